"""Image files to normalised pixel tensors, equal to ``CLIPImageProcessor`` and safe on dirty data.

The output equals original LLaVA's ``processor.preprocess(Image.open(path).convert("RGB"))`` with
Hugging Face's PIL-based CLIP processor (``CLIPImageProcessorPil`` in transformers 5): same resize size
rule, same Pillow bicubic resize, same centre crop (zero padding when the image is smaller than the crop),
same float arithmetic. (Transparency is dropped by ``convert("RGB")`` as in LLaVA's transformers 4; the
transformers 5 processor would composite a palette image's leftover transparency onto white.)

It gets there faster, with every step bit-equal to the processor's (:mod:`.fast_image` checks that on the
installed Pillow): JPEGs are decoded by simplejpeg (libjpeg-turbo with Pillow's settings); the resize
computes only the output pixels the centre crop keeps, with Pillow's fixed-point weights, in C; and the
normalisation is a 256-entry lookup table per channel, ``(float32(v * rescale) - mean) / std`` computed once
for every byte value ``v`` with the processor's own dtypes. Where a route is unavailable, Pillow and numpy
do the same steps.

Loading checks what can be wrong with a file before decoding it (path outside the data folder, missing,
empty, too many pixels) and turns every decode failure into a :class:`~mm_plugin.data.errors.BadSample`
with a reason.
"""

from __future__ import annotations

import os
import warnings
from typing import Optional, Union

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from ..safe_io import file_name_problem
from . import fast_image
from .config import ImagePreprocessConfig
from .errors import BadSample


def resolve_image_path(data_folder: str, relative: str, real_folder: Optional[str] = None) -> str:
    """The file an ``image`` entry names, refusing absolute paths and anything that leaves ``data_folder``."""
    _check_file_name(relative)
    if os.path.isabs(relative) or relative.startswith(("~", "\\")):
        raise BadSample("unsafe_image_path", f"{relative!r} is absolute; image paths are relative to data_folder")
    real_folder = real_folder or os.path.realpath(data_folder)
    path = os.path.join(real_folder, relative)
    real = os.path.realpath(path)  # resolves '..' and symlinks
    if real != real_folder and not real.startswith(real_folder + os.sep):
        raise BadSample("unsafe_image_path", f"{relative!r} resolves to {real}, outside data_folder {real_folder}")
    return real


def _check_file_name(path: str) -> None:
    """``BadSample`` for a name no file system can hold (os.stat would raise ValueError or UnicodeEncodeError)."""
    problem = file_name_problem(path)
    if problem:
        raise BadSample("unsafe_image_path", f"{path!r} {problem}")


def expand_to_square(pixels: np.ndarray, background: tuple[int, ...]) -> np.ndarray:
    """LLaVA's ``expand2square`` on ``[H, W, 3]`` pixels: centred on a square canvas of ``background``."""
    height, width = pixels.shape[:2]
    if width == height:
        return pixels
    side = max(width, height)
    canvas = np.empty((side, side, 3), dtype=np.uint8)
    canvas[:] = background
    top, left = (side - height) // 2, (side - width) // 2
    canvas[top:top + height, left:left + width] = pixels
    return canvas


