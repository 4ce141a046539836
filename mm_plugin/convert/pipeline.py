"""The one streaming pipeline every command ends in: planned tensors -> files, with progress and a summary."""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Iterable, Iterator, Optional

import torch
from tqdm import tqdm

from mm_plugin.config.names import TORCH_DTYPES
from mm_plugin.convert.errors import ConversionError
from mm_plugin.convert.plan import Planned
from mm_plugin.convert.writers import shard, shard_names, write_file, write_index
from mm_plugin.safe_io import atomic_path

DTYPE_NAMES = {dtype: name for name, dtype in TORCH_DTYPES.items()}


@dataclasses.dataclass
class WrittenFile:
    path: Path
    fmt: str
    tensors: int
    nbytes: int
    dtypes: list[str]


@dataclasses.dataclass
class Summary:
    """What a command read and wrote; ``render()`` is what the CLI prints."""

    command: str
    output: Path
    inputs: list[str]
    written: list[WrittenFile]
    notes: list[str] = dataclasses.field(default_factory=list)
    seconds: float = 0.0

    def render(self) -> str:
        total = sum(file.nbytes for file in self.written)
        lines = [f"mm-convert {self.command}: wrote {self.output} ({len(self.written)} weight file(s), "
                 f"{sum(file.tensors for file in self.written)} tensors, {human_bytes(total)}) in {self.seconds:.1f} s"]
        lines += [f"  read   {source}" for source in self.inputs]
        shown = self.written if len(self.written) <= 6 else [*self.written[:2], None, *self.written[-2:]]
        for file in shown:  # None: the shards in between
            lines.append(f"  wrote  ... {len(self.written) - 4} more shards" if file is None else
                         f"  wrote  {file.path}  [{file.fmt}, {file.tensors} tensors, {'/'.join(file.dtypes)}, "
                         f"{human_bytes(file.nbytes)}]")
        lines += [f"  note   {note}" for note in self.notes]
        return "\n".join(lines)


def human_bytes(count: float) -> str:
    for unit in ("B", "KiB", "MiB"):
        if count < 1024:
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1024
    return f"{count:.1f} GiB"


_SIZE_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def parse_size(text: str) -> int:
    """``5GB``, ``500MB``, ``2GiB`` or a byte count, as Hugging Face's ``max_shard_size``."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]i?B|B)?\s*", text, re.IGNORECASE)
    if match is None or float(match.group(1)) <= 0:
        raise ConversionError(f"shard size {text!r}: use a positive number with B, KB, MB, GB, KiB, MiB or GiB")
    return int(float(match.group(1)) * _SIZE_UNITS[(match.group(2) or "").upper()])


def output_file(path: Path, safetensors: bool) -> tuple[Path, str]:
    """The output path and format: safetensors for ``--safetensors`` or a ``.safetensors`` name, else ``.pt``."""
    path = Path(path)
    if safetensors or path.suffix == ".safetensors":
        return path.with_suffix(".safetensors"), "safetensors"
    return path, "pt"


def refuse_overwriting_inputs(output: Path, inputs: Iterable[Path]) -> None:
    for source in inputs:
        if Path(source).resolve() == Path(output).resolve():
            raise ConversionError(f"{output}: is also an input; write the output elsewhere")


def copy_file(source: Path, target: Path) -> Path:
    """A side file (tokenizer, config) copied byte for byte, atomically."""
    with atomic_path(target) as temporary:
        shutil.copyfile(source, temporary)
    return target


def write_planned(path: Path, tensors: list[Planned], fmt: str, progress: bool) -> WrittenFile:
    """One output file, with a progress bar (bytes) that shows which input file is being read."""
    total = sum(planned.nbytes for planned in tensors)
    with tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=Path(path).name,
              disable=not progress, dynamic_ncols=True) as bar:
        reading: list[Optional[tuple]] = [None]

        def advance(planned: Planned) -> None:
            if planned.inputs != reading[0]:
                reading[0] = planned.inputs
                bar.set_postfix_str("from " + ", ".join(source.name for source in planned.inputs), refresh=False)
            bar.update(planned.nbytes)

        write_file(Path(path), tensors, fmt, advance)
    dtypes = collections.Counter(DTYPE_NAMES.get(planned.dtype, str(planned.dtype)) for planned in tensors)
    return WrittenFile(Path(path), fmt, len(tensors), total, [name for name, _ in dtypes.most_common()])


def write_sharded(directory: Path, tensors: list[Planned], max_bytes: int, progress: bool) -> list[WrittenFile]:
    """Hugging Face's sharded safetensors layout (with ``model.safetensors.index.json`` when sharded)."""
    groups = shard(tensors, max_bytes)
    names = shard_names(len(groups))
    written = [write_planned(directory / name, group, "safetensors", progress) for group, name in zip(groups, names)]
    if len(groups) > 1:
        write_index(directory, groups, names)
    return written


@contextlib.contextmanager
def atomic_directory(path: Path) -> Iterator[Path]:
    """A staging directory beside ``path``, renamed onto it when complete and removed on failure."""
    path = Path(path)
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise ConversionError(f"{path}: already exists and is not an empty directory; choose a new output directory")
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent))
    try:
        yield staging
        os.chmod(staging, 0o755)  # mkdtemp's 0700 would hide the model from the other users of a cluster
        os.replace(staging, path)  # also replaces an empty directory
    finally:
        if staging.exists():
            shutil.rmtree(staging)


def rebase(written: list[WrittenFile], staging: Path, final: Path) -> list[WrittenFile]:
    """The files' paths once the staging directory is renamed to its final name."""
    return [dataclasses.replace(file, path=final / file.path.relative_to(staging)) for file in written]
