"""A training step of this package's ``pretrain()`` against Hugging Face's LLaVA with AdamW: same weights,
same samples, one process.

    python bench/train_step.py --stage 1 [--shape tiny] [--device cpu] [--out DIR]
    python bench/train_step.py --stage 2 [--packing]
    PYTHONPATH=<megatron-core>:. python3 bench/train_step.py --shape 7b --device cuda --stage 1 --out DIR
    PYTHONPATH=<megatron-core>:. python3 bench/train_step.py --shape 7b --device cuda --stage 2 --layers 8 --out DIR

A random Hugging Face ``LlavaForConditionalGeneration`` of the chosen shape is built first, and its weights are
written as the three part files a ``model.json`` points to (what ``mm-convert llava-hf`` makes of a downloaded
model). A synthetic data set of JPEG files is made (``mm-data synth``: ``pretrain`` for stage 1,
``instruct-mix`` for stage 2). Then, in turn:

* **ours**: ``mm_plugin.training.loop.pretrain`` as ``launch/pretrain.py`` runs it without Megatron-LM:
  megatron-core DDP, the distributed optimizer (``--use-distributed-optimizer``), the package's data set and
  DataLoader (``--num-workers`` processes decoding the JPEGs), the log line every iteration, no checkpoints;
  ``--packing`` adds ``--sequence-packing`` (rows of ``--seq-length`` positions, ``--packed-rows`` per
  micro-batch).
* **hf**: the same weights in ``LlavaForConditionalGeneration`` (SDPA attention), ``torch.optim.AdamW`` and
  gradient clipping, what original LLaVA's trainer does at its core, fed the same samples in the same steps
  by the package's DataLoader (never packed), each micro-batch turned into Hugging Face's layout (every
  image's tokens spelled out, attention mask, right padding), its loss per micro-batch as ours (per trained
  token of the step with ``--packing``, as ours then).

Stage 1 trains the projector only (vision tower and language model frozen); stage 2 the projector and the
language model. ``--warmup`` steps are excluded from every figure. Reported per system: samples/s and trained
tokens/s (positions whose label is not -100), TFLOP/s and MFU per device with ``mm_plugin/training/flops.py``'s
count of the positions each system computes (MFU against ``--peak-tflops`` or a known GPU's peak; none on the
CPU without the flag), peak memory (CUDA: ``torch.cuda.max_memory_allocated``; CPU: growth of the process's
peak resident memory, DataLoader workers not included) and the share of step time spent inside
``next(data_iterator)``. Step times: ours from the loop's own log (``metrics.jsonl``, ``--log-interval 1``),
Hugging Face's around each whole step; both end with the loss on the host (a device sync).
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import inference_speed  # noqa: E402  (bench/inference_speed.py: the 7B shape, the machine's description)

SHAPES = {
    # packing.py's tiny shape in Hugging Face's terms: a 4-layer 256-wide LLaMA, a 2-layer CLIP at 112 px (64 image
    # tokens; the feature layer -2 is its first layer); the vocabulary is the synthetic tokenizer's.
    "tiny": dict(image_size=112, vocab_size=None,
                 vision=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4),
                 text=dict(hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=4,
                           num_key_value_heads=4)),
    # LLaVA-1.5-7B: CLIP ViT-L/14-336 and Vicuna-7B, Vicuna's vocabulary (32000 + padding; <image> is 32000).
    "7b": dict(image_size=336, vocab_size=32064, **inference_speed.SHAPES["7b"]),
}
# Per shape and stage: micro-batch (samples, unpacked), global batch, sequence length, learning rate.
RECIPES = {
    ("tiny", 1): dict(micro_batch=8, global_batch=32, seq_length=320, lr=1e-3, steps=20),
    ("tiny", 2): dict(micro_batch=8, global_batch=32, seq_length=576, lr=2e-5, steps=8),
    ("7b", 1): dict(micro_batch=8, global_batch=32, seq_length=2048, lr=1e-3, steps=5),
    ("7b", 2): dict(micro_batch=8, global_batch=32, seq_length=2048, lr=2e-5, steps=5),
}
SYSTEMS = ("ours", "hf")


# --- measuring ---------------------------------------------------------------------------------------


class TimedBatches:
    """A training iterator, timed: seconds inside ``next()`` (plus ``convert``, the rest of the batch's
    preparation) and what each item holds (a packed step is a list of micro-batches)."""

    def __init__(self, batches, count, convert=None):
        self.batches, self.count, self.convert, self.items = batches, count, convert, []

    def __iter__(self):
        return self

    def __next__(self):
        start = time.perf_counter()
        item = next(self.batches)
        converted = self.convert(item) if self.convert else item
        wait = time.perf_counter() - start
        self.items.append({"wait": wait, **self.count(item)})
        return converted

    def close(self) -> None:
        self.batches = None  # the DataLoader's workers end with their iterator


def batch_counts(tokens_per_image: int):
    """What a batch in our layout holds: samples, images, trained tokens and the decoder positions our model
    computes for it (``providers.expanded_length``, as the loop's log counts them)."""
    from mm_plugin.config.names import IGNORE_INDEX
    from mm_plugin.training.providers import expanded_length

    def count(item) -> dict:
        batches = item if isinstance(item, list) else [item]
        return {"samples": sum(len(b["sample_ids"]) for b in batches),
                "images": sum(int(b["image_counts"].sum()) for b in batches),
                "trained": sum(int((b["labels"] != IGNORE_INDEX).sum()) for b in batches),
                "positions": sum(b["input_ids"].shape[0] * expanded_length(b, tokens_per_image) for b in batches),
                "sample_ids": [s for b in batches for s in b["sample_ids"]]}

    return count


class PeakMemory:
    """CUDA: ``max_memory_allocated`` since ``start()``. CPU: how far the process's peak resident memory
    (VmHWM, reset through ``/proc/self/clear_refs``) rose above its resident memory at ``start()``."""

    def __init__(self, kind: str):
        self.kind = kind

    @staticmethod
    def _status(field: str) -> int:
        with open("/proc/self/status") as status:
            return next(int(line.split()[1]) * 1024 for line in status if line.startswith(field + ":"))

    def start(self, resident: int = 0) -> None:
        """Also records what is held already (``at_start``): the other system's leftovers would show there.
        ``resident``: bytes of this run's model already in the process's memory (CPU), counted as growth."""
        gc.collect()
        if self.kind == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            self.at_start = torch.cuda.memory_allocated()
            return
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)  # give freed heap back, so the next run's growth is its own
        except OSError:
            pass
        self.at_start = self._status("VmRSS")
        self.before = self.at_start - resident
        with open("/proc/self/clear_refs", "w") as clear:
            clear.write("5")  # VmHWM := VmRSS

    def peak(self) -> int:
        if self.kind == "cuda":
            return torch.cuda.max_memory_allocated()
        return self._status("VmHWM") - self.before


