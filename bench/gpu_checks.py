"""The model-level checks a lent GPU machine should run, in one process (tried on the CPU first).

    # on the GPU machine (bench/gpu_run.sh does this and the training checks):
    PYTHONPATH=/tmp/site:. python3 bench/gpu_checks.py --device cuda --out "$OUT"
    # here, as a dry run:
    PYTHONPATH=. python bench/gpu_checks.py --device cpu --shape cpu-small --batch 1 --micro-batch 1 --out /tmp/g

One random LLaVA of the chosen shape (``bench/inference_speed.py``'s shapes; ``7b`` is LLaVA-1.5-7B) is
built once, on the device:

1. **bf16 + flash-attention parity**: Hugging Face's ``LlavaForConditionalGeneration`` in fp32 gives the
   reference logits; then the same model in bf16, and ours loaded from those bf16 weights with the forward
   and a backward forced onto the flash kernel (``sdpa_kernel(FLASH_ATTENTION)`` raises where it cannot
   run). Ours must be as close to the fp32 reference as Hugging Face's own bf16 run is.
2. **Inference speed** against Hugging Face ``generate`` (``inference_speed.benchmark``; ours with static
   decode steps, replayed as CUDA graphs, and again with dynamic ones), batch-1 decode against the
   memory-bandwidth bound (``decode_bound``: every language-model weight read once per token), the tensor
   operations each dispatches at batch 1 on this device (``inference_speed.operation_counts``), and where
   batch 1's first token spends its time: the device's kernel time against the wall clock, with the
   profiler's tables (``OUT/profile.txt``) and traces (``OUT/trace_{ours,hf}.json.gz``).
3. **Stage-1 training step throughput**: the projector trains, CLIP and the language model are frozen;
   samples/s and TFLOP/s per device at ``--micro-batch`` with LLaVA-1.5's layout (576 image tokens +
   ``--text-tokens``), with the FLOP count of ``mm_plugin/training/flops.py``.

Results go to ``OUT/gpu_checks.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import inference_speed  # noqa: E402  (bench/inference_speed.py)


def flash_only(device: str):
    if device != "cuda":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel(SDPBackend.FLASH_ATTENTION)


def prompt_batch(batch: int, text_tokens: int, device: str, dtype: torch.dtype):
    """The same prompts in our layout (one -200) and Hugging Face's (576 image tokens), with images."""
    rows, images = inference_speed.inputs(batch, text_tokens, device, dtype)
    return torch.tensor(rows, device=device), inference_speed.hf_layout(rows, device), images


def relative_error(logits: torch.Tensor, reference: torch.Tensor) -> float:
    return ((logits.float() - reference).norm() / reference.norm()).item()


def parity(shape: str, device: str, text_tokens: int):
    """Builds the bf16 models (returned for the next checks) and compares both with the fp32 reference."""
    ids, hf_ids, images = prompt_batch(2, text_tokens, device, torch.float32)
    hf = inference_speed.build_hf(shape, torch.float32, device)
    with torch.no_grad():
        reference = hf(input_ids=hf_ids, pixel_values=images).logits.float()
    hf.to(torch.bfloat16)
    images = images.to(torch.bfloat16)
    with torch.no_grad():
        hf_bf16 = hf(input_ids=hf_ids, pixel_values=images).logits.float()
    ours = inference_speed.build_ours(hf, "bf16")
    counts = torch.ones(ids.shape[0], dtype=torch.long, device=device)
    with torch.no_grad(), flash_only(device):
        logits, _ = ours(ids, None, images, counts)
    vocabulary = reference.shape[-1]
    logits = logits[..., :vocabulary].float()
    top = reference.argmax(-1)
    result = {
        "relative_logit_error_ours_bf16_vs_fp32": relative_error(logits, reference),
        "relative_logit_error_hf_bf16_vs_fp32": relative_error(hf_bf16, reference),
        "relative_logit_error_ours_vs_hf_bf16": relative_error(logits, hf_bf16),
        "argmax_agreement_with_fp32_ours": (logits.argmax(-1) == top).float().mean().item(),
        "argmax_agreement_with_fp32_hf_bf16": (hf_bf16.argmax(-1) == top).float().mean().item(),
        "flash_kernel_forced": device == "cuda",
    }
    ours.requires_grad_(False)
    ours.vision_projection.requires_grad_(True)
    labels = ids.masked_fill(ids < 0, -100)
    with flash_only(device):  # the backward through SDPA, on the flash kernel too
        loss, mask = ours(ids, labels, images, counts)
        ((loss.float() * mask).sum() / mask.sum()).backward()
    result["projector_grad_norm"] = ours.vision_projection.encoder.linear_fc1.weight.grad.float().norm().item()
    ours.zero_grad(set_to_none=True)
    return result, hf, ours


