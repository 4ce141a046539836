"""Inference's matrix products on the CPU: oneDNN, each weight packed once into its blocked layout.

torch sends a float32 CPU matmul to MKL, which on AMD processors does not reach the machine's speed: on
the benchmark machine's 2 Zen 4 cores, the prompt's GEMMs run at 126-168 GFLOP/s through MKL and at
168-206 through oneDNN with a packed weight, and the output layer's one-row product (a decode step)
reads its weight at 10.5 GB/s through MKL and 24.3 GB/s packed (``python bench/cpu_linear.py``, in
BENCHMARKS.md). oneDNN is
part of every x86 and Arm build of torch (torch uses it for bf16 matmuls, and its compiler for CPU
graphs with frozen weights, which is where this packing comes from).

A oneDNN call has a larger fixed cost than MKL's, so small products stay with ``F.linear``: a weight under
2^18 elements (smaller than 512 x 512), or a product under 2^20 multiply-adds (one row through a 512 x 1376
weight, say). In that table packed loses at [512, 512] x 1 row (0.79x), is about even at [512, 1376] x 1
(1.08x) and gains on every matrix with 8 rows (1.28-3.81x); [1536, 512] x 1 measured between even
and 1.44x in different runs and stays with ``F.linear``.

The packed copy of a weight is made at its first use and kept beside it (weakly: it goes when the weight
goes), and made again when the weight changes (torch's version counter of the tensor). It is a second
copy of each matrix it packs; when packing one more would leave less than an eighth of the machine's
memory available, the remaining matrices stay unpacked (with a warning). ``MM_PLUGIN_CPU_LINEAR=torch``
turns it off (plain ``F.linear``).
"""

from __future__ import annotations

import functools
import os
import warnings
from typing import Optional

import torch
import torch.nn.functional as F
from torch.utils.weak import WeakIdKeyDictionary

_PACKED = WeakIdKeyDictionary()  # weight -> {its part: (its version when packed, the packed part)}
_DTYPES = (torch.float32, torch.bfloat16)
MIN_WEIGHT_ELEMENTS = 1 << 18
MIN_MULTIPLY_ADDS = 1 << 20


def enabled() -> bool:
    """Whether CPU linears go through packed oneDNN weights (``MM_PLUGIN_CPU_LINEAR``: ``onednn``, the
    default where torch has oneDNN, or ``torch``)."""
    choice = os.environ.get("MM_PLUGIN_CPU_LINEAR", "onednn")
    if choice not in ("onednn", "torch"):
        raise ValueError(f"MM_PLUGIN_CPU_LINEAR={choice!r}: use onednn or torch")
    return choice == "onednn" and has_onednn()


@functools.lru_cache(maxsize=None)
def has_onednn() -> bool:
    """Whether this torch has oneDNN and the two operators used here (torch's own compiler uses them)."""
    try:
        torch.ops.mkldnn._reorder_linear_weight, torch.ops.mkldnn._linear_pointwise
    except (AttributeError, RuntimeError):
        return False
    return torch.backends.mkldnn.is_available()


def linear_for(tensor: torch.Tensor):
    """The linear function (``F.linear``'s signature) for weights of ``tensor``'s device and dtype:
    :func:`linear` for float32 and bf16 on the CPU when :func:`enabled`, ``F.linear`` otherwise."""
    if tensor.device.type == "cpu" and tensor.dtype in _DTYPES and enabled():
        return linear
    return F.linear


def linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``F.linear(x, weight, bias)``: packed oneDNN for a product big enough to gain from it (and a weight
    there is memory to pack), else ``F.linear``. oneDNN's product has no backward: a product autograd
    must record runs through ``F.linear``."""
    rows = x.numel() // x.shape[-1]
    if (weight.numel() < MIN_WEIGHT_ELEMENTS or rows * weight.numel() < MIN_MULTIPLY_ADDS
            or torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)):
        return F.linear(x, weight, bias)
    packed = _packed(weight, check_memory=True)
    return F.linear(x, weight, bias) if packed is None else _run(x, packed, bias)


def packed_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` with ``weight`` [out, in] packed for oneDNN (packed at first use, again if
    it changed), whatever its size and the memory left."""
    return _run(x, _packed(weight, check_memory=False), bias)


def _run(x: torch.Tensor, packed: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x.contiguous(), packed, bias, "none", [], "")


def packed_copy(weight: torch.Tensor) -> Optional[torch.Tensor]:
    """The packed copy kept for ``weight`` (None: not packed)."""
    owner, part = _owner_and_part(weight)
    entry = _PACKED.get(owner, {}).get(part)
    return None if entry is None else entry[1]


def _packed(weight: torch.Tensor, check_memory: bool) -> Optional[torch.Tensor]:
    """``weight``'s packed copy, made now if it has none or it changed since; None where ``check_memory``
    found no room for it (that weight then stays unpacked until it changes)."""
    owner, part = _owner_and_part(weight)
    parts = _PACKED.setdefault(owner, {})
    entry = parts.get(part)
    if entry is None or entry[0] != weight._version or (entry[1] is None and not check_memory):
        packed = None
        if not check_memory or _room_for(weight.numel() * weight.element_size()):
            with torch.no_grad():
                packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach())
        entry = parts[part] = (weight._version, packed)
    return entry[1]


def _owner_and_part(weight: torch.Tensor) -> tuple[torch.Tensor, tuple]:
    """A view (the gate half of a fused weight, say: a new tensor object at each slicing) is kept with the
    tensor it views, under its place in it; a view shares that tensor's version counter."""
    owner = weight if weight._base is None else weight._base
    return owner, (weight.storage_offset(), tuple(weight.shape), weight.stride())


def _room_for(size: int) -> bool:
    """Whether a copy of ``size`` bytes leaves at least an eighth of the machine's memory (1 GiB at least)
    available. A model that only just fits keeps running, unpacked, instead of running out of memory."""
    available, total = memory()
    if available is None or available - size >= max(1 << 30, total // 8):
        return True
    warnings.warn(f"mm_plugin: {available / 2**30:.1f} GiB of memory available; matrices are no longer packed "
                  "for oneDNN (their products run through F.linear, slower on AMD processors). "
                  "MM_PLUGIN_CPU_LINEAR=torch turns packing off altogether.", RuntimeWarning, stacklevel=3)
    return False


def memory() -> tuple[Optional[int], int]:
    """(available, total) bytes of memory from ``/proc/meminfo``; (None, 0) where it cannot be read."""
    try:
        with open("/proc/meminfo") as file:
            fields = dict(line.split(":", 1) for line in file)
        return int(fields["MemAvailable"].split()[0]) * 1024, int(fields["MemTotal"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return None, 0
