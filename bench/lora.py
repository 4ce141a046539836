"""A LoRA stage-2 step against a full stage-2 step, and this package's adapter against PEFT's on megatron-core.

    python bench/lora.py [--shape tiny] [--steps 8] [--rank 16] [--repeats 1] [--device cpu|cuda]
    python bench/lora.py --check

Each mode trains ``--steps`` steps (after one warm-up step) of the same instruct-mix batches from the same
weights, in a process of its own so that its peak memory is its own: resident memory on the CPU
(``ru_maxrss``), ``torch.cuda.max_memory_allocated`` on a GPU. ``full`` trains the language model and the
projector; ``lora`` adapters of ``--rank`` on the language model's four linears (alpha twice the rank) and
the projector; ``peft`` the same adapters from PEFT (``LoraConfig(megatron_config=..., megatron_core=
"megatron.core")``, its ``LoraParallelLinear``) on a model built without ours. ``--repeats`` runs the modes
that many times, interleaved (a shared machine's load falls on all of them); the table gives the median and
the range of the wall time per step and of the main thread's CPU time per step (one torch thread: the
compute). Trainable parameters and the optimizer's fp32 state (master weights and two Adam moments) are
counted too.

``--check`` compares the two adapters on the ``--shape`` language model in two gloo processes, at TP=1 then
TP=2: how PEFT as installed fails, then, with the shims it needs (:func:`peft_lora`), the outputs at
initialisation against the base model, outputs and adapter gradients with the same ``A`` and ``B`` in both
(and TP=2 against TP=1), ``A`` as initialised, and what each gives megatron-core's ``dist_checkpointing``.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import resource
import subprocess
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from machine import cpu_name  # noqa: E402
from packing import SHAPES, model_json  # noqa: E402

MODES = ("full", "lora", "peft")
TARGETS = ("linear_qkv", "linear_proj", "linear_fc1", "linear_fc2")
LABELS = {"full": "full (language model + projector)", "lora": "LoRA rank {rank} + projector (ours)",
          "peft": "PEFT LoRA rank {rank} + projector"}


# --- PEFT on megatron-core ------------------------------------------------------------------------------------

def patch_peft(shims: int) -> None:
    """The first ``shims`` (0-2) of the fixes PEFT 0.21.2's megatron LoRA needs to build on megatron-core 0.16
    (the third, for its forward, is per module: :func:`peft_lora`). Patches the installed PEFT in this process.

    1. ``dispatch_megatron`` reads ``kwargs["fan_in_fan_out"]``, which PEFT's LoRA model no longer passes it;
    2. ``LoraParallelLinear.update_layer`` never fills ``lora_bias[adapter]``, which ``reset_lora_parameters``
       reads.
    """
    import peft.tuners.lora.model as lora_model
    from peft.tuners.lora.tp_layer import LoraParallelLinear, dispatch_megatron

    if shims >= 1 and lora_model.dispatch_megatron is dispatch_megatron:
        def dispatch(target, adapter_name, config, **kwargs):
            return dispatch_megatron(target, adapter_name, config=config,
                                     **{"fan_in_fan_out": config.fan_in_fan_out, **kwargs})
        lora_model.dispatch_megatron = dispatch
    if shims >= 2 and not hasattr(LoraParallelLinear, "_bench_update_layer"):
        LoraParallelLinear._bench_update_layer = LoraParallelLinear.update_layer

        def update_layer(self, adapter_name, r, lora_alpha, config, **kwargs):
            self.lora_bias[adapter_name] = config.lora_bias
            return self._bench_update_layer(adapter_name, r, lora_alpha, config, **kwargs)
        LoraParallelLinear.update_layer = update_layer


def _output_only(module, inputs, output):
    return output[0]  # a megatron parallel linear's (output, bias)


def peft_lora(language_model, rank: int, alpha: float, dropout: float, shims: int = 3):
    """PEFT's LoRA on the language model's four megatron linears, with the first ``shims`` fixes: 1 and 2 of
    :func:`patch_peft`, and 3: ``LoraParallelLinear.forward`` adds ``lora_B(lora_A(x)) * scaling``, but its
    ``A`` or ``B`` is a megatron parallel linear, which returns ``(output, bias)``: a forward hook on each keeps
    the output."""
    import peft
    from peft.tuners.lora.tp_layer import LoraParallelLinear

    patch_peft(min(shims, 2))
    config = peft.LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=list(TARGETS),
                             megatron_config=language_model.config, megatron_core="megatron.core")
    peft.inject_adapter_in_model(config, language_model)
    if shims >= 3:
        for module in language_model.modules():
            if isinstance(module, LoraParallelLinear):
                for part in (*module.lora_A.values(), *module.lora_B.values()):
                    if not isinstance(part, torch.nn.Linear):
                        part.register_forward_hook(_output_only)
    return language_model


def _with_peft(provider, lora: dict, *args, **kwargs):
    """``provider``'s model (built without our adapters) with PEFT's on its language model."""
    model = provider(*args, **kwargs)
    peft_lora(model.language_model, **lora)
    return model


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
    provider = providers.model_provider
    if mode == "peft":
        provider = functools.partial(_with_peft, provider, dict(rank=args.rank, alpha=2 * args.rank, dropout=0.0))
    loop.initialize(run_args)
    model = loop.build_model(provider, ModelType.encoder_or_decoder, run_args)
    optimizer, scheduler = loop.build_optimizer(model, run_args, providers.settings)
    loop.wire_schedule(model, optimizer, run_args)
    train, _, _ = providers.datasets_provider([0, 0, 0])
    model.train()
    step = (providers.forward_step, train, model, optimizer, scheduler, run_args, providers.settings)
    loop.train_step(*step)  # warm-up
    if torch.cuda.is_available() and args.device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start, cpu_start = time.perf_counter(), time.thread_time()
    for _ in range(args.steps):
        loop.train_step(*step)
    cpu = time.thread_time() - cpu_start
    if args.device == "cuda":
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    trainable = sum(p.numel() for p in unwrap(model).parameters() if p.requires_grad)
    return {"step_ms": 1000 * (time.perf_counter() - start) / args.steps, "cpu_ms": 1000 * cpu / args.steps,
            "peak_bytes": peak, "trainable": trainable, "optimizer_state_bytes": 12 * trainable}


# --- --check: the two adapters side by side ---------------------------------------------------------------------

CHECK_VOCAB, CHECK_BATCH, CHECK_LENGTH = 1000, 2, 64


def _failure(error: BaseException) -> str:
    frame = traceback.extract_tb(error.__traceback__)[-1]
    return f"{type(error).__name__}: {error} ({Path(frame.filename).name}:{frame.lineno})"


def _split(target: str, matrix: str):
    """How megatron splits an adapter matrix over tensor-parallel ranks: ``(dim, glu)``, or None (whole on every
    rank). Column-parallel layers (QKV, gate+up) split ``B``'s rows (gate+up: each half), row-parallel ones
    ``A``'s columns."""
    column = target in ("linear_qkv", "linear_fc1")
    if (matrix == "B") != column:
        return None
    return (0, target == "linear_fc1") if column else (1, False)


