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
