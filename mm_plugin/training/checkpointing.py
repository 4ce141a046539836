"""Training checkpoints in Megatron's layout, through megatron-core ``dist_checkpointing``.

    SAVE/latest_checkpointed_iteration.txt        the last complete checkpoint's iteration
    SAVE/iter_0001000/                             a dist_checkpointing directory (reshardable TP/PP/DP)

A checkpoint holds the model weights (by default only the trainable ones: a stage-1 checkpoint is the
projector, megabytes, not the frozen 7B decoder), the optimizer, the LR scheduler, every rank's RNG
state, the data position (consumed samples) and the model configuration. Saving is atomic: all ranks
write into ``iter_N.partial``, which is renamed to ``iter_N`` once complete; the tracker file is
written last, so a crash leaves the previous checkpoint as the latest. Before the rename every file's
size and CRC-32 go into ``manifest.json``. A load reads every pickle without executing it
(``safe_io.check_dist_checkpoint``) before megatron-core reads anything, and hashes the files against the
manifest while it reads them: nothing loaded is used before they match (``reading_checkpoint``).

Megatron-LM's stock ``pretrain()`` saves the same layout with its own bookkeeping: its arguments
(where ``launch/pretrain.py`` puts the model configuration, ``mm_model_config``) instead of ours. Its
weights read the same way (export, ``--finetune``); resuming one continues under Megatron-LM.
"""

from __future__ import annotations

import logging
import pickle
import random
import re
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Optional

import numpy
import torch
from megatron.core import dist_checkpointing, parallel_state, tensor_parallel
from megatron.core.dist_checkpointing.serialization import load_sharded_metadata
from megatron.core.dist_checkpointing.mapping import ShardedObject, ShardedTensor, ShardedTensorFactory

from mm_plugin import device
from mm_plugin.safe_io import UnsafeFileError, WeightFileError, check_dist_checkpoint, write_text
from mm_plugin.training.manifest import MANIFEST, Verification, verify_manifest, write_manifest

logger = logging.getLogger(__name__)

TRACKER = "latest_checkpointed_iteration.txt"
FORMAT_VERSION = 1


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, incomplete, or does not fit the model being trained."""


def iteration_dir(root: str | Path, iteration: int) -> Path:
    return Path(root) / f"iter_{iteration:07d}"


def latest_iteration(root: str | Path) -> Optional[int]:
    """The iteration the tracker names, or None when ``root`` holds no checkpoint yet."""
    tracker = Path(root) / TRACKER
    if not tracker.is_file():
        return None
    text = tracker.read_text().strip()
    if not text.isdigit():
        raise CheckpointError(f"{tracker}: expected an iteration number, found {text!r}")
    return int(text)


def holds_checkpoint(path: str | Path) -> bool:
    """A ``--save`` directory with a tracker, or an ``iter_N`` directory (MindSpeed-MM's scripts pass
    ``--load`` and ``--save`` the same folder, empty on the first run)."""
    path = Path(path)
    return (path / TRACKER).is_file() or (path.name.startswith("iter_") and path.is_dir())


def _locate(path: str | Path) -> tuple[Path, int]:
    """``SAVE`` (use its tracker) or an ``iter_N`` directory -> (directory, iteration)."""
    path = Path(path)
    iteration = latest_iteration(path)
    if iteration is not None:
        directory = iteration_dir(path, iteration)
    elif path.name.startswith("iter_") and path.name[5:].isdigit():
        directory, iteration = path, int(path.name[5:])
    else:
        raise CheckpointError(
            f"{path}: no {TRACKER} and not an iter_NNNNNNN directory; point --load at a --save directory"
        )
    if not (directory / "metadata.json").is_file():
        raise CheckpointError(f"{directory}: incomplete or not a dist_checkpointing checkpoint (no metadata.json)")
    return directory, iteration


@contextmanager
def reading_checkpoint(path: str | Path) -> Iterator[tuple[Path, int]]:
    """``SAVE`` (use its tracker) or an ``iter_N`` directory -> (directory, iteration), for the body to load
    from; verified meanwhile (collective when torch.distributed is initialised).

    Its pickles are checked before the body runs (before megatron-core or torch unpickle anything of it);
    its files are hashed against its manifest while the body reads them, and the ``with`` does not end
    before they match: damaged bytes raise ``CheckpointError`` naming the file, whatever the body loaded
    or raised, so nothing trains or generates from them. Overlapping costs a load about nothing when the
    files come from disk and little from the page cache (bench/checkpoint_verify.py).
    """
    directory, iteration = _locate(path)
    files = _file_signature(directory)
    if _verified.get(directory.resolve()) == files:  # inference reads several parts of one checkpoint
        yield directory, iteration
        return
    verification = Verification(directory)
    try:
        try:
            check_dist_checkpoint(directory)
        except (UnsafeFileError, WeightFileError) as error:
            raise CheckpointError(str(error)) from None
        yield directory, iteration
    except Exception:  # damaged bytes explain whatever went wrong reading them
        damage = verification.verdict()
        if damage:
            raise _damaged(directory, iteration, damage) from None
        raise
    damage = verification.verdict()
    if damage:
        raise _damaged(directory, iteration, damage)
    _verified[directory.resolve()] = files


_verified: dict[Path, tuple] = {}
"""Checkpoints this process verified, with their files' names, sizes and modification times then."""