def summarise(step_seconds: list, items: list, per_step: int, losses: list, args, config, peak_flops,
              memory: PeakMemory) -> dict:
    """Figures over the steps after the warm-up; ``items`` are the iterator's, ``per_step`` of them a step."""
    from mm_plugin.training.flops import training_flops

    steps = []
    for index, seconds in enumerate(step_seconds):
        own = items[index * per_step:(index + 1) * per_step]
        steps.append({"seconds": seconds, "data_wait": sum(i["wait"] for i in own), "loss": losses[index],
                      **{key: sum(i[key] for i in own) for key in ("samples", "images", "trained", "positions")},
                      "sample_ids": [s for i in own for s in i["sample_ids"]]})
    measured = steps[args.warmup:]
    total = {key: sum(step[key] for step in measured)
             for key in ("seconds", "data_wait", "samples", "images", "trained", "positions")}
    # As the loop's log line: the window's samples, positions and images into one count.
    flops = training_flops(config, samples=total["samples"], positions=total["positions"], images=total["images"])
    tflops = flops / total["seconds"] / 1e12
    peak_memory = memory.peak()
    return {
        "steps": steps, "measured_steps": len(measured), "step_s": total["seconds"] / len(measured),
        "samples_per_s": total["samples"] / total["seconds"],
        "trained_tokens_per_s": total["trained"] / total["seconds"],
        "positions_per_s": total["positions"] / total["seconds"], "trained_tokens": total["trained"],
        "positions": total["positions"], "tflops_per_device": tflops,
        "mfu": tflops / peak_flops if peak_flops else None, "peak_memory_bytes": peak_memory,
        "memory_at_start_bytes": memory.at_start,
        "data_wait_share": total["data_wait"] / total["seconds"],
    }


