"""Tensors out of PyTorch zip archives (``torch.save`` files and TorchScript archives), never running them.

Both are zip files holding a pickle (``data.pkl``) that names its tensors' storages, and one ``data/N``
member per storage. The pickle is read by an unpickler that admits only what weights need: torch's
tensor-rebuild functions and storage types become :class:`TensorRef` records (shape, stride, offset,
storage), containers stay containers, and a short list of data-only classes (TorchScript module
objects, ``argparse.Namespace`` args, numpy RNG state, Megatron enums) become inert :class:`Record`
objects whose real class is never imported. Any other global is refused with :class:`UnsafeFileError`.

Tensor bytes are read later, one tensor at a time, with ``readinto`` at the storage member's offset in
the file: nothing is mapped or loaded that the conversion does not need at that moment.
"""

from __future__ import annotations

import collections
import dataclasses
import io
import pickle
import re
import struct
import zipfile
from pathlib import Path
from typing import Any, Iterator

import torch

from mm_plugin.safe_io import UnsafeFileError, WeightFileError

_STORAGE_DTYPES = {
    "DoubleStorage": torch.float64, "FloatStorage": torch.float32, "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16, "LongStorage": torch.int64, "IntStorage": torch.int32,
    "ShortStorage": torch.int16, "CharStorage": torch.int8, "ByteStorage": torch.uint8, "BoolStorage": torch.bool,
    "UntypedStorage": torch.uint8, "Float8_e4m3fnStorage": torch.float8_e4m3fn,
    "Float8_e5m2Storage": torch.float8_e5m2,
}
# Classes whose pickled state is plain data: kept as inert records, never imported.
_RECORD_CLASSES = re.compile(
    r"^(__torch__\..*"  # TorchScript module objects (their state: parameters, buffers, submodules)
    r"|argparse\.Namespace"  # Megatron's saved args
    r"|numpy\.(_?core\.multiarray\._reconstruct|ndarray|dtype|dtypes\.\w+)"  # numpy RNG state
    r"|(megatron|modellink|mindspeed\w*|transformer_engine)\..*"  # enums in saved args
    r"|_io\.BytesIO|torch\.device|torch\.nn\.parameter\.Parameter)$"
)


@dataclasses.dataclass(frozen=True)
class StorageRef:
    key: str
    dtype: torch.dtype
    numel: int


@dataclasses.dataclass(frozen=True)
class TensorRef:
    """Where one tensor's elements are: a storage, an element offset into it, a shape and strides."""

    storage: StorageRef
    offset: int
    shape: tuple[int, ...]
    stride: tuple[int, ...]


class Record:
    """An object of a class we do not import: its constructor arguments and pickled state, as data."""

    type_name = "?"

    def __new__(cls, *args, **kwargs):
        record = super().__new__(cls)
        record.args, record.state = args, None
        return record

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        self.state = state


@dataclasses.dataclass(frozen=True)
class _StorageType:
    dtype: torch.dtype


def _rebuild_tensor(storage, offset, shape, stride, *unused) -> TensorRef:
    return TensorRef(storage, int(offset), tuple(int(s) for s in shape), tuple(int(s) for s in stride))


def _rebuild_tensor_v3(storage, offset, shape, stride, requires_grad, hooks, dtype, *unused) -> TensorRef:
    return _rebuild_tensor(StorageRef(storage.key, dtype, storage.numel), offset, shape, stride)


def _first(value, *unused):
    return value


def _rebuild_from_type(function, new_type, args, state):
    return function(*args)


def _reconstructor(cls, base, state=None):
    return cls.__new__(cls)


def _latin1_bytes(text: str, encoding: str = "latin1") -> bytes:
    """How protocol-2 pickles (torch.save's) spell bytes, e.g. a numpy RNG state's."""
    if encoding not in ("latin1", "latin-1"):
        raise UnsafeFileError(f"refused to load: a pickle asks to encode text as {encoding!r}")
    return text.encode("latin1")


_FUNCTIONS = {
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor_v3"): _rebuild_tensor_v3,
    ("torch._utils", "_rebuild_parameter"): _first,
    ("torch._utils", "_rebuild_parameter_with_state"): _first,
    ("torch._tensor", "_rebuild_from_type_v2"): _rebuild_from_type,
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("copyreg", "_reconstructor"): _reconstructor,
    ("_codecs", "encode"): _latin1_bytes,
    ("torch", "Size"): tuple,
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    ("builtins", "object"): object,
    # TorchScript's typed-list helpers: the value is already the list.
    ("torch.jit._pickle", "build_intlist"): _first,
    ("torch.jit._pickle", "build_doublelist"): _first,
    ("torch.jit._pickle", "build_boollist"): _first,
    ("torch.jit._pickle", "build_tensorlist"): _first,
    ("torch.jit._pickle", "build_strlist"): _first,
    ("torch.jit._pickle", "restore_type_tag"): _first,
}


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, data: bytes, source: Path):
        super().__init__(io.BytesIO(data))
        self._source = source
        self._records: dict[str, type] = {}
        self._storages: dict[str, StorageRef] = {}

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _FUNCTIONS:
            return _FUNCTIONS[(module, name)]
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(_STORAGE_DTYPES[name])
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        qualified = f"{module}.{name}"
        if _RECORD_CLASSES.match(qualified):
            if qualified not in self._records:
                self._records[qualified] = type(name, (Record,), {"type_name": qualified})
            return self._records[qualified]
        raise UnsafeFileError(
            f"{self._source}: refused to load: its pickle asks for {qualified!r}, which a weight file does not "
            "need. Nothing in the file was executed. Only tensors, containers and plain data records are read."
        )

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage" and isinstance(pid[1], _StorageType)):
            raise UnsafeFileError(f"{self._source}: refused to load: unknown persistent reference {pid!r:.80}")
        _, storage_type, key, _location, numel = pid
        key = str(key)
        if key not in self._storages:
            self._storages[key] = StorageRef(key, storage_type.dtype, int(numel))
        return self._storages[key]