def _shard(full: torch.Tensor, split, tp: int, rank: int) -> torch.Tensor:
    if split is None:
        return full
    dim, glu = split
    halves = full.chunk(2, dim) if glu else (full,)
    return torch.cat([half.chunk(tp, dim)[rank] for half in halves], dim)


def _unshard(local: torch.Tensor, split) -> tuple[torch.Tensor, bool]:
    """The full matrix from every tensor-parallel rank's part, and whether a whole one is the same on all."""
    from megatron.core import parallel_state

    group = parallel_state.get_tensor_model_parallel_group()
    parts = [torch.empty_like(local) for _ in range(torch.distributed.get_world_size(group))]
    torch.distributed.all_gather(parts, local.detach().contiguous(), group=group)
    if split is None:
        return parts[0], all(torch.equal(part, parts[0]) for part in parts)
    dim, glu = split
    halves = [part.chunk(2, dim) if glu else (part,) for part in parts]
    return torch.cat([h[i] for i in range(len(halves[0])) for h in halves], dim), True


def adapter_weights(language_model) -> dict:
    """``{"layer.target": (A, B)}``: the adapters' weights, ours or PEFT's (``lora_A["default"]``)."""
    found = {}
    for number, layer in enumerate(language_model.decoder.layers):
        for name, module in layer.named_modules():
            target = name.rsplit(".", 1)[-1]
            if target in TARGETS and hasattr(module, "lora_A"):
                a, b = module.lora_A, module.lora_B
                if isinstance(a, torch.nn.ModuleDict):
                    a, b = a["default"], b["default"]
                found[f"{number}.{target}"] = (a.weight, b.weight)
    return found


