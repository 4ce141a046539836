"""Safe reading and atomic writing of weight files. Every file the package reads or writes goes through here.

* ``load_state``: ``.safetensors`` through safetensors; ``.pt``/``.bin`` through
  ``torch.load(weights_only=True)``, admitting exactly the extra types real Megatron checkpoints hold
  (``argparse.Namespace`` args, numpy RNG state). Anything else in a pickle is refused, never run.
* ``atomic_path`` / ``save_state`` / ``write_text``: write beside the target and rename into place, so a
  crash never leaves a half-written file under the final name.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import pickle
import tempfile
import zipfile
from pathlib import Path
from typing import Any, Iterator, Mapping, Union

import numpy
import torch

PathLike = Union[str, os.PathLike]


class UnsafeFileError(RuntimeError):
    """A pickle that needs code or types outside the allow-list: refused, never executed."""


class WeightFileError(RuntimeError):
    """A weight file that is missing, truncated or not a weight file at all."""


def _numpy_rng_types() -> list:
    """The types a pickled ``numpy.random.get_state()`` tuple refers to (numpy 1.x and 2.x names)."""
    reconstruct = getattr(getattr(numpy, "_core", numpy.core), "multiarray")._reconstruct
    types = [reconstruct, numpy.ndarray, numpy.dtype]
    types += [type(numpy.dtype(name)) for name in ("uint32", "int64", "float64", "uint8")]
    return types


def megatron_safe_globals() -> list:
    """Extra types admitted when reading Megatron checkpoints (``model_optim_rng.pt``)."""
    return [argparse.Namespace, *_numpy_rng_types()]


@contextlib.contextmanager
def admitting_megatron_types() -> Iterator[None]:
    """``torch.load(weights_only=True)`` admits :func:`megatron_safe_globals` inside the block.

    ``torch.serialization.safe_globals`` un-registers its types on exit even where they were registered
    before, and megatron-core registers ``argparse.Namespace`` for the whole process on import (what its
    own checkpoint loading relies on), so only the types not yet registered are added and then removed."""
    registered = torch.serialization.get_safe_globals()
    with torch.serialization.safe_globals([t for t in megatron_safe_globals() if t not in registered]):
        yield


def _is_torchscript_archive(path: Path) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(name.endswith("constants.pkl") or "/code/" in name for name in archive.namelist())


def load_state(path: PathLike, *, mmap: bool = False, map_location: str = "cpu") -> Any:
    """Read a ``.safetensors``, ``.pt`` or ``.bin`` file without executing anything in it.

    ``mmap=True`` maps a ``.pt`` file instead of reading it (tensors are paged in when touched), so
    several ranks reading slices of one large file share the page cache.
    """
    path = Path(path)
    if not path.is_file():
        raise WeightFileError(f"{path}: no such file")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path), device=map_location)
        except (SafetensorError, OSError) as error:
            raise WeightFileError(f"{path}: not a readable safetensors file ({error})") from error
    if _is_torchscript_archive(path):
        raise UnsafeFileError(
            f"{path}: is a TorchScript archive (code plus weights); it is never loaded as a pickle. "
            "Convert it with `mm-convert clip --input ... --output converted_clip.pt`, which reads its tensors only."
        )
    try:
        with admitting_megatron_types():
            return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as error:
        reason = _unpickler_reason(str(error))
        if "global" not in reason.lower():
            raise WeightFileError(f"{path}: not a readable PyTorch weight file ({reason})") from error
        raise UnsafeFileError(
            f"{path}: refused to load: {reason.rstrip('.')}. Only tensors, containers, argparse.Namespace and numpy RNG "
            "state are admitted, and nothing in the file was executed. If you trust the file, re-save its "
            "tensors as .safetensors in a sandbox and use that."
        ) from error
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError) as error:
        raise WeightFileError(f"{path}: not a readable PyTorch weight file ({error})") from error


def _unpickler_reason(message: str) -> str:
    """What torch's weights-only error says the pickle asked for, without its boilerplate."""
    reasons = []
    for line in message.splitlines():
        line = line.split("WeightsUnpickler error:", 1)[-1].strip()
        if line and not line.startswith(("Weights only load failed", "Check the documentation", "Please file")):
            reasons.append(line)
    return " ".join(reasons) or message


@contextlib.contextmanager
def atomic_path(path: PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success rename it onto ``path``, on failure delete it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent)
    os.close(handle)
    temporary = Path(temporary)
    try:
        yield temporary
        # mkstemp makes files private (and a writer may replace the file): give the result normal permissions.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(temporary, 0o666 & ~umask)
        with open(temporary, "rb") as written:
            os.fsync(written.fileno())
        os.replace(temporary, path)
    finally:
        if temporary.exists():
            temporary.unlink()


def save_state(state: Mapping[str, Any], path: PathLike) -> Path:
    """Write a state dict atomically: safetensors for ``.safetensors``, ``torch.save`` otherwise."""
    path = Path(path)
    with atomic_path(path) as temporary:
        if path.suffix == ".safetensors":
            from safetensors.torch import save_file

            save_file({k: v.contiguous() for k, v in state.items()}, str(temporary))
        else:
            torch.save(dict(state), temporary)
    return path


def write_text(path: PathLike, text: str) -> Path:
    """Write a text file (JSON, tracker files) atomically."""
    path = Path(path)
    with atomic_path(path) as temporary:
        temporary.write_text(text)
    return path
