"""What a conversion will write, checked against the target dimensions before a byte is read.

``plan_part`` walks the key table (``mm_plugin.models.hf_keys``) for one part: every source tensor must
be present with the shape the dimensions imply (computed by running the table's conversions on meta
tensors), nothing in the source may be left unused, and every output tensor's name, shape and dtype are
known up front — which lets a writer lay out a file's header before streaming its data.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Callable, Optional

import torch

from mm_plugin.convert.errors import ConversionError
from mm_plugin.convert.sources import TensorStore
from mm_plugin.models.hf_keys import KeyRule, PartDims, count_layers, is_weight, part_keys

PART_NAMES = {"vision": "CLIP vision tower", "projector": "two-layer MLP projector", "linear_projector": "linear projector",
              "language": "language model"}


@dataclasses.dataclass(frozen=True)
class Planned:
    """One output tensor: name, shape and dtype known before any data is read, and how to make it."""

    key: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    make: Callable[[], torch.Tensor]
    inputs: tuple[Path, ...]

    @property
    def nbytes(self) -> int:
        return torch.Size(self.shape).numel() * torch.empty((), dtype=self.dtype).element_size()


@dataclasses.dataclass
class PartPlan:
    tensors: list[Planned]
    notes: list[str]


def describe(part: str, dims: PartDims) -> str:
    """The dimensions a part's shapes follow, for error messages."""
    if part in ("projector", "linear_projector"):
        return f"input {dims.input_size}, hidden {dims.hidden}" + (f", ffn {dims.ffn}" if part == "projector" else "")
    text = (f"{dims.num_layers} layers, hidden {dims.hidden}, ffn {dims.ffn}, {dims.heads} heads in "
            f"{dims.groups} groups of {dims.head_dim}")
    if part == "vision":
        return text + f", {dims.positions} positions, patch {dims.patch}"
    return text + f", vocabulary {dims.vocab}"


def plan_part(part: str, store: TensorStore, dims: PartDims, *, source_layout: str, expected_from: str,
              target_layout: str = "megatron", dtype: Optional[torch.dtype] = None,
              output_key: Callable[[str], str] = lambda key: key) -> PartPlan:
    """Plan the conversion of one part from ``source_layout`` to ``target_layout`` (``megatron``: ours).

    ``expected_from`` names where ``dims`` came from (a config file), for error messages."""
    held = count_layers(part, store.entry, source_layout)
    if held != dims.num_layers:
        raise ConversionError(f"{store.description} holds {held} {PART_NAMES[part]} layers; {expected_from} "
                              f"says {dims.num_layers}")
    plan = PartPlan([], [])
    consumed: set[str] = set()
    absent: list[str] = []
    targets = part_keys(part, dims.num_layers, target_layout)
    for source, target in zip(part_keys(part, dims.num_layers, source_layout), targets):
        if source.optional and not any(key in store for key in source.source):
            absent += source.source
            continue
        out_dtype = _check_sources(part, store, source, dims, expected_from)
        out_dtype = dtype or out_dtype
        consumed.update(source.source)
        expected_targets = target.from_ours(dims.attention, torch.empty(source.shape(dims), device="meta"))
        make = _row_maker(source, target, dims, store, out_dtype)
        inputs = tuple(sorted({store.entry(key).file for key in source.source}))
        for index, (key, meta) in enumerate(zip(target.source, expected_targets)):
            plan.tensors.append(Planned(output_key(key), tuple(meta.shape), out_dtype,
                                        lambda index=index, make=make: make(index), inputs))
    if absent:
        plan.notes.append(f"{store.description} has no {', '.join(absent)} (LLaVA never uses it); not written")
    unexpected = [key for key in store.keys() if key not in consumed and is_weight(key)]
    if unexpected:
        listed = ", ".join(f"{store.display(key)!r} ({store.entry(key).file.name})" for key in unexpected[:6])
        raise ConversionError(
            f"{store.description}: {len(unexpected)} unexpected tensor(s) for a {f'{held}-layer ' if held else ''}"
            f"{PART_NAMES[part]} in the {source_layout!r} layout: {listed}{' ...' if len(unexpected) > 6 else ''}. "
            "Is this the right input for this command?")
    return plan


def _check_sources(part: str, store: TensorStore, rule: KeyRule, dims: PartDims, expected_from: str) -> torch.dtype:
    missing = [key for key in rule.source if key not in store]
    if missing:
        raise ConversionError(f"{store.description}: missing tensor {store.display(missing[0])!r} (part of our "
                              f"{rule.ours!r}) of a {PART_NAMES[part]} with {describe(part, dims)} (from "
                              f"{expected_from}). An incomplete download, or a different model?")
    expected = rule.from_ours(dims.attention, torch.empty(rule.shape(dims), device="meta"))
    dtypes = set()
    for key, meta in zip(rule.source, expected):
        entry = store.entry(key)
        if entry.shape != tuple(meta.shape):
            raise ConversionError(
                f"{entry.file}: {store.display(key)!r} has shape {list(entry.shape)}, expected {list(meta.shape)} for "
                f"{expected_from} ({describe(part, dims)})")
        if not entry.dtype.is_floating_point:
            raise ConversionError(f"{entry.file}: {store.display(key)!r} is {entry.dtype}; weights are floating point")
        dtypes.add(entry.dtype)
    if len(dtypes) > 1:
        raise ConversionError(f"{store.description}: {', '.join(rule.source)} mix dtypes {sorted(map(str, dtypes))}; "
                              "pass --dtype to convert them to one")
    return dtypes.pop()


def _row_maker(source: KeyRule, target: KeyRule, dims: PartDims, store: TensorStore, dtype: torch.dtype):
    """Makes a row's target tensors once (a QKV split gives three) and hands them out one by one, so
    at most one row's tensors are held at a time."""
    pending: dict[int, torch.Tensor] = {}

    def make(index: int) -> torch.Tensor:
        if not pending:
            ours = source.to_ours(dims.attention, *(store.read(key) for key in source.source))
            pending.update(enumerate(target.from_ours(dims.attention, ours)))
        return pending.pop(index).to(dtype).contiguous()

    return make
