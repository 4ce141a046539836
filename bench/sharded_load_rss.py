"""Per-rank peak memory when several ranks load one full state dict into a tensor-parallel model.

Each rank holds its 1/N shard of a Vicuna-7B-shaped GPT (hidden 4096, FFN 11008, 32 heads, vocabulary
32000; ``--layers`` of its 32 layers, bf16) and loads the same full (TP=1) file three ways:

* naive:       ``torch.load`` of the whole file, then slices copied from it (every rank holds a copy);
* mmap .pt:    ``load_full_state_dict(model, "full.pt")`` (memory-mapped; a rank touches only its slices);
* safetensors: ``load_full_state_dict(model, "full.safetensors")`` (``get_slice`` reads only its slices).

Reported per rank: the model's shard, the process's peak RSS (VmHWM) and, sampled every 5 ms, its peak
private (anonymous) and file-backed resident memory. File-backed pages are the shared page cache: N
ranks mapping one file hold one copy between them; private memory is each rank's own.

    python bench/sharded_load_rss.py --layers 8 --ranks 2 --dir /tmp/sharded_load [--write BENCHMARKS.md]
"""

from __future__ import annotations

import argparse
import datetime
import multiprocessing
import os
import platform
import re
import socket
import sys
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

VOCAB = 32000
SECTION = "## Sharded loading"
MODES = ("naive", "mmap .pt", "safetensors")


def _gpt(layers: int, tp: int):
    """The Vicuna-7B-shaped GPTModel shard for this rank, allocated but not initialised."""
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer import TransformerConfig

    config = TransformerConfig(
        num_layers=layers, hidden_size=4096, num_attention_heads=32, ffn_hidden_size=11008,
        normalization="RMSNorm", gated_linear_unit=True, activation_func=torch.nn.functional.silu,
        add_bias_linear=False, bf16=True, params_dtype=torch.bfloat16, use_cpu_initialization=True,
        perform_initialization=False, tensor_model_parallel_size=tp,
    )
    return GPTModel(config=config, transformer_layer_spec=get_gpt_layer_local_spec(normalization="RMSNorm"),
                    vocab_size=VOCAB, max_sequence_length=4096, position_embedding_type="rope",
                    share_embeddings_and_output_weights=False)


