"""Named tensors across one or more input files, described up front and read one at a time.

A :class:`TensorStore` knows every tensor's shape, dtype and file from the files' headers (safetensors
header, PyTorch archive pickle) without reading any tensor data; ``read(key)`` then reads that one tensor
straight from the file into a fresh buffer. Views re-key a store (strip a prefix, apply a layout's
alternative spellings), so one reader serves every layout.
"""

from __future__ import annotations

import dataclasses
import json
import struct
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Optional

import torch

from mm_plugin.convert.errors import ConversionError
from mm_plugin.convert.torch_archive import TorchArchive, read_into, record_fields
from mm_plugin.safe_io import WeightFileError, load_state

SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
# Hugging Face's weight files, in the order from_pretrained prefers them.
HF_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
HF_SINGLE_FILES = ("model.safetensors", "pytorch_model.bin")


@dataclasses.dataclass(frozen=True)
class Entry:
    shape: tuple[int, ...]
    dtype: torch.dtype
    file: Path
    read: Callable[[], torch.Tensor]

    @property
    def nbytes(self) -> int:
        return torch.Size(self.shape).numel() * torch.empty((), dtype=self.dtype).element_size()


class TensorStore:
    """Tensors by name, each with its shape, dtype and file; ``description`` names the input in messages."""

    def __init__(self, entries: Mapping[str, Entry], description: str,
                 display: Callable[[str], str] = lambda key: key):
        self._entries = dict(entries)
        self.description = description
        self.display = display
        """How a key is named in the input files (views strip prefixes), for messages."""

    def __contains__(self, key: str) -> bool:
        return key in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def keys(self) -> list[str]:
        return list(self._entries)

    def entry(self, key: str) -> Entry:
        """Raises KeyError for a key the store does not hold."""
        return self._entries[key]

    @property
    def files(self) -> list[Path]:
        return sorted({entry.file for entry in self._entries.values()})

    def read(self, key: str) -> torch.Tensor:
        entry = self._entries[key]
        tensor = entry.read()
        if tuple(tensor.shape) != entry.shape or tensor.dtype != entry.dtype:
            raise WeightFileError(f"{entry.file}: {key!r} reads as {list(tensor.shape)} {tensor.dtype}, its header "
                                  f"says {list(entry.shape)} {entry.dtype}; corrupt file")
        return tensor

    def view(self, prefix: str = "", rename: Callable[[str], str] = lambda key: key,
             exclude: Iterable[str] = ()) -> "TensorStore":
        """The tensors under ``prefix``, with it stripped and ``rename`` applied; ``exclude``: relative keys left out."""
        excluded = set(exclude)
        entries = {}
        for key, entry in self._entries.items():
            if key.startswith(prefix) and key[len(prefix):] not in excluded:
                entries[rename(key[len(prefix):])] = entry
        return TensorStore(entries, self.description, lambda key: self.display(prefix + key))

    def with_entries(self, entries: Mapping[str, Entry]) -> "TensorStore":
        """This store with some tensors added or replaced."""
        return TensorStore({**self._entries, **entries}, self.description, self.display)


def in_memory(tensors: Mapping[str, torch.Tensor], file: Path) -> dict[str, Entry]:
    """Entries for tensors already in memory (on any device: each is copied to the CPU when read)."""
    return {key: Entry(tuple(t.shape), t.dtype, file, lambda t=t: t.detach().cpu()) for key, t in tensors.items()}


def open_safetensors(path: Path) -> TensorStore:
    path = Path(path)
    try:
        with open(path, "rb") as file:
            (length,) = struct.unpack("<Q", file.read(8))
            if length > 100 * 2**20:
                raise ValueError(f"header length {length}")
            header = json.loads(file.read(length))
    except (OSError, struct.error, ValueError, UnicodeDecodeError) as error:
        raise WeightFileError(f"{path}: not a readable safetensors file ({error}); truncated download?") from error
    data_start = 8 + length
    size = path.stat().st_size
    entries = {}
    for key, meta in header.items():
        if key == "__metadata__":
            continue
        dtype = SAFETENSORS_DTYPES.get(meta.get("dtype"))
        begin, end = meta["data_offsets"]
        if dtype is None or data_start + end > size:
            raise WeightFileError(f"{path}: tensor {key!r} ({meta.get('dtype')}, bytes {begin}..{end}) does not fit "
                                  f"the file ({size} bytes); truncated download?")
        entries[key] = Entry(tuple(meta["shape"]), dtype, path,
                             lambda begin=begin, end=end, shape=tuple(meta["shape"]), dtype=dtype:
                             _read_span(path, data_start + begin, end - begin, shape, dtype))
    return TensorStore(entries, str(path))


