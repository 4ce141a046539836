"""Does the demo learn on any machine? README command 1's demo under several seeds and thread counts.

Each run is ``bash examples/llava1.5/pretrain_llava1_5.sh --demo`` exactly as a user runs it, with
``DEMO_SEED`` (the data sets, the vision tower's initialisation and training order, both training runs'
seeds) and ``OMP_NUM_THREADS`` (threads per process: the kernels' float rounding differs) set; the
held-out numbers come from the ``evaluation.json`` its last step writes. The table is what BENCHMARKS.md
shows and what the demo tests' thresholds are set against (tests/test_demo.py, tests/test_inference_demo.py).

    python bench/demo_seeds.py [--seeds 0 1 2 3 4] [--threads 1 2] [--json results.json] [--stage2 [--lora]]

``--stage2`` runs ``bash examples/llava1.5/finetune_llava1_5.sh --demo`` instead (stage 1's demo, then stage 2's)
and adds stage 2's held-out exact-match answers (``evaluation_stage2.json``): with the right image, another
sample's and none. ``--lora`` runs stage 2's LoRA variant (``LORA=1``, ``evaluation_stage2-lora.json``).
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
STAGE2 = ("right_image", "another_image", "no_image")


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def run_demo(seed: int, threads: int, stage2: bool = False, lora: bool = False) -> dict:
    """One demo run in a temporary folder; its evaluation.json (and evaluation_stage2.json, or with ``lora``
    evaluation_stage2-lora.json) plus the wall time."""
    with tempfile.TemporaryDirectory(prefix="demo-seeds-") as folder:
        out = Path(folder) / "demo_out"
        python = Path(sys.executable)
        env = dict(os.environ, DEMO_DIR=str(out), DEMO_SEED=str(seed), OMP_NUM_THREADS=str(threads),
                   PYTHON=str(python), MASTER_PORT=str(_free_port()), PATH=f"{python.parent}{os.pathsep}{os.environ['PATH']}",
                   LORA="1" if lora else "0")
        start = time.perf_counter()
        script = "finetune_llava1_5.sh" if stage2 else "pretrain_llava1_5.sh"
        result = subprocess.run(["bash", f"examples/llava1.5/{script}", "--demo"], cwd=ROOT, env=env,
                                capture_output=True, text=True)
        seconds = time.perf_counter() - start
        if result.returncode != 0:
            raise SystemExit(f"seed {seed}, {threads} thread(s): the demo failed\n{result.stdout[-2000:]}{result.stderr[-3000:]}")
        report = json.loads((out / "evaluation.json").read_text())
        if stage2:
            evaluation = "evaluation_stage2-lora.json" if lora else "evaluation_stage2.json"
            report["stage2"] = json.loads((out / evaluation).read_text())["exact_match"]
    return {"seed": seed, "threads": threads, "seconds": round(seconds, 1), **report}


def _row(run: dict) -> str:
    losses, right, other = run["losses"], run["named"]["right_image"], run["named"]["another_image"]
    named = " | ".join(f"{100 * right[a]:.0f}% ({100 * other[a]:.0f}%)" for a in ATTRIBUTES)
    stage2 = "".join(f" {100 * run['stage2'][k]:.1f}% |" for k in STAGE2) if "stage2" in run else ""
    return (f"| {run['seed']} | {run['threads']} | {losses['with_images']:.3f} | {losses['images_shuffled']:.3f} | "
            f"{losses['language_model_alone']:.3f} | {named} |{stage2} {run['seconds']:.0f} |")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="OMP_NUM_THREADS per process")
    parser.add_argument("--json", type=Path, help="also write every run's numbers here")
    parser.add_argument("--stage2", action="store_true", help="run the stage-2 demo too (after stage 1's)")
    parser.add_argument("--lora", action="store_true", help="with --stage2: its LoRA variant (LORA=1)")
    args = parser.parse_args()

    print(f"{cpu_name()}, {os.cpu_count()} cores; "
          "held-out caption loss per token, and how often a caption names the image's attribute "
          "(in brackets: with another sample's image)")
    stage2 = " stage 2: right image | another image | no image |" if args.stage2 else ""
    print("| seed | threads | loss with images | images shuffled | language model alone "
          f"| colour | shape | position |{stage2} seconds |")
    print("|---" * (9 + 3 * args.stage2) + "|")
    runs = []
    for seed in args.seeds:
        for threads in args.threads:
            runs.append(run_demo(seed, threads, args.stage2, args.lora))
            print(_row(runs[-1]), flush=True)
    worst = {a: min(run["named"]["right_image"][a] for run in runs) for a in ATTRIBUTES}
    ratio = min(run["losses"][other] / run["losses"]["with_images"] for run in runs
                for other in ("images_shuffled", "language_model_alone"))
    print(f"worst of {len(runs)} runs: " + ", ".join(f"{a} {100 * v:.0f}%" for a, v in worst.items())
          + f"; the loss without the right image is at least {ratio:.1f}x the loss with it")
    if args.stage2:
        print("stage 2, exact match over all runs: right image at least "
              f"{100 * min(run['stage2']['right_image'] for run in runs):.1f}%, another image at most "
              f"{100 * max(run['stage2']['another_image'] for run in runs):.1f}%, no image at most "
              f"{100 * max(run['stage2']['no_image'] for run in runs):.1f}%")
    if args.json:
        args.json.write_text(json.dumps(runs, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
