"""The LLaVA-1.5 model configuration: one dataclass per part, presets, and MindSpeed-MM's ``model.json``.

``load_model_config(path_or_preset)`` accepts a preset name (``"llava-1.5-7b"``, ``"llava-1.5-13b"``,
``"tiny"``) or a ``model.json`` in MindSpeed-MM's published layout (``text_decoder``,
``image_encoder.vision_encoder``, ``image_encoder.vision_projector``, ``freeze``, ``ckpt_path``, plus
Megatron ``TransformerConfig`` fields). Every field is used, passed to megatron-core's
``TransformerConfig``, or accepted and logged as without effect here; any other field is an error
that names it. Fields that would silently change the math (a causal CLIP, a tanh GELU) are errors too.

The vision feature layer can be stated two ways, which give the same model:
* MindSpeed-MM's: ``num_layers: 23`` and no ``select_layer`` — the layers built, the last one's
  output is the feature;
* LLaVA's: ``num_layers: 24, select_layer: -2`` — the tower's depth and the Hugging Face
  ``hidden_states`` index of the feature; layers after it are not built.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import typing
from pathlib import Path
from typing import Any, Optional

from mm_plugin.config.names import DTYPES, LANGUAGE, PROJECTOR, PROJECTOR_MODEL_IDS, VISION
from mm_plugin.safe_io import file_name_problem

logger = logging.getLogger(__name__)



class ModelConfigError(ValueError):
    """A model.json (or preset override) that cannot describe a LLaVA-1.5 model."""


@dataclasses.dataclass
class VisionEncoderConfig:
    """CLIP ViT: conv patch embedding (no bias), class token, learned positions, ``ln_pre``, pre-LN
    blocks with biases and quick-GELU, no attention mask, no ``ln_post``."""

    num_layers: int = 24
    """Transformer layers: of the whole tower when ``select_layer`` is set, else the layers built."""
    select_layer: Optional[int] = -2
    """Hugging Face ``hidden_states`` index of the feature (-2: penultimate layer); None: last built layer."""
    select_feature: str = "patch"
    """``patch`` drops the class token from the features (LLaVA-1.5); ``cls_patch`` keeps it."""
    hidden_size: int = 1024
    num_attention_heads: int = 16
    ffn_hidden_size: int = 4096
    kv_channels: Optional[int] = None
    image_size: int = 336
    patch_size: int = 14
    class_token_len: int = 1
    layernorm_epsilon: float = 1e-5
    params_dtype: str = "fp32"
    freeze: bool = True
    ckpt_path: Optional[str] = None
    transformer_overrides: dict = dataclasses.field(default_factory=dict)
    """Further megatron ``TransformerConfig`` fields (dropout, recompute, fusions) from model.json."""

    @property
    def num_layers_built(self) -> int:
        if self.select_layer is None:
            return self.num_layers
        built = self.select_layer if self.select_layer > 0 else self.num_layers + 1 + self.select_layer
        if not 1 <= built <= self.num_layers:
            raise ModelConfigError(
                f"vision_encoder.select_layer={self.select_layer} selects no transformer layer of a "
                f"{self.num_layers}-layer tower (use -1..-{self.num_layers} or 1..{self.num_layers})"
            )
        return built

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def num_image_tokens(self) -> int:
        """Positions one image occupies in the language model's sequence."""
        return self.num_patches + (self.class_token_len if self.select_feature == "cls_patch" else 0)


@dataclasses.dataclass
class ProjectorConfig:
    """Vision features -> language model embeddings."""

    projector_type: str = "mlp2x_gelu"
    """``mlp2x_gelu`` (Linear + exact GELU + Linear, LLaVA-1.5), ``linear`` or ``identity``."""
    ffn_hidden_size: Optional[int] = None
    """Width between the two linears of ``mlp2x_gelu`` (default: the language model's hidden size)."""
    params_dtype: str = "fp32"
    freeze: bool = False
    ckpt_path: Optional[str] = None
    transformer_overrides: dict = dataclasses.field(default_factory=dict)


