"""A persistent pool of 2 processes (gloo over loopback) that tests share.

Starting processes and importing megatron-core costs seconds, so the pool starts once per test
session and runs many test functions. ``pool.run(fn, *args)`` calls the module-level function ``fn``
on every rank and returns the per-rank results; an exception on any rank fails the test with that
rank's traceback. ``parallel(tp, pp)`` (run inside a rank) rebuilds megatron's process groups.
"""

from __future__ import annotations

import faulthandler
import multiprocessing
import os
import signal
import socket
import time
import traceback
from multiprocessing.connection import wait
from typing import Any, Callable

TIMEOUT_S = int(os.environ.get("MM_TEST_POOL_TIMEOUT", 600))
ERROR_GRACE_S = 30


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _die_with_parent() -> None:
    """Linux: the kernel kills this worker when the test process dies, even mid-collective."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def _worker(rank: int, world_size: int, port: int, connection) -> None:
    _die_with_parent()
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank), OMP_NUM_THREADS="1")
    import datetime

    import torch

    import mm_plugin  # noqa: F401  (patches)

    torch.set_num_threads(1)
    faulthandler.register(signal.SIGUSR1)
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world_size,
                                         timeout=datetime.timedelta(seconds=TIMEOUT_S))
    while True:
        try:
            message = connection.recv()
        except EOFError:  # the test session ended without closing the pool
            break
        if message is None:
            break
        function, args, kwargs = message
        # A rank stuck in a collective prints where it is before the parent gives up on it.
        faulthandler.dump_traceback_later(max(TIMEOUT_S - 30, 1), exit=False)
        try:
            connection.send(("ok", function(*args, **kwargs)))
        except BaseException:  # report everything, keep serving
            connection.send(("error", traceback.format_exc()))
        finally:
            faulthandler.cancel_dump_traceback_later()
    torch.distributed.destroy_process_group()


class Pool:
    def __init__(self, world_size: int = 2):
        self.world_size = world_size
        self._start()

    def _start(self) -> None:
        context = multiprocessing.get_context("spawn")
        port = free_port()
        self._connections, self._processes = [], []
        for rank in range(self.world_size):
            parent, child = context.Pipe()
            # Not daemonic: megatron's checkpoint writer starts child processes of its own.
            process = context.Process(target=_worker, args=(rank, self.world_size, port, child))
            process.start()
            self._connections.append(parent)
            self._processes.append(process)

    def run(self, function: Callable, *args, **kwargs) -> list[Any]:
        for connection in self._connections:
            connection.send((function, args, kwargs))
        replies, pending = {}, dict(enumerate(self._connections))
        deadline = time.monotonic() + TIMEOUT_S
        while pending and time.monotonic() < deadline:
            for connection in wait(list(pending.values()), timeout=max(deadline - time.monotonic(), 0)):
                rank = self._connections.index(connection)
                replies[rank] = connection.recv()
                del pending[rank]
            if any(status == "error" for status, _ in replies.values()):
                # The others are likely waiting in a collective for the rank that failed.
                deadline = min(deadline, time.monotonic() + ERROR_GRACE_S)
        errors = [f"--- rank {rank} ---\n{value}" for rank, (status, value) in sorted(replies.items())
                  if status == "error"]
        errors += [f"--- rank {rank} ---\nno answer (stuck; its stack is printed on stderr)" for rank in pending]
        if pending:
            for rank in pending:
                os.kill(self._processes[rank].pid, signal.SIGUSR1)  # faulthandler prints its stack
            time.sleep(1)
            self.restart()  # a rank stuck in a collective cannot serve another test
        if errors:
            raise RuntimeError(f"{function.__name__} failed:\n" + "\n".join(errors))
        return [replies[rank][1] for rank in range(self.world_size)]

    def restart(self) -> None:
        for process in self._processes:
            process.kill()
            process.join()
        self._start()

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
    """Inside a rank: megatron's process groups for this TP x PP (DP is the rest), rebuilt only when the
    layout changes; every generator seeded."""
    from mm_plugin.parallel.world import set_model_parallel

    set_model_parallel(tensor_parallel, pipeline_parallel, seed)
