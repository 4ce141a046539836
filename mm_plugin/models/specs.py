"""Layer specs: what a LLaVA-1.5 layer is, built from megatron-core's local modules.

The differences from megatron-core's stock specs are exactly LLaVA's: CLIP layers have LayerNorm,
biases and no attention mask (megatron-core's ViT spec is causal, which is wrong for CLIP), and the
core attention can be PyTorch SDPA (flash kernels without TransformerEngine).
"""

from __future__ import annotations

from typing import Optional

from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.attention import SelfAttention, SelfAttentionSubmodules
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.mlp import MLP, MLPSubmodules
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.torch_norm import WrappedTorchNorm
from megatron.core.transformer.transformer_layer import TransformerLayer, TransformerLayerSubmodules

from mm_plugin import device
from mm_plugin.config.model import LoraConfig
from mm_plugin.models.attention import SDPAttention
from mm_plugin.models.lora import LoraColumnParallelLinear, LoraRowParallelLinear


def core_attention(backend: str) -> type:
    """``sdpa`` or ``local``; ``auto`` keeps megatron's module on NPU (MindSpeed swaps in its kernels)."""
    if backend == "auto":
        backend = "local" if device.kind() == "npu" else "sdpa"
    return {"sdpa": SDPAttention, "local": DotProductAttention}[backend]


def _linear(parallel: type, lora: Optional[LoraConfig], target: str):
    """``parallel`` (a megatron parallel linear), with an adapter when ``lora`` targets ``target``."""
    if lora is None or target not in lora.targets:
        return parallel
    if parallel is ColumnParallelLinear:
        return ModuleSpec(module=LoraColumnParallelLinear, params={"lora": lora, "glu": target == "linear_fc1"})
    return ModuleSpec(module=LoraRowParallelLinear, params={"lora": lora})


def _layer_spec(mask_type: AttnMaskType, backend: str, lora: Optional[LoraConfig] = None) -> ModuleSpec:
    # WrappedTorchNorm builds LayerNorm or RMSNorm from config.normalization.
    return ModuleSpec(
        module=TransformerLayer,
        submodules=TransformerLayerSubmodules(
            input_layernorm=WrappedTorchNorm,
            self_attention=ModuleSpec(
                module=SelfAttention,
                params={"attn_mask_type": mask_type},
                submodules=SelfAttentionSubmodules(
                    linear_qkv=_linear(ColumnParallelLinear, lora, "linear_qkv"),
                    core_attention=core_attention(backend),
                    linear_proj=_linear(RowParallelLinear, lora, "linear_proj"),
                    q_layernorm=IdentityOp,
                    k_layernorm=IdentityOp,
                ),
            ),
            self_attn_bda=get_bias_dropout_add,
            pre_mlp_layernorm=WrappedTorchNorm,
            mlp=ModuleSpec(module=MLP, submodules=MLPSubmodules(
                linear_fc1=_linear(ColumnParallelLinear, lora, "linear_fc1"),
                linear_fc2=_linear(RowParallelLinear, lora, "linear_fc2"))),
            mlp_bda=get_bias_dropout_add,
        ),
    )


def language_layer_spec(backend: str = "auto", lora: Optional[LoraConfig] = None) -> ModuleSpec:
    """LLaMA decoder layer: RMSNorm (from the config), causal self-attention, SwiGLU MLP; ``lora``: adapters on
    the linears it targets (``models.lora``)."""
    return _layer_spec(AttnMaskType.causal, backend, lora)


def vision_layer_spec(backend: str = "auto") -> ModuleSpec:
    """CLIP encoder layer: LayerNorm, bidirectional self-attention (no mask), quick-GELU MLP."""
    return _layer_spec(AttnMaskType.no_mask, backend)


def projector_submodules() -> MLPSubmodules:
    return MLPSubmodules(linear_fc1=ColumnParallelLinear, linear_fc2=RowParallelLinear)
