"""The data configuration: a typed view of MindSpeed-MM's ``data.json``.

The published LLaVA-1.5 ``data.json`` (MindSpeed-MM 1.0.RC3 and 2.3.0) loads unchanged apart from its
paths. Its layout, with the fields this package reads (everything else it accepts and ignores, see
``_IGNORED``)::

    dataset_param:
      basic_parameters:      data_path, data_folder            (+ valid_data_path, valid_data_folder,
                                                                  valid_fraction, index_cache_dir)
      preprocess_parameters:
        image_reader_type:   "CLIPImageProcessor"
        train_pipeline:      size, crop_size, resample, do_resize, do_center_crop, do_rescale,
                             rescale_factor, do_normalize, image_mean, image_std, do_convert_rgb,
                             pad2square                        (+ exif_transpose, max_image_pixels,
                                                                  jpeg_draft)
      tokenizer_config:      from_pretrained, model_max_length (optional), padding_side ("right")
      template_name:         "plain" / "llava-plain" / "vicuna_v1" / "lm"
      mm_use_im_start_end:   false                             (+ max_bad_fraction)
    dataloader_param:
      shuffle, drop_last, pin_memory, collate_param.pad_token_id,
      collate_param.model_max_length (optional)                (+ group_by_length, group_by_modality_length,
                                                                   sequence_packing)

Fields marked ``+`` are this package's additions. Relative paths are taken relative to the folder of
the ``data.json`` that names them, so a data set folder can be moved as a whole.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from pathlib import Path
from typing import Any, Optional

from .errors import DataError

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

TEMPLATE_ALIASES = {"plain": "plain", "llava-plain": "plain", "vicuna_v1": "vicuna_v1", "lm": "lm"}
"""Template names accepted in ``template_name`` and what they mean (MindSpeed-MM says ``llava-plain``)."""


PILLOW_FILTERS = (0, 1, 2, 3, 4, 5)  # NEAREST, LANCZOS, BILINEAR, BICUBIC, BOX, HAMMING


@dataclasses.dataclass
class ImagePreprocessConfig:
    """How an image file becomes a normalised ``[3, crop_height, crop_width]`` tensor.

    The defaults are ``openai/clip-vit-large-patch14-336``'s ``CLIPImageProcessor``: resize the shortest
    edge to 336 with bicubic resampling, centre-crop 336x336, scale by 1/255, normalise with the CLIP mean
    and standard deviation.
    """

    shortest_edge: Optional[int] = 336
    """Resize so the shorter side has this length (aspect kept); ``None`` with ``resize_height``/``_width``."""
    resize_height: Optional[int] = None
    """Resize to exactly this height (only when ``shortest_edge`` is ``None``)."""
    resize_width: Optional[int] = None
    """Resize to exactly this width (only when ``shortest_edge`` is ``None``)."""
    crop_height: int = 336
    """Height of the centre crop; the output height."""
    crop_width: int = 336
    """Width of the centre crop; the output width."""
    resample: int = 3
    """Pillow resampling filter (3 = bicubic, as CLIP)."""
    do_resize: bool = True
    do_center_crop: bool = True
    do_rescale: bool = True
    rescale_factor: float = 1 / 255
    do_normalize: bool = True
    image_mean: tuple[float, float, float] = OPENAI_CLIP_MEAN
    image_std: tuple[float, float, float] = OPENAI_CLIP_STD
    pad_to_square: bool = False
    """Original LLaVA's ``image_aspect_ratio="pad"``: paste the image on a square of the mean colour first
    (LLaVA-1.5 fine-tuning), instead of losing the borders to the centre crop (pre-training)."""
    exif_transpose: bool = False
    """Rotate by the EXIF orientation tag first. Off by default, as original LLaVA, which ignores it."""
    max_image_pixels: int = 89_478_485
    """Images with more pixels are decompression bombs and are replaced (Pillow's default limit)."""
    jpeg_draft: bool = False
    """Let libjpeg decode large JPEGs at 1/2, 1/4 or 1/8 scale (never below the resize target) before the
    bicubic resize. Several times faster on big photos, but no longer bit-equal to CLIPImageProcessor;
    off by default."""

    def __post_init__(self):
        if self.shortest_edge is None and not (self.resize_height and self.resize_width):
            raise DataError("image preprocessing: give size.shortest_edge, or size.height and size.width")
        if len(self.image_mean) != 3 or len(self.image_std) != 3:
            raise DataError("image preprocessing: image_mean and image_std need three values (RGB)")
        self.image_mean = tuple(float(v) for v in self.image_mean)
        self.image_std = tuple(float(v) for v in self.image_std)
        if not all(math.isfinite(v) for v in self.image_mean) or not all(math.isfinite(v) and v > 0
                                                                         for v in self.image_std):
            raise DataError(f"image preprocessing: image_std must be positive and image_mean finite, got "
                            f"mean {self.image_mean}, std {self.image_std} (a zero std divides every pixel by 0)")
        if self.resample not in PILLOW_FILTERS:
            raise DataError(f"image preprocessing: resample {self.resample!r} is not a Pillow filter; use one of "
                            f"{PILLOW_FILTERS} (3 = bicubic, as CLIP)")
        for name in ("crop_height", "crop_width", "shortest_edge", "resize_height", "resize_width"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise DataError(f"image preprocessing: {name} must be a whole number of pixels, got {value!r}")


@dataclasses.dataclass
class DataConfig:
    """Everything the data layer needs to know about one training data set."""

    data_path: str
    """The LLaVA JSON file: an array of ``{"id", "image", "conversations"}`` records (or JSON Lines)."""
    data_folder: str
    """Folder the records' ``image`` paths are relative to."""
    tokenizer_path: Optional[str] = None
    """Hugging Face tokenizer directory (``tokenizer_config.from_pretrained``)."""
    template: str = "plain"
    """``plain`` (stage 1), ``vicuna_v1`` (stage 2) or ``lm`` (text-only LM pre-training)."""
    model_max_length: Optional[int] = None
    """Longest sequence, counting each image as its image tokens; the training loop may override it."""
    image: ImagePreprocessConfig = dataclasses.field(default_factory=ImagePreprocessConfig)
    valid_data_path: Optional[str] = None
    """A separate validation file; otherwise ``valid_fraction`` of ``data_path`` is held out."""
    valid_data_folder: Optional[str] = None
    """Image folder of ``valid_data_path`` (default: ``data_folder``)."""
    valid_fraction: float = 0.0
    """Share of ``data_path`` held out for validation (a fixed, seed-independent choice of records)."""
    shuffle: bool = True
    """Shuffle the training records each epoch (deterministic from seed and epoch)."""
    drop_last: bool = True
    """Drop the records of an epoch that do not fill a whole global batch."""
    pin_memory: bool = True
    pad_token_id: Optional[int] = None
    """Padding id of ``input_ids``; default the tokenizer's pad token, else its unk token (as LLaVA)."""
    group_by_length: bool = False
    """Batch records of similar length together (less padding); still exact on resume."""
    group_by_modality_length: bool = False
    """Original LLaVA's option: samples with and without images in separate micro-batches, each grouped by
    length; still exact on resume."""
    sequence_packing: bool = False
    """Pack each step's samples into rows of the sequence length (``data.packing``; ``--sequence-packing``)."""
    max_bad_fraction: float = 0.01
    """Stop the run when more than this share of the samples seen so far had to be replaced."""
    index_cache_dir: Optional[str] = None
    """Where the record index is cached; default beside the JSON file, or the user cache if read-only."""

    def __post_init__(self):
        if self.template not in TEMPLATE_ALIASES:
            raise DataError(
                f"template_name {self.template!r} is not known; use one of {sorted(TEMPLATE_ALIASES)}"
            )
        self.template = TEMPLATE_ALIASES[self.template]
        if not 0.0 <= self.valid_fraction < 1.0:
            raise DataError(f"valid_fraction must be in [0, 1), got {self.valid_fraction}")
        if not 0.0 <= self.max_bad_fraction <= 1.0:
            raise DataError(f"max_bad_fraction must be in [0, 1], got {self.max_bad_fraction}")

    @property
    def has_validation(self) -> bool:
        """Whether a validation set is configured (a separate file, or a held-out share of data_path)."""
        return bool(self.valid_data_path or self.valid_fraction)


# Published MindSpeed-MM fields that do not change what this package does.
_IGNORED = {
    "dataset_param": {"dataset_type", "use_text_processer"},
    "preprocess_parameters": {"image_processer_type"},
    "train_pipeline": {"do_convert_rgb"},  # images are always converted to RGB, as original LLaVA does
    "tokenizer_config": {"hub_backend", "autotokenizer_name", "cache_dir", "use_fast"},
    "dataloader_param": {"dataloader_mode", "sampler_type", "batch_size", "num_workers"},
    "collate_param": {"model_name"},
}


def _section(parent: dict, name: str, where: str, known: set[str], required: bool = True) -> dict:
    value = parent.get(name)
    if value is None:
        if required:
            raise DataError(f"{where}: missing section {name!r}")
        return {}
    if not isinstance(value, dict):
        raise DataError(f"{where}: {name!r} must be an object, got {type(value).__name__}")
    unknown = set(value) - known - _IGNORED.get(name, set())
    if unknown:
        raise DataError(f"{where}: unknown field(s) in {name!r}: {sorted(unknown)} (known: {sorted(known)})")
    return value


def _resolve(path: Optional[str], base: Path) -> Optional[str]:
    if path is None:
        return None
    path = os.path.expanduser(str(path))
    return path if os.path.isabs(path) else str(base / path)


def _image_config(pipeline: dict, where: str) -> ImagePreprocessConfig:
    size = pipeline.get("size", {"shortest_edge": 336})
    crop = pipeline.get("crop_size", {"height": 336, "width": 336})
    if not isinstance(size, dict) or not isinstance(crop, dict):
        raise DataError(f"{where}: train_pipeline.size and crop_size must be objects like {{'shortest_edge': 336}}")
    fields = {
        "shortest_edge": size.get("shortest_edge"),
        "resize_height": size.get("height"),
        "resize_width": size.get("width"),
        "crop_height": crop.get("height", 336),
        "crop_width": crop.get("width", 336),
        "pad_to_square": pipeline.get("pad2square", False),
        "max_image_pixels": pipeline.get("max_image_pixels", ImagePreprocessConfig.max_image_pixels),
    }
    for name in ("resample", "do_resize", "do_center_crop", "do_rescale", "rescale_factor", "do_normalize",
                 "image_mean", "image_std", "exif_transpose", "jpeg_draft"):
        if name in pipeline:
            fields[name] = pipeline[name]
    return ImagePreprocessConfig(**fields)


def load_data_config(path: str | os.PathLike) -> DataConfig:
    """Read a MindSpeed-MM-style ``data.json``; errors name the file and the field to fix."""
    try:
        return _load_data_config(Path(path))
    except DataError:
        raise
    except (TypeError, ValueError, AttributeError, KeyError) as error:  # a JSON type no check below foresaw
        raise DataError(f"{path}: a field has the wrong type or shape ({type(error).__name__}: {error})") from None


def _load_data_config(path: Path) -> DataConfig:
    where = str(path)
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataError(f"{where}: no such data config file") from None
    except json.JSONDecodeError as error:
        raise DataError(f"{where}: line {error.lineno}, column {error.colno}: not valid JSON ({error.msg})") from None
    if not isinstance(raw, dict):
        raise DataError(f"{where}: expected a JSON object with 'dataset_param' and 'dataloader_param'")
    base = path.resolve().parent

    dataset = _section(raw, "dataset_param", where, {
        "basic_parameters", "preprocess_parameters", "tokenizer_config", "template_name",
        "mm_use_im_start_end", "max_bad_fraction"})
    basic = _section(dataset, "basic_parameters", where, {
        "data_path", "data_folder", "valid_data_path", "valid_data_folder", "valid_fraction", "index_cache_dir"})
    preprocess = _section(dataset, "preprocess_parameters", where, {"image_reader_type", "train_pipeline"},
                          required=False)
    pipeline = _section(preprocess, "train_pipeline", where, {
        "size", "crop_size", "resample", "do_resize", "do_center_crop", "do_rescale", "rescale_factor",
        "do_normalize", "image_mean", "image_std", "pad2square", "exif_transpose", "max_image_pixels",
        "jpeg_draft"}, required=False)
    tokenizer = _section(dataset, "tokenizer_config", where, {"from_pretrained", "model_max_length", "padding_side"},
                         required=False)
    loader = _section(raw, "dataloader_param", where, {"shuffle", "drop_last", "pin_memory", "collate_param",
                                                       "group_by_length", "group_by_modality_length",
                                                       "sequence_packing"}, required=False)
    collate = _section(loader, "collate_param", where, {"pad_token_id", "model_max_length"}, required=False)

    reader = preprocess.get("image_reader_type", "CLIPImageProcessor")
    if reader != "CLIPImageProcessor":
        raise DataError(f"{where}: image_reader_type {reader!r} is not supported; use 'CLIPImageProcessor'")
    if dataset.get("mm_use_im_start_end", False):
        raise DataError(f"{where}: mm_use_im_start_end=true is not supported (LLaVA-1.5 uses false)")
    if tokenizer.get("padding_side", "right") != "right":
        raise DataError(f"{where}: tokenizer_config.padding_side must be 'right' for training")
    for name in ("data_path", "data_folder"):
        if not basic.get(name):
            raise DataError(f"{where}: dataset_param.basic_parameters.{name} is required")

    try:
        return DataConfig(
            data_path=_resolve(basic["data_path"], base),
            data_folder=_resolve(basic["data_folder"], base),
            tokenizer_path=_resolve(tokenizer.get("from_pretrained"), base),
            template=dataset.get("template_name", "plain"),
            model_max_length=collate.get("model_max_length", tokenizer.get("model_max_length")),
            image=_image_config(pipeline, where),
            valid_data_path=_resolve(basic.get("valid_data_path"), base),
            valid_data_folder=_resolve(basic.get("valid_data_folder"), base),
            valid_fraction=float(basic.get("valid_fraction", 0.0)),
            shuffle=bool(loader.get("shuffle", True)),
            drop_last=bool(loader.get("drop_last", True)),
            pin_memory=bool(loader.get("pin_memory", True)),
            pad_token_id=collate.get("pad_token_id"),
            group_by_length=bool(loader.get("group_by_length", False)),
            group_by_modality_length=bool(loader.get("group_by_modality_length", False)),
            sequence_packing=bool(loader.get("sequence_packing", False)),
            max_bad_fraction=float(dataset.get("max_bad_fraction", 0.01)),
            index_cache_dir=_resolve(basic.get("index_cache_dir"), base),
        )
    except DataError as error:
        raise DataError(f"{where}: {error}") from None


def data_config_json(
    *,
    data_path: str,
    data_folder: str,
    tokenizer_path: str,
    template: str,
    image_size: int = 336,
    model_max_length: Optional[int] = None,
    pad2square: bool = False,
    valid_fraction: float = 0.0,
) -> dict[str, Any]:
    """A ``data.json`` in MindSpeed-MM's published layout (what ``mm-data synth`` writes)."""
    basic: dict[str, Any] = {"data_path": data_path, "data_folder": data_folder}
    if valid_fraction:
        basic["valid_fraction"] = valid_fraction
    tokenizer: dict[str, Any] = {
        "hub_backend": "hf",
        "autotokenizer_name": "AutoTokenizer",
        "from_pretrained": tokenizer_path,
        "cache_dir": None,
        "padding_side": "right",
        "use_fast": False,
    }
    if model_max_length is not None:
        tokenizer["model_max_length"] = model_max_length
    return {
        "dataset_param": {
            "dataset_type": "multimodal",
            "basic_parameters": basic,
            "preprocess_parameters": {
                "image_reader_type": "CLIPImageProcessor",
                "train_pipeline": {
                    "crop_size": {"height": image_size, "width": image_size},
                    "do_center_crop": True,
                    "do_convert_rgb": True,
                    "do_normalize": True,
                    "do_rescale": True,
                    "do_resize": True,
                    "pad2square": pad2square,
                    "image_mean": list(OPENAI_CLIP_MEAN),
                    "image_std": list(OPENAI_CLIP_STD),
                    "resample": 3,
                    "rescale_factor": 1 / 255,
                    "size": {"shortest_edge": image_size},
                },
            },
            "tokenizer_config": tokenizer,
            "use_text_processer": True,
            "template_name": template,
            "mm_use_im_start_end": False,
        },
        "dataloader_param": {
            "dataloader_mode": "sampler",
            "shuffle": True,
            "drop_last": True,
            "pin_memory": True,
            "sampler_type": "BaseRandomBatchSampler",
            "collate_param": {"model_name": "llava", "pad_token_id": 0},
        },
    }