LORA_TARGETS = ("linear_qkv", "linear_proj", "linear_fc1", "linear_fc2", "output_layer")
"""The language model's linear layers an adapter can sit on: fused QKV, attention output, gate+up, down in
every decoder layer, and the output layer (PEFT's ``lm_head``)."""
DEFAULT_LORA_TARGETS = LORA_TARGETS[:4]
"""LLaVA's recipe: every linear of the decoder layers; the output layer stays as it is."""


@dataclasses.dataclass
class LoraConfig:
    """Low-rank adapters on the language model's linear layers (``text_decoder.lora`` in model.json): each
    target ``W`` computes ``W x + (alpha / rank) B A dropout(x)``, ``A`` random, ``B`` zero at the start; the
    base weights stay frozen."""

    rank: int = 128
    alpha: float = 256.0
    dropout: float = 0.05
    targets: tuple[str, ...] = DEFAULT_LORA_TARGETS

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank


@dataclasses.dataclass
class LanguageModelConfig:
    """LLaMA / Vicuna decoder: RMSNorm, SwiGLU, RoPE, no biases, untied output layer."""

    num_layers: int = 32
    hidden_size: int = 4096
    num_attention_heads: int = 32
    num_query_groups: Optional[int] = None
    ffn_hidden_size: int = 11008
    kv_channels: Optional[int] = None
    vocab_size: int = 32000
    """Rows of the embedding: 32000 for Vicuna, 32064 for llava-1.5-7b-hf (padding rows kept)."""
    max_sequence_length: int = 4096
    layernorm_epsilon: float = 1e-5
    """RMSNorm epsilon: Hugging Face ``rms_norm_eps`` (1e-5 for Vicuna-7B v1.5 and LLaVA-1.5)."""
    rotary_base: float = 10000.0
    params_dtype: str = "fp32"
    freeze: bool = True
    ckpt_path: Optional[str] = None
    lora: Optional[LoraConfig] = None
    """Train low-rank adapters instead of the weights themselves (which then stay frozen)."""
    transformer_overrides: dict = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class LlavaConfig:
    vision: VisionEncoderConfig = dataclasses.field(default_factory=VisionEncoderConfig)
    projector: ProjectorConfig = dataclasses.field(default_factory=ProjectorConfig)
    language: LanguageModelConfig = dataclasses.field(default_factory=LanguageModelConfig)
    attention_backend: str = "auto"
    """Core attention: ``sdpa`` (PyTorch scaled_dot_product_attention: flash kernels on GPU),
    ``local`` (megatron-core's DotProductAttention, which MindSpeed replaces on NPU) or ``auto``
    (``local`` on NPU, ``sdpa`` elsewhere)."""
    source: str = "preset"
    """Where this config came from (preset name or file), for error messages."""

    def validate(self) -> "LlavaConfig":
        for part in (self.vision, self.projector, self.language):
            if part.params_dtype not in DTYPES:
                raise ModelConfigError(f"{self.source}: params_dtype {part.params_dtype!r}: use one of {DTYPES}")
        self.vision.num_layers_built  # noqa: B018  (raises on a bad select_layer)
        if self.vision.select_feature not in ("patch", "cls_patch"):
            raise ModelConfigError(f"{self.source}: select_feature {self.vision.select_feature!r}: use patch or cls_patch")
        if self.projector.projector_type not in PROJECTOR_MODEL_IDS:
            raise ModelConfigError(
                f"{self.source}: projector type {self.projector.projector_type!r}: use mlp2x_gelu, linear or identity"
            )
        if self.projector.projector_type == "identity" and self.vision.hidden_size != self.language.hidden_size:
            raise ModelConfigError(
                f"{self.source}: an identity projector needs vision hidden_size ({self.vision.hidden_size}) "
                f"== language hidden_size ({self.language.hidden_size})"
            )
        for part_name, part in ((VISION.json_key, self.vision), (LANGUAGE.json_key, self.language)):
            if part.hidden_size % part.num_attention_heads:
                raise ModelConfigError(
                    f"{self.source}: {part_name}.hidden_size {part.hidden_size} is not a multiple of "
                    f"num_attention_heads {part.num_attention_heads}"
                )
        groups = self.language.num_query_groups or self.language.num_attention_heads
        if self.language.num_attention_heads % groups:
            raise ModelConfigError(
                f"{self.source}: text_decoder.num_attention_heads {self.language.num_attention_heads} is not a "
                f"multiple of num_query_groups {groups}"
            )
        if self.attention_backend not in ("auto", "sdpa", "local"):
            raise ModelConfigError(f"{self.source}: attention_backend {self.attention_backend!r}: use auto, sdpa or local")
        lora = self.language.lora
        if lora is not None:
            if self.language.freeze:
                raise ModelConfigError(f"{self.source}: text_decoder.lora trains adapters of the language model, but "
                                       "text_decoder.freeze is true; set it false (under LoRA the weights themselves "
                                       "stay frozen)")
            smallest = min(self.language.hidden_size, self.language.ffn_hidden_size)
            if lora.rank > smallest:
                raise ModelConfigError(f"{self.source}: text_decoder.lora.rank {lora.rank} exceeds the narrowest side "
                                       f"of the layers it adapts ({smallest}); a low-rank adapter needs rank <= "
                                       f"{smallest}")
        return self

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}


