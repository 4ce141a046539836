"""The inference configuration: MindSpeed-MM's published ``inference_llava.json``, typed.

Its fields, and what each does here::

    model_id, text_decoder, image_encoder,     the model, as in model.json (each part's ckpt_path: a
    text_encoder, video_encoder                part file or a training checkpoint directory)
    pipeline_class                             "LlavaPipeline" (the only one)
    dtype                                      fp32 / bf16 / fp16 for every part (default: each part's params_dtype)
    device                                     accepted without effect: the device is chosen at run time
    tokenizer.from_pretrained                  Hugging Face tokenizer directory (other tokenizer fields ignored)
    generation_config                          see mm_plugin.inference.sampling.GenerationConfig
    image_processer_path                       a CLIPImageProcessor directory (preprocessor_config.json)
    image_path, prompts                        a path / prompt, or lists of them (see ``queries``)
  and this package's additions:
    template                                   vicuna_v1 (default), plain or raw
    image_aspect_ratio                         pad (LLaVA-1.5's: pad to a square of the mean colour, the
                                               default) or crop (the processor's centre crop only)

Relative paths are taken from the JSON's folder; a path that does not exist there but does from the
working directory is taken from there (MindSpeed-MM's scripts name paths from the repository root).
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Optional, Union

from mm_plugin.config.model import LlavaConfig, ModelConfigError, from_mindspeed_json
from mm_plugin.config.names import DTYPES, LANGUAGE, PROJECTOR, VISION
from mm_plugin.data.config import ImagePreprocessConfig
from mm_plugin.inference.prompts import TEMPLATES
from mm_plugin.inference.sampling import GenerationConfig, GenerationConfigError

logger = logging.getLogger(__name__)

MODEL_FIELDS = ("model_id", LANGUAGE.json_key, "image_encoder", "text_encoder", "video_encoder", "attention_backend")
_DTYPE_NAMES = {"fp32": "fp32", "float32": "fp32", "bf16": "bf16", "bfloat16": "bf16", "fp16": "fp16",
                "float16": "fp16"}


class InferenceConfigError(ValueError):
    """An inference JSON that cannot be used, with the field to fix."""


@dataclasses.dataclass
class Query:
    """One question: its prompt text and the images it is about (paths or PIL images)."""

    prompt: str
    images: list = dataclasses.field(default_factory=list)
    reference: Optional[str] = None
    """A known answer, printed beside the generated one (the demo's held-out captions)."""


@dataclasses.dataclass
class InferenceConfig:
    model: LlavaConfig
    tokenizer: str
    """Hugging Face tokenizer directory."""
    image: ImagePreprocessConfig
    generation: GenerationConfig
    template: str = "vicuna_v1"
    queries: list[Query] = dataclasses.field(default_factory=list)
    source: str = "inference config"


def load_inference_config(path: Union[str, Path]) -> InferenceConfig:
    path = Path(path)
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        raise InferenceConfigError(f"{path}: no such inference config") from None
    except json.JSONDecodeError as error:
        raise InferenceConfigError(f"{path}: not valid JSON (line {error.lineno}, column {error.colno}: "
                                   f"{error.msg})") from None
    return parse_inference_config(raw, path.parent, str(path))


def parse_inference_config(raw: dict, base: Path, source: str) -> InferenceConfig:
    try:
        return _parse_inference_config(raw, base, source)
    except (InferenceConfigError, GenerationConfigError):
        raise
    except (TypeError, ValueError, AttributeError, KeyError) as error:  # a JSON type no check foresaw
        raise InferenceConfigError(f"{source}: a field has the wrong type or shape ({type(error).__name__}: "
                                   f"{error})") from None


def _parse_inference_config(raw: dict, base: Path, source: str) -> InferenceConfig:
    known = set(MODEL_FIELDS) | {"pipeline_class", "dtype", "device", "tokenizer", "generation_config",
                                 "image_processer_path", "image_path", "prompts", "template", "image_aspect_ratio"}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise InferenceConfigError(f"{source}: unknown field(s) {unknown}")
    if raw.get("pipeline_class", "LlavaPipeline") != "LlavaPipeline":
        raise InferenceConfigError(f"{source}: pipeline_class {raw['pipeline_class']!r}: only LlavaPipeline is offered")
    resolve = _Resolver(base)
    model = model_config(raw, source, resolve)
    tokenizer = (raw.get("tokenizer") or {}).get("from_pretrained")
    if not tokenizer:
        raise InferenceConfigError(f"{source}: tokenizer.from_pretrained: give the tokenizer directory")
    processor = raw.get("image_processer_path") and resolve(raw["image_processer_path"])
    _check_paths(source, model, resolve(tokenizer), processor)
    template = raw.get("template", "vicuna_v1")
    if template not in TEMPLATES:
        raise InferenceConfigError(f"{source}: template {template!r}: use one of {', '.join(TEMPLATES)}")
    return InferenceConfig(
        model=model,
        tokenizer=resolve(tokenizer),
        image=image_config(processor, raw.get("image_aspect_ratio", "pad"), model, source),
        generation=GenerationConfig.from_dict(raw.get("generation_config") or {"max_new_tokens": 256},
                                              f"{source}: generation_config"),
        template=template,
        queries=queries(raw.get("image_path"), raw.get("prompts"), resolve, source),
        source=source,
    )


def _check_paths(source: str, model: LlavaConfig, tokenizer: str, processor: Optional[str]) -> None:
    """Every file and folder the config names exists; else one error listing all that do not."""
    named = [(f"{part.json_key}.ckpt_path", getattr(model, part.field).ckpt_path)
             for part in (LANGUAGE, VISION, PROJECTOR)]
    named += [("tokenizer.from_pretrained", tokenizer), ("image_processer_path", processor)]
    missing = [f"{field} {path}" for field, path in named if path and not Path(path).exists()]
    if missing:
        raise InferenceConfigError(
            f"{source}: these paths do not exist: {'; '.join(missing)}. `mm-convert llava-hf --input "
            "llava-1.5-7b-hf --output DIR` writes all of them (DIR/converted_*.pt, DIR/mlp.pt, DIR/tokenizer); a "
            "part's ckpt_path may also name a training checkpoint directory (--save of launch/pretrain.py)")


class _Resolver:
    def __init__(self, base: Path):
        self.base = base

    def __call__(self, value: str) -> str:
        path = Path(value).expanduser()
        if path.is_absolute():
            return str(path)
        beside = self.base / path
        return str(path.resolve() if not beside.exists() and path.exists() else beside.resolve())


def model_config(raw: dict, source: str, resolve=None) -> LlavaConfig:
    """The model sections, as model.json; ``dtype`` (all parts) and the inference-only field
    ``text_decoder.is_encoder_decoder`` (must be false) applied here."""
    sections = {key: raw[key] for key in MODEL_FIELDS if key in raw}
    if isinstance(sections.get(LANGUAGE.json_key), dict):  # anything else: from_mindspeed_json names it
        decoder = dict(sections[LANGUAGE.json_key])
        if decoder.pop("is_encoder_decoder", False) is not False:
            raise InferenceConfigError(f"{source}: text_decoder.is_encoder_decoder: LLaVA's decoder is decoder-only")
        sections[LANGUAGE.json_key] = decoder
    try:
        config = from_mindspeed_json(sections, source)
    except ModelConfigError as error:
        raise InferenceConfigError(str(error)) from None
    dtype = raw.get("dtype")
    if dtype is not None:
        if dtype not in _DTYPE_NAMES:
            raise InferenceConfigError(f"{source}: dtype {dtype!r}: use one of {sorted(_DTYPE_NAMES)}")
        set_dtype(config, _DTYPE_NAMES[dtype])
    for part in (config.vision, config.projector, config.language):
        if part.ckpt_path and resolve is not None:
            part.ckpt_path = resolve(part.ckpt_path)
    return config


def set_dtype(config: LlavaConfig, dtype: str) -> None:
    """Run every part in ``dtype``; fused fp16/bf16 flags of a part follow it."""
    assert dtype in DTYPES
    for part in (config.vision, config.projector, config.language):
        part.params_dtype = dtype
        for flag in ("fp16", "bf16"):
            part.transformer_overrides.pop(flag, None)


def image_config(processor_dir: Optional[str], aspect_ratio: str, model: LlavaConfig, source: str
                 ) -> ImagePreprocessConfig:
    """From a ``CLIPImageProcessor`` directory, else CLIP's defaults at the vision tower's image size."""
    if aspect_ratio not in ("pad", "crop"):
        raise InferenceConfigError(f"{source}: image_aspect_ratio {aspect_ratio!r}: use pad or crop")
    size = model.vision.image_size
    fields = dict(shortest_edge=size, crop_height=size, crop_width=size)
    if processor_dir:
        fields.update(_processor_fields(*_read_processor(Path(processor_dir), source)))
    config = ImagePreprocessConfig(**fields, pad_to_square=aspect_ratio == "pad")
    if (config.crop_height, config.crop_width) != (size, size):
        raise InferenceConfigError(f"{source}: the image processor crops {config.crop_height}x{config.crop_width}, "
                                   f"the vision tower takes {size}x{size}")
    return config


def has_image_processor(directory: Path) -> bool:
    return any((directory / name).is_file() for name in ("preprocessor_config.json", "processor_config.json"))


def _read_processor(directory: Path, source: str) -> tuple[dict, str]:
    """A CLIPImageProcessor's settings: ``preprocessor_config.json``, or the ``image_processor`` section of
    transformers 5's ``processor_config.json``."""
    file = directory / "preprocessor_config.json"
    if file.is_file():
        return json.loads(file.read_text()), str(file)
    file = directory / "processor_config.json"
    if file.is_file() and isinstance(json.loads(file.read_text()).get("image_processor"), dict):
        return json.loads(file.read_text())["image_processor"], str(file)
    raise InferenceConfigError(f"{source}: image_processer_path: {directory} holds no preprocessor_config.json "
                               "(nor a processor_config.json with an image_processor section)")


def _processor_fields(processor: dict, source: str) -> dict:
    """``preprocessor_config.json`` of a CLIPImageProcessor -> ImagePreprocessConfig fields."""
    fields = {}
    size = processor.get("size", {})
    if isinstance(size, int):
        size = {"shortest_edge": size}
    if "shortest_edge" in size:
        fields["shortest_edge"] = size["shortest_edge"]
    elif {"height", "width"} <= set(size):
        fields.update(shortest_edge=None, resize_height=size["height"], resize_width=size["width"])
    crop = processor.get("crop_size", {})
    if isinstance(crop, int):
        crop = {"height": crop, "width": crop}
    if crop:
        fields.update(crop_height=crop["height"], crop_width=crop["width"])
    for name in ("do_resize", "do_center_crop", "do_rescale", "rescale_factor", "do_normalize", "image_mean",
                 "image_std", "resample"):
        if name in processor:
            fields[name] = processor[name]
    logger.info("%s: image preprocessing %s", source, fields)
    return fields


def queries(image_path, prompts, resolve, source: str) -> list[Query]:
    """Pair ``image_path`` with ``prompts``.

    Each may be one value or a list; an ``image_path`` entry may itself be a list (several images for
    one prompt) or null (a text-only prompt). Lists of equal length pair up; a single value goes with
    every entry of the other.
    """
    images = image_path if isinstance(image_path, list) else ([] if image_path is None else [image_path])
    texts = prompts if isinstance(prompts, list) else ([] if prompts is None else [prompts])
    if not texts:
        return []
    if len(images) <= 1:
        images = images * len(texts) or [None] * len(texts)
    if len(texts) == 1:
        texts = texts * len(images)
    if len(images) != len(texts):
        raise InferenceConfigError(f"{source}: {len(images)} image_path entries for {len(texts)} prompts; give one "
                                   "of each, equal numbers, or one of either for all of the other")
    result = []
    for entry, text in zip(images, texts):
        paths = entry if isinstance(entry, list) else ([] if entry is None else [entry])
        result.append(Query(str(text), [resolve(p) for p in paths]))
    return result
