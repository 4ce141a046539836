"""A record index over a LLaVA JSON file, built once and shared by every process of a node.

558k records loaded with ``json.load`` are 558k Python dicts in every DataLoader worker of every rank,
and copy-on-write does not help: reading a Python object writes its reference count, so each worker
slowly copies the whole list. Instead, the JSON file itself is memory-mapped (read-only, in the page
cache once per node), and a small index file holds per record:

* ``spans``: the record's byte range in the JSON file; ``json.loads`` of that slice is the record.
* ``image_counts`` and ``word_counts``: what the sampler needs for length grouping without parsing.

The index is cached beside the JSON (``<file>.mmidx``), or in ``index_cache_dir``, or in the user cache
when the data folder is read-only, and is rebuilt when the JSON's size, modification time or leading and
trailing bytes change. Several ranks starting at once take an exclusive file lock: one builds, into a
temporary file renamed into place, and the others wait and then read it.

Both a JSON array (LLaVA's format) and JSON Lines are read. A file that is not valid JSON is a
:class:`~mm_plugin.data.errors.DataError` naming the file, line and column.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import mmap
import os
import struct
from pathlib import Path
from typing import Any, Iterator, Optional

import numpy as np

from ..safe_io import atomic_path
from .errors import DataError

try:
    import fcntl
except ImportError:  # not POSIX: no cross-process lock, the atomic rename still keeps the cache whole
    fcntl = None

_MAGIC = b"MMIDX\x00\x01\x00"
_VERSION = 1
_ALIGN = 64
_FINGERPRINT_BYTES = 1 << 20


def _fingerprint(path: Path, size: int) -> str:
    """sha1 of the first and last MiB: catches an edited file whose size and mtime were kept."""
    digest = hashlib.sha1()
    with open(path, "rb") as handle:
        digest.update(handle.read(_FINGERPRINT_BYTES))
        if size > 2 * _FINGERPRINT_BYTES:
            handle.seek(size - _FINGERPRINT_BYTES)
        digest.update(handle.read(_FINGERPRINT_BYTES))
    return digest.hexdigest()


def _source_identity(path: Path) -> dict[str, Any]:
    stat = path.stat()
    return {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "fingerprint": _fingerprint(path, stat.st_size)}


def _line_column(text: str, position: int) -> tuple[int, int]:
    line = text.count("\n", 0, position) + 1
    return line, position - (text.rfind("\n", 0, position) + 1) + 1


def _words(record: Any) -> int:
    """Whitespace-separated words over all turns (what LLaVA's length grouping counts)."""
    if not isinstance(record, dict) or not isinstance(record.get("conversations"), list):
        return 0
    total = 0
    for turn in record["conversations"]:
        value = turn.get("value") if isinstance(turn, dict) else None
        if isinstance(value, str):
            # The text was decoded as latin-1 (see _scan); bytes.split() splits on ASCII whitespace only,
            # which is what str.split() does on the real UTF-8 text for all but exotic Unicode spaces.
            total += len(value.encode("latin-1", "replace").split())
    return total


def _images(record: Any) -> int:
    image = record.get("image") if isinstance(record, dict) else None
    if isinstance(image, str):
        return 1
    if isinstance(image, list):
        return len(image)
    return 0


def _scan(path: Path) -> tuple[str, np.ndarray, np.ndarray, np.ndarray]:
    """Parse the file once: layout, record byte spans, image counts, word counts."""
    data = path.read_bytes()
    # latin-1 maps every byte to one character, so character offsets are byte offsets; JSON's structural
    # characters are ASCII and never occur inside a UTF-8 multi-byte sequence, so the spans are exact.
    text = data.decode("latin-1")
    del data
    decoder = json.JSONDecoder()
    spans: list[tuple[int, int]] = []
    images: list[int] = []
    words: list[int] = []
    position = 3 if text.startswith("\xef\xbb\xbf") else 0  # UTF-8 byte order mark
    whitespace = " \t\r\n"

    def skip(at: int) -> int:
        while at < len(text) and text[at] in whitespace:
            at += 1
        return at

    def fail(at: int, message: str) -> DataError:
        line, column = _line_column(text, at)
        return DataError(
            f"{path}: line {line}, column {column}: not valid JSON ({message}). LLaVA data files are a JSON array "
            "of records (or JSON Lines, one record per line); fix the file or regenerate it."
        )

    def decode(at: int) -> tuple[Any, int]:
        try:
            return decoder.raw_decode(text, at)
        except json.JSONDecodeError as error:
            raise fail(error.pos, error.msg) from None

    def add(record: Any, start: int, end: int) -> None:
        spans.append((start, end))
        images.append(_images(record))
        words.append(_words(record))

    position = skip(position)
    if position == len(text):
        raise DataError(f"{path}: file is empty; expected a JSON array of LLaVA records")
    if text[position] == "[":
        layout = "array"
        position = skip(position + 1)
        if position < len(text) and text[position] == "]":
            position += 1
        else:
            while True:
                record, end = decode(position)
                add(record, position, end)
                position = skip(end)
                if position < len(text) and text[position] == ",":
                    position = skip(position + 1)
                    continue
                if position < len(text) and text[position] == "]":
                    position += 1
                    break
                raise fail(position, "expected ',' or ']' after a record")
        position = skip(position)
        if position != len(text):
            raise fail(position, "extra data after the closing ']'")
    elif text[position] == "{":
        layout = "jsonl"
        while position < len(text):
            record, end = decode(position)
            add(record, position, end)
            position = end
            while position < len(text) and text[position] in " \t\r":
                position += 1
            if position < len(text) and text[position] != "\n":
                raise fail(position, "expected one record per line")
            position = skip(position)
    else:
        raise fail(position, "expected '[' (a JSON array of records) or '{' (JSON Lines)")
    return (
        layout,
        np.asarray(spans, dtype=np.int64).reshape(-1, 2),
        np.asarray(images, dtype=np.int32),
        np.asarray(words, dtype=np.int32),
    )


def _write_index(target: Path, header: dict[str, Any], arrays: dict[str, np.ndarray]) -> None:
    layout: dict[str, Any] = {}
    offset = 0
    for name, array in arrays.items():
        layout[name] = {"offset": offset, "dtype": array.dtype.str, "shape": list(array.shape)}
        offset += -(-array.nbytes // _ALIGN) * _ALIGN
    header = dict(header, arrays=layout)
    encoded = json.dumps(header).encode()
    start = -(-(len(_MAGIC) + 8 + len(encoded)) // _ALIGN) * _ALIGN
    with atomic_path(target) as temporary, open(temporary, "wb") as handle:
        handle.write(_MAGIC + struct.pack("<Q", len(encoded)) + encoded)
        for name, array in arrays.items():
            handle.seek(start + layout[name]["offset"])
            handle.write(np.ascontiguousarray(array).tobytes())
        handle.truncate(start + offset)


def _read_header(target: Path) -> Optional[tuple[dict[str, Any], int]]:
    """The index header and where its arrays start, or ``None`` if the file is absent or not an index."""
    try:
        with open(target, "rb") as handle:
            if handle.read(len(_MAGIC)) != _MAGIC:
                return None
            (length,) = struct.unpack("<Q", handle.read(8))
            header = json.loads(handle.read(length))
    except (OSError, ValueError, struct.error):
        return None
    return header, -(-(len(_MAGIC) + 8 + length) // _ALIGN) * _ALIGN


@contextlib.contextmanager
def _exclusive(lock_path: Path) -> Iterator[None]:
    if fcntl is None:
        yield
        return
    with open(lock_path, "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def default_index_path(source: Path, cache_dir: Optional[str] = None) -> Path:
    """Beside the JSON if that folder is writable, else ``cache_dir`` or the user cache."""
    name = source.name + ".mmidx"
    if cache_dir is None and os.access(source.parent, os.W_OK):
        return source.parent / name
    if cache_dir is None:
        cache_dir = os.path.join(os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "mm_plugin", "index")
    key = hashlib.sha1(str(source).encode()).hexdigest()[:12]
    return Path(cache_dir) / f"{key}-{name}"


class RecordIndex:
    """Records of one LLaVA JSON file, read lazily from a memory map; cheap to fork and to pickle."""

    def __init__(self, source: Path, index_path: Path, header: dict[str, Any], arrays_start: int):
        self.source = source
        self.index_path = index_path
        self.layout = header["layout"]
        self._header = header
        self._arrays_start = arrays_start
        self._open_maps()

    def _open_maps(self) -> None:
        arrays = {}
        for name, spec in self._header["arrays"].items():
            count = int(np.prod(spec["shape"]))
            arrays[name] = np.memmap(self.index_path, dtype=np.dtype(spec["dtype"]), mode="r",
                                     offset=self._arrays_start + spec["offset"], shape=tuple(spec["shape"])) \
                if count else np.zeros(spec["shape"], dtype=np.dtype(spec["dtype"]))
        self.spans = arrays["spans"]
        self.image_counts = arrays["image_counts"]
        self.word_counts = arrays["word_counts"]
        self._map: Optional[mmap.mmap] = None  # the JSON file, mapped on first read in each process

    @classmethod
    def open(cls, source: str | os.PathLike, cache_dir: Optional[str] = None) -> "RecordIndex":
        """Index ``source``, reusing a valid cached index and building (once per node) otherwise."""
        source = Path(source).resolve()
        if not source.is_file():
            raise DataError(f"{source}: no such data file; check data_path in data.json")
        target = default_index_path(source, cache_dir)
        found = cls._valid(source, target)
        if found is None:
            target.parent.mkdir(parents=True, exist_ok=True)
            with _exclusive(target.with_name(target.name + ".lock")):
                found = cls._valid(source, target)  # another rank may have built it while we waited
                if found is None:
                    cls.build(source, target)
                    found = cls._valid(source, target)
        if found is None:
            raise DataError(f"{target}: the index was written but does not match {source}; is the file changing?")
        return cls(source, target, *found)

    @staticmethod
    def _valid(source: Path, target: Path) -> Optional[tuple[dict[str, Any], int]]:
        found = _read_header(target)
        if found is None:
            return None
        header = found[0]
        if header.get("version") != _VERSION or header.get("source") != str(source):
            return None
        if header.get("identity") != _source_identity(source):
            return None
        return found

    @staticmethod
    def build(source: Path, target: Path) -> None:
        """Scan ``source`` and write its index to ``target`` (atomically)."""
        identity = _source_identity(source)
        layout, spans, images, words = _scan(source)
        header = {"format": "mm_plugin.data.index", "version": _VERSION, "source": str(source),
                  "identity": identity, "layout": layout, "num_records": len(spans)}
        if _source_identity(source) != identity:
            raise DataError(f"{source}: the file changed while it was being indexed; try again")
        _write_index(target, header, {"spans": spans, "image_counts": images, "word_counts": words})

    def __len__(self) -> int:
        return len(self.spans)

    def raw(self, index: int) -> bytes:
        """The JSON text of record ``index``."""
        if self._map is None:
            with open(self.source, "rb") as handle:
                self._map = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) if self.spans.size else None
        start, end = self.spans[index]
        return self._map[int(start):int(end)]

    def record(self, index: int) -> Any:
        """Record ``index`` parsed (a fresh object each call); ``ValueError`` if its bytes are not UTF-8 JSON."""
        return json.loads(self.raw(index))

    def __getstate__(self) -> dict[str, Any]:
        # Spawned DataLoader workers get the paths and re-map the files themselves.
        return {"source": self.source, "index_path": self.index_path, "header": self._header,
                "arrays_start": self._arrays_start}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["source"], state["index_path"], state["header"], state["arrays_start"])
