"""Output files written tensor by tensor: ``.pt`` (the PyTorch archive ``torch.load`` reads) and
``.safetensors``, single or sharded with an index. Each file is written beside its final name and renamed
into place when complete (``mm_plugin.safe_io.atomic_path``).

Both formats take their layout from the plan (names, shapes, dtypes) before any data is made, so only one
tensor (one table row) is in memory at a time:
* safetensors: the JSON header with every offset first, then the tensors' bytes in the same order;
* ``.pt``: torch's own zip writer takes one storage record per tensor as it is made, and the pickle that
  names them (``_rebuild_tensor_v2`` of each storage, as ``torch.save`` writes) goes in last.
"""

from __future__ import annotations

import collections
import contextlib
import io
import json
import pickle
import struct
from pathlib import Path
from typing import Callable

import torch

from mm_plugin.convert.plan import Planned
from mm_plugin.convert.sources import SAFETENSORS_DTYPES
from mm_plugin.safe_io import atomic_path, write_text

_SAFETENSORS_NAMES = {dtype: name for name, dtype in SAFETENSORS_DTYPES.items()}
# The legacy typed-storage class torch.save names for each dtype (torch.load maps it back to the dtype).
_STORAGE_CLASSES = {
    torch.float64: "DoubleStorage", torch.float32: "FloatStorage", torch.float16: "HalfStorage",
    torch.bfloat16: "BFloat16Storage", torch.int64: "LongStorage", torch.int32: "IntStorage",
    torch.int16: "ShortStorage", torch.int8: "CharStorage", torch.uint8: "ByteStorage", torch.bool: "BoolStorage",
}

Progress = Callable[[Planned], None]


def _made(planned: Planned) -> torch.Tensor:
    tensor = planned.make().contiguous()
    if tuple(tensor.shape) != planned.shape or tensor.dtype != planned.dtype:
        raise AssertionError(f"{planned.key}: made {list(tensor.shape)} {tensor.dtype}, planned "
                             f"{list(planned.shape)} {planned.dtype}")
    return tensor


def _bytes_of(tensor: torch.Tensor) -> memoryview:
    return memoryview(tensor.reshape(-1).view(torch.uint8).numpy())


def write_safetensors(path: Path, tensors: list[Planned], progress: Progress) -> Path:
    header, offset = {}, 0
    for planned in tensors:
        header[planned.key] = {"dtype": _SAFETENSORS_NAMES[planned.dtype], "shape": list(planned.shape),
                               "data_offsets": [offset, offset + planned.nbytes]}
        offset += planned.nbytes
    header["__metadata__"] = {"format": "pt"}
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # the data starts 8-byte aligned, as safetensors writes it
    with atomic_path(path) as temporary, open(temporary, "wb") as file:
        file.write(struct.pack("<Q", len(encoded)) + encoded)
        for planned in tensors:
            file.write(_bytes_of(_made(planned)))
            progress(planned)
    return path


class _Storage:
    def __init__(self, key: str, dtype: torch.dtype, numel: int):
        self.key, self.dtype, self.numel = key, dtype, numel


class _TensorStub:
    """Pickles as torch.save pickles a contiguous tensor that owns its storage."""

    def __init__(self, storage: _Storage, shape: tuple[int, ...]):
        self.storage, self.shape = storage, shape

    def __reduce_ex__(self, protocol):
        stride = torch.empty(self.shape, device="meta").stride()
        return (torch._utils._rebuild_tensor_v2,
                (self.storage, 0, self.shape, stride, False, collections.OrderedDict()))


class _Pickler(pickle.Pickler):
    def persistent_id(self, obj):
        if isinstance(obj, _Storage):
            return ("storage", getattr(torch, _STORAGE_CLASSES[obj.dtype]), obj.key, "cpu", obj.numel)
        return None


def write_torch(path: Path, tensors: list[Planned], progress: Progress) -> Path:
    with atomic_path(path) as temporary, open(temporary, "wb") as file:
        # Given a file object, the writer names the archive "archive", as torch.save does: the bytes do
        # not depend on the (temporary) file name.
        writer = torch._C.PyTorchFileWriter(file)
        try:
            _write_torch_records(writer, tensors, progress)
        except BaseException:
            # Finish the archive while the file is still open: the writer's destructor would otherwise write
            # to a closed file, which aborts the process. The partial file is then deleted.
            with contextlib.suppress(Exception):
                writer.write_end_of_file()
            raise
        writer.write_end_of_file()
    return path


def _write_torch_records(writer, tensors: list[Planned], progress: Progress) -> None:
    state = {}
    for index, planned in enumerate(tensors):
        tensor = _made(planned)
        if tensor.storage_offset() or tensor.untyped_storage().nbytes() != planned.nbytes:
            tensor = tensor.clone()  # a view into a larger buffer: store only its own elements
        writer.write_record(f"data/{index}", tensor.untyped_storage(), planned.nbytes)
        state[planned.key] = _TensorStub(_Storage(str(index), planned.dtype, tensor.numel()), planned.shape)
        del tensor
        progress(planned)
    buffer = io.BytesIO()
    _Pickler(buffer, protocol=2).dump(state)
    writer.write_record("data.pkl", buffer.getvalue(), len(buffer.getvalue()))


def write_file(path: Path, tensors: list[Planned], fmt: str, progress: Progress) -> Path:
    return (write_safetensors if fmt == "safetensors" else write_torch)(path, tensors, progress)


def shard(tensors: list[Planned], max_bytes: int) -> list[list[Planned]]:
    """Consecutive groups of at most ``max_bytes`` (a larger tensor gets a shard of its own)."""
    shards: list[list[Planned]] = [[]]
    size = 0
    for planned in tensors:
        if shards[-1] and size + planned.nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(planned)
        size += planned.nbytes
    return shards


def shard_names(count: int) -> list[str]:
    """Hugging Face's names: one ``model.safetensors``, or ``model-0000i-of-0000n.safetensors`` with an index."""
    if count == 1:
        return ["model.safetensors"]
    return [f"model-{index:05d}-of-{count:05d}.safetensors" for index in range(1, count + 1)]


def write_index(directory: Path, shards: list[list[Planned]], names: list[str]) -> Path:
    weight_map = {planned.key: name for group, name in zip(shards, names) for planned in group}
    total = sum(planned.nbytes for group in shards for planned in group)
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    return write_text(directory / "model.safetensors.index.json", json.dumps(index, indent=2) + "\n")
