"""The seeds of the tests' random weights, inputs and data, shifted by ``MM_TEST_SEED``.

A test whose verdict hangs on a float tolerance or a training outcome must hold for other random draws
than the one it was written with: ``bench/test_seeds.py`` runs the ``numeric`` tests under several
``MM_TEST_SEED`` values and thread counts. Every seed that draws such a test's weights, inputs or data goes
through :func:`varied`; with ``MM_TEST_SEED`` unset (CI) the seeds are the written ones.
"""

import os

OFFSET = int(os.environ.get("MM_TEST_SEED", "0"))


def varied(seed: int) -> int:
    """``seed`` moved by ``MM_TEST_SEED`` (a prime stride, so shifted seeds do not land on each other)."""
    return seed + 7919 * OFFSET