# --- the model and the data --------------------------------------------------------------------------


def build_hf(args, vocab_size: int, image_token: int, dtype: torch.dtype):
    """A random Hugging Face LLaVA of the shape (``--layers``: that many language-model layers)."""
    from transformers import LlavaForConditionalGeneration

    shape = SHAPES[args.shape]
    text = {**shape["text"], **({"num_hidden_layers": args.layers} if args.layers else {})}
    config = inference_speed.llava_config(shape["vision"], text, image_size=shape["image_size"],
                                          vocab_size=vocab_size, image_token=image_token, use_cache=False)
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # built in its dtype on the device: no fp32 copy of a 7B model on the way
    try:
        with torch.device(args.device):
            return LlavaForConditionalGeneration(config).to(dtype)
    finally:
        torch.set_default_dtype(default)


def write_model(hf, args, folder: Path, dtype_name: str) -> Path:
    """The HF model's weights as our three part files and a model.json naming them, frozen as the stage says."""
    from safetensors.torch import save_file

    from mm_plugin.config.model import from_hf_config, to_mindspeed_json
    from mm_plugin.config.names import PARTS
    from mm_plugin.models.hf_keys import llava_hf_to_ours
    from mm_plugin.safe_io import write_text

    config = from_hf_config(hf.config, source="bench/train_step.py")
    config.attention_backend = "sdpa"
    state = llava_hf_to_ours(hf.state_dict(), config)
    for names in PARTS:
        part = getattr(config, names.field)
        path = folder / f"{names.field}.safetensors"
        save_file({key[len(names.module_prefix):]: tensor.contiguous().cpu() for key, tensor in state.items()
                   if key.startswith(names.module_prefix)}, str(path))  # a temporary file: no fsync
        part.ckpt_path, part.params_dtype = str(path), dtype_name
    del state
    config.vision.freeze, config.projector.freeze, config.language.freeze = True, False, args.stage == 1
    return write_text(folder / "model.json", json.dumps(to_mindspeed_json(config), indent=2))


def hf_layout(tokens_per_image: int, image_token: int, pad_token_id: int, device: torch.device):
    """Our collated micro-batch -> Hugging Face's: each -200 spelled out as ``tokens_per_image`` image tokens
    (labels -100), right-padded to the longest sample, attention mask 0 on padding (LLaVA's collator)."""
    from mm_plugin.config.names import IGNORE_INDEX, IMAGE_TOKEN_INDEX

    def convert(batch: dict) -> dict:
        rows, row_labels = [], []
        for ids, labels in zip(batch["input_ids"], batch["labels"]):
            length = int(((ids != pad_token_id) | (labels != IGNORE_INDEX)).nonzero().max()) + 1
            ids, labels = ids[:length], labels[:length]
            is_image = ids == IMAGE_TOKEN_INDEX
            repeats = torch.where(is_image, tokens_per_image, 1)
            rows.append(torch.repeat_interleave(ids.masked_fill(is_image, image_token), repeats))
            row_labels.append(torch.repeat_interleave(labels.masked_fill(is_image, IGNORE_INDEX), repeats))
        width = max(len(row) for row in rows)
        input_ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
        labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
        for index, (row, row_label) in enumerate(zip(rows, row_labels)):
            input_ids[index, :len(row)], labels[index, :len(row)] = row, row_label
            attention_mask[index, :len(row)] = 1
        images = batch["images"]
        return {"input_ids": input_ids.to(device, non_blocking=True), "labels": labels.to(device, non_blocking=True),
                "attention_mask": attention_mask.to(device, non_blocking=True),
                "pixel_values": images.to(device, non_blocking=True) if images.shape[0] else None}

    return convert


def pretrain_argv(args, recipe: dict, folder: Path, packed: bool) -> list:
    argv = ["--mm-model", str(folder / "model.json"), "--mm-data", str(folder / "data" / "data.json"),
            "--micro-batch-size", str(args.packed_rows if packed else recipe["micro_batch"]),
            "--global-batch-size", str(recipe["global_batch"]), "--seq-length", str(recipe["seq_length"]),
            "--lr", str(recipe["lr"]), "--lr-decay-style", "constant", "--weight-decay", "0.0", "--clip-grad", "1.0",
            "--train-iters", str(args.warmup + recipe["steps"]), "--num-workers", str(args.num_workers),
            "--use-distributed-optimizer", "--log-interval", "1", "--tensorboard-dir", str(folder / "tensorboard")]
    if args.dtype == "bf16":
        argv.append("--bf16")
    if packed:
        argv.append("--sequence-packing")
    if args.peak_tflops:
        argv += ["--peak-tflops", str(args.peak_tflops)]
    return argv