def parameter_bytes(config: LlavaConfig) -> dict[str, int]:
    """Bytes of each part's parameters as built (vision layers up to the feature layer, unpadded vocabulary):
    what a model.json asks for, computed before anything is allocated."""
    vision, language = config.vision, config.language
    h, f = vision.hidden_size, vision.ffn_hidden_size
    vision_layer = 4 * h * h + 4 * h + 2 * h * f + f + h + 4 * h  # qkv + proj with biases, fc1/fc2, two norms
    vision_count = (3 * vision.patch_size ** 2 * h + h + (vision.num_patches + vision.class_token_len) * h + 2 * h
                    + vision.num_layers_built * vision_layer)
    width = config.projector.ffn_hidden_size or language.hidden_size
    projector_count = {"mlp2x_gelu": h * width + width + width * language.hidden_size + language.hidden_size,
                       "linear": h * language.hidden_size + language.hidden_size, "identity": 0}
    d = language.hidden_size
    channels = language.kv_channels or d // language.num_attention_heads
    groups = language.num_query_groups or language.num_attention_heads
    language_layer = (d * channels * (language.num_attention_heads + 2 * groups) + language.num_attention_heads
                      * channels * d + 3 * d * language.ffn_hidden_size + 2 * d)
    language_count = 2 * language.vocab_size * d + language.num_layers * language_layer + d
    return {"vision": vision_count * DTYPE_BYTES[vision.params_dtype],
            "projector": projector_count[config.projector.projector_type] * DTYPE_BYTES[config.projector.params_dtype],
            "language": language_count * DTYPE_BYTES[language.params_dtype]}


def _preset_7b() -> LlavaConfig:
    return LlavaConfig(source="llava-1.5-7b")


def _preset_13b() -> LlavaConfig:
    return LlavaConfig(
        language=LanguageModelConfig(num_layers=40, hidden_size=5120, num_attention_heads=40, ffn_hidden_size=13824),
        source="llava-1.5-13b",
    )


def _preset_tiny() -> LlavaConfig:
    """A model that trains in seconds on a CPU: the demo's and the tests' default."""
    return LlavaConfig(
        vision=VisionEncoderConfig(num_layers=3, select_layer=-2, hidden_size=64, num_attention_heads=4,
                                   ffn_hidden_size=128, image_size=56, patch_size=14),
        language=LanguageModelConfig(num_layers=2, hidden_size=64, num_attention_heads=4, num_query_groups=2,
                                     ffn_hidden_size=160, vocab_size=256, max_sequence_length=256,
                                     layernorm_epsilon=1e-6),
        source="tiny",
    )


PRESETS = {"llava-1.5-7b": _preset_7b, "llava-1.5-13b": _preset_13b, "tiny": _preset_tiny}


