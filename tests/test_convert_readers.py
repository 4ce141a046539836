"""Reading weight files without running them, and writing them tensor by tensor (mm_plugin.convert)."""

import os
import pickle
import shutil
from pathlib import Path

import pytest
import torch

import convert_fixtures as fixtures
from mm_plugin.convert.errors import ConversionError
from mm_plugin.convert.plan import Planned
from mm_plugin.convert.sources import open_hf_directory, open_safetensors, open_torch_file
from mm_plugin.convert.writers import write_safetensors, write_torch
from mm_plugin.safe_io import UnsafeFileError, WeightFileError
from seeds import varied


def tensors_to_save():
    generator = torch.Generator().manual_seed(varied(0))
    base = torch.randn(6, 8, generator=generator)
    return {
        "block": {"weight": base, "half": torch.randn(5, generator=generator).half(),
                  "bf16": torch.randn(3, 4, generator=generator).bfloat16()},
        "transposed": base.t(),  # shares base's storage, not contiguous
        "row": base[2],  # a view at an offset into base's storage
        "scalar": torch.tensor(1.5), "empty": torch.zeros(0, 3), "steps": torch.arange(7),
    }


def flat(tree, prefix=""):
    out = {}
    for key, value in tree.items():
        out.update(flat(value, f"{prefix}{key}.") if isinstance(value, dict) else {prefix + key: value})
    return out


@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "pre-1.6"])
def test_torch_files_read_lazily_with_their_exact_values(tmp_path, zip_format):
    path = tmp_path / "state.pt"
    torch.save(tensors_to_save(), path, _use_new_zipfile_serialization=zip_format)
    store = open_torch_file(path).store
    expected = flat(tensors_to_save())
    assert sorted(store.keys()) == sorted(expected)
    for key, tensor in expected.items():
        entry = store.entry(key)
        assert (entry.shape, entry.dtype, entry.file) == (tuple(tensor.shape), tensor.dtype, path)
        read = store.read(key)
        assert read.dtype == tensor.dtype and torch.equal(read, tensor), key


def test_torchscript_archive_tensors_are_read_without_loading_the_module():
    opened = open_torch_file(fixtures.openai_torchscript_file())
    assert opened.is_torchscript
    expected = {**fixtures.openai_visual_state(), **fixtures.openai_text_state()}
    weights = {key: opened.store.read(key) for key in opened.store.keys()}
    assert set(weights) == set(expected)
    assert all(torch.equal(weights[key], expected[key]) for key in expected)


def test_safetensors_header_describes_and_reads_each_tensor(tmp_path):
    from safetensors.torch import save_file

    tensors = {key: value.contiguous().clone() for key, value in flat(tensors_to_save()).items() if value.numel()}
    save_file(tensors, str(tmp_path / "x.safetensors"))
    store = open_safetensors(tmp_path / "x.safetensors")
    assert all(torch.equal(store.read(key), tensor) and store.entry(key).dtype == tensor.dtype
               for key, tensor in tensors.items())


class _CreatesFile:
    """A pickle payload that creates a file when unpickled by anything that runs its global."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_malicious_pickle_is_refused_and_never_runs(tmp_path):
    live = tmp_path / "ran-when-unpickled"
    pickle.loads(pickle.dumps(_CreatesFile(live)))
    assert live.exists(), "the payload is live: plain unpickling runs it"

    marker = tmp_path / "must-not-exist"
    path = tmp_path / "mm_projector.bin"
    torch.save({"model.mm_projector.0.weight": torch.zeros(2, 2), "hook": _CreatesFile(marker)}, path)
    with pytest.raises(UnsafeFileError, match=r"mm_projector\.bin: refused to load: .*'posix\.system'.*Nothing"):
        open_torch_file(path)
    assert not marker.exists()


def test_truncated_files_are_named(tmp_path):
    from safetensors.torch import save_file

    save_file({"w": torch.randn(64, 64)}, str(tmp_path / "w.safetensors"))
    torch.save({"w": torch.randn(64, 64)}, tmp_path / "w.pt")
    for name in ("w.safetensors", "w.pt"):
        data = (tmp_path / name).read_bytes()
        (tmp_path / f"cut-{name}").write_bytes(data[: len(data) // 2])
    with pytest.raises(WeightFileError, match=r"cut-w\.safetensors: .*truncated"):
        open_safetensors(tmp_path / "cut-w.safetensors")
    with pytest.raises(WeightFileError, match=r"cut-w\.pt: .*truncated"):
        open_torch_file(tmp_path / "cut-w.pt")


def test_hf_directory_missing_shard_and_inconsistent_index_are_named(tmp_path):
    broken = tmp_path / "vicuna"
    shutil.copytree(fixtures.hf_llama_dir("gqa"), broken)
    shards = sorted(broken.glob("model-*.safetensors"))
    shards[1].unlink()
    with pytest.raises(ConversionError, match=rf"model\.safetensors\.index\.json lists {len(shards)} shards but 1 "
                                              rf"are missing: {shards[1].name}"):
        open_hf_directory(broken)

    lying = tmp_path / "lying"
    shutil.copytree(fixtures.hf_llama_dir("gqa"), lying)
    index = lying / "model.safetensors.index.json"
    text = index.read_text()
    first = sorted(lying.glob("model-*.safetensors"))[0].name
    index.write_text(text.replace('"model.norm.weight": "', f'"model.norm.weight": "{first}", "x": "', 1))
    with pytest.raises(ConversionError, match=r"says 'model.norm.weight' is in .* which does not hold it"):
        open_hf_directory(lying)


def planned(tensors: dict) -> list:
    return [Planned(key, tuple(t.shape), t.dtype, lambda t=t: t, ()) for key, t in tensors.items()]


def test_streamed_files_load_like_torch_save_and_safetensors(tmp_path):
    from safetensors.torch import load_file

    tensors = {key: value.clone() for key, value in flat(tensors_to_save()).items()}
    write_torch(tmp_path / "a.pt", planned(tensors), lambda _: None)
    write_torch(tmp_path / "b.pt", planned(tensors), lambda _: None)
    assert (tmp_path / "a.pt").read_bytes() == (tmp_path / "b.pt").read_bytes(), "the name must not matter"
    for mmap in (False, True):
        loaded = torch.load(tmp_path / "a.pt", weights_only=True, mmap=mmap)
        assert list(loaded) == list(tensors)
        assert all(loaded[k].dtype == v.dtype and torch.equal(loaded[k], v) for k, v in tensors.items())

    write_safetensors(tmp_path / "a.safetensors", planned(tensors), lambda _: None)
    loaded = load_file(str(tmp_path / "a.safetensors"))
    assert all(loaded[k].dtype == v.dtype and torch.equal(loaded[k], v) for k, v in tensors.items())


@pytest.mark.parametrize("writer", [write_torch, write_safetensors])
def test_a_failure_mid_file_leaves_nothing_under_the_output_name(tmp_path, writer):
    def fail():
        raise ConversionError("disk on fire")

    items = planned({"a": torch.ones(3)}) + [Planned("b", (3,), torch.float32, fail, ())]
    with pytest.raises(ConversionError, match="disk on fire"):
        writer(tmp_path / "out.bin", items, lambda _: None)
    assert fixtures.files_under(tmp_path) == []