# --- the two systems ---------------------------------------------------------------------------------


def run_ours(args, recipe: dict, folder: Path, memory: PeakMemory, peak_flops) -> dict:
    """``pretrain()`` as ``launch/pretrain.py`` calls it (``mm_plugin.training.cli.run``), its training
    iterator timed."""
    from megatron.core.enums import ModelType

    from mm_plugin.config.model import load_model_config
    from mm_plugin.data.config import load_data_config
    from mm_plugin.training.arguments import parse_args
    from mm_plugin.training.cli import check_inputs
    from mm_plugin.training.loop import pretrain
    from mm_plugin.training.providers import bind

    run_args = parse_args(pretrain_argv(args, recipe, folder, packed=args.packing))
    model_config, data_config = load_model_config(run_args.mm_model), load_data_config(run_args.mm_data)
    check_inputs(run_args, model_config, data_config)
    providers = bind(run_args, model_config, data_config)
    timed = TimedBatches(None, batch_counts(model_config.vision.num_image_tokens))

    def datasets_provider(num_samples, consumed_samples=0):
        train, valid, test = providers.datasets_provider(num_samples, consumed_samples=consumed_samples)
        timed.batches = train
        return timed, valid, test

    memory.start()
    result = pretrain(datasets_provider, providers.model_provider, ModelType.encoder_or_decoder,
                      providers.forward_step, args=run_args, stats=providers.stats, settings=providers.settings)
    timed.close()
    log = [json.loads(line) for line in (folder / "tensorboard" / "metrics.jsonl").read_text().splitlines()]
    summary = summarise([record["iteration_ms"] / 1000 for record in log], timed.items,
                        1 if providers.settings.sequence_packing else providers.settings.num_microbatches,
                        [loss for _, loss in result.losses], args, model_config, peak_flops, memory)
    measured = log[args.warmup:]  # the loop's own figure, for comparison: its per-iteration rates, time-weighted
    summary["loop_log_tflops_per_device"] = sum(r["tflops_per_device"] * r["iteration_ms"] for r in measured) \
        / sum(r["iteration_ms"] for r in measured)
    del result
    return summary


def run_hf(hf, args, recipe: dict, folder: Path, memory: PeakMemory, peak_flops) -> dict:
    """The same samples through the HF model: AdamW on the trainable parameters, clipping at 1.0."""
    from mm_plugin import device
    from mm_plugin.config.model import load_model_config
    from mm_plugin.data.config import load_data_config
    from mm_plugin.training.arguments import parse_args
    from mm_plugin.training.providers import bind

    run_args = parse_args(pretrain_argv(args, recipe, folder, packed=False))
    model_config, data_config = load_model_config(run_args.mm_model), load_data_config(run_args.mm_data)
    providers = bind(run_args, model_config, data_config)  # the same sampler and seed: the same steps
    tokens_per_image = model_config.vision.num_image_tokens
    train, _, _ = providers.datasets_provider([0, 0, 0])
    pad_token_id = data_config.pad_token_id
    if pad_token_id is None:
        from mm_plugin.data.tokenization import load_tokenizer

        pad_token_id = load_tokenizer(data_config.tokenizer_path).pad_token_id
    timed = TimedBatches(train, batch_counts(tokens_per_image),
                         hf_layout(tokens_per_image, hf.config.image_token_id, pad_token_id, device.current()))

    on_cpu = device.kind() == "cpu"  # then its weights are resident already: counted as ours are, built in the run
    memory.start(resident=sum(p.numel() * p.element_size() for p in hf.parameters()) if on_cpu else 0)
    hf.to(device.current())
    hf.requires_grad_(False)
    trainable_parts = [hf.model.multi_modal_projector]
    if args.stage == 2:
        trainable_parts += [hf.model.language_model, hf.lm_head]
    for part in trainable_parts:
        part.requires_grad_(True)
    parameters = [p for p in hf.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=recipe["lr"], betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    micro_batches = providers.settings.num_microbatches
    hf.train()
    step_seconds, losses = [], []
    for _ in range(args.warmup + recipe["steps"]):
        start = time.perf_counter()
        batches = [next(timed) for _ in range(micro_batches)]  # as transformers' Trainer: the step's batches first
        trained = sum(int((batch["labels"] != -100).sum()) for batch in batches)
        total = torch.zeros((), device=device.current())
        for batch in batches:
            if args.packing:  # per trained token of the step, as ours with packing (the Trainer's num_items_in_batch)
                loss = hf(**batch, use_cache=False, num_items_in_batch=trained).loss
            else:  # each micro-batch's mean, averaged over the step's micro-batches, as ours and original LLaVA
                loss = hf(**batch, use_cache=False).loss / micro_batches
            loss.backward()
            total += loss.detach()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(total))  # on the host: the step is done
        step_seconds.append(time.perf_counter() - start)
        print(f" hf step {len(losses):>3d} | {1000 * step_seconds[-1]:.1f} ms | loss {losses[-1]:.6E}", flush=True)
    timed.close()
    summary = summarise(step_seconds, timed.items, micro_batches, losses, args, model_config, peak_flops, memory)
    del optimizer, parameters
    return summary