# --- MindSpeed-MM model.json -------------------------------------------------------------------

# Fields whose value is fixed by the architecture: another value would build a different model.
# Values of published files that contradict LLaVA-1.5 by mistake: loaded with a warning, built as LLaVA-1.5.
_LEGACY_VALUES = {
    (VISION.json_key, "activation_func", "gelu"): "MindSpeed-MM's first model.json and inference_llava.json "
    "(2024-09) said gelu, fixed there in 2024-10: CLIP ViT-L/14 uses quick_gelu, and its weights need it",
}

# The vision tower's geometry, which MindSpeed-MM's first model.json put at the image_encoder level.
_VISION_GEOMETRY = ("add_class_token", "class_token_len", "patch_size", "image_size")

_REQUIRED_VALUES = {
    LANGUAGE.json_key: {
        "add_bias_linear": False, "gated_linear_unit": True, "activation_func": "silu",
        "normalization": "RMSNorm", "lm_position_embedding_type": "rope", "rotary_interleaved": False,
        "add_qkv_bias": False,
    },
    VISION.json_key: {
        "model_id": "clip", "post_layer_norm": False, "add_bias_linear": True, "add_qkv_bias": True,
        "gated_linear_unit": False, "normalization": "LayerNorm", "activation_func": "quick_gelu",
        "add_class_token": True,
    },
    PROJECTOR.json_key: {
        "gated_linear_unit": False, "add_bias_linear": True, "activation_func": "gelu",
        # megatron fuses bias+GELU with the tanh approximation; LLaVA's GELU is the exact erf.
        "bias_activation_fusion": False,
    },
}

# Fields accepted and logged as without effect, with the reason.
_NO_EFFECT = {
    "device": "the device is chosen at run time (mm_plugin.device)",
    "persist_layer_norm": "a fused-kernel flag of apex; megatron-core's torch norm is used",
    "num_attention_heads@vision_projector": "a projector has no attention",
    "num_layers@vision_projector": "the projector type fixes its depth",
    "num_query_groups@vision_encoder": "CLIP has no grouped-query attention",
    "class_token_len": "CLIP has one class token",
    "apply_rope_fusion": "the RoPE fusion needs TransformerEngine; the unfused RoPE is exact",
    "bf16": "the part's dtype is params_dtype; mixed precision is the training flag --bf16",
}

_ALIASES = {
    LANGUAGE.json_key: {"language_vocab_size": "vocab_size", "language_max_sequence_length": "max_sequence_length",
                     "max_position_embeddings": "max_sequence_length"},
    VISION.json_key: {},
    PROJECTOR.json_key: {},
}

_DTYPE_NAMES = {"bf16": "bf16", "bfloat16": "bf16", "fp16": "fp16", "float16": "fp16", "fp32": "fp32",
                "float32": "fp32"}


def _transformer_config_fields() -> dict[str, dataclasses.Field]:
    from megatron.core.transformer import TransformerConfig

    return {field.name: field for field in dataclasses.fields(TransformerConfig)}


# Numeric fields that may be zero or negative; every other size, count and epsilon must be positive.
_NOT_POSITIVE = {"select_layer": "a layer index", "class_token_len": "at least 0"}


def _checked(part: Any, name: str, value: Any, where: str) -> Any:
    """``value`` for the dataclass field ``name`` of ``part``, if its JSON type and range fit the field."""
    hint = typing.get_type_hints(type(part))[name]
    choices = [choice for choice in typing.get_args(hint) if choice is not type(None)] or [hint]
    kind = choices[0]
    if value is None:
        if type(None) in typing.get_args(hint):
            return None
        raise ModelConfigError(f"{where} = null: give a {kind.__name__}")
    fits = {bool: lambda: isinstance(value, bool),
            int: lambda: isinstance(value, int) and not isinstance(value, bool),
            float: lambda: isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value),
            str: lambda: isinstance(value, str)}.get(kind, lambda: True)()
    if not fits:
        expected = {bool: "true or false", int: "a whole number", float: "a finite number", str: "a string"}[kind]
        raise ModelConfigError(f"{where} = {value!r}: expected {expected}")
    if name == "ckpt_path" and file_name_problem(value):
        raise ModelConfigError(f"{where} = {value!r}: not a file name: it {file_name_problem(value)}")
    if kind in (int, float) and name not in _NOT_POSITIVE and value <= 0:
        raise ModelConfigError(f"{where} = {value!r}: must be positive")
    if name == "class_token_len" and value < 0:
        raise ModelConfigError(f"{where} = {value!r}: must be at least 0")
    return value


