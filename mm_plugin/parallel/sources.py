"""Full state dicts to read slices from, without reading (or holding) the rest.

* a ``.safetensors`` file: ``safe_open(...).get_slice(key)[index]`` reads only the slice;
* a ``.pt``/``.bin`` file: memory-mapped (``mm_plugin.safe_io.load_state(path, mmap=True)``), so a slice
  pages in only what it touches and ranks on one machine share the page cache instead of each holding
  a private copy of the file;
* a mapping of tensors already in memory (e.g. ``load_state(path, mmap=True)["model"]``).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping, Union

import torch

from mm_plugin.safe_io import WeightFileError, load_state

Index = tuple  # of slices, one per dimension
SourceLike = Union[str, os.PathLike, Mapping[str, torch.Tensor], "TensorSource"]


class TensorSource:
    """Keys, shapes and slices of a full state dict; ``name`` is how errors refer to it."""

    name: str

    def keys(self) -> list[str]:
        raise NotImplementedError

    def shape(self, key: str) -> tuple[int, ...]:
        raise NotImplementedError

    def read(self, key: str, index: Index) -> torch.Tensor:
        raise NotImplementedError


class MappingSource(TensorSource):
    def __init__(self, tensors: Mapping[str, torch.Tensor], name: str):
        not_tensors = [k for k, v in tensors.items() if not isinstance(v, torch.Tensor) and not _is_extra_state(k)]
        if not_tensors:
            raise WeightFileError(
                f"{name}: expected a flat {{name: tensor}} state dict, but {len(not_tensors)} entries are not tensors "
                f"(first: {not_tensors[0]!r}); pass the inner dict (e.g. state['model']) as the source")
        self._tensors = {k: v for k, v in tensors.items() if isinstance(v, torch.Tensor) and not _is_extra_state(k)}
        self.name = name

    def keys(self) -> list[str]:
        return list(self._tensors)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._tensors[key].shape)

    def read(self, key: str, index: Index) -> torch.Tensor:
        return self._tensors[key][index]


class SafetensorsSource(TensorSource):
    def __init__(self, path: Path):
        from safetensors import SafetensorError, safe_open

        try:
            self._file = safe_open(str(path), framework="pt", device="cpu")
        except (SafetensorError, OSError) as error:
            raise WeightFileError(f"{path}: not a readable safetensors file ({error})") from error
        self.name = str(path)

    def keys(self) -> list[str]:
        return [k for k in self._file.keys() if not _is_extra_state(k)]

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._file.get_slice(key).get_shape())

    def read(self, key: str, index: Index) -> torch.Tensor:
        return self._file.get_slice(key)[index]


def _is_extra_state(key: str) -> bool:
    """TransformerEngine's per-module ``_extra_state`` (FP8 metadata) is not a weight: never loaded."""
    return key.endswith("._extra_state")


def source_name(source: SourceLike) -> str:
    """How errors refer to ``source``."""
    if isinstance(source, TensorSource):
        return source.name
    if isinstance(source, Mapping):
        return "the given state dict"
    return str(source)


def open_source(source: SourceLike) -> TensorSource:
    """A :class:`TensorSource` for a file path, a mapping of tensors, or a source already opened."""
    if isinstance(source, TensorSource):
        return source
    if isinstance(source, Mapping):
        return MappingSource(source, name=source_name(source))
    path = Path(source)
    if not path.is_file():
        raise WeightFileError(f"{path}: no such file")
    if path.suffix == ".safetensors":
        return SafetensorsSource(path)
    state = load_state(path, mmap=True)
    if not isinstance(state, Mapping):
        raise WeightFileError(f"{path}: holds a {type(state).__name__}, not a state dict")
    return MappingSource(state, name=str(path))