def _init_distributed(rank: int, world: int, port: int, tp: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    import mm_plugin  # noqa: F401  (device adaptation)
    from megatron.core import parallel_state

    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    parallel_state.initialize_model_parallel(tp, 1)


def _write_full_files(layers: int, pt_path: Path, safetensors_path: Path, port: int) -> None:
    """The full (TP=1) state dict with random bf16 values, as .pt and .safetensors (in its own process)."""
    from mm_plugin.safe_io import save_state

    _init_distributed(0, 1, port, 1)
    state = {k: v for k, v in _gpt(layers, 1).state_dict().items() if isinstance(v, torch.Tensor)}
    generator = torch.Generator().manual_seed(0)
    for tensor in state.values():
        tensor.normal_(0.0, 0.02, generator=generator)
    save_state(state, pt_path)
    save_state(state, safetensors_path)


class _MemorySampler(threading.Thread):
    """Peak anonymous and file-backed resident memory of this process, sampled from /proc/self/status."""

    def __init__(self, interval_s: float = 0.005):
        super().__init__(daemon=True)
        self.interval_s, self.peak = interval_s, {"RssAnon": 0, "RssFile": 0}
        self._stop_event = threading.Event()

    def run(self):
        while not self._stop_event.is_set():
            self.sample()
            time.sleep(self.interval_s)

    def sample(self):
        status = _proc_status()
        for field in self.peak:
            self.peak[field] = max(self.peak[field], status[field])

    def stop(self):
        self._stop_event.set()
        self.join()
        self.sample()


def _proc_status() -> dict[str, int]:
    """Memory fields of /proc/self/status, in bytes."""
    fields = {}
    with open("/proc/self/status") as status:
        for line in status:
            match = re.match(r"(\w+):\s+(\d+) kB", line)
            if match:
                fields[match.group(1)] = int(match.group(2)) * 1024
    return fields


def _rank(rank: int, world: int, port: int, mode: str, pt_path: str, safetensors_path: str, layers: int, queue):
    from mm_plugin.parallel import load_full_state_dict

    _init_distributed(rank, world, port, world)
    model = _gpt(layers, world)
    shard = sum(t.numel() * t.element_size() for t in model.state_dict().values() if isinstance(t, torch.Tensor))
    for tensor in model.parameters():  # touch the shard, so the baseline holds it
        tensor.data.zero_()
    baseline = _proc_status()["RssAnon"]
    sampler = _MemorySampler()
    sampler.start()
    start = time.perf_counter()
    if mode == "naive":
        source = torch.load(pt_path, map_location="cpu", weights_only=True)
    else:
        source = pt_path if mode == "mmap .pt" else safetensors_path
    load_full_state_dict(model, source, vocab_size=VOCAB)
    seconds = time.perf_counter() - start
    sampler.stop()
    torch.distributed.barrier()
    queue.put({"rank": rank, "mode": mode, "seconds": seconds, "shard": shard, "baseline": baseline,
               "peak_rss": _proc_status()["VmHWM"], "peak_anon": sampler.peak["RssAnon"],
               "peak_file": sampler.peak["RssFile"]})
    torch.distributed.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _run_ranks(world: int, mode: str, pt_path: Path, safetensors_path: Path, layers: int) -> list[dict]:
    context = multiprocessing.get_context("spawn")
    queue, port = context.Queue(), _free_port()
    processes = [context.Process(target=_rank, args=(rank, world, port, mode, str(pt_path), str(safetensors_path),
                                                      layers, queue)) for rank in range(world)]
    for process in processes:
        process.start()
    results = [queue.get() for _ in processes]
    for process in processes:
        process.join()
        if process.exitcode != 0:
            raise RuntimeError(f"a {mode} rank exited with {process.exitcode}")
    return sorted(results, key=lambda result: result["rank"])


def _gb(count: int) -> str:
    return f"{count / 2**30:.2f}"


def _section(args, file_bytes: int, results: list[dict]) -> str:
    command = (f"python bench/sharded_load_rss.py --layers {args.layers} --ranks {args.ranks} "
               f"--dir {args.dir}" + (" --write BENCHMARKS.md" if args.write else ""))
    lines = [
        SECTION, "",
        f"{args.ranks} ranks (tensor parallel {args.ranks}) each load one full {_gb(file_bytes)} GB state dict "
        f"(Vicuna-7B-shaped GPT, {args.layers} of 32 layers, bf16) into their shard with "
        "`mm_plugin.parallel.load_full_state_dict`. Memory in GB per rank; *private* is anonymous memory "
        "(each rank's own), *file* is mapped page cache (one copy shared by all ranks); peak RSS = "
        "VmHWM; *added private* = peak private minus the private memory after building (and touching) "
        "the shard, before loading: what loading itself costs each rank.",
        "",
        f"Measured {datetime.date.today()} on {platform.node() or 'this machine'}: {os.cpu_count()} CPU cores, "
        f"{_gb(os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES'))} GB RAM, torch {torch.__version__}, "
        f"megatron-core {_megatron_version()}. Command: `{command}`",
        "",
        "| source | rank | shard | peak RSS | peak private | added private | peak file | load s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for result in results:
        lines.append(f"| {result['mode']} | {result['rank']} | {_gb(result['shard'])} | {_gb(result['peak_rss'])} | "
                     f"{_gb(result['peak_anon'])} | {_gb(result['peak_anon'] - result['baseline'])} | "
                     f"{_gb(result['peak_file'])} | {result['seconds']:.1f} |")
    added = {mode: sum(r["peak_anon"] - r["baseline"] for r in results if r["mode"] == mode) for mode in MODES}
    lines += ["", "Private memory that loading added, all ranks together: " + ", ".join(
        f"{mode} {_gb(total)} GB" for mode, total in added.items()) + "."]
    return "\n".join(lines) + "\n"


def _megatron_version() -> str:
    from importlib.metadata import version

    return version("megatron-core")


def _write_section(path: Path, section: str) -> None:
    """Replace this benchmark's section of ``path`` (or add it), leaving the other sections as they are."""
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    pattern = re.compile(rf"^{re.escape(SECTION)}\n.*?(?=^## |\Z)", re.DOTALL | re.MULTILINE)
    if pattern.search(text):
        text = pattern.sub(lambda _: section + "\n", text, count=1).rstrip("\n") + "\n"
    else:
        text = text.rstrip("\n") + "\n\n" + section
    path.write_text(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=8, help="decoder layers of the 7B shape (32 = the whole 13.5 GB)")
    parser.add_argument("--ranks", type=int, default=2, help="ranks, all tensor parallel")
    parser.add_argument("--dir", type=Path, default=Path("/tmp/sharded_load_rss"), help="where the full files go")
    parser.add_argument("--write", type=Path, help="update this markdown file's section with the results")
    args = parser.parse_args()

    args.dir.mkdir(parents=True, exist_ok=True)
    pt_path = args.dir / f"full_{args.layers}_layers.pt"
    safetensors_path = pt_path.with_suffix(".safetensors")
    if not (pt_path.exists() and safetensors_path.exists()):
        print(f"writing {pt_path} and {safetensors_path} ...", flush=True)
        writer = multiprocessing.get_context("spawn").Process(
            target=_write_full_files, args=(args.layers, pt_path, safetensors_path, _free_port()))
        writer.start()
        writer.join()
        if writer.exitcode != 0:
            raise SystemExit(f"writing the full files failed (exit code {writer.exitcode})")
    results = []
    for mode in MODES:
        print(f"loading: {mode} ...", flush=True)
        results += _run_ranks(args.ranks, mode, pt_path, safetensors_path, args.layers)
    section = _section(args, pt_path.stat().st_size, results)
    print(section)
    if args.write:
        _write_section(args.write, section)


if __name__ == "__main__":
    main()
