"""The language model's LLaMA layers as plain tensor operations on megatron-core's own parameters.

A decode step is one token per row: its arithmetic is small, so on a CPU, or a GPU at small batch, its
time goes to Python and kernel launches. megatron-core's layer modules make about a dozen
autograd-Function calls and many more module calls per layer, even under ``no_grad``. For the decoder
LLaVA-1.5 has (RMSNorm, fused QKV without bias, RoPE, SwiGLU, no biases, SDPA core attention) this
computes the same operations directly: the layers' own norm modules and weights, megatron's QKV
layout, the rotation and cache of :meth:`~mm_plugin.inference.kv_cache.KVCache.store`,
scaled-dot-product attention, and the tensor-parallel all-reduce of each row-parallel output.
:func:`is_plain_llama` says when that description holds; otherwise megatron's modules run (with the
cache attached to them), e.g. with megatron's local attention, which MindSpeed replaces on NPUs.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core import parallel_state

from mm_plugin.inference.cpu_linear import linear_for
from mm_plugin.inference.kv_cache import KVCache
from mm_plugin.models.attention import SDPAttention


def is_plain_llama(language_model) -> bool:
    config = language_model.config
    tensor_parallel = parallel_state.get_tensor_model_parallel_world_size()
    return (
        config.normalization == "RMSNorm" and config.gated_linear_unit and config.activation_func is F.silu
        and not config.add_bias_linear and not config.add_qkv_bias and config.softmax_scale is None
        and not config.qk_layernorm and not config.sequence_parallel and not config.fp32_residual_connection
        and not getattr(config, "multi_latent_attention", False) and not getattr(config, "attention_output_gate", False)
        and config.num_query_groups % tensor_parallel == 0 and not language_model.training
        and all(isinstance(layer.self_attention.core_attention, SDPAttention) for layer in language_model.decoder.layers)
    )


def forward_layers(language_model, hidden: torch.Tensor, cache: KVCache, attend: Optional[torch.Tensor]
                   ) -> torch.Tensor:
    """``hidden`` [s, b, h], the new positions' embeddings -> the final norm's output [s, b, h].

    ``attend``: [b, 1, s, positions] bool, True where a query may see a key; None: a whole prompt,
    causal, or one new position, which sees everything. Call inside ``cache.forward(angles)``.
    """
    group = parallel_state.get_tensor_model_parallel_group()
    reduce = parallel_state.get_tensor_model_parallel_world_size() > 1
    length, batch = hidden.shape[:2]
    causal = attend is None and length > 1
    linear = linear_for(hidden)
    for index, layer in enumerate(language_model.decoder.layers):
        attention, mlp = layer.self_attention, layer.mlp
        heads, groups = attention.num_attention_heads_per_partition, attention.num_query_groups_per_partition
        dim = attention.hidden_size_per_attention_head

        # Attention: megatron's fused QKV rows are grouped per query group (its queries, key, value).
        qkv = linear(layer.input_layernorm(hidden), attention.linear_qkv.weight).view(length, batch, groups, -1)
        query, key, value = qkv.split([heads // groups * dim, dim, dim], dim=-1)
        query, keys, values = cache.store(index, query.reshape(length, batch, heads, dim), key, value)
        context = F.scaled_dot_product_attention(query.permute(1, 2, 0, 3), keys, values, attn_mask=attend,
                                                 is_causal=causal, scale=1.0 / math.sqrt(dim),
                                                 enable_gqa=heads != groups)
        context = context.permute(2, 0, 1, 3).reshape(length, batch, heads * dim)
        hidden = hidden + _all_reduce(linear(context, attention.linear_proj.weight), group, reduce)

        # SwiGLU MLP: linear_fc1 holds [gate; up].
        gate, up = linear(layer.pre_mlp_layernorm(hidden), mlp.linear_fc1.weight).chunk(2, dim=-1)
        hidden = hidden + _all_reduce(linear(F.silu(gate) * up, mlp.linear_fc2.weight), group, reduce)
    return language_model.decoder.final_layernorm(hidden)


def _all_reduce(partial: torch.Tensor, group, reduce: bool) -> torch.Tensor:
    """Sum a row-parallel layer's partial outputs over the tensor-parallel ranks."""
    if reduce:
        torch.distributed.all_reduce(partial, group=group)
    return partial
