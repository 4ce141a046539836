"""The CPU linear route of inference against torch's own, one matrix product at a time.

    PYTHONPATH=. python bench/cpu_linear.py --threads 2                 # the cpu-small model's shapes
    PYTHONPATH=. python bench/cpu_linear.py --shape 7b --rows 1 8       # Vicuna-7B's, decode only

For each weight of the language model (fused QKV, attention output, fused gate/up, down, output layer)
and each number of rows (a prompt of 617 positions; decode steps of 1 and 8 rows): ``F.linear`` (MKL
for float32) and :func:`mm_plugin.inference.cpu_linear.packed_linear` (oneDNN, weight packed once), median
of ``--repeats`` calls, interleaved. Prompt rows are reported in GFLOP/s, decode rows in GB/s of weight read.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from inference_speed import SHAPES, machine  # noqa: E402
from mm_plugin.inference.cpu_linear import packed_linear  # noqa: E402


def weights(shape: str) -> dict[str, tuple[int, int]]:
    """[out, in] of each distinct matrix of the language model, as our layout fuses them."""
    text = SHAPES[shape]["text"]
    hidden, ffn = text["hidden_size"], text["intermediate_size"]
    head = hidden // text["num_attention_heads"]
    return {"qkv": (hidden + 2 * text["num_key_value_heads"] * head, hidden), "attention out": (hidden, hidden),
            "gate+up": (2 * ffn, hidden), "down": (hidden, ffn), "output layer": (32064, hidden)}


def seconds(function) -> float:
    start = time.perf_counter()
    function()
    return time.perf_counter() - start


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=SHAPES, default="cpu-small")
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    parser.add_argument("--rows", type=int, nargs="+", default=[617, 1, 8])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    print(f"{args.shape}, {args.dtype}, {machine()['device']}, {args.threads} thread(s), torch {torch.__version__}")
    print("| matrix [out, in] | rows | torch F.linear | packed oneDNN | speed-up |")
    print("|---|---|---|---|---|")
    generator = torch.Generator().manual_seed(0)
    for name, (out, into) in weights(args.shape).items():
        weight = torch.randn(out, into, generator=generator).to(dtype)
        for rows in args.rows:
            x = torch.randn(rows, into, generator=generator).to(dtype)
            runs = {"torch": lambda: F.linear(x, weight), "packed": lambda: packed_linear(x, weight)}
            for function in runs.values():
                function()  # warm-up (and packing)
            times = {key: [] for key in runs}
            for _ in range(args.repeats):
                for key, function in runs.items():
                    times[key].append(seconds(function))
            median = {key: statistics.median(values) for key, values in times.items()}
            if rows > 16:
                rate = {key: f"{2 * rows * out * into / t / 1e9:.0f} GFLOP/s" for key, t in median.items()}
            else:
                rate = {key: f"{out * into * weight.element_size() / t / 1e9:.1f} GB/s" for key, t in median.items()}
            print(f"| {name} [{out}, {into}] | {rows} | {rate['torch']} | {rate['packed']} | "
                  f"{median['torch'] / median['packed']:.2f}x |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