def _file_signature(directory: Path) -> tuple:
    return tuple(sorted((path.name, stat.st_size, stat.st_mtime_ns)
                        for path in directory.iterdir() for stat in (path.stat(),)))


def _damaged(directory: Path, iteration: int, damage: str) -> CheckpointError:
    """The error for a checkpoint whose files do not match its manifest, offering the newest older one that
    verifies."""
    older = next((older for older in _older_checkpoints(directory.parent, iteration)
                  if (older / MANIFEST).is_file() and verify_manifest(older) is None), None)
    return CheckpointError(
        f"{damage}. {directory} is damaged and is not used; "
        + (f"{older} verifies: pass --load {older} to go on from it (or restore the file from a copy)"
           if older else "no older checkpoint beside it verifies: restore the file from a copy")
    )


def _older_checkpoints(root: Path, iteration: int) -> list[Path]:
    """The ``iter_N`` directories under ``root`` before ``iteration``, newest first."""
    found = [(int(path.name[5:]), path) for path in root.glob("iter_*")
             if path.is_dir() and path.name[5:].isdigit() and int(path.name[5:]) < iteration]
    return [path for _, path in sorted(found, reverse=True)]


# --- what goes in ----------------------------------------------------------------------------


def model_sharded_state(model: torch.nn.Module, trainable_only: bool) -> dict:
    """The model's sharded tensors (``trainable_only``: parameters with ``requires_grad``)."""
    state = model.sharded_state_dict()
    if not trainable_only:
        return state
    trainable = {name for name, parameter in model.named_parameters() if parameter.requires_grad}
    return {name: tensor for name, tensor in state.items() if name in trainable}


def _layout() -> dict[str, int]:
    return dict(tp=parallel_state.get_tensor_model_parallel_world_size(),
                pp=parallel_state.get_pipeline_model_parallel_world_size(),
                dp=parallel_state.get_data_parallel_world_size())


def _rng_state() -> ShardedObject:
    """This rank's generators, one object per (pp, tp, dp) position: restored exactly on the same layout."""
    state = {
        "random": random.getstate(),
        "numpy": numpy.random.get_state(),
        "torch": torch.get_rng_state(),
        "device": device.get_rng_state(),
        "tracker": tensor_parallel.get_cuda_rng_tracker().get_states(),
    }
    layout = _layout()
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
    root = Path(root)
    final = iteration_dir(root, iteration)
    partial = final.with_name(final.name + ".partial")
    rank = torch.distributed.get_rank()
    if rank == 0:
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
    torch.distributed.barrier()

    model_state = model_sharded_state(model, trainable_only)
    state: dict[str, Any] = {
        "model": model_state,
        "iteration": iteration,
        "consumed_train_samples": consumed_samples,
        "mm_plugin": {"format": FORMAT_VERSION, "trainable_only": trainable_only, "layout": _layout(),
                      "model_config": model_config},
    }
    if save_optimizer:
        state["optimizer"] = optimizer.sharded_state_dict(model_state)
        state["opt_param_scheduler"] = scheduler.state_dict()
    if save_rng:
        state["rng_state"] = _rng_state()
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


# --- what comes out --------------------------------------------------------------------------


def _saved_keys(entry) -> tuple[str, ...]:
    """Checkpoint keys one model entry is stored under (a gated MLP's fc1 may be split in two halves)."""
    if isinstance(entry, ShardedTensorFactory):
        return (entry.key, f"{entry.key}_w")
    return (entry.key,)