def _checked_override(field: dataclasses.Field, value: Any, where: str) -> Any:
    """A megatron ``TransformerConfig`` field from model.json, typed like the field's default."""
    default = field.default
    if isinstance(default, bool) and not isinstance(value, bool):
        raise ModelConfigError(f"{where} = {value!r}: expected true or false")
    if isinstance(default, (int, float)) and not isinstance(default, bool) and value is not None:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ModelConfigError(f"{where} = {value!r}: expected a finite number")
        if isinstance(default, int) and not isinstance(value, int):
            raise ModelConfigError(f"{where} = {value!r}: expected a whole number")
    if field.name.endswith("dropout") and not (isinstance(value, (int, float)) and 0 <= value < 1):
        raise ModelConfigError(f"{where} = {value!r}: a dropout probability is at least 0 and below 1")
    return value


def lora_config(raw: Any, where: str) -> Optional[LoraConfig]:
    """``text_decoder.lora`` (null: no adapters), each field checked."""
    if raw is None:
        return None
    if not isinstance(raw, dict):
        raise ModelConfigError(f"{where} = {raw!r}: expected an object with rank, alpha, dropout, targets")
    unknown = set(raw) - {field.name for field in dataclasses.fields(LoraConfig)}
    if unknown:
        raise ModelConfigError(f"{where}: unknown field(s) {sorted(unknown)}; use rank, alpha, dropout, targets")
    lora = LoraConfig(**{**raw, "targets": tuple(raw.get("targets", DEFAULT_LORA_TARGETS))})
    if isinstance(lora.rank, bool) or not isinstance(lora.rank, int) or lora.rank < 1:
        raise ModelConfigError(f"{where}.rank = {lora.rank!r}: a whole number of at least 1")
    if isinstance(lora.alpha, bool) or not isinstance(lora.alpha, (int, float)) or not 0 < lora.alpha < math.inf:
        raise ModelConfigError(f"{where}.alpha = {lora.alpha!r}: a positive number")
    if isinstance(lora.dropout, bool) or not isinstance(lora.dropout, (int, float)) or not 0 <= lora.dropout < 1:
        raise ModelConfigError(f"{where}.dropout = {lora.dropout!r}: a probability, at least 0 and below 1")
    wrong = [target for target in lora.targets if target not in LORA_TARGETS]
    if wrong or not lora.targets:
        raise ModelConfigError(f"{where}.targets = {list(lora.targets)!r}: name layers among {list(LORA_TARGETS)}")
    return lora


