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
