"""One function per part: our dataclass config -> megatron-core ``TransformerConfig``.

These are the settings that reproduce Hugging Face exactly (see the facts note): RMSNorm with HF's
epsilon, SwiGLU, unfused non-interleaved RoPE and no biases for LLaMA; LayerNorm, biases and
quick-GELU for CLIP; exact-erf GELU with the bias-activation fusion off for the projector.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.transformer import TransformerConfig

from mm_plugin import device
from mm_plugin.config.model import LanguageModelConfig, LlavaConfig, ModelConfigError, VisionEncoderConfig
from mm_plugin.config.names import LANGUAGE, PROJECTOR, TORCH_DTYPES, VISION

def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    """CLIP's activation, x * sigmoid(1.702 x) (megatron-core 0.12 has none)."""
    return x * torch.sigmoid(1.702 * x)




def _common(params_dtype: str, tensor_parallel: int, overrides: dict, extra: dict) -> dict:
    dtype = TORCH_DTYPES[params_dtype]
    settings = dict(
        tensor_model_parallel_size=tensor_parallel,
        params_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        # Off by default: the fused paths need TransformerEngine/apex or change the math.
        masked_softmax_fusion=False,
        bias_dropout_fusion=False,
        apply_rope_fusion=False,
        persist_layer_norm=False,
        gradient_accumulation_fusion=False,
        use_cpu_initialization=device.kind() != "cuda",
        hidden_dropout=0.0,
        attention_dropout=0.0,
    )
    settings.update(overrides)
    settings.update(extra)
    if not _transformer_engine_available():
        settings["apply_rope_fusion"] = False
        settings["gradient_accumulation_fusion"] = False
    if device.kind() != "cuda":
        settings["persist_layer_norm"] = False
        settings["masked_softmax_fusion"] = False
    return settings


def _transformer_engine_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("transformer_engine") is not None


def language_config(config: LanguageModelConfig, extra: dict) -> TransformerConfig:
    """``extra``: run-time settings shared by all parts (recompute, sequence parallel, ...)."""
    settings = _common(config.params_dtype, parallel_state.get_tensor_model_parallel_world_size(),
                       config.transformer_overrides, extra)
    dtype = TORCH_DTYPES[config.params_dtype]
    settings.update(
        num_layers=config.num_layers,
        hidden_size=config.hidden_size,
        num_attention_heads=config.num_attention_heads,
        num_query_groups=config.num_query_groups or config.num_attention_heads,
        ffn_hidden_size=config.ffn_hidden_size,
        kv_channels=config.kv_channels,
        normalization="RMSNorm",
        layernorm_epsilon=config.layernorm_epsilon,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=False,
        rotary_interleaved=False,
        pipeline_model_parallel_size=parallel_state.get_pipeline_model_parallel_world_size(),
        pipeline_dtype=dtype,
    )
    return _build(settings, LANGUAGE.json_key)


def vision_config(config: VisionEncoderConfig, extra: dict) -> TransformerConfig:
    settings = _common(config.params_dtype, parallel_state.get_tensor_model_parallel_world_size(),
                       config.transformer_overrides, _without_pipeline_settings(extra))
    settings.update(
        num_layers=config.num_layers_built,
        hidden_size=config.hidden_size,
        num_attention_heads=config.num_attention_heads,
        num_query_groups=config.num_attention_heads,
        ffn_hidden_size=config.ffn_hidden_size,
        kv_channels=config.kv_channels,
        normalization="LayerNorm",
        layernorm_epsilon=config.layernorm_epsilon,
        gated_linear_unit=False,
        activation_func=quick_gelu,
        bias_activation_fusion=False,  # megatron refuses to fuse quick_gelu
        add_bias_linear=True,
        add_qkv_bias=True,
        pipeline_model_parallel_size=1,  # the vision tower lives on the first pipeline stage
    )
    return _build(settings, VISION.json_key)


def projector_config(config: LlavaConfig, extra: dict) -> TransformerConfig:
    projector = config.projector
    settings = _common(projector.params_dtype, parallel_state.get_tensor_model_parallel_world_size(),
                       projector.transformer_overrides, _without_pipeline_settings(extra))
    settings.update(
        num_layers=1,
        num_attention_heads=settings["tensor_model_parallel_size"],  # unused by an MLP; megatron checks divisibility
        hidden_size=config.language.hidden_size,
        ffn_hidden_size=projector.ffn_hidden_size or config.language.hidden_size,
        activation_func=F.gelu,  # exact erf, as Hugging Face's "gelu"
        bias_activation_fusion=False,  # the fused path is the tanh approximation
        gated_linear_unit=False,
        add_bias_linear=True,
        pipeline_model_parallel_size=1,
        sequence_parallel=False,
    )
    return _build(settings, PROJECTOR.json_key)


def _without_pipeline_settings(extra: dict) -> dict:
    return {k: v for k, v in extra.items() if not k.startswith(("pipeline_", "num_layers_in_", "virtual_pipeline"))}


def _build(settings: dict, part: str) -> TransformerConfig:
    try:
        return TransformerConfig(**settings)
    except (AssertionError, ValueError, TypeError) as error:
        raise ModelConfigError(f"{part}: megatron-core rejects this configuration: {error or type(error).__name__}") from error
