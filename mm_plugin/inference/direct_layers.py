"""Inference through megatron-core's transformer layers as plain tensor operations on their own parameters.

A decode step is one token per row, and at batch 1 a whole prompt on a GPU is little arithmetic for
many kernels: the time goes to the host. megatron-core's layer modules make about a dozen
autograd-Function calls and many more module calls per layer, even under ``no_grad``. For the layers
LLaVA-1.5 has this computes the same operations directly: the layers' own norm modules and weights,
megatron's fused-QKV layout, scaled-dot-product attention, biases where the layer has them (a
row-parallel bias after the tensor-parallel all-reduce, as megatron adds it), the MLP's activation
(gated or not). The language model's layers rotate queries and keys and read earlier positions through
the :class:`~mm_plugin.inference.kv_cache.KVCache`; the vision tower's attend to all patches. On the
CPU the matrix products take the packed oneDNN route (:mod:`~mm_plugin.inference.cpu_linear`), and a long
prompt avoids what torch's CPU kernels do slowly: causal attention runs in chunks of queries
(:func:`sdpa`), an RMSNorm is computed here (:func:`norm`), and an MLP's rows run in chunks, gate and up
apart (:func:`mlp_forward`).

:func:`runs_direct` says when that description holds; otherwise megatron's modules run (with the cache
attached to them), e.g. with megatron's local attention, which MindSpeed replaces on NPUs.
"""

from __future__ import annotations

import math
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from megatron.core import parallel_state

from mm_plugin.inference.cpu_linear import linear_for
from mm_plugin.inference.kv_cache import KVCache
from mm_plugin.models.attention import SDPAttention

Attend = Callable[[int, torch.Tensor], torch.Tensor]
"""``(layer index, qkv [s, b, groups, heads / groups + 2, dim]) -> context [s, b, heads * dim]``: each query
group's queries, then its key, then its value (megatron's fused-QKV layout)."""


def runs_direct(module, layers: torch.nn.ModuleList) -> bool:
    """Whether ``layers`` (of ``module``, in eval mode) compute what :func:`forward_layers` computes."""
    config = module.config
    tensor_parallel = parallel_state.get_tensor_model_parallel_world_size()
    return (
        not module.training and mlp_runs_direct(config)
        and config.softmax_scale is None and not config.qk_layernorm and not config.sequence_parallel
        and not config.fp32_residual_connection and not config.apply_residual_connection_post_layernorm
        and not getattr(config, "multi_latent_attention", False) and not getattr(config, "attention_output_gate", False)
        and config.num_query_groups % tensor_parallel == 0
        and all(isinstance(layer.self_attention.core_attention, SDPAttention) for layer in layers)
    )


def mlp_runs_direct(config) -> bool:
    """Whether a megatron MLP of ``config`` computes ``fc2(act(fc1(x)))`` (or the gated ``act(a) * b``)."""
    fused_differently = config.bias_activation_fusion and not (config.gated_linear_unit and config.activation_func is F.silu)
    return (not fused_differently and not getattr(config, "use_te_activation_func", False)
            and getattr(config, "glu_linear_offset", 0.0) == 0.0
            and getattr(config, "activation_func_clamp_value", None) is None)