def _fill_part(part: Any, part_name: str, raw: dict, source: str,
               transformer_fields: dict[str, dataclasses.Field]) -> None:
    own = {field.name for field in dataclasses.fields(part)} - {"transformer_overrides"}
    for key, value in raw.items():
        where = f"{source}: {part_name}.{key}"
        target = _ALIASES[part_name].get(key, key)
        required = _REQUIRED_VALUES[part_name]
        if key in required:
            if isinstance(value, str) and (part_name, key, value) in _LEGACY_VALUES:
                logger.warning("%s = %r: %s; building LLaVA-1.5's %r", where, value,
                               _LEGACY_VALUES[part_name, key, value], required[key])
            elif value != required[key]:
                raise ModelConfigError(f"{where} = {value!r}: LLaVA-1.5 needs {required[key]!r} here")
            continue
        if key == "params_dtype":
            if str(value) not in _DTYPE_NAMES:
                raise ModelConfigError(f"{where} = {value!r}: use one of {sorted(_DTYPE_NAMES)}")
            part.params_dtype = _DTYPE_NAMES[str(value)]
        elif key == "model_id" and part_name == PROJECTOR.json_key:
            types = {model_id: projector_type for projector_type, model_id in PROJECTOR_MODEL_IDS.items()}
            if value not in types:
                raise ModelConfigError(f"{where} = {value!r}: use one of {sorted(types)}")
            part.projector_type = types[value]
        elif key in ("input_size", "hidden_size") and part_name == PROJECTOR.json_key:
            continue  # checked against the vision and language widths in _check_projector_widths
        elif key == "lora" and part_name == LANGUAGE.json_key:
            part.lora = lora_config(value, where)
        elif target in own:
            setattr(part, target, _checked(part, target, value, where))
        elif f"{key}@{part_name}" in _NO_EFFECT or key in _NO_EFFECT:
            logger.info("%s: accepted without effect here: %s", where,
                        _NO_EFFECT.get(f"{key}@{part_name}", _NO_EFFECT.get(key)))
        elif key in transformer_fields:
            part.transformer_overrides[key] = _checked_override(transformer_fields[key], value, where)
        else:
            raise ModelConfigError(
                f"{where}: unknown field (not a LLaVA-1.5 field nor a megatron TransformerConfig field); "
                "remove it or fix its spelling"
            )


def _check_projector_widths(config: LlavaConfig, raw: dict, source: str) -> None:
    for key, expected, owner in (("input_size", config.vision.hidden_size, "vision_encoder.hidden_size"),
                                 ("hidden_size", config.language.hidden_size, "text_decoder.hidden_size")):
        if key in raw and raw[key] != expected:
            raise ModelConfigError(
                f"{source}: vision_projector.{key} = {raw[key]} but {owner} = {expected}; they must agree"
            )


def from_mindspeed_json(raw: dict, source: str = "model.json") -> LlavaConfig:
    """Build a config from MindSpeed-MM's published ``model.json`` layout (see module docstring)."""
    try:
        return _from_mindspeed_json(raw, source)
    except ModelConfigError:
        raise
    except (TypeError, ValueError, AttributeError, KeyError) as error:  # a JSON type no check above foresaw
        raise ModelConfigError(f"{source}: a field has the wrong type or shape ({type(error).__name__}: {error})") \
            from None


def _from_mindspeed_json(raw: dict, source: str) -> LlavaConfig:
    unknown_top = set(raw) - {"model_id", LANGUAGE.json_key, "image_encoder", "text_encoder", "video_encoder",
                              "attention_backend"}
    if unknown_top:
        raise ModelConfigError(f"{source}: unknown top-level fields {sorted(unknown_top)}")
    if raw.get("model_id", "llava") != "llava":
        raise ModelConfigError(f"{source}: model_id {raw['model_id']!r}: mm_plugin builds 'llava'")
    for absent in ("text_encoder", "video_encoder"):
        if raw.get(absent) is not None:
            raise ModelConfigError(f"{source}: {absent} must be null: LLaVA-1.5 has none")
    for needed in (LANGUAGE.json_key, "image_encoder"):
        if not isinstance(raw.get(needed), dict):
            raise ModelConfigError(f"{source}: missing the {needed!r} section")
    image_encoder = raw["image_encoder"]
    unknown_image = set(image_encoder) - {VISION.json_key, PROJECTOR.json_key} - set(_VISION_GEOMETRY)
    if unknown_image or not isinstance(image_encoder.get(VISION.json_key), dict) \
            or not isinstance(image_encoder.get(PROJECTOR.json_key), dict):
        raise ModelConfigError(
            f"{source}: image_encoder needs vision_encoder and vision_projector sections and at most "
            f"{', '.join(_VISION_GEOMETRY)} beside them (found {sorted(image_encoder)})"
        )
    vision_raw = dict(image_encoder[VISION.json_key])
    for key in _VISION_GEOMETRY:  # MindSpeed-MM's first model.json (2024-09) kept them one level up
        if key in image_encoder:
            if key in vision_raw and vision_raw[key] != image_encoder[key]:
                raise ModelConfigError(f"{source}: image_encoder.{key} = {image_encoder[key]!r} but "
                                       f"image_encoder.vision_encoder.{key} = {vision_raw[key]!r}; keep one")
            vision_raw[key] = image_encoder[key]
    # MindSpeed-MM's convention: num_layers are the layers built, the feature is the last one's output.
    config = LlavaConfig(
        vision=VisionEncoderConfig(select_layer=None), projector=ProjectorConfig(),
        language=LanguageModelConfig(), attention_backend=raw.get("attention_backend", "auto"), source=source,
    )
    fields = _transformer_config_fields()
    _fill_part(config.language, LANGUAGE.json_key, raw[LANGUAGE.json_key], source, fields)
    _fill_part(config.vision, VISION.json_key, vision_raw, source, fields)
    _fill_part(config.projector, PROJECTOR.json_key, image_encoder[PROJECTOR.json_key], source, fields)
    _check_projector_widths(config, image_encoder[PROJECTOR.json_key], source)
    heads_per_width = config.vision.hidden_size // config.vision.num_attention_heads
    if config.vision.kv_channels not in (None, heads_per_width):
        raise ModelConfigError(
            f"{source}: vision_encoder.kv_channels {config.vision.kv_channels} != hidden_size/num_attention_heads "
            f"({heads_per_width}); CLIP's heads split the hidden size"
        )
    return config.validate()