def _full(language_model, which: str) -> dict:
    """Every adapter's full ``A`` and ``B`` (``which="weight"``) or their gradients (``"grad"``)."""
    full = {}
    for key, pair in adapter_weights(language_model).items():
        for matrix, parameter in zip("AB", pair):
            tensor = parameter if which == "weight" else parameter.grad
            full[f"{key}.{matrix}"], same = _unshard(tensor, _split(key.split(".")[1], matrix))
            full[f"{key}.{matrix}.same_on_ranks"] = same
    return full


def _set_adapters(language_model, seed: int) -> None:
    """The same A and B (full matrices from ``seed``, this rank's part kept) into either kind of adapter."""
    from megatron.core import parallel_state

    tp, rank = (parallel_state.get_tensor_model_parallel_world_size(),
                parallel_state.get_tensor_model_parallel_rank())
    generator = torch.Generator().manual_seed(seed)
    for key, pair in sorted(adapter_weights(language_model).items()):
        for matrix, parameter in zip("AB", pair):
            split = _split(key.split(".")[1], matrix)
            shape = list(parameter.shape)
            if split is not None:
                shape[split[0]] *= tp
            full = torch.randn(shape, generator=generator) * 0.05
            with torch.no_grad():
                parameter.copy_(_shard(full, split, tp, rank))


def _logits(language_model, backward: bool = False) -> torch.Tensor:
    """The full logits of fixed tokens (and the gradients of a fixed function of them, when ``backward``)."""
    from megatron.core import tensor_parallel

    generator = torch.Generator().manual_seed(7)
    ids = torch.randint(0, CHECK_VOCAB, (CHECK_BATCH, CHECK_LENGTH), generator=generator)
    positions = torch.arange(CHECK_LENGTH).expand(CHECK_BATCH, -1)
    with torch.set_grad_enabled(backward):
        local = language_model(ids, positions, None)
        logits = tensor_parallel.gather_from_tensor_model_parallel_region(local)[..., :CHECK_VOCAB]
        if backward:
            (logits * torch.randn(logits.shape, generator=generator)).sum().backward()
    return logits.detach()


def _build(folder: Path, shape: dict, lora: dict = None):
    """The language model of a LlavaModel of ``shape`` on the base part file, with our adapters for ``lora``."""
    from mm_plugin.config.model import from_mindspeed_json
    from mm_plugin.models.llava import LlavaModel
    from mm_plugin.models.loading import load_parts

    raw = model_json(shape, CHECK_VOCAB, CHECK_LENGTH)
    raw["text_decoder"].update(ckpt_path=str(folder / "llm.pt"), lora=lora)
    config = from_mindspeed_json(raw, source="bench")
    model = LlavaModel(config)
    load_parts(model, config, text_only=True)
    return model.language_model


def _write_base(folder: Path, shape: dict) -> None:
    """The base language model's part file (TP=1), from a seed: what both adapters' models load."""
    from mm_plugin.config.model import from_mindspeed_json
    from mm_plugin.models.llava import LlavaModel
    from mm_plugin.safe_io import save_state

    torch.manual_seed(0)
    state = LlavaModel(from_mindspeed_json(model_json(shape, CHECK_VOCAB, CHECK_LENGTH), source="bench")
                       ).language_model.state_dict()
    vocab_tables = ("embedding.word_embeddings.weight", "output_layer.weight")
    save_state({key: value[:CHECK_VOCAB] if key in vocab_tables else value for key, value in state.items()
                if "_extra_state" not in key}, folder / "llm.pt")


def _as_shipped(folder: Path, shape: dict, lora: dict) -> list:
    """How PEFT as installed fails, then with each shim of :func:`peft_lora` in turn (fresh models)."""
    stages = []
    for shims in range(4):
        language_model = _build(folder, shape)
        language_model.config.params_dtype = torch.bfloat16  # does PEFT change the model's shared config?
        try:
            peft_lora(language_model, **lora, shims=shims)
            dtype = str(language_model.config.params_dtype)
            _logits(language_model, backward=True)
            stages.append(f"{shims} shims: runs (the model's TransformerConfig.params_dtype, bfloat16 before, "
                          f"is now {dtype})")
        except Exception as error:  # noqa: BLE001  (the finding)
            stages.append(f"{shims} shims: {_failure(error)}")
    return stages