def forward_layers(layers: torch.nn.ModuleList, hidden: torch.Tensor, attend: Attend) -> torch.Tensor:
    """``hidden`` [s, b, h] through ``layers`` (pre-norm attention and MLP, each with its residual)."""
    linear = linear_for(hidden)
    for index, layer in enumerate(layers):
        attention = layer.self_attention
        heads, groups = attention.num_attention_heads_per_partition, attention.num_query_groups_per_partition
        dim = attention.hidden_size_per_attention_head
        length, batch = hidden.shape[:2]
        # megatron's fused QKV rows are grouped per query group (its queries, key, value).
        qkv = linear(norm(layer.input_layernorm, hidden), attention.linear_qkv.weight, attention.linear_qkv.bias)
        context = attend(index, qkv.view(length, batch, groups, heads // groups + 2, dim))
        hidden = hidden + _row_parallel(linear, context, attention.linear_proj)
        hidden = hidden + mlp_forward(layer.mlp, norm(layer.pre_mlp_layernorm, hidden), linear)
    return hidden


def norm(module, x: torch.Tensor) -> torch.Tensor:
    """``module(x)``. On the CPU a ``torch.nn.RMSNorm`` is computed here, in place where the tensor is new: the
    same operations in the same precision (the same bits, tested). torch's CPU RMSNorm multiplies by the
    weight in mixed dtypes and, for float32, runs a slower fused kernel."""
    if (x.device.type != "cpu" or type(module) is not torch.nn.RMSNorm or module.eps is None
            or module.weight is None):
        return module(x)
    upcast = x.float()
    scale = torch.rsqrt(upcast.pow(2).mean(-1, keepdim=True).add_(module.eps))
    return (upcast * scale).mul_(module.weight.float()).to(x.dtype)


CPU_INTERMEDIATE_BYTES = 32 << 20
"""On the CPU an MLP runs its rows in chunks whose intermediate stays under this size (see :func:`mlp_forward`)."""


def mlp_forward(mlp, x: torch.Tensor, linear=None) -> torch.Tensor:
    """A megatron ``MLP`` (see :func:`mlp_runs_direct`) on ``x``, its output bias included.

    On the CPU, rows run in chunks (of 512 rows at least) whose intermediate is under
    :data:`CPU_INTERMEDIATE_BYTES`: glibc's malloc maps a block over 32 MB afresh from the kernel at each
    allocation and every page of it faults when first written, while it reuses smaller ones (a batch-8
    prompt's [4944, 2752] float32 intermediate, cpu-small in ``bench/``, is 54 MB)."""
    linear = linear or linear_for(x)
    rows, width = x.numel() // x.shape[-1], mlp.linear_fc1.weight.shape[0]
    chunk = max(512, CPU_INTERMEDIATE_BYTES // (width * x.element_size())) if x.device.type == "cpu" else rows
    if rows <= chunk:
        return _mlp_rows(mlp, x, linear)
    parts = [_mlp_rows(mlp, part, linear) for part in x.reshape(rows, x.shape[-1]).split(chunk)]
    return torch.cat(parts).view(*x.shape[:-1], -1)


CPU_SPLIT_GATE_ROWS = 256
"""From this many rows on the CPU, a gated MLP's gate and up run as two products (see :func:`_mlp_rows`)."""


def _mlp_rows(mlp, x: torch.Tensor, linear) -> torch.Tensor:
    fc1, activation = mlp.linear_fc1, mlp.config.activation_func
    if not mlp.config.gated_linear_unit:
        intermediate = activation(linear(x, fc1.weight, fc1.bias))
    elif x.device.type == "cpu" and x.numel() // x.shape[-1] >= CPU_SPLIT_GATE_ROWS:
        # linear_fc1 holds [gate; up]. As halves of one product they are strided, and the CPU's activation
        # and multiply read strided halves more slowly: from 256 rows on, two products and their
        # activation are faster than one; with few rows (a decode step) one call is.
        (gate, up), (gate_bias, up_bias) = fc1.weight.chunk(2), _halves(fc1.bias)
        intermediate = activation(linear(x, gate, gate_bias)).mul_(linear(x, up, up_bias))
    else:
        gate, up = linear(x, fc1.weight, fc1.bias).chunk(2, dim=-1)
        intermediate = activation(gate).mul_(up)  # in place: one intermediate less
    return _row_parallel(linear, intermediate, mlp.linear_fc2)


def _halves(bias: Optional[torch.Tensor]) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    return (None, None) if bias is None else bias.chunk(2)


CPU_QUERY_CHUNK = 128
"""Queries per call in a causal attention on the CPU (see :func:`sdpa`)."""


def sdpa(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attn_mask: Optional[torch.Tensor] = None,
         causal: bool = False) -> torch.Tensor:
    """Attention of ``query`` [b, heads, s, dim] over ``key``, ``value`` [b, groups, positions, dim] -> [s, b, heads * dim].
    ``causal``: the queries are the last ``s`` positions and none sees a later key (``attn_mask``, where given,
    says so too). On the CPU a longer causal attention runs in chunks of queries
    (:func:`_causal_in_query_chunks`)."""
    batch, heads, length, dim = query.shape
    if causal and query.device.type == "cpu" and length > CPU_QUERY_CHUNK:
        return _causal_in_query_chunks(query, key, value, attn_mask)
    context = _attention(query, key, value, attn_mask, is_causal=causal and attn_mask is None)
    return context.permute(2, 0, 1, 3).reshape(length, batch, heads * dim)


def _causal_in_query_chunks(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                            attn_mask: Optional[torch.Tensor]) -> torch.Tensor:
    """:func:`sdpa` of a causal attention in chunks of :data:`CPU_QUERY_CHUNK` queries, each over the keys up to
    its last query. torch's CPU flash kernel computes whole blocks of 512 keys under a causal mask (86% of the
    full square for a 618-position prompt), the chunks 60%."""
    batch, heads, length, dim = query.shape
    known = key.shape[2]
    if attn_mask is None:
        attn_mask = torch.ones(length, known, dtype=torch.bool, device=query.device).tril(known - length)
    context = query.new_empty(length, batch, heads, dim)
    for start in range(0, length, CPU_QUERY_CHUNK):
        end = min(start + CPU_QUERY_CHUNK, length)
        seen = known - length + end  # the keys up to this chunk's last query
        context[start:end] = _attention(query[:, :, start:end], key[:, :, :seen], value[:, :, :seen],
                                        attn_mask[..., start:end, :seen]).permute(2, 0, 1, 3)
    return context.view(length, batch, heads * dim)


def _attention(query, key, value, attn_mask, is_causal=False) -> torch.Tensor:
    return F.scaled_dot_product_attention(query, key, value, attn_mask=attn_mask, is_causal=is_causal,
                                          scale=1.0 / math.sqrt(query.shape[-1]),
                                          enable_gqa=query.shape[1] != key.shape[1])


def cached_attention(cache: KVCache, attend: Optional[torch.Tensor], column: Optional[torch.Tensor] = None) -> Attend:
    """The language model's attention: rotated at true positions, over the cache. ``attend``: [b, 1, s, positions]
    bool, True where a query may see a key; None: a whole prompt, causal, or one new position, which sees all.
    Call inside ``cache.forward(angles)``; or, for a static decode step, inside ``cache.rotation(angles)`` with
    ``column`` (a [1] device tensor, where the new position goes), and ``attend`` over the whole capacity."""

    def run(index, qkv):
        per_group = qkv.shape[3] - 2
        rotated = cache.rotate(qkv[:, :, :, :per_group + 1])  # each group's queries and key, in one rotation
        key, value = rotated[:, :, :, per_group], qkv[:, :, :, per_group + 1]
        keys, values = cache.append(index, key, value) if column is None else cache.write(index, key, value, column)
        return sdpa(_heads_first(rotated[:, :, :, :per_group]), keys, values, attend, causal=qkv.shape[0] > 1)

    return run


def full_attention(index, qkv) -> torch.Tensor:
    """Every position sees every position (the vision tower)."""
    per_group = qkv.shape[3] - 2
    key, value = (qkv[:, :, :, i].permute(1, 2, 0, 3) for i in (per_group, per_group + 1))
    return sdpa(_heads_first(qkv[:, :, :, :per_group]), key, value)


def _heads_first(query: torch.Tensor) -> torch.Tensor:
    """Queries [s, b, groups, heads / groups, dim] -> [b, heads, s, dim] (a view for one query per group)."""
    return query.flatten(2, 3).permute(1, 2, 0, 3)


def image_features(model, images: torch.Tensor) -> torch.Tensor:
    """``model.image_features(images)``: vision tower and projector, directly where :func:`runs_direct` holds."""
    vision, projector = model.vision_model, model.vision_projection
    if not (runs_direct(vision, vision.decoder.layers) and getattr(projector, "projector_type", None) == "mlp"
            and mlp_runs_direct(projector.config)):
        return model.image_features(images)
    hidden = forward_layers(vision.decoder.layers, vision.embed(images), full_attention)
    return mlp_forward(projector.encoder, vision.select(hidden))


def _row_parallel(linear, x: torch.Tensor, module) -> torch.Tensor:
    """A row-parallel layer: the ranks' partial products summed, then its bias (added once, as megatron does)."""
    if parallel_state.get_tensor_model_parallel_world_size() == 1:
        return linear(x, module.weight, module.bias)
    output = linear(x, module.weight)
    torch.distributed.all_reduce(output, group=parallel_state.get_tensor_model_parallel_group())
    return output if module.bias is None else output + module.bias
