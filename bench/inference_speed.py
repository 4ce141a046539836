"""Inference speed of mm_plugin against Hugging Face ``generate``, same weights, same process, same inputs.

    PYTHONPATH=. python bench/inference_speed.py --shape cpu-small --batch 1 8            # CPU
    PYTHONPATH=. python bench/inference_speed.py --shape 7b --device cuda --dtype bf16    # the lent GPU

A random Hugging Face LLaVA of the chosen shape is built, converted to our layout in memory and loaded
into our model. Each request is one 336 px image (576 image tokens) and a question of ``--text-tokens``
tokens, all of the same length. Measured, interleaving the two implementations, each ``--repeats`` times:

* time to first token: ``max_new_tokens=1`` (vision tower, projector, the whole prompt, one token);
* decode speed: ``batch * (N - 1) / (t(N) - t(1))`` tokens/s for ``N = --new-tokens`` (end-of-sequence
  disabled, so every run generates exactly N tokens).

Both are greedy; the report says whether they chose the same tokens, and how many page faults (first writes
to freshly mapped memory, costly on a CPU) each first token took. Medians are reported (and minima in
the JSON), with the machine and its load before and after.

``--compare-decode-steps`` runs ours with static decode steps (``mm_plugin.inference.static_step``: fixed
buffers, replayed as a CUDA graph on a GPU, where they are the default) and, in a column of its own, with
the dynamic steps (the CPU's default), and says whether both chose the same tokens.

``--count-operations`` reports instead how many tensor operations each implementation dispatches (views
not counted; on a GPU each counted operation on a device tensor is a kernel launch, the few on host tensors,
such as our per-request checks, are host time only) for the first token and per decode step. At batch 1 a
GPU's first token is mostly launch and host time, so this count, the same on any machine for a given device
type, tells what a GPU run will weigh. Shape ``7b-layers`` has LLaVA-1.5-7B's layers and heads
at tiny widths, so counting its operations is quick on a CPU.

``--clock thread`` measures the CPU time of the calling thread with one torch thread (``--threads`` is
ignored): on a machine shared with other work, wall-clock times swing with the load, while the CPU
time a computation takes barely does.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import resource
import statistics
import sys
import time

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from machine import cpu_name

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

SHAPES = {
    # ~60M parameters: a tiny CLIP at LLaVA's 336 px (576 patches) and a small LLaMA with Vicuna's vocabulary.
    "cpu-small": dict(
        vision=dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=4),
        text=dict(hidden_size=512, intermediate_size=1376, num_hidden_layers=8, num_attention_heads=8,
                  num_key_value_heads=8)),
    # LLaVA-1.5-7B's layers and heads (CLIP 24 x 16, LLaMA 32 x 32) at tiny widths: the 7B's operation count.
    "7b-layers": dict(
        vision=dict(hidden_size=64, intermediate_size=256, num_hidden_layers=24, num_attention_heads=16),
        text=dict(hidden_size=128, intermediate_size=344, num_hidden_layers=32, num_attention_heads=32,
                  num_key_value_heads=32)),
    # LLaVA-1.5-7B: CLIP ViT-L/14-336 and Vicuna-7B.
    "7b": dict(
        vision=dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16),
        text=dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                  num_key_value_heads=32)),
}
IMAGE_TOKEN = 32000
IMAGE_TOKENS = 576  # CLIP ViT-L/14 at 336 px: 24 x 24 patches


def llava_config(vision: dict, text: dict, *, image_size: int = 336, vocab_size: int = 32064,
                 image_token: int = IMAGE_TOKEN, use_cache: bool = True):
    """A Hugging Face ``LlavaConfig`` laid out as LLaVA-1.5 (CLIP patches of 14, the second-to-last layer's
    features, a LLaMA with untied output layer) with these ``vision`` and ``text`` sizes."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    return LlavaConfig(
        vision_config=CLIPVisionConfig(**vision, image_size=image_size, patch_size=14),
        text_config=LlamaConfig(**text, vocab_size=vocab_size, max_position_embeddings=4096, rms_norm_eps=1e-5,
                                tie_word_embeddings=False, use_cache=use_cache),
        image_token_index=image_token, vision_feature_layer=-2, vision_feature_select_strategy="default",
        image_seq_length=(image_size // 14) ** 2)


def build_hf(shape: str, dtype: torch.dtype, device: str):
    from transformers import LlavaForConditionalGeneration

    spec = SHAPES[shape]
    config = llava_config(spec["vision"], spec["text"])
    torch.manual_seed(0)
    with torch.device(device):
        model = LlavaForConditionalGeneration(config).to(dtype).eval()
    model.generation_config.eos_token_id = None  # every run generates exactly max_new_tokens
    model.generation_config.pad_token_id = 0
    return model


def build_ours(hf, dtype_name: str):
    from mm_plugin import device
    from mm_plugin.config.model import from_hf_config
    from mm_plugin.inference.runtime import initialize
    from mm_plugin.models.hf_keys import OUR_PREFIXES, llava_hf_to_ours
    from mm_plugin.models.llava import LlavaModel
    from mm_plugin.models.loading import select_built_vision_layers
    from mm_plugin.parallel import load_full_state_dict

    initialize(1)
    config = from_hf_config(hf.config)
    config.attention_backend = "sdpa"
    for part in (config.vision, config.projector, config.language):
        part.params_dtype = dtype_name
    model = LlavaModel(config, extra={"perform_initialization": False})
    state = llava_hf_to_ours(hf.state_dict(), config)
    prefix = OUR_PREFIXES["vision"]
    vision = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    state = {k: v for k, v in state.items() if not k.startswith(prefix)}
    state.update({prefix + k: v for k, v in select_built_vision_layers(vision, config, "benchmark").items()})
    load_full_state_dict(model, state, vocab_size=config.language.vocab_size)
    del state
    return model.to(device.current()).eval()  # megatron builds its norms on the CPU


def inputs(batch: int, text_tokens: int, device: str, dtype: torch.dtype):
    generator = torch.Generator().manual_seed(1)
    rows = []
    for _ in range(batch):
        words = torch.randint(3, 31999, (text_tokens,), generator=generator).tolist()
        rows.append([1] + words[:8] + [-200] + words[8:])  # "USER: <image>\n{question} ASSISTANT:" shape
    pixels = torch.randn(batch, 3, 336, 336, generator=generator).to(device, dtype)
    return rows, pixels


def hf_layout(rows, device) -> torch.Tensor:
    """Our prompts (one -200 per image) as Hugging Face's LLaVA takes them: 576 image tokens per image."""
    return torch.tensor([sum(([IMAGE_TOKEN] * IMAGE_TOKENS if t == -200 else [t] for t in row), []) for row in rows],
                        device=device)


class Runner:
    def __init__(self, hf, ours, rows, pixels, compare_steps: bool = False):
        from mm_plugin.inference.generate import Request

        self.hf, self.ours = hf, ours
        self.static = True if compare_steps else None  # None: the default for the device (static on CUDA)
        self.implementations = {"ours": self.run_ours, "hf": self.run_hf}
        if compare_steps:  # ours again, with the dynamic decode step (no static buffers, no CUDA graph)
            self.implementations["ours_dynamic"] = self.run_ours_dynamic
        device = pixels.device
        self.hf_ids = hf_layout(rows, device)
        self.pixels = pixels
        self.requests = [Request(row, pixels[i:i + 1]) for i, row in enumerate(rows)]

    def run_hf(self, new_tokens: int) -> list[list[int]]:
        output = self.hf.generate(input_ids=self.hf_ids, attention_mask=torch.ones_like(self.hf_ids),
                                  pixel_values=self.pixels, max_new_tokens=new_tokens, do_sample=False)
        return output[:, self.hf_ids.shape[1]:].tolist()

    def run_ours(self, new_tokens: int) -> list[list[int]]:
        return self._ours(new_tokens, self.static)

    def run_ours_dynamic(self, new_tokens: int) -> list[list[int]]:
        return self._ours(new_tokens, static=False)

    def _ours(self, new_tokens: int, static) -> list[list[int]]:
        from mm_plugin.inference.generate import generate
        from mm_plugin.inference.sampling import GenerationConfig

        config = GenerationConfig(max_new_tokens=new_tokens)
        return [r.tokens for r in generate(self.ours, self.requests, config, static=static)]


CLOCK = time.perf_counter


def timed(function, *args):
    """Seconds ``function(*args)`` takes, all device work included; Python's garbage collector is run before
    and held off during it, for both implementations alike (a collection pause mid-run is noise, not speed)."""
    gc.collect()
    synchronize()
    gc.disable()
    try:
        start = CLOCK()
        result = function(*args)
        synchronize()
        return CLOCK() - start, result
    finally:
        gc.enable()


def page_faults() -> int:
    """Minor page faults of this process so far: on the CPU each first write to freshly mapped memory is one."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def synchronize():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def measure(runner: Runner, batch: int, new_tokens: int, repeats: int) -> dict:
    times = {name: {"first": [], "full": [], "first_page_faults": []} for name in runner.implementations}
    tokens = {}
    for name, function in runner.implementations.items():
        function(2)  # warm-up: allocator, kernels, lazy imports
    for _ in range(repeats):
        for name, function in runner.implementations.items():
            faults = page_faults()
            first, _ = timed(function, 1)
            times[name]["first_page_faults"].append(page_faults() - faults)
            full, tokens[name] = timed(function, new_tokens)
            times[name]["first"].append(first)
            times[name]["full"].append(full)
    result = {}
    for name, measured in times.items():
        first, full = statistics.median(measured["first"]), statistics.median(measured["full"])
        result[name] = {
            "ttft_s": first, "ttft_min_s": min(measured["first"]),
            "ttft_page_faults": statistics.median(measured["first_page_faults"]),
            "decode_tokens_per_s": batch * (new_tokens - 1) / (full - first),
            "decode_tokens_per_s_best": batch * (new_tokens - 1) / (min(measured["full"]) - min(measured["first"])),
            "runs": measured,
        }
    if "ours_dynamic" in tokens:
        result["dynamic_same_tokens"] = tokens["ours_dynamic"] == tokens["ours"]
    same = [a == b for a, b in zip(tokens["ours"], tokens["hf"])]
    agree = [next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), len(a)) for a, b in zip(tokens["ours"], tokens["hf"])]
    result["same_tokens"] = all(same)
    result["tokens_agreeing_before_first_difference"] = agree
    return result


class _OperationCount(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += not (func.is_view or func is torch.ops.aten._unsafe_view.default)
        return func(*args, **(kwargs or {}))


def operations(function, *args) -> int:
    """Tensor operations ``function(*args)`` dispatches, views not counted."""
    with _OperationCount() as counter:
        function(*args)
    return counter.count


def operation_counts(hf, ours, shape: str, dtype_name: str, batches, text_tokens: int, new_tokens: int,
                     device: str) -> dict:
    """Operations each implementation dispatches for the first token and per decode step; prints a table.
    Counted as on a GPU: our CPU-only ways with a long prompt (attention and MLP in chunks, gate and up apart)
    are off."""
    from unittest import mock

    from mm_plugin.inference import direct_layers
    from mm_plugin.config.names import TORCH_DTYPES

    report = {"shape": shape, "device": device, "dtype": dtype_name, "new_tokens": new_tokens, "counts": {}}
    print(f"{shape}, {device}, {dtype_name}: tensor operations dispatched (views not counted)")
    print("| batch | first token ours | first token HF | per decode step ours | per decode step HF |")
    print("|---|---|---|---|---|")
    with mock.patch.multiple(direct_layers, CPU_QUERY_CHUNK=1 << 62, CPU_INTERMEDIATE_BYTES=1 << 62,
                             CPU_SPLIT_GATE_ROWS=1 << 62):
        for batch in batches:
            runner = Runner(hf, ours, *inputs(batch, text_tokens, device, TORCH_DTYPES[dtype_name]))
            counts = report["counts"][batch] = {}
            for name, function in (("ours", runner.run_ours), ("hf", runner.run_hf)):
                function(2)  # warm-up, as for the timings
                first = operations(function, 1)
                counts[name] = {"first_token": first,
                                "per_decode_step": (operations(function, new_tokens) - first) / (new_tokens - 1)}
            print(f"| {batch} | {counts['ours']['first_token']} | {counts['hf']['first_token']} | "
                  f"{counts['ours']['per_decode_step']:.0f} | {counts['hf']['per_decode_step']:.0f} |", flush=True)
    return report


def machine() -> dict:
    info = {"python": platform.python_version(), "torch": torch.__version__, "threads": torch.get_num_threads(),
            "load_average": os.getloadavg()}
    try:
        import transformers
        from megatron.core import __version__ as megatron

        info.update(transformers=transformers.__version__, megatron_core=megatron)
    except ImportError:
        pass
    if torch.cuda.is_available():
        info["device"] = torch.cuda.get_device_name()
    else:
        info["device"] = f"CPU {cpu_name()}, {os.cpu_count()} cores"
    return info


def benchmark(hf, ours, shape: str, dtype_name: str, batches, text_tokens: int, new_tokens: int, repeats: int,
              device: str, clock: str = "wall", compare_steps: bool = False) -> dict:
    """Both implementations on the same requests, interleaved; prints a markdown table and returns the report.
    ``compare_steps``: ours with static decode steps (CUDA graphs on a GPU), and again with dynamic ones in a
    column of its own."""
    from mm_plugin.config.names import TORCH_DTYPES

    parameters = sum(p.numel() for p in hf.parameters())
    report = {"shape": shape, "parameters": parameters, "dtype": dtype_name, "clock": clock,
              "text_tokens": text_tokens, "new_tokens": new_tokens, "repeats": repeats,
              "machine_before": machine(), "results": {}}
    print(f"{shape}: {parameters / 1e6:.0f}M parameters, {dtype_name}, {report['machine_before']['device']}, "
          f"{torch.get_num_threads()} thread(s), {clock} clock")
    dynamic_column = " decode ours, dynamic steps (same tokens) |" if compare_steps else ""
    print(f"| batch | TTFT ours | TTFT HF | decode ours | decode HF |{dynamic_column} same tokens "
          "| page faults per first token, ours / HF |")
    print("|---|---|---|---|---|---|---|" + "---|" * compare_steps)
    for batch in batches:
        rows, pixels = inputs(batch, text_tokens, device, TORCH_DTYPES[dtype_name])
        result = measure(Runner(hf, ours, rows, pixels, compare_steps), batch, new_tokens, repeats)
        report["results"][batch] = result
        ours_, hf_ = result["ours"], result["hf"]
        dynamic = (f" {result['ours_dynamic']['decode_tokens_per_s']:.1f} tok/s "
                   f"({'yes' if result['dynamic_same_tokens'] else 'NO'}) |") if compare_steps else ""
        print(f"| {batch} | {ours_['ttft_s'] * 1000:.0f} ms | {hf_['ttft_s'] * 1000:.0f} ms | "
              f"{ours_['decode_tokens_per_s']:.1f} tok/s | {hf_['decode_tokens_per_s']:.1f} tok/s |{dynamic} "
              f"{'yes' if result['same_tokens'] else result['tokens_agreeing_before_first_difference']} | "
              f"{ours_['ttft_page_faults']:.0f} / {hf_['ttft_page_faults']:.0f} |", flush=True)
    report["machine_after"] = machine()
    print(f"load average before {report['machine_before']['load_average']}, "
          f"after {report['machine_after']['load_average']}")
    return report


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=SHAPES, default="cpu-small")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), default="fp32")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--text-tokens", type=int, default=40, help="question tokens besides the image")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--clock", choices=("wall", "thread"), default="wall")
    parser.add_argument("--count-operations", action="store_true",
                        help="count dispatched tensor operations instead of timing")
    parser.add_argument("--compare-decode-steps", action="store_true",
                        help="ours with static decode steps (a CUDA graph on a GPU) and, in a column of its own, "
                             "with dynamic ones")
    parser.add_argument("--output", help="write the results as JSON here")
    args = parser.parse_args(argv)
    global CLOCK
    if args.clock == "thread":
        CLOCK, args.threads = time.thread_time, 1
    torch.set_num_threads(args.threads)
    if args.device == "cpu":
        os.environ.setdefault("MM_PLUGIN_DEVICE", "cpu")
    import mm_plugin  # noqa: F401  (patches)
    from mm_plugin.config.names import TORCH_DTYPES

    hf = build_hf(args.shape, TORCH_DTYPES[args.dtype], args.device)
    ours = build_ours(hf, args.dtype)
    if args.count_operations:
        report = operation_counts(hf, ours, args.shape, args.dtype, args.batch, args.text_tokens, args.new_tokens,
                                  args.device)
    else:
        report = benchmark(hf, ours, args.shape, args.dtype, args.batch, args.text_tokens, args.new_tokens,
                           args.repeats, args.device, args.clock, args.compare_decode_steps)
    if args.output:
        with open(args.output, "w") as file:
            json.dump(report, file, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