def _layout(state: dict) -> list:
    """The first layer's adapter entries of a sharded state dict: key, global shape, how it is split."""
    lines = []
    for key, value in state.items():
        if "layers.0." not in key or ".lora_" not in key or key.endswith("_extra_state"):
            continue
        if not hasattr(value, "global_shape"):  # a factory: gate+up's B as megatron saves its weight
            lines.append(f"{key}: {type(value).__name__} (local {list(value.data.shape)})")
            continue
        pieces = [n for n in value.axis_fragmentations if n > 1][1:]  # the first: the layers
        lines.append(f"{key}: global {list(value.global_shape)}, "
                     + (f"split in {pieces[0]}" if pieces else "one whole tensor (replicated)"))
    return lines


def _checkpoint(language_model, folder: Path) -> list:
    """What megatron-core's dist_checkpointing gets from the model. Where the whole model's sharded state dict
    fails (PEFT), the first layer's attention (megatron's generic path for modules without one) is saved and read
    back: does every rank get its own adapter back?"""
    from megatron.core import dist_checkpointing

    try:
        return _layout(language_model.sharded_state_dict())
    except Exception as error:  # noqa: BLE001  (the finding)
        lines = [f"model.sharded_state_dict(): {_failure(error)}"]
    attention, prefix = language_model.decoder.layers[0].self_attention, "decoder.layers.0.self_attention."
    layer_axis = ((0, 0, 1),)  # as the decoder block gives it, for a block of this one layer
    state = {key: value for key, value in attention.sharded_state_dict(prefix, layer_axis).items() if ".lora_" in key}
    lines += ["attention alone: " + line for line in _layout(state)]
    where = folder / "peft-attention"
    where.mkdir(exist_ok=True)
    kept = {prefix + name: value.detach().clone() for name, value in attention.named_parameters()
            if prefix + name in state}
    dist_checkpointing.save(state, str(where))
    loaded = dist_checkpointing.load(state, str(where))
    back = torch.tensor([all(torch.equal(loaded[key], kept[key]) for key in kept)])
    everywhere = [torch.empty_like(back) for _ in range(torch.distributed.get_world_size())]
    torch.distributed.all_gather(everywhere, back)
    lines.append(f"attention alone saved and read back, each rank's adapters as saved: "
                 f"{[bool(flag) for flag in everywhere]}")
    return lines


def check(args, folder: Path) -> dict:
    """Run in two processes (gloo): TP=1 (the two as data-parallel replicas) then TP=2."""
    from megatron.core import dist_checkpointing

    from mm_plugin.parallel.world import set_model_parallel

    shape, lora = SHAPES[args.shape], dict(rank=args.rank, alpha=2 * args.rank, dropout=0.0)
    set_model_parallel(1, 1)
    if torch.distributed.get_rank() == 0:
        _write_base(folder, shape)
    torch.distributed.barrier()
    report = {"peft as installed (TP=1)": _as_shipped(folder, shape, lora)}
    runs = {}
    for tp in (1, 2):
        set_model_parallel(tp, 1)
        base = _build(folder, shape)
        ours = _build(folder, shape, lora)
        reference = _logits(base)
        run = {"ours at init == base": torch.equal(_logits(ours), reference)}
        peft_model = peft_lora(base, **lora)  # the base model, wrapped in place
        run["peft at init == base"] = torch.equal(_logits(peft_model), reference)
        run["A at init"] = {name: _full(model, "weight") for name, model in (("ours", ours), ("peft", peft_model))}
        run["peft state_dict keys (layer 0 qkv)"] = [
            f"{key} {list(value.shape)}" for key, value in peft_model.state_dict().items()
            if "layers.0.self_attention.linear_qkv" in key and isinstance(value, torch.Tensor)]
        for name, model in (("ours", ours), ("peft", peft_model)):
            _set_adapters(model, seed=11)
            run[name] = {"logits": _logits(model, backward=True), "grads": _full(model, "grad")}
        (folder / f"tp{tp}").mkdir(exist_ok=True)
        run["checkpoint"] = {"ours": _checkpoint(ours, folder / f"tp{tp}"),
                             "peft": _checkpoint(peft_model, folder / f"tp{tp}")}
        if tp == 2:  # ours, saved at TP=2 through dist_checkpointing, read back at TP=1 below
            saved = {key: value for key, value in ours.sharded_state_dict().items() if ".lora_" in key}
            (folder / "ours-tp2").mkdir(exist_ok=True)
            dist_checkpointing.save(saved, str(folder / "ours-tp2"))
            run["saved"] = _full(ours, "weight")
        runs[tp] = run
    set_model_parallel(1, 1)
    ours = _build(folder, shape, lora)
    wanted = {key: value for key, value in ours.sharded_state_dict().items() if ".lora_" in key}
    ours.load_state_dict(dist_checkpointing.load(wanted, str(folder / "ours-tp2")), strict=False)
    loaded, saved = _full(ours, "weight"), runs[2]["saved"]
    report["ours: TP=2 checkpoint read at TP=1 == the TP=2 adapters"] = all(
        torch.equal(loaded[key], saved[key]) for key in saved if not key.endswith("same_on_ranks"))
    return _summarise(report, runs)


