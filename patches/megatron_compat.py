"""megatron-core 0.12.x next to a current torch and without TransformerEngine.

Defects of megatron-core that MindSpeed users (who must stay on 0.12) and this package's loop hit:

* its checkpoint writer calls torch's ``_write_item`` without the ``serialization_format`` argument
  that torch >= 2.7 requires, so every ``dist_checkpointing.save`` fails in the writer process;
* its distributed optimizer calls the FP8 ``quantize_param_shard`` on every step, and without
  TransformerEngine that function raises even when there is no FP8 parameter at all;
* (0.12 and 0.16) ``parallel_state.destroy_model_parallel`` keeps the old layout's global-rank lists
  (``_EMBEDDING_GLOBAL_RANKS``, ``_POSITION_EMBEDDING_GLOBAL_RANKS``...), which ``initialize`` sets only
  on member ranks, so a process that trains again with another TP/PP layout takes part in collectives
  of groups it no longer belongs to and hangs; and it only forgets its process groups, never destroys
  them: each re-initialisation leaves a few dozen gloo groups, each with a busy network thread.
"""

from __future__ import annotations

import importlib.util
import inspect
import sys

from .registry import MEGATRON_CORE, Patch, wrapping

MEGATRON_012 = {"megatron-core": ">=0.12,<0.13"}


def _needs_serialization_format(original) -> str | None:
    parameter = inspect.signature(original).parameters.get("serialization_format")
    if parameter is None or parameter.default is not inspect.Parameter.empty:
        return "torch's _write_item takes no required serialization_format"
    return None


def _write_item_with_format(wrapped, instance, args, kwargs):
    from torch.distributed.checkpoint.filesystem import SerializationFormat

    if len(args) < 6:
        kwargs.setdefault("serialization_format", SerializationFormat.TORCH_SAVE)
    return wrapped(*args, **kwargs)


def _without_transformer_engine(_original) -> str | None:
    if importlib.util.find_spec("transformer_engine") is not None:
        return "TransformerEngine is installed: FP8 shards are quantised by it"
    return None


def _skip_when_no_fp8_params(wrapped, instance, args, kwargs):
    model_params = args[0] if args else kwargs.get("model_params")
    if not model_params:
        return None
    return wrapped(*args, **kwargs)


def _process_groups(module) -> list:
    import torch.distributed as dist

    found = []
    for value in vars(module).values():
        values = value.values() if isinstance(value, dict) else value if isinstance(value, (list, tuple)) else [value]
        found += [group for group in values if isinstance(group, dist.ProcessGroup) and group not in found]
    return found


def _destroy_groups_and_forget_ranks(wrapped, instance, args, kwargs):
    import torch.distributed as dist

    module = sys.modules[wrapped.__module__]
    groups = _process_groups(module)
    result = wrapped(*args, **kwargs)
    for name in [name for name in vars(module) if name.startswith("_") and name.endswith("_GLOBAL_RANKS")]:
        setattr(module, name, None)
    for group in groups:
        if group is not dist.GroupMember.WORLD and group in dist.distributed_c10d._world.pg_map:
            dist.destroy_process_group(group)
    return result


PATCHES = [
    Patch(
        name="compat.checkpoint_write_item",
        target="megatron.core.dist_checkpointing.strategies.filesystem_async:_write_item",
        replace=wrapping(_write_item_with_format),
        reason="megatron-core 0.12 omits serialization_format, which torch >= 2.7 requires",
        versions=MEGATRON_012,
        guard=_needs_serialization_format,
    ),
    Patch(
        name="compat.quantize_param_shard",
        target="megatron.core.optimizer.distrib_optimizer:quantize_param_shard",
        replace=wrapping(_skip_when_no_fp8_params),
        reason="megatron-core 0.12's distributed optimizer raises without TransformerEngine even with no FP8 parameter",
        versions=MEGATRON_012,
        guard=_without_transformer_engine,
    ),
    Patch(
        name="compat.destroy_model_parallel",
        target="megatron.core.parallel_state:destroy_model_parallel",
        replace=wrapping(_destroy_groups_and_forget_ranks),
        reason="destroy_model_parallel keeps the old layout's rank lists (re-initialising hangs) and leaks its groups",
        versions=MEGATRON_CORE,
    ),
]
