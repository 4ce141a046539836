"""Shared fixtures: one 2-process gloo pool per session, tiny models and data built once."""

import os
import sys

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, os.path.dirname(__file__))


@pytest.fixture(scope="session")
def pool():
    """Two ranks (gloo, loopback) that stay up for the whole session; see tests/process_pool.py."""
    from process_pool import Pool

    workers = Pool(world_size=2)
    yield workers
    workers.close()


@pytest.fixture(scope="session")
def megatron_single():
    """This process as a world of one (gloo), with megatron's process groups at TP=PP=1."""
    import torch.distributed

    import mm_plugin  # noqa: F401  (patches)
    from process_pool import free_port, parallel

    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}",
                                             rank=0, world_size=1)
    parallel(1, 1)
    yield


def _run_demo(script: str, out, log_name: str) -> None:
    """``bash examples/llava1.5/SCRIPT --demo`` into ``out``, as a user runs it; its output kept in ``out/log_name``."""
    import subprocess
    from pathlib import Path

    from process_pool import free_port
    from seeds import OFFSET

    repo = Path(__file__).resolve().parents[1]
    python = Path(sys.executable)
    env = dict(os.environ, DEMO_DIR=str(out), DEMO_SEED=str(OFFSET), PYTHON=str(python), MASTER_PORT=str(free_port()),
               PATH=f"{python.parent}{os.pathsep}{os.environ['PATH']}",
               PYTHONPATH=os.pathsep.join(filter(None, [str(repo), os.environ.get("PYTHONPATH")])))
    result = subprocess.run(["bash", f"examples/llava1.5/{script}", "--demo"], cwd=repo, env=env,
                            capture_output=True, text=True, timeout=1800)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    (out / log_name).write_text(result.stdout + result.stderr)


@pytest.fixture(scope="session")
def demo_run(tmp_path_factory):
    """``bash examples/llava1.5/pretrain_llava1_5.sh --demo`` run once; its output folder."""
    out = tmp_path_factory.mktemp("demo") / "demo_out"
    _run_demo("pretrain_llava1_5.sh", out, "demo.log")
    return out


@pytest.fixture(scope="session")
def demo_stage2_run(demo_run, tmp_path_factory):
    """``bash examples/llava1.5/finetune_llava1_5.sh --demo`` run once after the stage-1 demo, in a copy of its
    folder (so that the stage-1 demo's folder stays as the stage-1 tests expect it); that folder."""
    import shutil

    out = tmp_path_factory.mktemp("demo2") / "demo_out"
    shutil.copytree(demo_run, out)
    _run_demo("finetune_llava1_5.sh", out, "demo_stage2.log")
    return out


@pytest.fixture(scope="session")
def demo_stage2_lora_run(demo_run, tmp_path_factory):
    """``bash examples/llava1.5/finetune_lora_llava1_5.sh --demo`` (LoRA, ``checkpoints/stage2-lora``) run once
    after the stage-1 demo, in a copy of its folder; that folder."""
    import shutil

    out = tmp_path_factory.mktemp("demo2lora") / "demo_out"
    shutil.copytree(demo_run, out)
    _run_demo("finetune_lora_llava1_5.sh", out, "demo_stage2-lora.log")
    return out