def load_model_weights(directory: Path, model, *, prefix: str = "", required: Optional[set] = None) -> list[str]:
    """Load every weight of ``model`` under ``prefix`` that the checkpoint holds (collective).

    ``required``: model parameter names that must be in the checkpoint. Shapes are checked first, so a
    checkpoint of another model configuration is named clearly before any weight changes.
    """
    saved = dist_checkpointing.load_tensors_metadata(str(directory))
    wanted = {}
    for name, entry in model.sharded_state_dict().items():
        if not name.startswith(prefix) or not isinstance(entry, (ShardedTensor, ShardedTensorFactory)):
            continue
        stored = next((saved[key] for key in _saved_keys(entry) if key in saved), None)
        if stored is None:
            continue
        if isinstance(entry, ShardedTensor) and tuple(stored.global_shape) != tuple(entry.global_shape):
            raise CheckpointError(
                f"{directory}: tensor {entry.key!r} (model parameter {name}) has shape {tuple(stored.global_shape)} "
                f"in the checkpoint but {tuple(entry.global_shape)} in this model; the checkpoint belongs to "
                "another model configuration"
            )
        wanted[name] = entry
    missing = sorted((required or set()) - set(wanted))
    if missing:
        raise CheckpointError(
            f"{directory} lacks weights this run needs from it: {', '.join(missing[:5])}"
            f"{'...' if len(missing) > 5 else ''} (stage 1 checkpoints hold only the trainable projector; "
            "to start a new stage from a checkpoint use --finetune)"
        )
    loaded = dist_checkpointing.load({"model": wanted}, str(directory))["model"]
    model.load_state_dict(loaded, strict=False)
    return sorted(wanted)


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
        layout_matches = "mm_plugin" in common and common["mm_plugin"]["layout"] == _layout()
        # A sharded object's key is "rng_state" plus its shard: "rng_state/shard_0.0.0_1.1.1" on megatron-core
        # 0.16, a dotted suffix on older lines; a tensor's is its dotted name.
        saved_objects = {re.split(r"[./]", key, maxsplit=1)[0] for key in load_sharded_metadata(str(directory))}
        restore_rng = load_rng and not finetune and layout_matches and "rng_state" in saved_objects
        if load_rng and not finetune and not layout_matches:
            logger.warning("%s was saved with parallel layout %s, this run is %s: RNG states are not restored",
                           directory, common["mm_plugin"]["layout"], _layout())
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


def common_state(directory: Path) -> dict:
    """A checkpoint's non-sharded objects. Megatron-LM's pretrain() stores its ``argparse.Namespace`` of
    arguments there: megatron-core 0.13+ reads them with ``torch.load(weights_only=True)``, which admits only
    the types it registers on import (``safe_io.admitting_megatron_types`` keeps that registration)."""
    try:
        return dist_checkpointing.load_common_state_dict(str(directory))
    except pickle.UnpicklingError as error:
        reason = str(error).strip().splitlines()
        raise CheckpointError(f"{directory}: its common state (common.pt) holds objects that torch will not "
                              f"load safely ({reason[0] if reason else 'unpickling refused'}); only "
                              "checkpoints of mm_plugin's loop or of Megatron-LM's pretrain() through "
                              "launch/pretrain.py are read") from None


def saved_model_config(directory: Path, common: dict) -> dict:
    """The model.json configuration a checkpoint was trained with: our loop's, or the one launch/pretrain.py
    gives Megatron-LM's pretrain() to save among its arguments."""
    if "mm_plugin" in common:
        return common["mm_plugin"]["model_config"]
    config = getattr(common.get("args"), "mm_model_config", None)
    if config is None:
        raise CheckpointError(f"{directory} holds no mm_plugin model configuration: it was saved neither by "
                              "mm_plugin's loop nor by Megatron-LM's pretrain() through launch/pretrain.py, so "
                              "which model its weights belong to is unknown")
    return config


def read_model_tensors(path: str | Path) -> dict[str, torch.Tensor]:
    """Full (TP=1) tensors of a checkpoint's model weights, by our full-model parameter names.

    Builds the model the checkpoint was saved from (its config is inside) in this process at TP=PP=1,
    loads what the checkpoint holds and returns just those tensors. Needs a torch.distributed world
    (one process is enough); used by ``mm-convert export-hf --load`` and the demo.
    """
    from mm_plugin.config.model import from_mindspeed_json
    from mm_plugin.models.llava import LlavaModel

    if parallel_state.get_tensor_model_parallel_world_size() != 1 or \
            parallel_state.get_pipeline_model_parallel_world_size() != 1:
        raise CheckpointError("read_model_tensors runs at tensor- and pipeline-parallel size 1")
    with reading_checkpoint(path) as (directory, _):
        config = from_mindspeed_json(saved_model_config(directory, common_state(directory)),
                                     source=f"{directory} (saved model config)")
        model = LlavaModel(config, extra={"perform_initialization": False})
        names = set(load_model_weights(directory, model))
    tensors = {name: tensor.detach() for name, tensor in model.state_dict().items() if name in names}
    for name in ("language_model.embedding.word_embeddings.weight", "language_model.output_layer.weight"):
        if name in tensors:  # drop the vocabulary padding rows, as in a part file
            tensors[name] = tensors[name][: config.language.vocab_size]
    return tensors
