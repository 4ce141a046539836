"""A LoRA stage-2 step against a full stage-2 step: step time and peak memory, same model, same batches.

    python bench/lora.py [--shape tiny] [--steps 8] [--rank 16] [--device cpu|cuda]

Each mode trains ``--steps`` steps (after one warm-up step) of the same instruct-mix batches from the same
weights, in a process of its own so that its peak memory is its own: resident memory on the CPU
(``ru_maxrss``), ``torch.cuda.max_memory_allocated`` on a GPU. ``full`` trains the language model and the
projector; ``lora`` adapters of ``--rank`` on the language model's four linears (alpha twice the rank) and
the projector. Trainable parameters and the optimizer's fp32 state (master weights and two Adam moments)
are counted too.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from machine import cpu_name  # noqa: E402
from packing import SHAPES, model_json  # noqa: E402

MODES = ("full", "lora")


def run(mode: str, args, folder: Path) -> dict:
    """One mode's measurement, in this process."""
    from megatron.core.enums import ModelType

    import mm_plugin  # noqa: F401  (patches)
    from mm_plugin.config.model import load_model_config
    from mm_plugin.data.config import load_data_config
    from mm_plugin.parallel.placement import unwrap
    from mm_plugin.training import loop
    from mm_plugin.training.arguments import parse_args
    from mm_plugin.training.providers import bind

    argv = ["--mm-model", str(folder / "model.json"), "--mm-data", str(folder / "mix" / "data.json"),
            "--micro-batch-size", "4", "--global-batch-size", "16", "--seq-length", str(args.seq_length),
            "--lr", "1e-4", "--train-iters", str(args.steps + 1), "--num-workers", "0", "--log-interval", "1000000"]
    if mode == "lora":
        argv += ["--lora-rank", str(args.rank), "--lora-alpha", str(2 * args.rank), "--lora-dropout", "0"]
    run_args = parse_args(argv)
    providers = bind(run_args, load_model_config(run_args.mm_model), load_data_config(run_args.mm_data))
    loop.initialize(run_args)
    model = loop.build_model(providers.model_provider, ModelType.encoder_or_decoder, run_args)
    optimizer, scheduler = loop.build_optimizer(model, run_args, providers.settings)
    loop.wire_schedule(model, optimizer, run_args)
    train, _, _ = providers.datasets_provider([0, 0, 0])
    model.train()
    step = (providers.forward_step, train, model, optimizer, scheduler, run_args, providers.settings)
    loop.train_step(*step)  # warm-up
    if torch.cuda.is_available() and args.device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(args.steps):
        loop.train_step(*step)
    if args.device == "cuda":
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    trainable = sum(p.numel() for p in unwrap(model).parameters() if p.requires_grad)
    return {"step_ms": 1000 * (time.perf_counter() - start) / args.steps, "peak_bytes": peak,
            "trainable": trainable, "optimizer_state_bytes": 12 * trainable}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", choices=SHAPES, default="tiny")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--seq-length", type=int, default=576)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--run", choices=MODES, help=argparse.SUPPRESS)  # one mode, in a child process
    parser.add_argument("--folder", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    os.environ["MM_PLUGIN_DEVICE"] = args.device
    if args.run:
        from mm_plugin.parallel.world import join_world

        join_world()
        print(json.dumps(run(args.run, args, args.folder)))
        return 0

    from mm_plugin.data.synthetic import synthesize
    from mm_plugin.data.tokenization import load_tokenizer

    shape = SHAPES[args.shape]
    with tempfile.TemporaryDirectory(prefix="bench-lora-") as temporary:
        folder = Path(temporary)
        synthesize(folder / "mix", 16 * (args.steps + 1), kind="instruct-mix", seed=0, image_size=shape["image_size"],
                   workers=1)
        vocab = len(load_tokenizer(folder / "mix" / "tokenizer"))
        (folder / "model.json").write_text(json.dumps(model_json(shape, vocab, args.seq_length)))
        results = {}
        for mode in MODES:
            child = subprocess.run([sys.executable, __file__, "--run", mode, "--folder", str(folder),
                                    *sys.argv[1:]], capture_output=True, text=True, check=True)
            results[mode] = json.loads(child.stdout.strip().splitlines()[-1])

    print(f"machine: {cpu_name()}, {os.cpu_count()} cores; torch {torch.__version__}; device {args.device}; "
          f"OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']}")
    print(f"shape {args.shape}; {args.steps} steps of 16 instruct-mix samples (4 per micro-batch), seq length "
          f"{args.seq_length}; LoRA rank {args.rank}\n")
    print("| stage 2 | step ms | peak memory | trainable parameters | optimizer state |")
    print("|---|---|---|---|---|")
    for mode in MODES:
        result = results[mode]
        label = "full (language model + projector)" if mode == "full" else f"LoRA rank {args.rank} + projector"
        print(f"| {label} | {result['step_ms']:.0f} | {result['peak_bytes'] / 2**20:.0f} MiB | "
              f"{result['trainable'] / 1e6:.2f} M | {result['optimizer_state_bytes'] / 2**20:.1f} MiB |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