def load_model_config(path_or_preset: str) -> LlavaConfig:
    """A preset name or a MindSpeed-MM style ``model.json`` path."""
    if path_or_preset in PRESETS:
        return PRESETS[path_or_preset]().validate()
    path = Path(path_or_preset)
    if not path.is_file():
        raise ModelConfigError(
            f"{path_or_preset}: neither a preset ({', '.join(PRESETS)}) nor an existing model.json"
        )
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ModelConfigError(f"{path}: not valid JSON (line {error.lineno}, column {error.colno}: {error.msg})") from error
    config = from_mindspeed_json(raw, source=str(path))
    _resolve_relative_paths(config, path.parent)
    return config


def _resolve_relative_paths(config: LlavaConfig, base: Path) -> None:
    """``ckpt_path`` relative to the model.json's folder, so a config travels with its weights."""
    for part in (config.vision, config.projector, config.language):
        if part.ckpt_path and not Path(part.ckpt_path).is_absolute():
            part.ckpt_path = str((base / part.ckpt_path).resolve())


def to_mindspeed_json(config: LlavaConfig) -> dict:
    """The inverse of :func:`from_mindspeed_json` (MindSpeed-MM's convention: layers built, no select_layer)."""
    vision, projector, language = config.vision, config.projector, config.language
    return {
        "model_id": "llava",
        "attention_backend": config.attention_backend,
        LANGUAGE.json_key: {
            "num_layers": language.num_layers, "hidden_size": language.hidden_size,
            "num_attention_heads": language.num_attention_heads,
            "num_query_groups": language.num_query_groups or language.num_attention_heads,
            "ffn_hidden_size": language.ffn_hidden_size, "kv_channels": language.kv_channels,
            "add_bias_linear": False, "gated_linear_unit": True, "activation_func": "silu",
            "normalization": "RMSNorm", "layernorm_epsilon": language.layernorm_epsilon,
            "rotary_base": language.rotary_base, "language_vocab_size": language.vocab_size,
            "language_max_sequence_length": language.max_sequence_length, "lm_position_embedding_type": "rope",
            "params_dtype": language.params_dtype, "freeze": language.freeze, "ckpt_path": language.ckpt_path,
            "lora": dataclasses.asdict(language.lora) if language.lora else None,
            **language.transformer_overrides,
        },
        "image_encoder": {
            VISION.json_key: {
                "model_id": "clip", "num_layers": vision.num_layers_built, "hidden_size": vision.hidden_size,
                "num_attention_heads": vision.num_attention_heads, "ffn_hidden_size": vision.ffn_hidden_size,
                "select_feature": vision.select_feature, "post_layer_norm": False, "add_bias_linear": True,
                "add_qkv_bias": True, "gated_linear_unit": False, "normalization": "LayerNorm",
                "layernorm_epsilon": vision.layernorm_epsilon, "activation_func": "quick_gelu",
                "add_class_token": True, "patch_size": vision.patch_size, "image_size": vision.image_size,
                "params_dtype": vision.params_dtype, "freeze": vision.freeze, "ckpt_path": vision.ckpt_path,
                **vision.transformer_overrides,
            },
            PROJECTOR.json_key: {
                "model_id": PROJECTOR_MODEL_IDS[projector.projector_type], "add_bias_linear": True,
                "gated_linear_unit": False, "bias_activation_fusion": False,
                "input_size": vision.hidden_size, "hidden_size": language.hidden_size,
                "ffn_hidden_size": projector.ffn_hidden_size or language.hidden_size,
                "params_dtype": projector.params_dtype, "freeze": projector.freeze,
                "ckpt_path": projector.ckpt_path, **projector.transformer_overrides,
            },
        },
        "text_encoder": None,
        "video_encoder": None,
    }