# --- main --------------------------------------------------------------------------------------------


def prepare(args, recipe: dict, folder: Path, dtype: torch.dtype):
    """The synthetic data set, the HF model (returned, on the CPU) and the part files with model.json."""
    from mm_plugin.data.synthetic import synthesize
    from mm_plugin.data.tokenization import load_tokenizer

    shape = SHAPES[args.shape]
    records = (args.warmup + recipe["steps"]) * recipe["global_batch"]
    synthesize(folder / "data", records, kind="pretrain" if args.stage == 1 else "instruct-mix", seed=0,
               image_size=shape["image_size"], workers=min(os.cpu_count() or 1, 8))
    tokens = len(load_tokenizer(folder / "data" / "tokenizer"))
    # <image> needs a row of HF's vocabulary that no text uses: Vicuna's 32000, or one past the tokenizer's.
    vocab_size, image_token = (shape["vocab_size"], 32000) if shape["vocab_size"] else (tokens + 1, tokens)
    if tokens > image_token:
        raise SystemExit(f"the synthetic tokenizer has {tokens} tokens; <image> is {image_token}")
    hf = build_hf(args, vocab_size, image_token, dtype)
    write_model(hf, args, folder, args.dtype)
    return hf.to("cpu")  # off the device while ours runs


def table_row(name: str, result: dict, args) -> str:
    memory = result["peak_memory_bytes"] / 2 ** 30
    memory_text = f"{memory:.2f} GiB" if args.device == "cuda" else f"+{memory:.2f} GiB RSS"
    mfu = f"{100 * result['mfu']:.1f}%" if result["mfu"] is not None else "-"
    return (f"| {name} | {1000 * result['step_s']:.0f} ms | {result['samples_per_s']:.2f} | "
            f"{result['trained_tokens_per_s']:.0f} | {result['tflops_per_device']:.3g} | {mfu} | {memory_text} | "
            f"{100 * result['data_wait_share']:.1f}% |")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--stage", type=int, choices=(1, 2), required=True)
    parser.add_argument("--shape", choices=SHAPES, default="tiny")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default=None, help="default: bf16 on CUDA, fp32 on CPU")
    parser.add_argument("--layers", type=int, default=None, help="language-model layers (default: the shape's)")
    parser.add_argument("--packing", action="store_true", help="stage 2: ours with --sequence-packing")
    parser.add_argument("--packed-rows", type=int, default=1, help="with --packing: rows per micro-batch")
    parser.add_argument("--micro-batch", type=int, default=None, help="samples per micro-batch (unpacked)")
    parser.add_argument("--global-batch", type=int, default=None)
    parser.add_argument("--seq-length", type=int, default=None)
    parser.add_argument("--steps", type=int, default=None, help="measured steps (after the warm-up)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--num-workers", type=int, default=None, help="DataLoader workers (default: 1 CPU, 4 CUDA)")
    parser.add_argument("--peak-tflops", type=float, default=None, help="peak TFLOP/s of one device, for MFU")
    parser.add_argument("--out", type=Path, default=None, help="write train_step.json here")
    args = parser.parse_args()
    if args.packing and args.stage != 2:
        parser.error("--packing is for stage 2")
    args.dtype = args.dtype or ("bf16" if args.device == "cuda" else "fp32")
    args.num_workers = args.num_workers if args.num_workers is not None else (4 if args.device == "cuda" else 1)
    recipe = dict(RECIPES[args.shape, args.stage])
    for key in ("micro_batch", "global_batch", "seq_length", "steps"):
        if getattr(args, key) is not None:
            recipe[key] = getattr(args, key)
    os.environ["MM_PLUGIN_DEVICE"] = args.device

    from mm_plugin.console import quiet_third_party_warnings

    quiet_third_party_warnings()
    from mm_plugin.config.names import TORCH_DTYPES
    from mm_plugin.training.cli import configure_logging
    from mm_plugin.training.flops import peak_tflops

    configure_logging()
    device_name = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    peak = peak_tflops(device_name, args.peak_tflops)
    memory = PeakMemory(args.device)
    results = {}
    with tempfile.TemporaryDirectory(prefix="bench-train-step-") as temporary:
        folder = Path(temporary)
        hf = prepare(args, recipe, folder, TORCH_DTYPES[args.dtype])
        results["ours"] = run_ours(args, recipe, folder, memory, peak)
        results["hf"] = run_hf(hf, args, recipe, folder, memory, peak)
        parameters = sum(p.numel() for p in hf.parameters())
        trainable = sum(p.numel() for p in hf.parameters() if p.requires_grad)
        attention = hf.config._attn_implementation
        del hf

    ours, hf_result = results["ours"], results["hf"]
    same_steps = all(sorted(a["sample_ids"]) == sorted(b["sample_ids"])
                     for a, b in zip(ours["steps"], hf_result["steps"]))
    losses = [(a["loss"], b["loss"]) for a, b in zip(ours["steps"], hf_result["steps"])]
    machine = inference_speed.machine()
    print(f"\nmachine: {machine['device']}; torch {torch.__version__}, megatron-core {machine.get('megatron_core')}, "
          f"transformers {machine.get('transformers')}; OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']}, "
          f"{args.num_workers} DataLoader worker(s)")
    packing = f", ours packed ({args.packed_rows} row(s) of {recipe['seq_length']})" if args.packing else ""
    print(f"shape {args.shape} ({parameters / 1e6:.0f}M parameters, {trainable / 1e6:.2f}M trained), "
          f"stage {args.stage}, {args.dtype}, HF attention {attention}; global batch {recipe['global_batch']}, "
          f"micro-batch {recipe['micro_batch']}{packing}; {recipe['steps']} steps after {args.warmup} warm-up\n")
    print("| system | step | samples/s | trained tokens/s | TFLOP/s per device | MFU | peak memory | data wait |")
    print("|---|---|---|---|---|---|---|---|")
    print(table_row("mm_plugin pretrain()", ours, args))
    print(table_row("HF LlavaForConditionalGeneration + AdamW", hf_result, args))
    print(f"\nours / HF: samples/s {ours['samples_per_s'] / hf_result['samples_per_s']:.2f}x, trained tokens/s "
          f"{ours['trained_tokens_per_s'] / hf_result['trained_tokens_per_s']:.2f}x")
    print(f"same samples in every step: {same_steps}; trained tokens measured: ours {ours['trained_tokens']}, "
          f"HF {hf_result['trained_tokens']}; positions computed: ours {ours['positions']}, "
          f"HF {hf_result['positions']}")
    print(f"loss at step 1: ours {losses[0][0]:.6f}, HF {losses[0][1]:.6f}; largest difference over the "
          f"{len(losses)} steps {max(abs(a - b) for a, b in losses):.2e}")
    print("the loop's own log line, TFLOP/s per device over the measured steps: "
          f"{ours['loop_log_tflops_per_device']:.3g}")
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        report = {"args": {k: str(v) for k, v in vars(args).items()}, "recipe": recipe, "machine": machine,
                  "parameters": parameters, "trainable": trainable, "hf_attention": attention,
                  "same_samples_every_step": same_steps, "results": results}
        (args.out / "train_step.json").write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