class ImageProcessor:
    """Open, validate and preprocess images for one :class:`ImagePreprocessConfig`."""

    def __init__(self, config: ImagePreprocessConfig):
        self.config = config
        # Mean colour for pad_to_square, as LLaVA computes it: int(mean * 255) per channel.
        self.background = tuple(int(value * 255) for value in config.image_mean)
        self.table = self._normalisation_table(config)

    @staticmethod
    def _normalisation_table(config: ImagePreprocessConfig) -> np.ndarray:
        """``table[c, v]`` = the processor's output for byte value ``v`` in channel ``c`` (float32)."""
        values = np.arange(256, dtype=np.uint8)[None, :].repeat(3, axis=0)
        if config.do_rescale:  # transformers: multiply in float64, then cast to float32
            values = (values.astype(np.float64) * config.rescale_factor).astype(np.float32)
        else:
            values = values.astype(np.float32)
        if config.do_normalize:  # transformers: float32 (x - mean) / std with float32 mean and std
            mean = np.asarray(config.image_mean, dtype=np.float32)[:, None]
            std = np.asarray(config.image_std, dtype=np.float32)[:, None]
            values = (values - mean) / std
        return np.ascontiguousarray(values, dtype=np.float32)

    @property
    def output_size(self) -> tuple[int, int]:
        """``(height, width)`` of every preprocessed image."""
        if self.config.do_center_crop:
            return self.config.crop_height, self.config.crop_width
        if self.config.shortest_edge is None:
            return self.config.resize_height, self.config.resize_width
        raise ValueError("without centre crop, images keep their aspect ratio and have no common size")

    # -- opening --------------------------------------------------------------------------------------

    def open(self, path: str) -> Image.Image:
        """Open ``path`` as a decoded RGB image, or raise ``BadSample`` with the reason it cannot be used."""
        return self._open(path, draft=False)[0]

    def inspect(self, path: str) -> tuple[tuple[int, int], str]:
        """``(width, height)`` and original mode of a file that fully decodes and converts, else ``BadSample``."""
        _, size, mode = self._open(path, draft=False)
        return size, mode

    def _open(self, path: str, draft: bool, fast: bool = False
              ) -> tuple[Union[Image.Image, np.ndarray], tuple[int, int], str]:
        """The decoded RGB image, the ``(width, height)`` it has at full scale, and its original mode.

        ``fast``: a JPEG that simplejpeg decodes cleanly comes back as ``[H, W, 3]`` pixels (the same ones).
        """
        _check_file_name(path)
        try:
            size = os.stat(path).st_size
        except FileNotFoundError:
            raise BadSample("missing_image", f"{path}: no such file") from None
        except OSError as error:
            raise BadSample("missing_image", f"{path}: {error.strerror}") from None
        if size == 0:
            raise BadSample("empty_image_file", f"{path}: file is empty")
        with warnings.catch_warnings():
            # Pillow warns on large images (max_image_pixels decides below) and on palette images with
            # byte transparency (harmless: convert("RGB") takes the palette colours, as LLaVA does).
            warnings.simplefilter("ignore")
            try:
                image = Image.open(path)
            except UnidentifiedImageError:
                raise BadSample("not_an_image", f"{path}: not an image file Pillow can read") from None
            except Image.DecompressionBombError as error:
                raise BadSample("decompression_bomb", f"{path}: {error}") from None
            except Exception as error:  # noqa: BLE001 - any header failure is a broken file
                raise BadSample("corrupt_image", f"{path}: cannot read the header ({error})") from None
            full_size = image.size
            width, height = full_size
            if width * height > self.config.max_image_pixels:
                image.close()
                raise BadSample("decompression_bomb", f"{path}: {width}x{height} = {width * height} pixels exceeds "
                                f"max_image_pixels={self.config.max_image_pixels}")
            try:
                if fast and image.format == "JPEG" and image.mode in ("RGB", "L"):
                    image.fp.seek(0)  # the file Pillow opened for the header (its load() seeks for itself)
                    pixels = fast_image.decode_jpeg(image.fp.read())
                    if pixels is not None:
                        image.close()
                        return pixels, full_size, image.mode
                if draft and image.format == "JPEG":
                    # libjpeg picks the largest 1/2^k reduction that keeps both sides >= the resize target.
                    image.draft("RGB", self.resize_size(width, height))
                image.load()
                if self.config.exif_transpose:
                    image = ImageOps.exif_transpose(image)
                    full_size = image.size
                # Original LLaVA: Image.open(path).convert("RGB"), no alpha compositing.
                mode = image.mode
                return (image if mode == "RGB" else image.convert("RGB")), full_size, mode
            except Image.DecompressionBombError as error:
                raise BadSample("decompression_bomb", f"{path}: {error}") from None
            except Exception as error:  # noqa: BLE001 - truncated data, bad tables, decoder errors
                raise BadSample("corrupt_image", f"{path}: cannot decode ({error})") from None

    # -- preprocessing --------------------------------------------------------------------------------

    def resize_size(self, width: int, height: int) -> tuple[int, int]:
        """``(width, height)`` after resizing, by transformers' ``get_resize_output_image_size`` rule."""
        edge = self.config.shortest_edge
        if edge is None:
            return self.config.resize_width, self.config.resize_height
        if width <= height:
            return edge, int(edge * height / width)
        return int(edge * width / height), edge

    def crop_box(self, width: int, height: int) -> Optional[tuple[int, int, int, int]]:
        """``(left, top, width, height)`` the centre crop keeps of a ``width`` x ``height`` image (all of it
        without crop); None when the image is smaller than the crop (the processor then zero-pads)."""
        config = self.config
        if not config.do_center_crop:
            return 0, 0, width, height
        top, left = (height - config.crop_height) // 2, (width - config.crop_width) // 2
        if top < 0 or left < 0:
            return None
        return left, top, config.crop_width, config.crop_height

    def preprocess(self, image: Union[Image.Image, np.ndarray], full_size: Optional[tuple[int, int]] = None
                   ) -> torch.Tensor:
        """A decoded RGB image (PIL, or ``[H, W, 3]`` uint8 pixels) to a float32 ``[3, H, W]`` tensor.

        ``full_size`` is the image's size before a JPEG draft decode, so the resize target (and so the
        output) is the one the full-scale image would get.
        """
        config = self.config
        if config.pad_to_square:
            image = expand_to_square(np.asarray(image), self.background)
        width, height = image.size if isinstance(image, Image.Image) else (image.shape[1], image.shape[0])
        target = self.resize_size(*(full_size or (width, height))) if config.do_resize else (width, height)
        crop = self.crop_box(*target)
        if crop is not None and config.resample == Image.BICUBIC:
            out = fast_image.resize_crop_normalize(np.asarray(image), target, crop, self.table)
            if out is not None:
                return torch.from_numpy(out)
        if target != (width, height):
            if not isinstance(image, Image.Image):
                image = Image.fromarray(image)
            image = image.resize(target, resample=config.resample)
        pixels = np.asarray(image)
        if config.do_center_crop:
            pixels = center_crop(pixels, config.crop_height, config.crop_width)
        out = np.empty((3,) + pixels.shape[:2], dtype=np.float32)
        for channel in range(3):
            np.take(self.table[channel], np.ascontiguousarray(pixels[:, :, channel]), out=out[channel])
        return torch.from_numpy(out)

    def load(self, path: str) -> torch.Tensor:
        """Open, validate and preprocess one image file."""
        config = self.config
        draft = config.jpeg_draft and config.do_resize and not (config.pad_to_square or config.exif_transpose)
        image, full_size, _ = self._open(path, draft, fast=not (draft or config.exif_transpose))
        return self.preprocess(image, full_size if draft else None)


def center_crop(pixels: np.ndarray, height: int, width: int) -> np.ndarray:
    """transformers' ``center_crop`` on an ``[H, W, C]`` array, including its zero padding of small images."""
    in_height, in_width = pixels.shape[:2]
    top, left = (in_height - height) // 2, (in_width - width) // 2
    if top >= 0 and left >= 0:
        return pixels[top:top + height, left:left + width]
    padded_height, padded_width = max(height, in_height), max(width, in_width)
    padded = np.zeros((padded_height, padded_width) + pixels.shape[2:], dtype=pixels.dtype)
    pad_top, pad_left = -(-(padded_height - in_height) // 2), -(-(padded_width - in_width) // 2)
    padded[pad_top:pad_top + in_height, pad_left:pad_left + in_width] = pixels
    top, left = top + pad_top, left + pad_left
    return padded[max(0, top):max(0, top) + height, max(0, left):max(0, left) + width]

