"""Inference's matrix products on the CPU: oneDNN, each weight packed once into its blocked layout.

torch sends a float32 CPU matmul to MKL, which on AMD processors does not reach the machine's speed: on
the benchmark machine's 2 Zen 4 cores, the prompt's GEMMs run at 115-153 GFLOP/s through MKL and at
187-206 through oneDNN with a packed weight, and the output layer's one-row product (a decode step)
reads its weight at 8 GB/s through MKL and 26 GB/s packed (``python bench/cpu_linear.py``). oneDNN is
part of every x86 and Arm build of torch (torch uses it for bf16 matmuls, and its compiler for CPU
graphs with frozen weights, which is where this packing comes from).

The packed copy of a weight is made at its first use and kept beside it (weakly: it goes when the weight
goes), and made again when the weight changes (torch's version counter of the tensor). It is a second
copy of each matrix it packs. ``MM_PLUGIN_CPU_LINEAR=torch`` turns it off (plain ``F.linear``).
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch.utils.weak import WeakIdKeyDictionary

_PACKED = WeakIdKeyDictionary()  # weight -> (its version when packed, the packed weight)
_DTYPES = (torch.float32, torch.bfloat16)


def enabled() -> bool:
    """Whether CPU linears go through packed oneDNN weights (``MM_PLUGIN_CPU_LINEAR``: ``onednn``, the
    default where torch has oneDNN, or ``torch``)."""
    choice = os.environ.get("MM_PLUGIN_CPU_LINEAR", "onednn")
    if choice not in ("onednn", "torch"):
        raise ValueError(f"MM_PLUGIN_CPU_LINEAR={choice!r}: use onednn or torch")
    return choice == "onednn" and torch.backends.mkldnn.is_available()


def linear_for(tensor: torch.Tensor):
    """The linear function (``f(x, weight)``, no bias) for weights of ``tensor``'s device and dtype: packed
    oneDNN for float32 and bf16 on the CPU when :func:`enabled`, ``F.linear`` otherwise."""
    if tensor.device.type == "cpu" and tensor.dtype in _DTYPES and enabled():
        return packed_linear
    return F.linear


def packed_linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``x @ weight.T`` with ``weight`` [out, in] packed for oneDNN (packed at first use, again if it changed)."""
    entry = _PACKED.get(weight)
    if entry is None or entry[0] != weight._version:
        with torch.no_grad():
            entry = (weight._version, torch.ops.mkldnn._reorder_linear_weight(weight.detach()))
        _PACKED[weight] = entry
    return torch.ops.mkldnn._linear_pointwise(x.contiguous(), entry[1], None, "none", [], "")
