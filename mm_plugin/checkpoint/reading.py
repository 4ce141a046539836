"""Reading training checkpoints (Megatron's layout, megatron-core ``dist_checkpointing``): finding one,
verifying it while it is read, its model weights, its common state and the model configuration saved in it.

    SAVE/latest_checkpointed_iteration.txt        the last complete checkpoint's iteration
    SAVE/iter_0001000/                             a dist_checkpointing directory (reshardable TP/PP/DP)

This is the read side every layer above needs (model loading, export, inference, resuming); the write
side is ``checkpoint.writing``'s, a training run's additions and resuming ``training.checkpointing``'s. A load reads every pickle without executing it
(``safe_io.check_dist_checkpoint``) before megatron-core reads anything, and hashes the files against the
checkpoint's manifest while it reads them: nothing loaded is used before they match (``reading_checkpoint``).
"""

from __future__ import annotations

import pickle
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional

from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory

from mm_plugin.checkpoint.manifest import MANIFEST, Verification, verify_manifest
from mm_plugin.config.model import LlavaConfig, from_mindspeed_json
from mm_plugin.config.names import is_adapter
from mm_plugin.safe_io import UnsafeFileError, WeightFileError, check_dist_checkpoint

TRACKER = "latest_checkpointed_iteration.txt"


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


# --- what comes out -----------------------------------------------------------------------------


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
    built_with_adapters = any(is_adapter(name) for name in model.state_dict())
    if not built_with_adapters and any(is_adapter(key) and key.startswith(prefix) for key in saved):
        raise CheckpointError(f"{directory} holds LoRA adapters but this model has none: build it with the "
                              "checkpoint's text_decoder.lora (or export the merged model with mm-convert export-hf "
                              "--load and use that)")
    missing = sorted((required or set()) - set(wanted))
    if missing and built_with_adapters and all(is_adapter(name) for name in missing):
        raise CheckpointError(f"{directory} holds no LoRA adapters but this model is built with text_decoder.lora: "
                              "to start LoRA from it, pass --finetune (the adapters then start fresh)")
    if missing:
        raise CheckpointError(
            f"{directory} lacks weights this run needs from it: {', '.join(missing[:5])}"
            f"{'...' if len(missing) > 5 else ''} (stage 1 checkpoints hold only the trainable projector; "
            "to start a new stage from a checkpoint use --finetune)"
        )
    loaded = dist_checkpointing.load({"model": wanted}, str(directory))["model"]
    model.load_state_dict(loaded, strict=False)
    return sorted(wanted)


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


def trained_model_config(path: str | Path) -> LlavaConfig:
    """The model configuration a checkpoint (``SAVE`` or ``iter_N``) was trained with, as saved in it."""
    with reading_checkpoint(path) as (directory, _):
        return from_mindspeed_json(saved_model_config(directory, common_state(directory)),
                                   source=f"{directory} (saved model config)")