def _read_span(path: Path, offset: int, nbytes: int, shape: tuple, dtype: torch.dtype) -> torch.Tensor:
    buffer = torch.empty(nbytes, dtype=torch.uint8)
    read_into(path, offset, buffer)
    return buffer.view(dtype).reshape(shape)


@dataclasses.dataclass
class TorchFile:
    """A ``.pt``/``.bin`` file: its tensors, its unpickled top object (tensors in it are references;
    plain-data objects are readable with :func:`fields`), and whether it is a TorchScript archive."""

    store: TensorStore
    root: Any
    is_torchscript: bool


def open_torch_file(path: Path) -> TorchFile:
    path = Path(path)
    if not path.is_file():
        raise WeightFileError(f"{path}: no such file")
    with open(path, "rb") as file:
        is_zip = file.read(4) == b"PK\x03\x04"  # also a truncated zip, which is_zipfile would not see
    if is_zip:
        archive = TorchArchive(path)
        entries = {key: Entry(ref.shape, ref.storage.dtype, path, lambda ref=ref: archive.read(ref))
                   for key, ref in archive.tensors()}
        return TorchFile(TensorStore(entries, str(path)), archive.root, archive.is_torchscript)
    # Files written before torch 1.6 (not zip): the weights-only loader reads them whole.
    try:
        root = load_state(path)
    except OSError as error:
        raise WeightFileError(f"{path}: not a readable PyTorch weight file ({error})") from error
    return TorchFile(TensorStore(in_memory(dict(_walk_loaded(root, ())), path), str(path)), root, False)


def _walk_loaded(node: Any, path: tuple[str, ...]):
    if isinstance(node, torch.Tensor):
        yield ".".join(path), node
    elif isinstance(node, dict):
        for key, value in node.items():
            yield from _walk_loaded(value, path + (str(key),))


def fields(node: Any) -> dict:
    """Attributes of a plain-data object from a checkpoint (``argparse.Namespace`` args), or {}."""
    return record_fields(node) or (dict(vars(node)) if hasattr(node, "__dict__") and not callable(node) else {})


def open_weight_file(path: Path) -> TensorStore:
    path = Path(path)
    if path.suffix == ".safetensors":
        return open_safetensors(path)
    return open_torch_file(path).store


def hf_weight_files(directory: Path) -> Optional[list[Path]]:
    """The weight files of a Hugging Face model directory (checking its index's shards exist), or None."""
    for index_name in HF_INDEXES:
        index_path = directory / index_name
        if index_path.is_file():
            try:
                weight_map = json.loads(index_path.read_text())["weight_map"]
            except (ValueError, KeyError, TypeError) as error:
                raise ConversionError(f"{index_path}: not a weight index (no readable 'weight_map': {error})") from error
            shards = sorted(set(weight_map.values()))
            missing = [shard for shard in shards if not (directory / shard).is_file()]
            if missing:
                raise ConversionError(
                    f"{index_path} lists {len(shards)} shards but {len(missing)} are missing: "
                    f"{', '.join(missing[:4])}{' ...' if len(missing) > 4 else ''}. Download them again.")
            return [directory / shard for shard in shards]
    for name in HF_SINGLE_FILES:
        if (directory / name).is_file():
            return [directory / name]
    return None


def open_hf_directory(directory: Path) -> TensorStore:
    """Every tensor of a Hugging Face model directory (sharded with an index, or one file)."""
    directory = Path(directory)
    files = hf_weight_files(directory)
    if files is None:
        raise ConversionError(f"{directory}: no weights (none of {', '.join(HF_INDEXES + HF_SINGLE_FILES)})")
    entries: dict[str, Entry] = {}
    for file in files:
        store = open_weight_file(file)
        for key in store.keys():
            if key in entries:
                raise ConversionError(f"{directory}: {key!r} is in both {entries[key].file.name} and {file.name}")
            entries[key] = store.entry(key)
    index = next((directory / name for name in HF_INDEXES if (directory / name).is_file()), None)
    if index is not None:
        for key, shard in json.loads(index.read_text())["weight_map"].items():
            if key not in entries or entries[key].file.name != Path(shard).name:
                raise ConversionError(f"{index}: says {key!r} is in {shard}, which does not hold it; "
                                      "the index and the shards are from different downloads")
    return TensorStore(entries, str(directory))
