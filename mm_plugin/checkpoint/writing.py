"""Writing training checkpoints: a model's weights with the bookkeeping every reader relies on (iteration,
consumed samples, the parallel layout, the model configuration), written atomically. Saving is atomic: all
ranks write into ``iter_N.partial``, which is renamed to ``iter_N`` once complete, with ``manifest.json`` (every
file's size and CRC-32) inside; the tracker file is written last, so a crash leaves the previous checkpoint as
the latest. What a training run adds (optimizer, LR schedule, RNG states) and resuming are
``mm_plugin.training.checkpointing``'s.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import torch
from megatron.core import dist_checkpointing, parallel_state

from mm_plugin.checkpoint.manifest import write_manifest
from mm_plugin.checkpoint.reading import TRACKER, iteration_dir
from mm_plugin.safe_io import write_text

FORMAT_VERSION = 1


def model_sharded_state(model: torch.nn.Module, trainable_only: bool) -> dict:
    """The model's sharded tensors (``trainable_only``: parameters with ``requires_grad``)."""
    state = model.sharded_state_dict()
    if not trainable_only:
        return state
    trainable = {name for name, parameter in model.named_parameters() if parameter.requires_grad}
    return {name: tensor for name, tensor in state.items() if name in trainable}


def parallel_layout() -> dict[str, int]:
    return dict(tp=parallel_state.get_tensor_model_parallel_world_size(),
                pp=parallel_state.get_pipeline_model_parallel_world_size(),
                dp=parallel_state.get_data_parallel_world_size())


def weights_state(model: torch.nn.Module, iteration: int, *, consumed_samples: int, model_config: dict,
                  trainable_only: bool = True) -> dict[str, Any]:
    """What every checkpoint holds: the model's (trainable) weights and the bookkeeping beside them."""
    return {
        "model": model_sharded_state(model, trainable_only),
        "iteration": iteration,
        "consumed_train_samples": consumed_samples,
        "mm_plugin": {"format": FORMAT_VERSION, "trainable_only": trainable_only, "layout": parallel_layout(),
                      "model_config": model_config},
    }


def write_checkpoint(root: str | Path, iteration: int, state: dict[str, Any]) -> Path:
    """``state`` (a dist_checkpointing state dict) as ``root/iter_N`` on every rank (collective), atomically;
    returns the final directory."""
    root = Path(root)
    final = iteration_dir(root, iteration)
    partial = final.with_name(final.name + ".partial")
    rank = torch.distributed.get_rank()
    if rank == 0:
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
    torch.distributed.barrier()
    dist_checkpointing.save(state, str(partial))
    torch.distributed.barrier()
    write_manifest(partial)  # before the tracker moves: a listed checkpoint always has its manifest
    torch.distributed.barrier()
    if rank == 0:
        shutil.rmtree(final, ignore_errors=True)
        partial.rename(final)
        write_text(root / TRACKER, f"{iteration}\n")
    torch.distributed.barrier()
    return final