def _difference(a: dict, b: dict) -> float:
    """Largest relative difference over the tensors of two ``{key: tensor}`` (keys ending ``same_on_ranks`` are
    flags)."""
    return max(((a[key] - b[key]).abs().max() / b[key].abs().max()).item() for key in b
               if not key.endswith("same_on_ranks"))


def _summarise(report: dict, runs: dict) -> dict:
    for tp, run in runs.items():
        for flag in ("ours at init == base", "peft at init == base"):
            report[f"TP={tp}: {flag}"] = run[flag]
        report[f"TP={tp}: peft / ours, same A and B: logits max rel diff"] = _difference(
            {"x": run["peft"]["logits"]}, {"x": run["ours"]["logits"]})
        report[f"TP={tp}: peft / ours, same A and B: adapter grads max rel diff"] = _difference(
            run["peft"]["grads"], run["ours"]["grads"])
        report[f"TP={tp}: checkpoint"] = run["checkpoint"]
        report[f"TP={tp}: peft state_dict keys (layer 0 qkv)"] = run["peft state_dict keys (layer 0 qkv)"]
    for name in ("ours", "peft"):
        one, two = runs[1][name], runs[2][name]
        report[f"{name}: TP=2 / TP=1 logits max rel diff"] = _difference({"x": two["logits"]}, {"x": one["logits"]})
        report[f"{name}: TP=2 / TP=1 adapter grads max rel diff"] = _difference(two["grads"], one["grads"])
        report[f"{name}: whole adapter matrices' grads the same on both TP=2 ranks"] = all(
            value for key, value in two["grads"].items() if key.endswith("same_on_ranks"))
        init_one, init_two = runs[1]["A at init"][name], runs[2]["A at init"][name]
        a_keys = [key for key in init_one if key.endswith(".A")]
        report[f"{name}: A at init, TP=2 == TP=1"] = {
            target: all(torch.equal(init_two[key], init_one[key]) for key in a_keys if target in key)
            for target in TARGETS}
        report[f"{name}: A at init, largest |value| TP=1 / TP=2"] = {
            target: " / ".join(f"{max(init[key].abs().max().item() for key in a_keys if target in key):.4f}"
                               for init in (init_one, init_two)) for target in TARGETS}
        halves = {}
        for target in ("linear_proj", "linear_fc2"):  # row-parallel: A split by columns at TP=2
            pairs = [init_two[key].chunk(2, 1) for key in a_keys if target in key]
            halves[target] = all(torch.equal(left, right) for left, right in pairs)
        report[f"{name}: row-parallel A at init, TP=2 rank 0's columns == rank 1's"] = halves
    return report


def _versions() -> str:
    from importlib.metadata import version

    return ", ".join(f"{name} {version(name)}" for name in ("megatron-core", "peft"))


