"""Safe reading and atomic writing of weight files. Every file the package reads or writes goes through here.

* ``load_state``: ``.safetensors`` through safetensors; ``.pt``/``.bin`` through
  ``torch.load(weights_only=True)``, admitting exactly the extra types real Megatron checkpoints hold
  (``argparse.Namespace`` args, numpy RNG state). Anything else in a pickle is refused, never run.
* ``check_dist_checkpoint``: the same for every pickle of a ``dist_checkpointing`` directory, before
  megatron-core and torch read it (torch unpickles its ``.metadata`` unrestricted).
* ``atomic_path`` / ``save_state`` / ``write_text``: write beside the target and rename into place, so a
  crash never leaves a half-written file under the final name.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import pickle
import tempfile
import zipfile
from pathlib import Path
from typing import Any, Iterator, Mapping, Optional, Union

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


def file_name_problem(name: str) -> Optional[str]:
    """Why no file system can hold ``name`` (a NUL byte, or a lone surrogate that is not an undecodable byte
    of os.fsencode's surrogateescape), or ``None``."""
    if "\x00" in name:
        return "contains a NUL byte"
    try:
        os.fsencode(name)
    except UnicodeEncodeError as error:
        return f"is not a valid file name ({error.reason})"
    return None


def _is_torchscript_archive(path: Path) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    try:
        with zipfile.ZipFile(path) as archive:
            return any(name.endswith("constants.pkl") or "/code/" in name for name in archive.namelist())
    except Exception:  # noqa: BLE001 - a damaged archive fails in many ways; torch.load below names it
        return False


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
    return _load_pickled(path, str(path), map_location=map_location, mmap=mmap)


def _load_pickled(source: Union[Path, io.BytesIO], where: str, **load_args) -> Any:
    """``torch.load(weights_only=True)`` of a file or buffer; errors name ``where``."""
    try:
        with admitting_megatron_types():
            return torch.load(source, weights_only=True, **load_args)
    except pickle.UnpicklingError as error:
        reason = _unpickler_reason(str(error))
        if "global" not in reason.lower():
            raise WeightFileError(f"{where}: not a readable PyTorch weight file ({reason})") from error
        raise UnsafeFileError(
            f"{where}: refused to load: {reason.rstrip('.')}. Only tensors, containers, argparse.Namespace and numpy "
            "RNG state are admitted, and nothing in the file was executed. If you trust the file, re-save its "
            "tensors as .safetensors in a sandbox and use that."
        ) from error
    except Exception as error:  # noqa: BLE001 - damaged bytes fail in many ways (zip, pickle, storages)
        raise WeightFileError(f"{where}: not a readable PyTorch weight file ({type(error).__name__}: {error})") \
            from error


# What torch.distributed.checkpoint's ``.metadata`` pickle refers to (torch reads it with plain pickle.load):
# its metadata and plan dataclasses and enums, megatron-core 0.12's plan subclass, and the values inside.
_CHECKPOINT_METADATA_CLASSES = {
    "torch.distributed.checkpoint.metadata": {"Metadata", "MetadataIndex", "StorageMeta", "TensorProperties",
                                              "TensorStorageMetadata", "BytesStorageMetadata",
                                              "ChunkStorageMetadata", "_MEM_FORMAT_ENCODING"},
    "torch.distributed.checkpoint.planner": {"SavePlan", "WriteItem", "WriteItemType", "TensorWriteData"},
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    "megatron.core.dist_checkpointing.strategies.torch": {"MCoreSavePlan"},
    "torch.serialization": {"_get_layout"},
    "torch": {"Size"},
    "pathlib": {"PosixPath", "PurePosixPath"},
    "collections": {"OrderedDict"},
}


class _CheckpointMetadataUnpickler(pickle.Unpickler):
    """Resolves only the globals in ``_CHECKPOINT_METADATA_CLASSES`` (and torch dtypes); refuses the rest."""

    def find_class(self, module: str, name: str) -> Any:
        if name in _CHECKPOINT_METADATA_CLASSES.get(module, ()):
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise UnsafeFileError(f"it refers to {module}.{name}, which a checkpoint's metadata never holds")


def check_dist_checkpoint(directory: PathLike) -> None:
    """Read every pickle of a ``dist_checkpointing`` directory without executing anything, and check that
    every shard its metadata names is there, whole. Raises ``UnsafeFileError`` or ``WeightFileError`` naming
    the file; after it returns, megatron-core and torch read the same files safely.

    * ``.metadata`` (torch reads it with plain ``pickle.load``): unpickled with an allow-list of classes;
    * the pickled objects stored in the ``.distcp`` shards (RNG states; torch loads them with
      ``weights_only=False``) and ``common.pt`` (megatron-core 0.12 loads it unrestricted): loaded as
      :func:`load_state` loads a ``.pt`` file;
    * every shard the metadata points into exists and is long enough (a truncated or deleted shard), and
      ``metadata.json`` is dist_checkpointing's.
    """
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata, Metadata, MetadataIndex

    directory = Path(directory)
    backend_file = directory / "metadata.json"  # dist_checkpointing's format marker
    try:
        backend = json.loads(backend_file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as error:
        raise WeightFileError(f"{backend_file}: missing or damaged ({type(error).__name__}: {error})") from None
    if not isinstance(backend, dict) or not isinstance(backend.get("sharded_backend"), str):
        raise WeightFileError(f"{backend_file}: not dist_checkpointing's metadata (no sharded_backend)")
    metadata_file = directory / ".metadata"
    if not metadata_file.is_file():
        raise WeightFileError(f"{metadata_file}: missing: the checkpoint is incomplete")
    try:
        with open(metadata_file, "rb") as handle:
            metadata = _CheckpointMetadataUnpickler(handle).load()
    except UnsafeFileError as error:
        raise UnsafeFileError(f"{metadata_file}: refused to load: {error}. Nothing in it was executed; a "
                              "checkpoint from an untrusted source may carry code") from None
    except Exception as error:  # a damaged pickle fails in many ways; each means the same here
        raise WeightFileError(f"{metadata_file}: truncated or damaged ({type(error).__name__}: {error})") from None
    if not isinstance(metadata, Metadata):
        raise WeightFileError(f"{metadata_file}: holds a {type(metadata).__name__}, not a checkpoint's metadata")

    sizes: dict[str, int] = {}
    for index, storage in metadata.storage_data.items():
        name = storage.relative_path
        if not isinstance(name, str) or Path(name).name != name or name in ("", ".", ".."):
            raise UnsafeFileError(f"{metadata_file}: names the shard {name!r}, which is not a file in {directory}")
        if name not in sizes:
            shard = directory / name
            if not shard.is_file():
                raise WeightFileError(f"{shard}: missing (named by {metadata_file}): the checkpoint is incomplete")
            sizes[name] = shard.stat().st_size
        if storage.offset + storage.length > sizes[name]:
            raise WeightFileError(f"{directory / name}: truncated: {sizes[name]} bytes, but {index.fqn} needs bytes "
                                  f"{storage.offset}-{storage.offset + storage.length}")
    for fqn, item in metadata.state_dict_metadata.items():
        if isinstance(item, BytesStorageMetadata):
            storage = metadata.storage_data[MetadataIndex(fqn)]
            if getattr(storage, "transform_descriptors", None):  # torch 2.7+: e.g. compressed
                raise WeightFileError(f"{directory / storage.relative_path}: object {fqn} is stored transformed "
                                      f"({storage.transform_descriptors}), which this reader cannot verify")
            with open(directory / storage.relative_path, "rb") as handle:
                handle.seek(storage.offset)
                blob = handle.read(storage.length)
            _load_pickled(io.BytesIO(blob), f"{directory / storage.relative_path} (object {fqn})")
    if (directory / "common.pt").is_file():
        load_state(directory / "common.pt")


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