def from_hf_config(hf: Any, source: str = "Hugging Face config") -> LlavaConfig:
    """Our config for a transformers ``LlavaConfig``, or the dict of its ``config.json`` (published configs
    omit fields at their defaults, so a dict goes through transformers' ``LlavaConfig`` first)."""
    if isinstance(hf, dict):
        from transformers import LlavaConfig as HFLlavaConfig

        hf = HFLlavaConfig.from_dict(hf)
    raw = hf.to_dict()
    vision, text = raw["vision_config"], raw["text_config"]
    if raw.get("vision_feature_select_strategy", "default") not in ("default", "full"):
        raise ModelConfigError(f"{source}: vision_feature_select_strategy {raw['vision_feature_select_strategy']!r}")
    if raw.get("projector_hidden_act", "gelu") != "gelu":
        raise ModelConfigError(f"{source}: projector_hidden_act {raw['projector_hidden_act']!r}: LLaVA-1.5 uses gelu")
    rope = text.get("rope_parameters") or text.get("rope_scaling") or {}
    if rope.get("rope_type", "default") != "default" or text.get("attention_bias") or text.get("mlp_bias"):
        raise ModelConfigError(f"{source}: RoPE scaling, attention_bias or mlp_bias: not LLaVA-1.5's LLaMA")
    layer = raw.get("vision_feature_layer", -2)
    if not isinstance(layer, int):
        raise ModelConfigError(f"{source}: vision_feature_layer {layer!r}: one layer index is supported")
    heads = text["num_attention_heads"]
    return LlavaConfig(
        vision=VisionEncoderConfig(
            num_layers=vision["num_hidden_layers"], select_layer=layer,
            select_feature="patch" if raw.get("vision_feature_select_strategy", "default") == "default" else "cls_patch",
            hidden_size=vision["hidden_size"], num_attention_heads=vision["num_attention_heads"],
            ffn_hidden_size=vision["intermediate_size"], image_size=vision["image_size"],
            patch_size=vision["patch_size"], layernorm_epsilon=vision.get("layer_norm_eps", 1e-5),
        ),
        projector=ProjectorConfig(ffn_hidden_size=text["hidden_size"]),
        language=LanguageModelConfig(
            num_layers=text["num_hidden_layers"], hidden_size=text["hidden_size"], num_attention_heads=heads,
            num_query_groups=text.get("num_key_value_heads") or heads, ffn_hidden_size=text["intermediate_size"],
            kv_channels=text.get("head_dim") or text["hidden_size"] // heads, vocab_size=text["vocab_size"],
            max_sequence_length=text.get("max_position_embeddings", 4096),
            layernorm_epsilon=text.get("rms_norm_eps", 1e-6),
            rotary_base=float(rope.get("rope_theta", text.get("rope_theta", 10000.0))),
        ),
        source=source,
    ).validate()