def _checked(args, folder: Path) -> int:
    """``--check`` in two processes (torchrun, gloo); prints rank 0's findings."""
    from mm_plugin.parallel.world import free_port

    child = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                            "--master-port", str(free_port()), __file__, "--child", "check", "--folder", str(folder),
                            *sys.argv[1:]], capture_output=True, text=True)
    if child.returncode:
        sys.stderr.write(child.stderr[-20000:])
        return child.returncode
    report = json.loads(child.stdout.strip().splitlines()[-1])
    print(f"machine: {cpu_name()}, {os.cpu_count()} cores; torch {torch.__version__}; {_versions()}")
    print(f"shape {args.shape} language model, LoRA rank {args.rank}, alpha {2 * args.rank}, dropout 0; "
          f"{CHECK_BATCH} x {CHECK_LENGTH} tokens\n")
    for key, value in report.items():
        if isinstance(value, list):
            print(f"{key}:" + "".join(f"\n    {line}" for line in value))
        elif isinstance(value, dict) and all(isinstance(lines, list) for lines in value.values()):
            print(f"{key}:" + "".join(f"\n    {name}:" + "".join(f"\n        {line}" for line in lines)
                                      for name, lines in value.items()))
        else:
            print(f"{key}: {value:.2e}" if isinstance(value, float) else f"{key}: {value}")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", choices=SHAPES, default="tiny")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--seq-length", type=int, default=576)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--check", action="store_true", help="compare the adapters (TP=1 and TP=2, on the CPU)")
    parser.add_argument("--child", choices=(*MODES, "check"), help=argparse.SUPPRESS)  # in a child process
    parser.add_argument("--folder", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    os.environ["MM_PLUGIN_DEVICE"] = "cpu" if args.check else args.device
    if args.child:
        from mm_plugin.parallel.world import join_world

        join_world()
        result = check(args, args.folder) if args.child == "check" else run(args.child, args, args.folder)
        if torch.distributed.get_rank() == 0:
            print(json.dumps(result))
        return 0
    if args.check:
        with tempfile.TemporaryDirectory(prefix="bench-lora-check-") as temporary:
            return _checked(args, Path(temporary))

    from mm_plugin.data.synthetic import synthesize
    from mm_plugin.data.tokenization import load_tokenizer

    shape = SHAPES[args.shape]
    with tempfile.TemporaryDirectory(prefix="bench-lora-") as temporary:
        folder = Path(temporary)
        synthesize(folder / "mix", 16 * (args.steps + 1), kind="instruct-mix", seed=0, image_size=shape["image_size"],
                   workers=1)
        vocab = len(load_tokenizer(folder / "mix" / "tokenizer"))
        (folder / "model.json").write_text(json.dumps(model_json(shape, vocab, args.seq_length)))
        results = {mode: [] for mode in MODES}
        for _ in range(args.repeats):
            for mode in MODES:
                child = subprocess.run([sys.executable, __file__, "--child", mode, "--folder", str(folder),
                                        *sys.argv[1:]], capture_output=True, text=True, check=True)
                results[mode].append(json.loads(child.stdout.strip().splitlines()[-1]))

    def spread(mode: str, field: str) -> str:
        values = [result[field] for result in results[mode]]
        if len(values) == 1:
            return f"{values[0]:.0f}"
        return f"{statistics.median(values):.0f} ({min(values):.0f}-{max(values):.0f})"

    print(f"machine: {cpu_name()}, {os.cpu_count()} cores; torch {torch.__version__}; {_versions()}; device "
          f"{args.device}; OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']}")
    print(f"shape {args.shape}; {args.steps} steps of 16 instruct-mix samples (4 per micro-batch), seq length "
          f"{args.seq_length}; LoRA rank {args.rank}; {args.repeats} interleaved runs of each mode: median (range)\n")
    print("| stage 2 | step ms | CPU ms per step | peak memory | trainable parameters | optimizer state |")
    print("|---|---|---|---|---|---|")
    for mode in MODES:
        result = results[mode][0]
        peak = statistics.median(result["peak_bytes"] for result in results[mode])
        print(f"| {LABELS[mode].format(rank=args.rank)} | {spread(mode, 'step_ms')} | {spread(mode, 'cpu_ms')} | "
              f"{peak / 2**20:.0f} MiB | {result['trainable'] / 1e6:.2f} M | "
              f"{result['optimizer_state_bytes'] / 2**20:.1f} MiB |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
