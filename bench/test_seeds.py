"""Do the tests that hang on float tolerances hold on other draws and thread counts than CI's?

Runs the tests marked ``numeric`` (pytest.ini: parity with Hugging Face, greedy tokens of random weights,
TP/PP/DP against one process, loss trajectories, resume) once per ``MM_TEST_SEED`` (tests/seeds.py shifts
every seed that draws their weights, inputs and data) and ``OMP_NUM_THREADS``, and prints a row per run
with the tests that failed. CI runs seed 0 with one thread. The demo's own tests are checked the same way
by bench/demo_seeds.py (a training run per row).

    python bench/test_seeds.py [--seeds 0 1 2 3 4] [--threads 1 2] [-- extra pytest arguments]
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import time
from pathlib import Path

from machine import cpu_name

ROOT = Path(__file__).resolve().parents[1]


def run_tests(seed: int, threads: int, extra: list[str]) -> dict:
    env = dict(os.environ, MM_TEST_SEED=str(seed), OMP_NUM_THREADS=str(threads))
    start = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "numeric", "-rf",
                             *extra], cwd=ROOT, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    counts = {word: int(number) for number, word in re.findall(r"(\d+) (passed|failed|errors?|skipped)", result.stdout)}
    failed = re.findall(r"^(?:FAILED|ERROR) (\S+)", result.stdout, flags=re.MULTILINE)
    if result.returncode not in (0, 1) or "passed" not in counts:
        raise SystemExit(f"seed {seed}, {threads} thread(s): pytest exited {result.returncode}\n"
                         f"{result.stdout[-3000:]}{result.stderr[-3000:]}")
    return {"seed": seed, "threads": threads, "seconds": seconds, "counts": counts, "failed": failed}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="OMP_NUM_THREADS")
    parser.add_argument("pytest_args", nargs="*", help="passed to pytest (after --)")
    args = parser.parse_args()

    print(f"{cpu_name()}, {os.cpu_count()} cores; pytest -m numeric")
    print("| MM_TEST_SEED | threads | passed | failed | seconds | failed tests |")
    print("|---|---|---|---|---|---|")
    failures = 0
    for seed in args.seeds:
        for threads in args.threads:
            run = run_tests(seed, threads, args.pytest_args)
            failed = run["counts"].get("failed", 0) + run["counts"].get("error", 0) + run["counts"].get("errors", 0)
            failures += failed
            print(f"| {seed} | {threads} | {run['counts'].get('passed', 0)} | {failed} | {run['seconds']:.0f} | "
                  f"{', '.join(run['failed']) or '-'} |", flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
