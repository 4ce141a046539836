"""A persistent pool of 2 processes (gloo over loopback) that tests share.

Starting processes and importing megatron-core costs seconds, so the pool starts once per test
session and runs many test functions. ``pool.run(fn, *args)`` calls the module-level function ``fn``
on every rank and returns the per-rank results; an exception on any rank fails the test with that
rank's traceback. ``parallel(tp, pp)`` (run inside a rank) rebuilds megatron's process groups.
"""

from __future__ import annotations

import multiprocessing
import os
import socket
import traceback
from typing import Any, Callable

TIMEOUT_S = 600


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _worker(rank: int, world_size: int, port: int, connection) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank), OMP_NUM_THREADS="1")
    import datetime

    import torch

    import mm_plugin  # noqa: F401  (patches)

    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world_size,
                                         timeout=datetime.timedelta(seconds=TIMEOUT_S))
    while True:
        message = connection.recv()
        if message is None:
            break
        function, args, kwargs = message
        try:
            connection.send(("ok", function(*args, **kwargs)))
        except BaseException:  # report everything, keep serving
            connection.send(("error", traceback.format_exc()))
    torch.distributed.destroy_process_group()


class Pool:
    def __init__(self, world_size: int = 2):
        context = multiprocessing.get_context("spawn")
        port = free_port()
        self.world_size = world_size
        self._connections, self._processes = [], []
        for rank in range(world_size):
            parent, child = context.Pipe()
            process = context.Process(target=_worker, args=(rank, world_size, port, child), daemon=True)
            process.start()
            self._connections.append(parent)
            self._processes.append(process)

    def run(self, function: Callable, *args, **kwargs) -> list[Any]:
        for connection in self._connections:
            connection.send((function, args, kwargs))
        replies = []
        for rank, connection in enumerate(self._connections):
            if not connection.poll(TIMEOUT_S):
                self.close()
                raise TimeoutError(f"rank {rank} gave no answer within {TIMEOUT_S} s running {function.__name__}")
            replies.append(connection.recv())
        errors = [f"--- rank {rank} ---\n{value}" for rank, (status, value) in enumerate(replies) if status == "error"]
        if errors:
            raise RuntimeError(f"{function.__name__} failed:\n" + "\n".join(errors))
        return [value for _, value in replies]

    def close(self) -> None:
        for connection, process in zip(self._connections, self._processes):
            try:
                connection.send(None)
            except (BrokenPipeError, OSError):
                pass
            process.join(timeout=10)
            if process.is_alive():
                process.kill()


def parallel(tensor_parallel: int = 1, pipeline_parallel: int = 1, seed: int = 1234) -> None:
    """Inside a rank: (re)build megatron's process groups for this TP x PP (DP is the rest)."""
    from megatron.core import parallel_state, tensor_parallel as megatron_tp

    parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(tensor_parallel, pipeline_parallel)
    megatron_tp.model_parallel_cuda_manual_seed(seed)
