"""Stage-2 training throughput: unpacked, length-grouped and packed batches, same model, same samples, one run.

    python bench/packing.py [--records 384] [--shape tiny] [--device cpu|cuda] [--repeats 2] [--packed-rows 1]

An instruction mix of ``--records`` records (``mm-data synth --kind instruct-mix``: the 665k mix's sources,
text-only share, rounds and answer lengths) is trained for one epoch in each mode, from the same initial
weights, with the same global batch and sequence length:

* ``unpacked``: micro-batches of ``--micro-batch`` samples in random order, padded to their longest;
* ``grouped``: the same, batched by modality and length (original LLaVA's ``group_by_modality_length``);
* ``packed``: each step's samples packed into rows of ``--seq-length`` positions (``--sequence-packing``),
  ``--packed-rows`` rows per micro-batch.

Reported per mode: trained tokens (those in the loss) per second, decoder positions computed per second,
the padding fraction (positions computed that hold no sample) and the loss of the epoch (equal across
modes up to float rounding in the unpacked and packed modes, which see the same steps; grouping changes
which samples share a step). Time is the best of ``--repeats`` epochs, all steps included. Modes run in
turn inside one process, so the machine's state is the same for all.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from machine import cpu_name  # noqa: E402

SHAPES = {
    # A small decoder whose cost grows with the positions it computes, a tiny CLIP at 112 px (64 image tokens).
    "tiny": dict(image_size=112, vision=dict(num_layers=2, hidden_size=64, num_attention_heads=4, ffn_hidden_size=128),
                 language=dict(num_layers=4, hidden_size=256, num_attention_heads=4, num_query_groups=4,
                               ffn_hidden_size=688)),
    # LLaVA-1.5-7B's widths, two decoder layers: the GPU figure.
    "7b-2layers": dict(image_size=336, vision=dict(num_layers=24, hidden_size=1024, num_attention_heads=16,
                                                   ffn_hidden_size=4096),
                       language=dict(num_layers=2, hidden_size=4096, num_attention_heads=32, num_query_groups=32,
                                     ffn_hidden_size=11008)),
}
MODES = ("unpacked", "grouped", "packed")


def model_json(shape: dict, vocab: int, seq_length: int) -> dict:
    vision, language = shape["vision"], shape["language"]
    return {
        "model_id": "llava",
        "text_decoder": {**language, "language_vocab_size": vocab, "language_max_sequence_length": seq_length,
                         "layernorm_epsilon": 1e-6, "params_dtype": "fp32", "freeze": False, "ckpt_path": None},
        "image_encoder": {
            "vision_encoder": {"model_id": "clip", "select_layer": -2, "patch_size": 14,
                               "image_size": shape["image_size"], "params_dtype": "fp32", "freeze": True,
                               "ckpt_path": None, **vision},
            "vision_projector": {"model_id": "mlp", "input_size": vision["hidden_size"],
                                 "hidden_size": language["hidden_size"], "ffn_hidden_size": language["hidden_size"],
                                 "params_dtype": "fp32", "freeze": False, "ckpt_path": None},
        },
        "text_encoder": None, "video_encoder": None,
    }


def data_json(folder: Path, mode: str) -> Path:
    config = json.loads((folder / "data.json").read_text())
    config["dataloader_param"]["group_by_modality_length"] = mode == "grouped"
    config["dataloader_param"]["sequence_packing"] = mode == "packed"
    path = folder / f"data-{mode}.json"
    path.write_text(json.dumps(config))
    return path


def run_epoch(mode: str, args, folder: Path, model_path: Path, initial: dict) -> dict:
    from megatron.core.enums import ModelType

    from mm_plugin.config.model import load_model_config
    from mm_plugin.data.config import load_data_config
    from mm_plugin.parallel.placement import unwrap
    from mm_plugin.training import loop
    from mm_plugin.training.arguments import parse_args
    from mm_plugin.training.providers import bind

    steps = args.records // args.global_batch
    micro = args.packed_rows if mode == "packed" else args.micro_batch
    argv = ["--mm-model", str(model_path), "--mm-data", str(data_json(folder, mode)),
            "--micro-batch-size", str(micro), "--global-batch-size", str(args.global_batch),
            "--seq-length", str(args.seq_length), "--lr", "1e-4", "--train-iters", str(steps),
            "--num-workers", "0", "--calculate-per-token-loss", "--log-interval", str(10 ** 9)]
    if mode == "packed":
        argv.append("--sequence-packing")
    run_args = parse_args(argv)
    model_config = load_model_config(run_args.mm_model)
    providers = bind(run_args, model_config, load_data_config(run_args.mm_data))
    loop.initialize(run_args)
    model = loop.build_model(providers.model_provider, ModelType.encoder_or_decoder, run_args)
    unwrap(model).load_state_dict(initial)
    optimizer, scheduler = loop.build_optimizer(model, run_args, providers.settings)
    loop.wire_schedule(model, optimizer, run_args)
    train, _, _ = providers.datasets_provider([steps * args.global_batch, 0, 0])

    counted = {"trained": 0, "positions": 0}

    def forward_step(data_iterator, model):
        output, loss_function = providers.forward_step(data_iterator, model)
        mask = loss_function.args[0]
        counted["trained"] += int(mask.sum())
        counted["positions"] += mask.numel()
        return output, loss_function

    losses = []
    model.train()
    start = time.perf_counter()
    for _ in range(steps):
        loss, _, _ = loop.train_step(forward_step, train, model, optimizer, scheduler, run_args,
                                     providers.settings)
        losses.append(float(loss))
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "trained_tokens": counted["trained"], "positions": counted["positions"],
            "loss": sum(losses) / len(losses)}


def sample_positions(folder: Path, args, tokens_per_image: int) -> int:
    """Positions the epoch's samples occupy, images expanded (what no mode can compute less of)."""
    from mm_plugin.data.config import load_data_config
    from mm_plugin.data.loader import build_datasets
    from mm_plugin.data.packing import expanded_length
    from mm_plugin.data.tokenization import load_tokenizer

    config = load_data_config(folder / "data.json")
    dataset, _ = build_datasets(config, load_tokenizer(config.tokenizer_path), image_tokens=tokens_per_image,
                                model_max_length=args.seq_length)
    return sum(expanded_length(dataset[index], tokens_per_image) for index in range(len(dataset)))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--records", type=int, default=384)
    parser.add_argument("--shape", choices=SHAPES, default="tiny")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--global-batch", type=int, default=32)
    parser.add_argument("--micro-batch", type=int, default=8)
    parser.add_argument("--packed-rows", type=int, default=1)
    parser.add_argument("--seq-length", type=int, default=576)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", type=Path, default=None, help="also write the results as JSON here")
    args = parser.parse_args()
    os.environ["MM_PLUGIN_DEVICE"] = args.device

    import mm_plugin  # noqa: F401  (patches)
    from mm_plugin.data.synthetic import synthesize
    from mm_plugin.data.tokenization import load_tokenizer
    from mm_plugin.models.llava import LlavaModel
    from mm_plugin.config.model import from_mindspeed_json
    from mm_plugin.parallel.world import join_world, set_model_parallel

    shape = SHAPES[args.shape]
    join_world()
    set_model_parallel(1, 1)
    tokens_per_image = (shape["image_size"] // 14) ** 2
    with tempfile.TemporaryDirectory(prefix="bench-packing-") as temporary:
        folder = Path(temporary) / "mix"
        synthesize(folder, args.records, kind="instruct-mix", seed=0, image_size=shape["image_size"], workers=1)
        vocab = len(load_tokenizer(folder / "tokenizer"))
        model_path = Path(temporary) / "model.json"
        raw = model_json(shape, vocab, args.seq_length)
        model_path.write_text(json.dumps(raw))
        torch.manual_seed(0)
        initial = LlavaModel(from_mindspeed_json(raw, source="bench")).state_dict()
        needed = sample_positions(folder, args, tokens_per_image)
        results = {mode: [] for mode in MODES}
        for _ in range(args.repeats):
            for mode in MODES:
                results[mode].append(run_epoch(mode, args, folder, model_path, initial))

    best = {mode: min(runs, key=lambda run: run["seconds"]) for mode, runs in results.items()}
    print(f"machine: {cpu_name()}, {os.cpu_count()} cores; torch {torch.__version__}; device {args.device}; "
          f"OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']}")
    print(f"shape {args.shape}; {args.records} instruct-mix records ({needed} positions with images expanded, "
          f"{tokens_per_image} per image), global batch {args.global_batch}, seq length {args.seq_length}, one epoch; "
          f"best of {args.repeats}\n")
    print("| batches | seconds | trained tokens/s | positions computed/s | padding | epoch loss | vs unpacked |")
    print("|---|---|---|---|---|---|---|")
    base = best["unpacked"]["trained_tokens"] / best["unpacked"]["seconds"]
    for mode in MODES:
        run = best[mode]
        rate = run["trained_tokens"] / run["seconds"]
        padding = 1 - needed / run["positions"]
        label = {"unpacked": f"unpacked, micro-batch {args.micro_batch}",
                 "grouped": f"grouped by modality and length, micro-batch {args.micro_batch}",
                 "packed": f"packed, {args.packed_rows} rows of {args.seq_length}"}[mode]
        print(f"| {label} | {run['seconds']:.2f} | {rate:.0f} | {run['positions'] / run['seconds']:.0f} | "
              f"{100 * padding:.0f}% | {run['loss']:.4f} | {rate / base:.2f}x |")
    if args.out:
        args.out.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "runs": results},
                                       indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
