"""The shared record index: exact spans, cached once, rebuilt on change, clear errors on bad JSON."""

import json
import multiprocessing
import os
import pickle

import numpy as np
import pytest

from mm_plugin.data.errors import DataError
from mm_plugin.data.index import RecordIndex, default_index_path

RECORDS = [
    {"id": "a", "image": "00000/a.jpg", "conversations": [{"from": "human", "value": "<image>\nQ"},
                                                         {"from": "gpt", "value": "ein großer Hund, 一只狗"}]},
    {"id": "b", "conversations": [{"from": "human", "value": "two words"}, {"from": "gpt", "value": "and three more"}]},
    {"id": "c", "image": ["x.jpg", "y.jpg"], "conversations": [{"from": "human", "value": "<image><image>"},
                                                              {"from": "gpt", "value": "pair"}]},
    ["not", "a", "record"],
]


def write(path, text):
    path.write_text(text, encoding="utf-8")
    return path


@pytest.mark.parametrize("layout", ["array", "jsonl"])
def test_records_read_back_exactly(tmp_path, layout):
    if layout == "array":
        path = write(tmp_path / "data.json", "\ufeff" + json.dumps(RECORDS, indent=2, ensure_ascii=False))
    else:
        path = write(tmp_path / "data.jsonl", "\n".join(json.dumps(r, ensure_ascii=False) for r in RECORDS) + "\n\n")
    index = RecordIndex.open(path)
    assert index.layout == layout and len(index) == len(RECORDS)
    assert [index.record(i) for i in range(len(index))] == RECORDS
    assert index.image_counts.tolist() == [1, 0, 2, 0]
    assert index.word_counts.tolist() == [2 + 4, 2 + 3, 1 + 1, 0]
    assert isinstance(index.spans, np.memmap)  # shared pages, not per-process objects


def test_index_is_cached_and_rebuilt_when_the_file_changes(tmp_path):
    path = write(tmp_path / "data.json", json.dumps(RECORDS[:2]))
    first = RecordIndex.open(path)
    built = os.stat(first.index_path).st_mtime_ns
    assert RecordIndex.open(path).index_path == first.index_path
    assert os.stat(first.index_path).st_mtime_ns == built  # reused, not rebuilt
    write(path, json.dumps(RECORDS[:3]))
    again = RecordIndex.open(path)
    assert len(again) == 3 and again.record(2)["id"] == "c"


def test_same_size_edit_is_detected(tmp_path):
    path = write(tmp_path / "data.json", json.dumps([{"id": "aaaa"}]))
    RecordIndex.open(path)
    stat = os.stat(path)
    write(path, json.dumps([{"id": "bbbb"}]))
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # same size, same mtime
    assert RecordIndex.open(path).record(0)["id"] == "bbbb"


@pytest.mark.parametrize("text,line,column", [
    ('[\n  {"id": "a"},\n  {"id": "b",}\n]', 3, 14),
    ('[\n  {"id": "a"}\n  {"id": "b"}\n]', 3, 3),
    ('{"id": "a"}\n{"id": \n', 3, 1),
    ('[{"id": "a"}] trailing', 1, 15),
])
def test_invalid_json_names_file_line_and_column(tmp_path, text, line, column):
    path = write(tmp_path / "broken.json", text)
    with pytest.raises(DataError) as caught:
        RecordIndex.open(path)
    message = str(caught.value)
    assert str(path) in message and f"line {line}, column {column}" in message, message


def test_not_a_record_list(tmp_path):
    with pytest.raises(DataError, match="expected '\\['"):
        RecordIndex.open(write(tmp_path / "x.json", '"just a string"'))
    with pytest.raises(DataError, match="empty"):
        RecordIndex.open(write(tmp_path / "y.json", "  \n"))


def _open_and_count(path):
    index = RecordIndex.open(path)
    return len(index), index.record(len(index) - 1)["id"]


def test_ranks_building_at_once_get_one_valid_index(tmp_path):
    records = [{"id": str(i), "conversations": [{"from": "human", "value": "q " * (i % 7)}]} for i in range(3000)]
    path = write(tmp_path / "data.json", json.dumps(records))
    with multiprocessing.get_context("fork").Pool(4) as pool:
        results = pool.map(_open_and_count, [str(path)] * 4)
    assert results == [(3000, "2999")] * 4
    leftovers = [name for name in os.listdir(tmp_path) if name.endswith(".partial")]
    assert leftovers == []


def test_read_only_folder_uses_the_cache_dir(tmp_path, monkeypatch):
    path = write(tmp_path / "data.json", json.dumps(RECORDS))
    monkeypatch.setattr(os, "access", lambda *args: False)
    target = default_index_path(path.resolve(), str(tmp_path / "cache"))
    assert target.parent == tmp_path / "cache"
    index = RecordIndex.open(path, str(tmp_path / "cache"))
    assert index.index_path == target and len(index) == len(RECORDS)


def test_pickles_for_spawned_workers(tmp_path):
    path = write(tmp_path / "data.json", json.dumps(RECORDS))
    index = RecordIndex.open(path)
    index.record(0)
    clone = pickle.loads(pickle.dumps(index))
    assert clone.record(1) == RECORDS[1]