def first_token_profile(hf, ours, text_tokens: int, device: str, out: Path, runs: int = 3) -> dict:
    """Kernels launched and their summed device time per batch-1 first token, for both implementations.
    The device idles for the rest of the first token's wall time (``inference_speed.benchmark``'s TTFT,
    measured without the profiler, whose own host overhead inflates wall time): host and launch cost."""
    import gzip

    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    runner = inference_speed.Runner(hf, ours, *inference_speed.inputs(1, text_tokens, device, torch.bfloat16))
    report, tables = {}, []
    for name, function in (("ours", runner.run_ours), ("hf", runner.run_hf)):
        function(2)  # warm-up, as for the timings
        with profile(activities=activities) as profiler:
            for _ in range(runs):
                inference_speed.timed(function, 1)
        kernels = [e for e in profiler.events() if e.device_type == DeviceType.CUDA]
        report[name] = {"kernels_per_first_token": len(kernels) / runs,
                        "kernel_ms_per_first_token": sum(e.time_range.elapsed_us() for e in kernels) / runs / 1e3}
        sort = "self_cuda_time_total" if kernels else "self_cpu_time_total"
        tables.append(f"== {name}: {runs} first tokens, batch 1, {report[name]}\n"
                      + profiler.key_averages().table(sort_by=sort, row_limit=25, max_name_column_width=70))
        trace = out / f"trace_{name}.json"
        profiler.export_chrome_trace(str(trace))
        with open(trace, "rb") as source, gzip.open(f"{trace}.gz", "wb") as target:
            target.write(source.read())
        trace.unlink()
    (out / "profile.txt").write_text("\n\n".join(tables))
    return report


def training_throughput(ours, device: str, micro_batch: int, text_tokens: int, steps: int) -> dict:
    from mm_plugin.training.flops import training_flops

    ours.train()
    optimizer = torch.optim.AdamW([p for p in ours.parameters() if p.requires_grad], lr=1e-3)
    ids, _, images = prompt_batch(micro_batch, text_tokens, device, torch.bfloat16)
    labels = ids.masked_fill(ids < 0, -100)
    counts = torch.ones(micro_batch, dtype=torch.long, device=device)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for step in range(steps + 2):
        start = time.perf_counter()
        with flash_only(device):
            loss, mask = ours(ids, labels, images, counts)
            ((loss.float() * mask).sum() / mask.sum()).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()
        if step >= 2:  # warm-up steps excluded
            times.append(time.perf_counter() - start)
    seconds = sum(times) / len(times)
    positions = micro_batch * (ids.shape[1] - 1 + inference_speed.IMAGE_TOKENS)
    flops = training_flops(ours.llava_config, samples=micro_batch, positions=positions, images=micro_batch)
    return {"micro_batch": micro_batch, "positions_per_sample": positions // micro_batch, "step_s": seconds,
            "samples_per_s": micro_batch / seconds, "tflops_per_device": flops / seconds / 1e12,
            "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None}


PEAK_MEMORY_BANDWIDTH = {"H100": 3.35e12, "H200": 4.8e12, "A100": 2.0e12}
"""Bytes/s by device name (SXM parts); a device not listed gets no bound."""


def decode_bound(ours, speed: dict) -> dict:
    """Batch-1 decode tokens/s against the bound a token's reads set: the language model's weights (the
    KV cache of a short answer is a few MB more, left out: the bound is a little generous)."""
    name = torch.cuda.get_device_name() if torch.cuda.is_available() else ""
    bandwidth = next((value for key, value in PEAK_MEMORY_BANDWIDTH.items() if key in name), None)
    weights = sum(p.numel() * p.element_size() for p in ours.language_model.parameters())
    report = {"device": name, "language_model_bytes": weights, "peak_bytes_per_s": bandwidth}
    if bandwidth and 1 in speed["results"]:
        bound = bandwidth / weights
        measured = speed["results"][1]
        report.update(bound_tokens_per_s=bound,
                      **{f"{name}_share_of_bound": measured[name]["decode_tokens_per_s"] / bound
                         for name in ("ours", "ours_dynamic", "hf") if name in measured})
    return report


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--shape", choices=inference_speed.SHAPES, default="7b")
    parser.add_argument("--text-tokens", type=int, default=40)
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8], help="inference batch sizes")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--micro-batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    if args.device == "cpu":
        os.environ.setdefault("MM_PLUGIN_DEVICE", "cpu")
    import mm_plugin  # noqa: F401  (patches)

    args.out.mkdir(parents=True, exist_ok=True)
    results = {"shape": args.shape, "machine": inference_speed.machine()}

    def save():
        (args.out / "gpu_checks.json").write_text(json.dumps(results, indent=2, default=str))

    results["parity_bf16"], hf, ours = parity(args.shape, args.device, args.text_tokens)
    print(json.dumps(results["parity_bf16"], indent=2), flush=True)
    save()
    results["inference_speed"] = inference_speed.benchmark(
        hf, ours, args.shape, "bf16", args.batch, args.text_tokens, args.new_tokens, args.repeats, args.device,
        compare_steps=True)
    results["decode_bound"] = decode_bound(ours, results["inference_speed"])
    print(json.dumps(results["decode_bound"], indent=2), flush=True)
    save()
    results["operations"] = inference_speed.operation_counts(hf, ours, args.shape, "bf16", [1], args.text_tokens, 8,
                                                             args.device)
    save()
    results["first_token_profile"] = first_token_profile(hf, ours, args.text_tokens, args.device, args.out)
    print(json.dumps(results["first_token_profile"], indent=2), flush=True)
    save()
    del hf
    results["stage1_training"] = training_throughput(ours, args.device, args.micro_batch, args.text_tokens,
                                                     args.steps)
    print(json.dumps(results["stage1_training"], indent=2), flush=True)
    save()
    return 0


if __name__ == "__main__":
    sys.exit(main())
