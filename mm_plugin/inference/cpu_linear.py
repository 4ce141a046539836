"""Inference's matrix products on the CPU: oneDNN, each weight packed once into its blocked layout.

torch sends a float32 CPU matmul to MKL, which on AMD processors does not reach the machine's speed: on
the benchmark machine's 2 Zen 4 cores, the prompt's GEMMs run at 115-153 GFLOP/s through MKL and at
187-206 through oneDNN with a packed weight, and the output layer's one-row product (a decode step)
reads its weight at 8 GB/s through MKL and 26 GB/s packed (``python bench/cpu_linear.py``). oneDNN is
part of every x86 and Arm build of torch (torch uses it for bf16 matmuls, and its compiler for CPU
graphs with frozen weights, which is where this packing comes from).

A oneDNN call costs about 20 us more than MKL's, so small products stay with ``F.linear``: a weight of
fewer than 2^18 elements (512 x 512), or fewer than 2^20 multiply-adds in all (a 512 x 512 weight and one
row). Measured crossovers, same machine: packed loses at [512, 512] x 1 row (45 against 34 us), ties at
[1536, 512] x 1, wins from [512, 512] x 8 rows (70 against 114 us) up.

The packed copy of a weight is made at its first use and kept beside it (weakly: it goes when the weight
goes), and made again when the weight changes (torch's version counter of the tensor). It is a second
copy of each matrix it packs. ``MM_PLUGIN_CPU_LINEAR=torch`` turns it off (plain ``F.linear``).
"""

from __future__ import annotations

import os
from typing import Optional

import torch
import torch.nn.functional as F
from torch.utils.weak import WeakIdKeyDictionary

_PACKED = WeakIdKeyDictionary()  # weight -> (its version when packed, the packed weight)
_DTYPES = (torch.float32, torch.bfloat16)
MIN_WEIGHT_ELEMENTS = 1 << 18
MIN_MULTIPLY_ADDS = 1 << 20


def enabled() -> bool:
    """Whether CPU linears go through packed oneDNN weights (``MM_PLUGIN_CPU_LINEAR``: ``onednn``, the
    default where torch has oneDNN, or ``torch``)."""
    choice = os.environ.get("MM_PLUGIN_CPU_LINEAR", "onednn")
    if choice not in ("onednn", "torch"):
        raise ValueError(f"MM_PLUGIN_CPU_LINEAR={choice!r}: use onednn or torch")
    return choice == "onednn" and torch.backends.mkldnn.is_available()


def linear_for(tensor: torch.Tensor):
    """The linear function (``F.linear``'s signature) for weights of ``tensor``'s device and dtype:
    :func:`linear` for float32 and bf16 on the CPU when :func:`enabled`, ``F.linear`` otherwise."""
    if tensor.device.type == "cpu" and tensor.dtype in _DTYPES and enabled():
        return linear
    return F.linear


def linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``F.linear(x, weight, bias)``: packed oneDNN for a product big enough to gain from it, else ``F.linear``."""
    rows = x.numel() // x.shape[-1]
    if weight.numel() < MIN_WEIGHT_ELEMENTS or rows * weight.numel() < MIN_MULTIPLY_ADDS:
        return F.linear(x, weight, bias)
    return packed_linear(x, weight, bias)


def packed_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` with ``weight`` [out, in] packed for oneDNN (packed at first use, again if it changed)."""
    entry = _PACKED.get(weight)
    if entry is None or entry[0] != weight._version:
        with torch.no_grad():
            entry = (weight._version, torch.ops.mkldnn._reorder_linear_weight(weight.detach()))
        _PACKED[weight] = entry
    return torch.ops.mkldnn._linear_pointwise(x.contiguous(), entry[1], bias, "none", [], "")
