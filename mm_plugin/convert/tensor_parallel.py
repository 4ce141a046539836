"""Megatron tensor-parallel shards (``mp_rank_0N``, ``state_dict_tp_N.pt``) merged back into full tensors.

Megatron splits column-parallel weights (QKV, first MLP linear, embeddings, output layer) by rows and
row-parallel weights (attention output, second MLP linear) by columns, and copies the rest. A QKV merges
by plain concatenation because each rank holds whole query groups in megatron's grouped order; a gated
first MLP linear does not: each rank holds ``[gate_r; up_r]``, so the halves are regrouped.
"""

from __future__ import annotations

import re
from typing import Optional

import torch

from mm_plugin.convert.errors import ConversionError
from mm_plugin.convert.sources import Entry, TensorStore

_SPLIT_DIMS = (
    (r"(linear_qkv|query_key_value|linear_fc1|dense_h_to_4h)\.(weight|bias)$", 0),
    (r"(word_embeddings|output_layer)\.weight$", 0),
    (r"(linear_proj|dense|linear_fc2|dense_4h_to_h)\.weight$", 1),
)
_GATED = r"(linear_fc1|dense_h_to_4h)\.(weight|bias)$"


def split_dim(key: str) -> Optional[int]:
    for pattern, dim in _SPLIT_DIMS:
        if re.search(pattern, key):
            return dim
    return None


def merge_tensor_parallel(ranks: list[TensorStore], gated: bool, description: str) -> TensorStore:
    """One store of full tensors from one store per tensor-parallel rank (in rank order)."""
    if len(ranks) == 1:
        return ranks[0]
    keys = ranks[0].keys()
    for rank in ranks[1:]:
        if set(rank.keys()) != set(keys):
            odd = sorted(set(rank.keys()) ^ set(keys))[:3]
            raise ConversionError(f"{rank.description}: holds different tensors than {ranks[0].description} "
                                  f"(e.g. {odd}); the rank files are from different checkpoints")
    entries = {}
    for key in keys:
        dim = split_dim(key)
        if dim is None:
            entries[key] = ranks[0].entry(key)
            continue
        shapes = [rank.entry(key).shape for rank in ranks]
        shape = list(shapes[0])
        if any(len(other) != len(shape) or any(a != b for i, (a, b) in enumerate(zip(other, shape)) if i != dim)
               for other in shapes):
            raise ConversionError(f"{description}: {key!r} has shapes {shapes} on the ranks; they do not concatenate")
        shape[dim] = sum(other[dim] for other in shapes)
        first = ranks[0].entry(key)
        entries[key] = Entry(tuple(shape), first.dtype, first.file,
                             lambda key=key, dim=dim: _merged(ranks, key, dim, gated and re.search(_GATED, key)))
    return TensorStore(entries, description)


def _merged(ranks: list[TensorStore], key: str, dim: int, gated: bool) -> torch.Tensor:
    pieces = [rank.read(key) for rank in ranks]
    if gated:
        halves = [piece.chunk(2, dim=0) for piece in pieces]
        return torch.cat([gate for gate, _ in halves] + [up for _, up in halves], dim=0)
    return torch.cat(pieces, dim=dim)
