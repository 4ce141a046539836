"""One loader for weight files that never executes them, one writer that never leaves half a file."""

import argparse
import os
import random
import stat

import numpy
import pytest
import torch

from mm_plugin.safe_io import UnsafeFileError, WeightFileError, atomic_path, load_state, save_state


class _CreatesFile:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_megatron_checkpoint_with_args_and_rng_state_loads(tmp_path):
    state = {"args": argparse.Namespace(tensor_model_parallel_size=2, params_dtype=torch.bfloat16),
             "iteration": 7, "model": {"w": torch.arange(4.0)},
             "rng_state": [{"random_rng_state": random.getstate(), "np_rng_state": numpy.random.get_state(),
                            "torch_rng_state": torch.get_rng_state()}]}
    torch.save(state, tmp_path / "model_optim_rng.pt")
    loaded = load_state(tmp_path / "model_optim_rng.pt")
    assert loaded["args"].tensor_model_parallel_size == 2 and loaded["iteration"] == 7
    assert loaded["rng_state"][0]["np_rng_state"][0] == "MT19937"
    assert numpy.array_equal(loaded["rng_state"][0]["np_rng_state"][1], state["rng_state"][0]["np_rng_state"][1])
    assert torch.equal(loaded["model"]["w"], torch.arange(4.0))


def test_loading_keeps_the_process_wide_registration_of_megatron_core(tmp_path):
    """megatron-core registers argparse.Namespace for torch.load on import, and its own checkpoint loading
    relies on that; torch's safe_globals context would un-register it on leaving."""
    torch.save({"w": torch.zeros(1)}, tmp_path / "plain.pt")
    before = torch.serialization.get_safe_globals()
    torch.serialization.add_safe_globals([argparse.Namespace])
    try:
        load_state(tmp_path / "plain.pt")
        assert argparse.Namespace in torch.serialization.get_safe_globals()
    finally:
        torch.serialization.clear_safe_globals()
        torch.serialization.add_safe_globals(before)


def test_a_malicious_pickle_is_refused_never_run(tmp_path):
    marker = tmp_path / "created-by-the-pickle"
    torch.save({"w": torch.zeros(1), "payload": _CreatesFile(marker)}, tmp_path / "evil.pt")
    with pytest.raises(UnsafeFileError, match=r"evil\.pt: refused to load: .*posix\.system"):
        load_state(tmp_path / "evil.pt")
    assert not marker.exists()


def test_not_a_weight_file_is_named(tmp_path):
    (tmp_path / "garbage.bin").write_bytes(b"not a checkpoint")
    with pytest.raises(WeightFileError, match=r"garbage\.bin: not a readable PyTorch weight file"):
        load_state(tmp_path / "garbage.bin")
    with pytest.raises(WeightFileError, match=r"missing\.pt: no such file"):
        load_state(tmp_path / "missing.pt")
    (tmp_path / "broken.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{}")
    with pytest.raises(WeightFileError, match=r"broken\.safetensors"):
        load_state(tmp_path / "broken.safetensors")


def test_a_torchscript_archive_is_refused_with_the_way_out(tmp_path):
    torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), str(tmp_path / "ViT-L-14-336px.pt"))
    with pytest.raises(UnsafeFileError, match=r"TorchScript archive.*mm-convert clip"):
        load_state(tmp_path / "ViT-L-14-336px.pt")


@pytest.mark.parametrize("name", ["part.pt", "part.safetensors"])
def test_save_round_trip_with_normal_permissions(tmp_path, name):
    tensors = {"a": torch.randn(3, 2), "b": torch.arange(5)}
    path = save_state(tensors, tmp_path / name)
    loaded = load_state(path, mmap=name.endswith(".pt"))
    assert set(loaded) == {"a", "b"} and all(torch.equal(loaded[k], v) for k, v in tensors.items())
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask
    assert [p.name for p in tmp_path.iterdir()] == [name]  # nothing left beside it


def test_a_failed_write_leaves_the_old_file_and_no_partial_one(tmp_path):
    target = tmp_path / "model.json"
    target.write_text("old")
    with pytest.raises(RuntimeError, match="crash"):
        with atomic_path(target) as temporary:
            temporary.write_text("half of the new")
            raise RuntimeError("crash")
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["model.json"]
