"""A checkpoint's manifest: the size and CRC-32 of every file, written at save, verified at load.

Neither megatron-core nor torch.distributed.checkpoint checks what it reads back: flipped bytes inside a
weight or optimizer shard load silently and training goes on with the damaged values. So every save
writes ``manifest.json`` into the checkpoint before the tracker moves to it, and every load verifies the
files against it while reading them (``Verification``); a mismatch stops with the damaged file's name before
anything loaded is used (see ``reading.reading_checkpoint``).

CRC-32 (zlib's, several GB/s) rather than a cryptographic hash: the manifest guards against damage (flipped
bits, torn or truncated copies), not against someone who rewrites the files, who could rewrite it too; what
keeps a planted checkpoint from running code is ``safe_io.check_dist_checkpoint``. A cryptographic hash is
several times slower and would buy nothing here; what verifying costs next to a load is measured by
bench/checkpoint_verify.py.

Hashing is shared among the ranks (each hashes every world-size-th file, the verdicts are gathered), so
writing and verdicts are collective when torch.distributed is initialised, as the saves and loads around them are.
"""

from __future__ import annotations

import json
import mmap
import os
import threading
import zlib
from pathlib import Path
from typing import Optional

import torch

from mm_plugin.safe_io import write_text

MANIFEST = "manifest.json"


def _crc32(path: Path) -> str:
    """The file's CRC-32, computed over a read-only mapping (no copies, no fresh buffers to page-fault)."""
    with open(path, "rb") as handle:
        if os.fstat(handle.fileno()).st_size == 0:
            return f"{zlib.crc32(b''):08x}"
        with mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
            return f"{zlib.crc32(mapped):08x}"


def _share(items: list) -> list:
    """This rank's share of ``items`` (all of them outside a distributed run)."""
    if not torch.distributed.is_initialized():
        return items
    return items[torch.distributed.get_rank()::torch.distributed.get_world_size()]


def _gather(mine: dict) -> dict:
    """The union of every rank's ``mine``."""
    if not torch.distributed.is_initialized():
        return mine
    everyone: list = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(everyone, mine)
    return {key: value for part in everyone for key, value in part.items()}


def write_manifest(directory: Path) -> None:
    """Hash every file of a just-saved checkpoint ``directory`` into its ``manifest.json`` (collective)."""
    names = sorted(path.name for path in directory.iterdir() if path.is_file() and path.name != MANIFEST)
    files = _gather({name: {"bytes": (directory / name).stat().st_size, "crc32": _crc32(directory / name)}
                     for name in _share(names)})
    if not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0:
        write_text(directory / MANIFEST, json.dumps({"algorithm": "crc32", "files": files}, indent=1) + "\n")


class Verification:
    """``directory`` checked against its manifest, begun at construction so that a load can read the files
    meanwhile: presence and sizes at once, this rank's share of the CRC-32s on a background thread (zlib
    releases the GIL while it hashes). A cold checkpoint is then read from disk once: whichever of the two
    reads a file first leaves it in the page cache for the other. ``verdict()`` waits for the thread and
    gathers every rank's findings (collective when torch.distributed is initialised).

    A checkpoint saved without a manifest is not checked: its verdict is ``None``.
    """

    def __init__(self, directory: Path):
        self._problems: dict[str, str] = {}
        self._thread: Optional[threading.Thread] = None
        self._listed = (directory / MANIFEST).is_file()
        if not self._listed:
            return
        manifest_file = directory / MANIFEST
        try:
            files = json.loads(manifest_file.read_text(encoding="utf-8"))["files"]
            expected = {str(name): (int(entry["bytes"]), str(entry["crc32"])) for name, entry in files.items()}
        except (ValueError, KeyError, TypeError, AttributeError) as error:
            self._problems[MANIFEST] = f"{manifest_file}: damaged ({type(error).__name__}: {error})"
            return
        to_hash = []
        for name in _share(sorted(expected)):
            path = directory / name
            size, digest = expected[name]
            if Path(name).name != name or not path.is_file():
                self._problems[name] = f"{path}: missing (listed in {manifest_file})"
            elif path.stat().st_size != size:
                self._problems[name] = f"{path}: {path.stat().st_size} bytes, {size} when it was saved"
            else:
                to_hash.append((name, path, digest))
        self._thread = threading.Thread(target=self._hash, args=(to_hash,), name="manifest-crc32", daemon=True)
        self._thread.start()

    def _hash(self, files: list[tuple[str, Path, str]]) -> None:
        for name, path, digest in files:
            try:
                if _crc32(path) != digest:
                    self._problems[name] = (f"{path}: damaged: its CRC-32 differs from the one recorded when it "
                                            "was saved")
            except OSError as error:
                self._problems[name] = f"{path}: unreadable ({error})"

    def verdict(self) -> Optional[str]:
        """``None`` when every listed file is there with its size and hash, else what is wrong (the first
        damaged file, by name)."""
        if not self._listed:
            return None
        if self._thread is not None:
            self._thread.join()
        problems = _gather(self._problems)
        return problems[min(problems)] if problems else None


def verify_manifest(directory: Path) -> Optional[str]:
    """``Verification(directory).verdict()``: the whole check, here and now (collective)."""
    return Verification(directory).verdict()