class TorchArchive:
    """One ``torch.save`` file or TorchScript archive: its unpickled structure, and its tensors on demand."""

    def __init__(self, path: Path):
        self.path = Path(path)
        try:
            with zipfile.ZipFile(self.path) as archive:
                members = {info.filename: info for info in archive.infolist()}
                pickles = [name for name in members if re.fullmatch(r"[^/]+/data\.pkl", name)]
                if len(pickles) != 1:
                    raise WeightFileError(f"{self.path}: a zip file but not a PyTorch archive (no single */data.pkl)")
                self._prefix = pickles[0][: -len("data.pkl")]
                data = archive.read(pickles[0])
                byteorder = members.get(self._prefix + "byteorder")
                if byteorder is not None and archive.read(byteorder).decode() != "little":
                    raise WeightFileError(f"{self.path}: big-endian archive; only little-endian files are read")
        except (zipfile.BadZipFile, OSError, EOFError) as error:
            raise WeightFileError(f"{self.path}: not a readable PyTorch archive ({error}); truncated download?") from error
        self._members = members
        self.is_torchscript = self._prefix + "constants.pkl" in members or any(
            name.startswith(self._prefix + "code/") for name in members)
        try:
            self.root = _RestrictedUnpickler(data, self.path).load()
        except UnsafeFileError:
            raise
        except Exception as error:  # a corrupt pickle: any unpickling failure means the same to the user
            raise WeightFileError(f"{self.path}: its data.pkl is not a readable pickle ({error})") from error
        self._data_offsets: dict[str, int] = {}

    def tensors(self) -> Iterator[tuple[str, TensorRef]]:
        """Every tensor in the archive with its dotted path (dict keys, TorchScript attribute names)."""
        yield from _walk(self.root, ())

    def read(self, ref: TensorRef) -> torch.Tensor:
        if any(size == 0 for size in ref.shape):
            return torch.empty(ref.shape, dtype=ref.storage.dtype)
        extent = 1 + sum((size - 1) * stride for size, stride in zip(ref.shape, ref.stride))
        if ref.offset + extent > ref.storage.numel:
            raise WeightFileError(f"{self.path}: a tensor reaches past its storage {ref.storage.key}; corrupt file")
        element = torch.empty((), dtype=ref.storage.dtype).element_size()
        buffer = torch.empty(extent * element, dtype=torch.uint8)
        self._read_member(self._prefix + "data/" + ref.storage.key, ref.offset * element, buffer)
        tensor = buffer.view(ref.storage.dtype).as_strided(ref.shape, ref.stride)
        return tensor if tensor.is_contiguous() and tensor.numel() == extent else tensor.contiguous()

    def _read_member(self, name: str, start: int, buffer: torch.Tensor) -> None:
        info = self._members.get(name)
        if info is None:
            raise WeightFileError(f"{self.path}: storage {name!r} is missing from the archive; truncated file?")
        if start + buffer.numel() > info.file_size:
            raise WeightFileError(f"{self.path}: storage {name!r} is shorter than its tensors; corrupt file")
        view = memoryview(buffer.numpy())
        if info.compress_type != zipfile.ZIP_STORED:  # torch never compresses; a re-zipped file may be
            with zipfile.ZipFile(self.path) as archive, archive.open(info) as member:
                member.seek(start)
                _read_fully(member, view, self.path)
            return
        with open(self.path, "rb") as file:
            file.seek(self._data_offset(file, info) + start)
            _read_fully(file, view, self.path)

    def _data_offset(self, file, info: zipfile.ZipInfo) -> int:
        if info.filename not in self._data_offsets:
            # The local header's own name and extra-field lengths, which may differ from the central directory's.
            file.seek(info.header_offset)
            header = file.read(30)
            if len(header) != 30 or header[:4] != b"PK\x03\x04":
                raise WeightFileError(f"{self.path}: broken zip entry {info.filename!r}; truncated file?")
            name_length, extra_length = struct.unpack("<HH", header[26:30])
            self._data_offsets[info.filename] = info.header_offset + 30 + name_length + extra_length
        return self._data_offsets[info.filename]


def read_into(path: Path, offset: int, buffer: torch.Tensor) -> None:
    """Fill a uint8 tensor with the file's bytes at ``offset`` (no mapping, no second copy)."""
    with open(path, "rb") as file:
        file.seek(offset)
        _read_fully(file, memoryview(buffer.numpy()), path)


def _read_fully(file, view: memoryview, path: Path) -> None:
    done = 0
    while done < len(view):  # one read returns at most ~2 GiB on Linux
        count = file.readinto(view[done:])
        if not count:
            raise WeightFileError(f"{path}: ends {len(view) - done} bytes early; truncated download?")
        done += count


def _walk(node: Any, path: tuple[str, ...]) -> Iterator[tuple[str, TensorRef]]:
    if isinstance(node, TensorRef):
        yield ".".join(path), node
    elif isinstance(node, dict):
        for key, value in node.items():
            yield from _walk(value, path + (str(key),))
    elif isinstance(node, Record) and node.type_name.startswith("__torch__.") and isinstance(node.state, dict):
        for key, value in node.state.items():
            yield from _walk(value, path + (str(key),))


def record_fields(node: Any) -> dict:
    """The attributes of a pickled plain-data object (e.g. Megatron's ``args``), or {}."""
    return dict(node.state) if isinstance(node, Record) and isinstance(node.state, dict) else {}
