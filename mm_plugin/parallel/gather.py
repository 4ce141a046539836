"""Gather a TP/PP-sharded megatron-core model back into a full (TP=1, PP=1) state dict.

Tensor by tensor in one global key order: the tensor-parallel peers that hold a key all-gather it, and
the lowest rank holding it (its owner) sends it to the destination (or broadcasts it), so no rank ever
holds more than the full dict plus one tensor.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.distributed as dist

from mm_plugin import device

from .placement import ModelChunks, Placement, from_every_rank, placements, tensor_parallel_group


def gather_full_state_dict(model: ModelChunks, *, prefix: str = "", vocab_size: Optional[int] = None,
                           dst: Optional[int] = 0,
                           select: Optional[Callable[[torch.Tensor], Optional[torch.Tensor]]] = None,
                           ) -> Optional[dict[str, torch.Tensor]]:
    """The full state dict of ``model`` (keys without ``prefix``), as CPU tensors. Collective.

    vocab_size: trims the vocabulary tables' padding rows back to the true vocabulary.
    dst:        the rank that receives the dict (others get None); None: every rank gets it.
    select:     what to gather for each parameter or buffer instead of the tensor itself, e.g.
                ``lambda p: p.grad``; a None result leaves the key out.
    """
    tp_size, _, tp_group = tensor_parallel_group()
    distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    rank = dist.get_rank() if distributed else 0
    mine = {}
    for placement in placements(model, prefix):
        value = placement.tensor if select is None else select(placement.tensor)
        if value is not None:
            mine[placement.full_key] = (placement, value.detach())
    owners, shapes = _agree_on_keys(mine, tp_size, vocab_size)
    peers = set(dist.get_process_group_ranks(tp_group)) if distributed and tp_group is not None else {rank}

    full_state = {}
    for key in sorted(owners):
        owner, (shape, dtype) = owners[key], shapes[key]
        full = None
        if key in mine and owner in peers:  # this rank's TP group owns the key: assemble it
            placement, value = mine[key]
            full = _trim(placement, _tp_all_gather(placement, value, tp_size, tp_group), vocab_size)
        if not distributed:
            full_state[key] = full.to("cpu", copy=True)
        elif dst is None:
            buffer = full.contiguous() if rank == owner else torch.empty(shape, dtype=dtype, device=device.current())
            dist.broadcast(buffer, src=owner)
            full_state[key] = buffer.to("cpu", copy=True)
        elif rank == owner == dst:
            full_state[key] = full.to("cpu", copy=True)
        elif rank == owner:
            dist.send(full.contiguous(), dst)
        elif rank == dst:
            buffer = torch.empty(shape, dtype=dtype, device=device.current())
            dist.recv(buffer, src=owner)
            full_state[key] = buffer.cpu()
    return full_state if dst is None or rank == dst or not distributed else None


def _agree_on_keys(mine: dict, tp_size: int, vocab_size: Optional[int]) -> tuple[dict, dict]:
    """Every key's owner (the lowest rank holding it) and its gathered ``(shape, dtype)``. Collective; a
    problem found on any rank is raised on every rank, before any tensor moves."""
    metadata, problems = {}, []
    for key, (placement, value) in mine.items():
        if _trims(placement, vocab_size) and vocab_size > placement.full_shape(tp_size)[placement.dim]:
            problems.append(f"{key}: vocab_size={vocab_size} is larger than the model's "
                            f"{placement.full_shape(tp_size)[placement.dim]} rows")
        metadata[key] = (_gathered_shape(placement, tp_size, vocab_size), value.dtype)
    owners, shapes, everyones_problems = {}, {}, set()
    for owner, (rank_metadata, rank_problems) in enumerate(from_every_rank((metadata, problems))):
        everyones_problems.update(rank_problems)
        for key, shape_and_dtype in rank_metadata.items():
            owners.setdefault(key, owner)
            shapes.setdefault(key, shape_and_dtype)
    if everyones_problems:
        raise ValueError("cannot gather the full state dict: " + "; ".join(sorted(everyones_problems)))
    return owners, shapes


def _trims(placement: Placement, vocab_size: Optional[int]) -> bool:
    return placement.vocab and vocab_size is not None and placement.dim is not None


def _gathered_shape(placement: Placement, tp_size: int, vocab_size: Optional[int]) -> tuple[int, ...]:
    shape = list(placement.full_shape(tp_size))
    if _trims(placement, vocab_size):
        shape[placement.dim] = min(vocab_size, shape[placement.dim])
    return tuple(shape)


def _trim(placement: Placement, full: torch.Tensor, vocab_size: Optional[int]) -> torch.Tensor:
    return full.narrow(placement.dim, 0, vocab_size) if _trims(placement, vocab_size) else full


def _tp_all_gather(placement: Placement, value: torch.Tensor, tp_size: int, tp_group) -> torch.Tensor:
    if placement.dim is None or tp_size == 1:
        return value
    parts = [torch.empty_like(value) for _ in range(tp_size)]
    dist.all_gather(parts, value.contiguous(), group=tp_group)
    blocks = [part.chunk(placement.stride, dim=placement.dim) for part in parts]
    return torch.cat([blocks[rank][index] for index in range(placement.stride) for rank in range(tp_size)],
                     dim=placement.dim)
