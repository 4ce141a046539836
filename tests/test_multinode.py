"""Two torchrun "nodes" on this machine, as the pretrain script starts them (NNODES=2, NODE_RANK, MASTER_ADDR):
train, save and resume exactly; a node lost ends the other within the timeout; a failed job restarts from its
last checkpoint by running the same command again."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from process_pool import free_port
from training_fixtures import argv, build_setup, model_json

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = build_setup(tmp_path_factory.mktemp("multinode"))
    model_json(root, "stage1.json", train_language=False)
    return root


def _start_nodes(setup, port: int, logs: Path, extra: tuple, iterations: int) -> list[subprocess.Popen]:
    """Both nodes of a 2-node job (one process each: data parallelism across the nodes)."""
    arguments = argv(setup, iterations=iterations, extra=("--log-interval", "1", "--tensorboard-dir", str(logs),
                                                          "--distributed-timeout-minutes", "1", *extra))
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    return [subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node-rank", str(node),
         "--nproc-per-node", "1", "--master-addr", "127.0.0.1", "--master-port", str(port),
         str(REPO / "launch" / "pretrain.py"), *arguments],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
        for node in (0, 1)]


def _finish(nodes: list[subprocess.Popen], timeout: float = 300) -> list[str]:
    outputs = [node.communicate(timeout=timeout)[0] for node in nodes]
    for node, output in zip(nodes, outputs):
        assert node.returncode == 0, output[-3000:]
    return outputs


def _losses(logs: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (logs / "metrics.jsonl").read_text().splitlines()]
    return {record["iteration"]: record["loss"] for record in records if "loss" in record}


def test_two_nodes_train_save_and_resume_exactly(setup, tmp_path):
    _finish(_start_nodes(setup, free_port(), tmp_path / "straight", (), iterations=6))
    save = tmp_path / "ckpt"
    _finish(_start_nodes(setup, free_port(), tmp_path / "first", ("--save", str(save), "--exit-interval", "3"), 6))
    _finish(_start_nodes(setup, free_port(), tmp_path / "rest", ("--load", str(save)), 6))
    straight = _losses(tmp_path / "straight")
    assert sorted(straight) == list(range(1, 7))
    assert {**_losses(tmp_path / "first"), **_losses(tmp_path / "rest")} == straight  # bit for bit


def test_a_lost_node_ends_the_job_and_the_same_command_restarts_it(setup, tmp_path):
    save = tmp_path / "ckpt"
    extra = ("--save", str(save), "--load", str(save), "--save-interval", "2")
    nodes = _start_nodes(setup, free_port(), tmp_path / "killed", extra, iterations=400)
    tracker = save / "latest_checkpointed_iteration.txt"
    deadline = time.monotonic() + 240
    while not (tracker.is_file() and int(tracker.read_text()) >= 4):
        assert time.monotonic() < deadline and all(node.poll() is None for node in nodes), "no checkpoint saved"
        time.sleep(0.2)
    os.killpg(nodes[1].pid, signal.SIGKILL)  # node 1 and its worker vanish, as when a machine dies
    output = nodes[0].communicate(timeout=300)[0]
    assert nodes[0].returncode != 0, output[-3000:]
    # The surviving node ends when its wait for the lost one reaches --distributed-timeout-minutes (1 here; the
    # default 10), on megatron-core's groups too (whose own default is 30), and torchrun shuts it down.
    assert "Timed out waiting 60000ms" in output, output[-3000:]
    nodes[1].communicate()
    resumed_from = int(tracker.read_text())
    # The way to restart: the same command again (--load is --save); it goes on from the last checkpoint.
    _finish(_start_nodes(setup, free_port(), tmp_path / "restarted", extra, iterations=resumed_from + 4))
    assert sorted(_losses(tmp_path / "restarted")) == list(range(resumed_from + 1, resumed_from + 5))
    assert int(tracker.read_text()) == resumed_from + 4
