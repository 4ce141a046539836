"""Saving training checkpoints in Megatron's layout, and resuming from them (the read side every layer
needs, finding and verifying a checkpoint and reading its weights, is ``mm_plugin.checkpoint.reading``; the
weights, the bookkeeping and the atomic write, which ``mm-convert`` uses too, ``mm_plugin.checkpoint.writing``).

A checkpoint holds the model weights (by default only the trainable ones: a stage-1 checkpoint is the
projector, megabytes, not the frozen 7B decoder), the optimizer, the LR scheduler, every rank's RNG
state, the data position (consumed samples) and the model configuration. Saving is atomic: all ranks
write into ``iter_N.partial``, which is renamed to ``iter_N`` once complete; the tracker file is
written last, so a crash leaves the previous checkpoint as the latest. Before the rename every file's
size and CRC-32 go into ``manifest.json``, which every load verifies (``reading_checkpoint``).

Megatron-LM's stock ``pretrain()`` saves the same layout with its own bookkeeping: its arguments
(where ``launch/pretrain.py`` puts the model configuration, ``mm_model_config``) instead of ours. Its
weights read the same way (export, ``--finetune``); resuming one continues under Megatron-LM.
"""

from __future__ import annotations

import logging
import random
import re
from pathlib import Path
from typing import Any

import numpy
import torch
from megatron.core import dist_checkpointing, parallel_state, tensor_parallel
from megatron.core.dist_checkpointing.serialization import load_sharded_metadata
from megatron.core.dist_checkpointing.mapping import ShardedObject, ShardedTensor

from mm_plugin import device
from mm_plugin.checkpoint.reading import (CheckpointError, common_state, load_model_weights, reading_checkpoint,
                                          saved_model_config)
from mm_plugin.checkpoint.writing import model_sharded_state, parallel_layout, weights_state, write_checkpoint

logger = logging.getLogger(__name__)

# --- what goes in ----------------------------------------------------------------------------


def _rng_state() -> ShardedObject:
    """This rank's generators, one object per (pp, tp, dp) position: restored exactly on the same layout."""
    state = {
        "random": random.getstate(),
        "numpy": numpy.random.get_state(),
        "torch": torch.get_rng_state(),
        "device": device.get_rng_state(),
        "tracker": tensor_parallel.get_cuda_rng_tracker().get_states(),
    }
    layout = parallel_layout()
    position = (parallel_state.get_pipeline_model_parallel_rank(), parallel_state.get_tensor_model_parallel_rank(),
                parallel_state.get_data_parallel_rank())
    return ShardedObject("rng_state", state, (layout["pp"], layout["tp"], layout["dp"]), position, replica_id=0)


def _restore_rng(state: dict) -> None:
    random.setstate(state["random"])
    numpy.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    device.set_rng_state(state["device"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])


def save_checkpoint(root: str | Path, iteration: int, model, optimizer, scheduler, *, consumed_samples: int,
                    model_config: dict, trainable_only: bool = True, save_optimizer: bool = True,
                    save_rng: bool = True) -> Path:
    """Save on every rank (collective); returns the final directory."""
    state = weights_state(model, iteration, consumed_samples=consumed_samples, model_config=model_config,
                          trainable_only=trainable_only)
    if save_optimizer:
        state["optimizer"] = optimizer.sharded_state_dict(state["model"])
        state["opt_param_scheduler"] = scheduler.state_dict()
    if save_rng:
        state["rng_state"] = _rng_state()
    return write_checkpoint(root, iteration, state)


# --- resuming --------------------------------------------------------------------------


def load_checkpoint(path: str | Path, model, optimizer, scheduler, *, load_optimizer: bool = True,
                    load_rng: bool = True, finetune: bool = False) -> tuple[int, int]:
    """Load into the (DDP-unwrapped) model and the optimizer; returns (iteration, consumed samples).

    Weights the checkpoint lacks keep what the part files gave them; for a resume (not ``finetune``)
    every trainable weight must be in the checkpoint.
    """
    with reading_checkpoint(path) as (directory, iteration):
        common = common_state(directory)
        if "mm_plugin" not in common and not finetune:
            saved_model_config(directory, common)  # names a checkpoint that is not a training checkpoint at all
            raise CheckpointError(f"{directory} was saved by Megatron-LM's pretrain(): resume it there "
                                  "(launch/pretrain.py with Megatron-LM on PYTHONPATH), or start a new run from its "
                                  "weights with --finetune")
        trainable = model_sharded_state(model, trainable_only=True)
        loaded_weights = load_model_weights(directory, model, required=None if finetune else set(trainable))
        request: dict[str, Any] = {}
        resume_optimizer = load_optimizer and not finetune and "opt_param_scheduler" in common
        if resume_optimizer:
            request["optimizer"] = optimizer.sharded_state_dict(trainable, is_loading=True)
        layout_matches = "mm_plugin" in common and common["mm_plugin"]["layout"] == parallel_layout()
        # A sharded object's key is "rng_state" plus its shard: "rng_state/shard_0.0.0_1.1.1" on megatron-core
        # 0.16, a dotted suffix on older lines; a tensor's is its dotted name.
        saved_objects = {re.split(r"[./]", key, maxsplit=1)[0] for key in load_sharded_metadata(str(directory))}
        restore_rng = load_rng and not finetune and layout_matches and "rng_state" in saved_objects
        if load_rng and not finetune and not layout_matches:
            logger.warning("%s was saved with parallel layout %s, this run is %s: RNG states are not restored",
                           directory, common["mm_plugin"]["layout"], parallel_layout())
        if restore_rng:
            request["rng_state"] = _rng_state()
        if request:
            loaded = dist_checkpointing.load(request, str(directory))
            if resume_optimizer:
                optimizer.load_state_dict(loaded["optimizer"])
                scheduler.load_state_dict(common["opt_param_scheduler"])
            if restore_rng:
                _restore_rng(loaded["rng_state"])
        logger.info("loaded %s: %d weight tensors%s%s", directory, len(loaded_weights),
                    ", optimizer and LR schedule" if resume_optimizer else "", ", RNG" if restore_rng else "")
    if finetune:
        return 0, 0
    return iteration, int(common["consumed_train_samples"])
