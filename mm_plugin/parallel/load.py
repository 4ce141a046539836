"""Load a full (TP=1, PP=1) state dict into this rank's shards of a megatron-core model.

Every rank reads only its own slices (see ``sources``). Loading is all-or-nothing across ranks: each
rank first checks every tensor it needs (present, right shape for this TP size), the ranks agree, and
only when no rank found a problem does any rank copy. A problem found on one pipeline stage is
reported by every rank, and no rank's weights change.
"""

from __future__ import annotations

import dataclasses
from collections import defaultdict
from typing import Callable, Optional, Union

import torch

from .placement import ModelChunks, Placement, from_every_rank, placements, tensor_parallel_group
from .sources import SourceLike, TensorSource, open_source, source_name

_LISTED = 20  # problems listed in an error before "... and N more"


class FullStateDictError(ValueError):
    """The full state dict does not fit the model. Raised on every rank, before any rank changed a weight."""


@dataclasses.dataclass
class LoadResult:
    loaded: list[str]  # full keys copied into this rank's module
    missing: list[str]  # full keys this rank needs that the source lacks (kept as they were; allow_missing)
    unexpected: list[str]  # source keys that no rank's module uses (allow_unexpected)


def load_full_state_dict(model: ModelChunks, source: SourceLike, *, prefix: str = "",
                         vocab_size: Optional[int] = None,
                         allow_missing: Union[bool, Callable[[str], bool]] = False,
                         allow_unexpected: bool = False) -> LoadResult:
    """Copy a full state dict into this rank's part of ``model``. Collective: every rank must call it.

    model:    a megatron-core module built for this rank's tensor/pipeline-parallel position (DDP or
              Float16Module wrappers are looked through), or this rank's list of virtual-pipeline chunks.
    source:   a ``.safetensors`` or ``.pt``/``.bin`` path (read slice by slice / memory-mapped), or a
              mapping of full tensors.
    prefix:   load into the submodule at this path only (e.g. ``"language_model."``); the source's keys
              lack the prefix (a part file).
    vocab_size: the true vocabulary size; when given, vocabulary tables in the source must have exactly
              that many rows (otherwise any number up to the model's padded rows is accepted).
    allow_missing: tensors the source lacks keep their values (e.g. load only the projector); a function of the
              full key allows just the keys it accepts (a LoRA model's adapters, which no part file holds).
    allow_unexpected: source keys no rank uses are ignored.

    Build the optimizer after loading (or have it re-read the model's parameters): it keeps its own copies.
    """
    tp_size, tp_rank, _ = tensor_parallel_group()
    check, failure = _Check(name=source_name(source)), None
    try:
        check = _check(model, open_source(source), prefix, tp_size, vocab_size, allow_missing)
    except Exception as error:  # unreadable file, unsupported layer: every rank must still hear of it
        check.problems, failure = [f"{type(error).__name__}: {error}"], error

    reports = from_every_rank((check.problems, check.used))
    unexpected = sorted(check.available.difference(*(set(used) for _, used in reports)))
    by_problem = defaultdict(list)
    for rank, (rank_problems, _) in enumerate(reports):
        for problem in rank_problems:
            by_problem[problem].append(rank)
    lines = [f"{_ranks(ranks)}: {problem}" for problem, ranks in by_problem.items()]
    if not allow_unexpected:
        lines += [f"{key}: in {check.name} but no parameter of the model uses it" for key in unexpected]
    if lines:
        raise FullStateDictError(_message(check.name, prefix, lines)) from failure

    with torch.no_grad():
        for placement in check.plan:
            _copy(placement, check.source, tp_size, tp_rank)
    return LoadResult(loaded=sorted({p.full_key for p in check.plan}), missing=check.missing, unexpected=unexpected)


@dataclasses.dataclass
class _Check:
    """This rank's findings before anything is copied."""

    name: str
    source: Optional[TensorSource] = None
    available: set = dataclasses.field(default_factory=set)  # the source's keys
    used: list = dataclasses.field(default_factory=list)  # full keys this rank's module has
    plan: list = dataclasses.field(default_factory=list)  # placements to copy
    missing: list = dataclasses.field(default_factory=list)
    problems: list = dataclasses.field(default_factory=list)


def _check(model, source: TensorSource, prefix, tp_size, vocab_size, allow_missing) -> _Check:
    available = set(source.keys())
    needed = placements(model, prefix)
    check = _Check(name=source.name, source=source, available=available, used=sorted({p.full_key for p in needed}))
    check.missing = sorted({p.full_key for p in needed if p.full_key not in available})
    check.plan = [p for p in needed if p.full_key in available]
    check.problems = [problem for p in check.plan
                      if (problem := _shape_problem(p, source, tp_size, vocab_size)) is not None]
    if allow_missing is not True:
        check.problems += [f"{key}: missing from {source.name}" for key in check.missing
                           if not (allow_missing and allow_missing(key))]
    return check


def _along(dim: int, part: slice, ndim: int) -> tuple:
    return tuple(part if axis == dim else slice(None) for axis in range(ndim))


def _copy(placement: Placement, source: TensorSource, tp_size: int, tp_rank: int) -> None:
    tensor, key, ndim = placement.tensor, placement.full_key, placement.tensor.dim()
    if placement.dim is None:
        tensor.copy_(source.read(key, (slice(None),) * ndim))
        return
    if placement.vocab:
        tensor.zero_()  # padding rows, past the full table's end
    full_length = source.shape(key)[placement.dim]
    for local, full in placement.pieces(tp_size, tp_rank, full_length):
        tensor[_along(placement.dim, local, ndim)].copy_(source.read(key, _along(placement.dim, full, ndim)))


def _shape_problem(placement: Placement, source: TensorSource, tp_size: int, vocab_size: Optional[int]):
    found, expected = list(source.shape(placement.full_key)), list(placement.full_shape(tp_size))
    if placement.vocab and placement.dim is not None and len(found) == len(expected):
        dim, rows, padded = placement.dim, found[placement.dim], expected[placement.dim]
        rows_fit = 0 < rows <= padded and (vocab_size is None or rows == vocab_size)
        if rows_fit and all(f == e for axis, (f, e) in enumerate(zip(found, expected)) if axis != dim):
            return None
        expected[dim] = vocab_size if vocab_size is not None and vocab_size <= padded else f"<={padded}"
    elif found == expected:
        return None
    return (f"{placement.full_key}: the model (tensor parallel size {tp_size}) needs shape "
            f"[{', '.join(map(str, expected))}], {source.name} has {found}")


def _ranks(ranks: list[int]) -> str:
    return f"rank {ranks[0]}" if len(ranks) == 1 else f"ranks {', '.join(map(str, ranks))}"


def _message(name: str, prefix: str, lines: list[str]) -> str:
    listed = lines[:_LISTED] + ([f"... and {len(lines) - _LISTED} more"] if len(lines) > _LISTED else [])
    into = f"the model's {prefix!r} submodule" if prefix else "the model"
    return (
        f"cannot load {name} into {into}: {len(lines)} problem(s); no rank changed any weight.\n  "
        + "\n  ".join(listed)
        + "\nCheck that the file was converted for this model's configuration (sizes, heads, query groups, "
        "layers, vocabulary), load a part file into its submodule with prefix='language_model.' (for "
        "example), or allow a partial load with allow_missing=True / allow_unexpected=True."
    )
