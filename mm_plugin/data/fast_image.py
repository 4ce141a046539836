"""Faster routes to exactly the pixels Pillow gives: JPEG decoding with simplejpeg, and resize + crop +
normalisation in one C call (``_resample.c``).

Both are optional (simplejpeg is a dependency, the C extension is built at install when a compiler is
there) and both must equal what the installed Pillow computes, byte for byte. That is checked once per
process on small generated images; a route that disagrees (another libjpeg-turbo, a compiler that fuses
multiply-adds) is switched off with a warning, and Pillow does the work.
"""

from __future__ import annotations

import functools
import io
import warnings
from typing import Optional

import numpy as np
import PIL
from packaging.version import Version
from PIL import Image

try:
    from mm_plugin.data import _resample
except ImportError:  # installed without a C compiler
    _resample = None
try:
    import simplejpeg
except ImportError:
    simplejpeg = None

# Pillow 13 runs the vertical pass first when the height shrinks by more than twice what the width does.
_PILLOW_MAY_RESIZE_VERTICALLY_FIRST = Version(PIL.__version__) >= Version("13")


def pillow_vertical_first(width: int, height: int, out_width: int, out_height: int) -> bool:
    """Whether the installed Pillow's resize runs its vertical pass first for this size change."""
    shrink = height - out_height
    return _PILLOW_MAY_RESIZE_VERTICALLY_FIRST and shrink > 0 and shrink > (width - out_width) * 2


def decode_jpeg(data: bytes) -> Optional[np.ndarray]:
    """``[H, W, 3]`` uint8 RGB of a baseline or progressive YCbCr/grayscale JPEG, or None where this route is
    off or the data is anything simplejpeg will not decode cleanly (the caller then lets Pillow decide)."""
    return _decode_jpeg(data) if jpeg_route_agrees() else None


def _decode_jpeg(data: bytes) -> Optional[np.ndarray]:
    """simplejpeg with Pillow's settings (exact DCT and upsampling); None where it will not decode cleanly."""
    try:
        return simplejpeg.decode_jpeg(data, colorspace="RGB", fastdct=False, fastupsample=False, strict=True)
    except (ValueError, RuntimeError):
        return None


def resize_crop_normalize(pixels: np.ndarray, size: tuple[int, int], crop: tuple[int, int, int, int],
                          table: np.ndarray) -> Optional[np.ndarray]:
    """Bicubic resize of RGB ``pixels`` to ``size`` (width, height), the ``crop`` (left, top, width, height)
    of it, through ``table`` [3, 256] -> float32 ``[3, crop height, crop width]``; None where the route is off."""
    if not resample_route_agrees():
        return None
    return _resize_crop_normalize(pixels, size, crop, table)


def _resize_crop_normalize(pixels, size, crop, table) -> np.ndarray:
    height, width = pixels.shape[:2]
    left, top, crop_width, crop_height = crop
    out = np.empty((3, crop_height, crop_width), dtype=np.float32)
    _resample.resize_crop_normalize(np.ascontiguousarray(pixels), height, width, size[0], size[1], left, top,
                                    crop_width, crop_height, pillow_vertical_first(width, height, *size),
                                    np.ascontiguousarray(table, dtype=np.float32), out)
    return out


def _test_image(height: int, width: int, seed: int) -> np.ndarray:
    """Noise over smooth gradients: exercises every rounding of the resize and JPEG's chroma upsampling."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    smooth = np.stack([x * 255 / width, y * 255 / height, (x + y) * 127 / (width + height)], axis=-1)
    return np.clip(smooth + rng.normal(0, 40, smooth.shape), 0, 255).astype(np.uint8)


@functools.lru_cache(maxsize=None)
def resample_route_agrees() -> bool:
    if _resample is None:
        return False
    identity = np.tile(np.arange(256, dtype=np.float32), (3, 1))
    # Down- and upscaling, both of Pillow 13's pass orders (the last two: height shrinks most), one
    # dimension unchanged, odd crops.
    cases = [((61, 97), (40, 63), (3, 5, 33, 50)), ((150, 47), (90, 30), (10, 0, 70, 30)),
             ((40, 90), (40, 150), (0, 20, 40, 100)), ((33, 20), (120, 70), (7, 2, 100, 60)),
             ((200, 64), (60, 19), (0, 0, 60, 19)), ((64, 200), (60, 40), (5, 3, 50, 30)),
             ((45, 130), (45, 50), (0, 10, 45, 40))]
    for seed, ((width, height), size, crop) in enumerate(cases):
        pixels = _test_image(height, width, seed)
        left, top, crop_width, crop_height = crop
        expected = np.asarray(Image.fromarray(pixels).resize(size, Image.BICUBIC))
        expected = expected[top:top + crop_height, left:left + crop_width].transpose(2, 0, 1)
        if not np.array_equal(_resize_crop_normalize(pixels, size, crop, identity), expected):
            warnings.warn(f"mm_plugin's C resize differs from Pillow {PIL.__version__}'s on this machine; "
                          "images are resized with Pillow (same result, slower)", RuntimeWarning, stacklevel=2)
            return False
    return True


@functools.lru_cache(maxsize=None)
def jpeg_route_agrees() -> bool:
    if simplejpeg is None:
        return False
    for seed, (mode, subsampling) in enumerate((("RGB", 2), ("RGB", 1), ("RGB", 0), ("L", 0))):
        image = Image.fromarray(_test_image(45, 67, seed))
        image = image.convert(mode)
        encoded = io.BytesIO()
        image.save(encoded, format="JPEG", quality=90, subsampling=subsampling, progressive=seed % 2 == 1)
        data = encoded.getvalue()
        expected = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
        decoded = _decode_jpeg(data)
        if decoded is None or not np.array_equal(decoded, expected):
            warnings.warn(f"simplejpeg {simplejpeg.__version__} decodes JPEGs differently from Pillow "
                          f"{PIL.__version__} on this machine; JPEGs are decoded with Pillow (same result, slower)",
                          RuntimeWarning, stacklevel=2)
            return False
    return True
