"""Core attention through PyTorch's ``scaled_dot_product_attention``.

A drop-in for megatron-core's local ``DotProductAttention`` (same constructor and forward), which
materialises the full score matrix; SDPA picks flash or memory-efficient kernels on GPU and a fused
kernel on CPU. Masks follow megatron's convention: a bool tensor with True = masked; a passed mask
overrides the layer's ``attn_mask_type``.

Packed rows (``models.packed_rows``) pass instead an integer ``[b, s]`` tensor, the sample each position
belongs to: each sample then attends causally to itself in its own SDPA call, so the blocks between samples
are never computed (a dense mask would compute and discard them).
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.utils import divide

from mm_plugin.models.packed_rows import sample_runs


class SDPAttention(MegatronModule):
    def __init__(self, config, layer_number: int, attn_mask_type: AttnMaskType, attention_type: str,
                 attention_dropout: Optional[float] = None, softmax_scale: Optional[float] = None, **_):
        super().__init__(config=config)
        tensor_parallel = parallel_state.get_tensor_model_parallel_world_size()
        self.attn_mask_type = attn_mask_type
        self.num_heads = divide(config.num_attention_heads, tensor_parallel)
        self.num_groups = divide(config.num_query_groups, tensor_parallel)
        self.head_dim = config.kv_channels
        self.scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(self.head_dim)
        self.dropout = config.attention_dropout if attention_dropout is None else attention_dropout

    def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None):
        if packed_seq_params is not None or attention_bias is not None:
            raise NotImplementedError("SDPAttention supports neither packed sequences nor attention bias")
        # megatron: [s, b, heads, dim] -> SDPA: [b, heads, s, dim]
        query, key, value = (t.permute(1, 2, 0, 3) for t in (query, key, value))
        if attention_mask is not None and attention_mask.dtype != torch.bool:
            return self._per_sample(query, key, value, attention_mask)
        mask_type = attn_mask_type if attn_mask_type is not None else self.attn_mask_type
        sdpa_mask, causal = None, False
        if attention_mask is not None:
            sdpa_mask = ~attention_mask  # SDPA's bool mask: True = attend
        elif mask_type == AttnMaskType.causal:
            causal = query.shape[2] == key.shape[2]
            if not causal and query.shape[2] > 1:  # queries are the last positions of the keys
                offset = key.shape[2] - query.shape[2]
                sdpa_mask = torch.ones(query.shape[2], key.shape[2], dtype=torch.bool,
                                       device=query.device).tril(diagonal=offset)
        output = F.scaled_dot_product_attention(
            query, key, value, attn_mask=sdpa_mask, is_causal=causal, scale=self.scale,
            dropout_p=self.dropout if self.training else 0.0, enable_gqa=self.num_heads != self.num_groups,
        )
        return _to_megatron(output)

    def _per_sample(self, query, key, value, segments):
        """Causal attention within each run of equal ``segments`` values of each row (packed samples)."""
        rows = []
        for row, runs in enumerate(sample_runs(segments)):
            rows.append(torch.cat([F.scaled_dot_product_attention(
                query[row:row + 1, :, start:end], key[row:row + 1, :, start:end], value[row:row + 1, :, start:end],
                is_causal=True, scale=self.scale, dropout_p=self.dropout if self.training else 0.0,
                enable_gqa=self.num_heads != self.num_groups) for start, end in runs], dim=2))
        return _to_megatron(torch.cat(rows))


def _to_megatron(output: torch.Tensor) -> torch.Tensor:
    """SDPA's [b, heads, s, dim] -> megatron's [s, b, heads * dim]."""
    batch, heads, sequence, dim = output.shape
    return output.permute(2, 0, 1, 3).reshape(sequence, batch, heads * dim)
