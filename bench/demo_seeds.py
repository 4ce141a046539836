"""Does the demo learn on any machine? README command 1's demo under several seeds and thread counts.

Each run is ``bash examples/llava1.5/pretrain_llava1_5.sh --demo`` exactly as a user runs it, with
``DEMO_SEED`` (the data sets, the vision tower's initialisation and training order, both training runs'
seeds) and ``OMP_NUM_THREADS`` (threads per process: the kernels' float rounding differs) set; the
held-out numbers come from the ``evaluation.json`` its last step writes. The table is what BENCHMARKS.md
shows and what the demo tests' thresholds are set against (tests/test_demo.py, tests/test_inference_demo.py).

    python bench/demo_seeds.py [--seeds 0 1 2 3 4] [--threads 1 2] [--json results.json]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from machine import cpu_name

ROOT = Path(__file__).resolve().parents[1]
ATTRIBUTES = ("colour", "shape", "position")


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def run_demo(seed: int, threads: int) -> dict:
    """One demo run in a temporary folder; its evaluation.json plus the wall time."""
    with tempfile.TemporaryDirectory(prefix="demo-seeds-") as folder:
        out = Path(folder) / "demo_out"
        python = Path(sys.executable)
        env = dict(os.environ, DEMO_DIR=str(out), DEMO_SEED=str(seed), OMP_NUM_THREADS=str(threads),
                   PYTHON=str(python), MASTER_PORT=str(_free_port()), PATH=f"{python.parent}{os.pathsep}{os.environ['PATH']}")
        start = time.perf_counter()
        result = subprocess.run(["bash", "examples/llava1.5/pretrain_llava1_5.sh", "--demo"], cwd=ROOT, env=env,
                                capture_output=True, text=True)
        seconds = time.perf_counter() - start
        if result.returncode != 0:
            raise SystemExit(f"seed {seed}, {threads} thread(s): the demo failed\n{result.stdout[-2000:]}{result.stderr[-3000:]}")
        report = json.loads((out / "evaluation.json").read_text())
    return {"seed": seed, "threads": threads, "seconds": round(seconds, 1), **report}


def _row(run: dict) -> str:
    losses, right, other = run["losses"], run["named"]["right_image"], run["named"]["another_image"]
    named = " | ".join(f"{100 * right[a]:.0f}% ({100 * other[a]:.0f}%)" for a in ATTRIBUTES)
    return (f"| {run['seed']} | {run['threads']} | {losses['with_images']:.3f} | {losses['images_shuffled']:.3f} | "
            f"{losses['language_model_alone']:.3f} | {named} | {run['seconds']:.0f} |")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="OMP_NUM_THREADS per process")
    parser.add_argument("--json", type=Path, help="also write every run's numbers here")
    args = parser.parse_args()

    print(f"{cpu_name()}, {os.cpu_count()} cores; "
          "held-out caption loss per token, and how often a caption names the image's attribute "
          "(in brackets: with another sample's image)")
    print("| seed | threads | loss with images | images shuffled | language model alone "
          "| colour | shape | position | seconds |")
    print("|---|---|---|---|---|---|---|---|---|")
    runs = []
    for seed in args.seeds:
        for threads in args.threads:
            runs.append(run_demo(seed, threads))
            print(_row(runs[-1]), flush=True)
    worst = {a: min(run["named"]["right_image"][a] for run in runs) for a in ATTRIBUTES}
    ratio = min(run["losses"][other] / run["losses"]["with_images"] for run in runs
                for other in ("images_shuffled", "language_model_alone"))
    print(f"worst of {len(runs)} runs: " + ", ".join(f"{a} {100 * v:.0f}%" for a, v in worst.items())
          + f"; the loss without the right image is at least {ratio:.1f}x the loss with it")
    if args.json:
        args.json.write_text(json.dumps(runs, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
