"""Attention over packed rows: which kernel, by measurement (forward + backward, one layer's attention).

    python bench/packed_attention.py --device cuda                     # the lent GPU: LLaVA-1.5-7B's heads, bf16
    python bench/packed_attention.py --device cpu --heads 4 --head-dim 32 --seq-length 512 --dtype fp32

Rows of ``--seq-length`` positions are packed (``mm_plugin.data.packing.pack_rows``, as training packs them)
from sample lengths spread like the 665k mix after image expansion: ``--image-share`` of the samples hold
one image of 576 positions plus their text, the others are text only. Every sample attends causally to
itself only. The candidates:

* ``per_sample_sdpa``: one causal SDPA call per sample (``SDPAttention`` with packed rows, today's path);
* ``dense_mask_sdpa``: one SDPA call per row under the block-diagonal causal mask (what a dense mask costs:
  the blocks between samples computed and thrown away);
* ``flex_document_mask``: FlexAttention, compiled, with a block mask built from the sample numbers (blocks
  outside every sample are skipped);
* ``varlen_flash``: ``torch.nn.attention.varlen.varlen_attn``, the variable-length flash kernel, on the
  packed positions with their cumulative lengths (nothing outside a sample is touched).

Each one's output and input gradients are compared with ``per_sample_sdpa``'s (largest difference relative
to the largest value), and timed (median of ``--repeats``, after warm-up). A candidate that cannot run
here says why instead of a time.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

IMAGE_POSITIONS = 576


def packed_rows(args) -> list[list[int]]:
    """Sample lengths of each packed row."""
    from mm_plugin.data.packing import pack_rows

    generator = torch.Generator().manual_seed(args.seed)
    lengths = []
    for _ in range(args.samples):
        with_image = torch.rand((), generator=generator) < args.image_share
        text = int(torch.randint(40, 600, (), generator=generator))
        lengths.append(min(text + IMAGE_POSITIONS * int(with_image), args.seq_length))
    return [[lengths[i] for i in row] for row in pack_rows(lengths, args.seq_length)][: args.rows]


def per_sample_sdpa(query, key, value, rows, scale):
    outputs = []
    for index, lengths in enumerate(rows):
        start, parts = 0, []
        for length in lengths:
            end = start + length
            parts.append(F.scaled_dot_product_attention(query[index:index + 1, :, start:end], key[index:index + 1, :, start:end],
                                                        value[index:index + 1, :, start:end], is_causal=True, scale=scale))
            start = end
        outputs.append(torch.cat(parts, dim=2))
    return torch.cat(outputs)


def sample_numbers(rows, device) -> torch.Tensor:
    """[b, s]: the sample each position belongs to."""
    return torch.stack([torch.repeat_interleave(torch.arange(len(r)), torch.tensor(r)) for r in rows]).to(device)


def dense_mask(rows, device) -> torch.Tensor:
    """[b, 1, s, s] bool, True where a query may see a key."""
    length = sum(rows[0])
    segments = sample_numbers(rows, device)
    causal = torch.ones(length, length, dtype=torch.bool, device=device).tril()
    return (segments[:, :, None] == segments[:, None, :]).logical_and_(causal)[:, None]


def candidates(rows, device: str) -> dict[str, Callable]:
    """Each candidate as ``(query, key, value, scale) -> output``, built once (masks, block masks, lengths)."""
    mask = dense_mask(rows, device)
    built = {
        "per_sample_sdpa": lambda q, k, v, scale: per_sample_sdpa(q, k, v, rows, scale),
        "dense_mask_sdpa": lambda q, k, v, scale: F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale),
    }
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        segments = sample_numbers(rows, device)

        def document_causal(b, h, q_index, kv_index):
            return (segments[b, q_index] == segments[b, kv_index]) & (q_index >= kv_index)

        length = sum(rows[0])
        block_mask = create_block_mask(document_causal, len(rows), None, length, length, device=device)
        compiled = torch.compile(flex_attention, dynamic=False)
        built["flex_document_mask"] = lambda q, k, v, scale: compiled(q, k, v, block_mask=block_mask, scale=scale)
    except Exception as error:  # noqa: BLE001  (reported, not hidden: the table says why)
        built["flex_document_mask"] = error
    try:
        from torch.nn.attention.varlen import varlen_attn

        lengths = torch.tensor([n for row in rows for n in row], device=device)
        cumulative = F.pad(lengths.cumsum(0), (1, 0)).to(torch.int32)
        longest = int(lengths.max())

        def varlen(q, k, v, scale):
            # [b, heads, s, dim] -> the packed [b * s, heads, dim] and back
            flat = [t.transpose(1, 2).reshape(-1, t.shape[1], t.shape[3]) for t in (q, k, v)]
            out = varlen_attn(*flat, cumulative, cumulative, longest, longest, scale=scale, window_size=(-1, 0))
            return out.view(q.shape[0], q.shape[2], q.shape[1], q.shape[3]).transpose(1, 2)

        built["varlen_flash"] = varlen
    except Exception as error:  # noqa: BLE001
        built["varlen_flash"] = error
    return built


def synchronize(device: str):
    if device == "cuda":
        torch.cuda.synchronize()


def run(function, inputs, upstream, scale):
    for tensor in inputs:
        tensor.grad = None
    output = function(*inputs, scale)
    output.backward(upstream)
    return output.detach(), [t.grad for t in inputs]


def relative(got: torch.Tensor, reference: torch.Tensor) -> float:
    return float((got.float() - reference.float()).abs().max() / reference.float().abs().max())


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), default="bf16")
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--seq-length", type=int, default=2048)
    parser.add_argument("--rows", type=int, default=4, help="packed rows per call (a micro-batch)")
    parser.add_argument("--samples", type=int, default=64, help="samples drawn to pack rows from")
    parser.add_argument("--image-share", type=float, default=0.94, help="samples with an image (the 665k mix: 94%%)")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    args = parser.parse_args(argv)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]

    packed = packed_rows(args)
    length = max(sum(row) for row in packed)
    # A row's padding is a run of its own, as in training: it attends to itself.
    rows = [row + [length - sum(row)] if sum(row) < length else row for row in packed]
    generator = torch.Generator().manual_seed(args.seed)
    shape = (len(rows), args.heads, length, args.head_dim)
    inputs = [torch.randn(shape, generator=generator).to(args.device, dtype).requires_grad_() for _ in range(3)]
    upstream = torch.randn(shape, generator=generator).to(args.device, dtype)
    scale = 1.0 / math.sqrt(args.head_dim)
    computed = sum(n * (n + 1) // 2 for row in rows for n in row) / (len(rows) * length * (length + 1) // 2)
    report = {"device": torch.cuda.get_device_name() if args.device == "cuda" else f"CPU, {torch.get_num_threads()} threads",
              "torch": torch.__version__, "dtype": args.dtype, "shape": shape, "runs_per_row": [len(r) for r in rows],
              "share_of_causal_square_inside_samples": computed, "results": {}}
    print(f"{report['device']}, torch {torch.__version__}, {args.dtype}, [rows, heads, positions, dim] = {list(shape)}, "
          f"runs per row (samples, and padding as one) {report['runs_per_row']}, {computed:.0%} of the causal square inside samples")
    built = candidates(rows, args.device)
    reference = run(built["per_sample_sdpa"], inputs, upstream, scale)
    print("| kernel | forward + backward | vs per-sample SDPA | largest difference (output, gradients) |")
    print("|---|---|---|---|")
    for name, function in built.items():
        if isinstance(function, Exception):
            report["results"][name] = {"unavailable": f"{type(function).__name__}: {function}"}
            print(f"| {name} | unavailable: {type(function).__name__}: {str(function)[:120]} | | |")
            continue
        try:
            output, grads = run(function, inputs, upstream, scale)
            difference = max([relative(output, reference[0])] + [relative(g, r) for g, r in zip(grads, reference[1])])
            run(function, inputs, upstream, scale)  # warm-up
            times = []
            for _ in range(args.repeats):
                synchronize(args.device)
                start = time.perf_counter()
                run(function, inputs, upstream, scale)
                synchronize(args.device)
                times.append(time.perf_counter() - start)
        except Exception as error:  # noqa: BLE001  (a kernel this device lacks: reported)
            report["results"][name] = {"unavailable": f"{type(error).__name__}: {error}"}
            print(f"| {name} | unavailable: {type(error).__name__}: {str(error)[:120]} | | |")
            continue
        seconds = statistics.median(times)
        report["results"][name] = {"seconds": seconds, "largest_relative_difference": difference}
        base = report["results"]["per_sample_sdpa"]["seconds"]
        print(f"| {name} | {seconds * 1000:.2f} ms | {base / seconds:.2f}x | {difference:.1e} |", flush=True)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "packed_attention.json").write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
