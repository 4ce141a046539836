"""Peak memory and time of ``mm-convert`` on a synthetic multi-GB sharded checkpoint, beside the naive way.

Writes a Vicuna-7B-shaped LLaMA (hidden 4096, FFN 11008, 32 heads, vocabulary 32000, bf16; as many of its
32 layers as ``--size-gb`` allows) as a Hugging Face directory twice, sharded safetensors and sharded
``pytorch_model-*.bin``, then converts it in a fresh child process per run:

* mm-convert llm:   safetensors shards -> one .safetensors; safetensors shards -> .pt; .bin shards -> .pt
* naive:            load every shard, convert in memory (the same key table), ``torch.save`` (as the seed's
                    vicuna_converter.py does, without even building the model)
* mm-convert export-hf: that converted decoder (plus a small CLIP and projector) -> sharded safetensors

Reported per run: wall time of the conversion, the child's RSS after its imports, its peak RSS (VmHWM),
and the difference (what the conversion itself held at most). Inputs are read through the page cache,
which is not part of a process's RSS.

    python bench/convert_memory.py --dir /tmp/convert_bench --size-gb 6 [--write BENCHMARKS.md]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

SECTION = "## Conversion"
DESCRIPTION = """\
`mm-convert` against the naive way (load every shard, convert in memory with the same key table,
`torch.save`, as the seed's `vicuna_converter.py` does minus building the model) on a synthetic
Vicuna-7B-shaped LLaMA (hidden 4096, FFN 11008, 32 heads, vocabulary 32000, bf16, {layers} of its 32
layers), written as sharded safetensors and as sharded `pytorch_model-*.bin`. Each run is a fresh process;
*peak RSS* is its VmHWM, *after imports* its RSS before converting, *added* the difference (what the
conversion held at most). Inputs were just written, so they are read from the page cache (which is not
part of a process's RSS); the export run converts the first run's output (plus a small CLIP and projector)
back to Hugging Face shards of at most 2 GB. Times depend on the machine's other jobs and on how much of
the inputs the page cache still holds (two formats of inputs plus outputs exceed it here): the memory
figures repeat from run to run, the times only roughly."""
HIDDEN, FFN, HEADS, VOCAB = 4096, 11008, 32, 32000
GB = 1e9


def llama_config(layers: int) -> dict:
    return {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": HIDDEN,
            "intermediate_size": FFN, "num_hidden_layers": layers, "num_attention_heads": HEADS,
            "num_key_value_heads": HEADS, "vocab_size": VOCAB, "rms_norm_eps": 1e-5, "max_position_embeddings": 4096,
            "tie_word_embeddings": False, "torch_dtype": "bfloat16"}


def hf_tensors(layers: int):
    """(name, shape) of a LlamaForCausalLM, in the order Hugging Face shards it."""
    yield "model.embed_tokens.weight", (VOCAB, HIDDEN)
    for layer in range(layers):
        prefix = f"model.layers.{layer}."
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            yield f"{prefix}self_attn.{name}.weight", (HIDDEN, HIDDEN)
        yield f"{prefix}mlp.gate_proj.weight", (FFN, HIDDEN)
        yield f"{prefix}mlp.up_proj.weight", (FFN, HIDDEN)
        yield f"{prefix}mlp.down_proj.weight", (HIDDEN, FFN)
        yield f"{prefix}input_layernorm.weight", (HIDDEN,)
        yield f"{prefix}post_attention_layernorm.weight", (HIDDEN,)
    yield "model.norm.weight", (HIDDEN,)
    yield "lm_head.weight", (VOCAB, HIDDEN)


def write_inputs(root: Path, layers: int, shard_bytes: int) -> dict:
    """The same random weights as safetensors shards (``llama-st``) and .bin shards (``llama-bin``)."""
    from safetensors.torch import save_file

    st, pt = root / "llama-st", root / "llama-bin"
    for directory in (st, pt):
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "config.json").write_text(json.dumps(llama_config(layers)))
    generator = torch.Generator().manual_seed(0)
    groups, group, size = [], {}, 0
    for name, shape in hf_tensors(layers):
        group[name] = (torch.randn(shape, generator=generator) * 0.02).to(torch.bfloat16)
        size += group[name].numel() * 2
        if size >= shard_bytes:
            groups.append(group)
            group, size = {}, 0
    if group:
        groups.append(group)
    maps = {"st": {}, "pt": {}}
    for index, tensors in enumerate(groups, start=1):
        names = {"st": f"model-{index:05d}-of-{len(groups):05d}.safetensors",
                 "pt": f"pytorch_model-{index:05d}-of-{len(groups):05d}.bin"}
        save_file(tensors, str(st / names["st"]), metadata={"format": "pt"})
        torch.save(tensors, pt / names["pt"])
        for kind in maps:
            maps[kind].update(dict.fromkeys(tensors, names[kind]))
        groups[index - 1] = None  # drop each shard's tensors once written
    (st / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": maps["st"]}))
    (pt / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": maps["pt"]}))
    largest = max(max(f.stat().st_size for f in st.glob("*.safetensors")), max(f.stat().st_size for f in pt.glob("*.bin")))
    total = sum(f.stat().st_size for f in st.glob("*.safetensors"))
    return {"shards": len(groups), "largest_shard": largest, "total": total}


def write_small_parts(root: Path, language_part: Path, layers: int) -> Path:
    """A model.json with a 2-layer 64-wide CLIP, a projector and the converted decoder, plus the
    hf_config.json ``llava-hf`` would have kept, for the export run."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig as HfLlavaConfig

    from mm_plugin.config.model import (LanguageModelConfig, LlavaConfig, ProjectorConfig, VisionEncoderConfig,
                                        to_mindspeed_json)
    from mm_plugin.models.hf_keys import part_dims, part_keys
    from mm_plugin.safe_io import save_state

    directory = root / "parts"
    directory.mkdir(exist_ok=True)
    config = LlavaConfig(
        vision=VisionEncoderConfig(num_layers=2, select_layer=-2, hidden_size=64, num_attention_heads=2,
                                   ffn_hidden_size=128, image_size=28, patch_size=14),
        projector=ProjectorConfig(ffn_hidden_size=HIDDEN),
        language=LanguageModelConfig(num_layers=layers, hidden_size=HIDDEN, num_attention_heads=HEADS,
                                     num_query_groups=HEADS, ffn_hidden_size=FFN, kv_channels=HIDDEN // HEADS,
                                     vocab_size=VOCAB, layernorm_epsilon=1e-5, params_dtype="bf16"),
    ).validate()
    for part, name in (("vision", "converted_clip.pt"), ("projector", "mlp.pt")):
        dims = part_dims(config, part)
        save_state({rule.ours: torch.randn(rule.shape(dims)).to(torch.bfloat16)
                    for rule in part_keys(part, dims.num_layers, "megatron")}, directory / name)
    shutil.copy(language_part, directory / "converted_vicuna.safetensors")
    config.vision.ckpt_path, config.projector.ckpt_path = "converted_clip.pt", "mlp.pt"
    config.language.ckpt_path = "converted_vicuna.safetensors"
    (directory / "model.json").write_text(json.dumps(to_mindspeed_json(config)))
    hf = HfLlavaConfig(
        vision_config=CLIPVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                       num_attention_heads=2, image_size=28, patch_size=14),
        text_config=LlamaConfig(**{k: v for k, v in llama_config(layers).items() if k not in ("model_type", "architectures")}),
        image_token_index=VOCAB - 1, vision_feature_layer=-2, image_seq_length=4)
    (directory / "hf_config.json").write_text(hf.to_json_string())
    return directory


def child(run: str, source: str, output: str) -> None:
    """One conversion in this (fresh) process; prints its measurements as JSON."""
    import mm_plugin  # noqa: F401
    from mm_plugin.convert import convert_llm, export_hf

    baseline = _status("VmRSS")
    started = time.perf_counter()
    if run.startswith("mm-convert llm"):
        convert_llm(source, output, progress=False)
    elif run.startswith("mm-convert export-hf"):
        export_hf(source, output, max_shard_size="2GB", progress=False)
    else:
        naive(Path(source), Path(output))
    seconds = time.perf_counter() - started
    print(json.dumps({"seconds": seconds, "baseline": baseline, "peak": _status("VmHWM")}))


def naive(directory: Path, output: Path) -> None:
    """Load everything, convert, torch.save."""
    from safetensors.torch import load_file

    from mm_plugin.models.hf_keys import AttentionShape, to_ours

    state = {}
    for shard in sorted(directory.glob("*.safetensors")) + sorted(directory.glob("*.bin")):
        state.update(load_file(str(shard)) if shard.suffix == ".safetensors" else torch.load(shard, weights_only=True))
    layers = json.loads((directory / "config.json").read_text())["num_hidden_layers"]
    shape = AttentionShape(HEADS, HEADS, HIDDEN // HEADS)
    torch.save(dict(to_ours("language", layers, shape, state.__getitem__)), output)


def _status(field: str) -> int:
    """A /proc/self/status memory figure in bytes. VmHWM (peak RSS) is per address space, so it starts afresh
    at exec; getrusage's ru_maxrss would carry over the parent's peak."""
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) * 1024 for line in status if line.startswith(field + ":"))


def measure(run: str, source: Path, output: Path) -> dict:
    result = subprocess.run([sys.executable, __file__, "--child", run, str(source), str(output)],
                            capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "2"})
    if result.returncode:
        raise SystemExit(f"{run} failed:\n{result.stderr}")
    written = sum(f.stat().st_size for f in output.rglob("*") if f.is_file()) if output.is_dir() else output.stat().st_size
    return {"run": run, **json.loads(result.stdout.strip().splitlines()[-1]), "written": written}


def table(results: list[dict], facts: dict) -> str:
    lines = ["| run | output | time s | RSS after imports GB | peak RSS GB | added GB |",
             "|---|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r['run']} | {r['written'] / GB:.2f} GB | {r['seconds']:.1f} | {r['baseline'] / GB:.2f} | "
                     f"{r['peak'] / GB:.2f} | {(r['peak'] - r['baseline']) / GB:.2f} |")
    bound = 1.5 * facts["largest_shard"]
    lines.append("")
    lines.append(f"Largest input shard {facts['largest_shard'] / GB:.2f} GB (1.5x: {bound / GB:.2f} GB); input "
                 f"{facts['total'] / GB:.2f} GB in {facts['shards']} shards per format.")
    return "\n".join(lines)


def write_section(path: Path, text: str) -> None:
    content = path.read_text() if path.exists() else "# Benchmarks\n"
    start = content.find(SECTION)
    if start < 0:
        content = content.rstrip("\n") + "\n\n" + text + "\n"
    else:
        end = content.find("\n## ", start + len(SECTION))
        content = content[:start] + text + ("\n" + content[end + 1:] if end >= 0 else "\n")
    path.write_text(content)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dir", type=Path, default=Path("/tmp/convert_bench"))
    parser.add_argument("--size-gb", type=float, default=6.0, help="input size per format (capped by free disk)")
    parser.add_argument("--shard-gb", type=float, default=2.0)
    parser.add_argument("--write", type=Path, help="replace the '## Conversion' section of this markdown file")
    parser.add_argument("--child", nargs=3, metavar=("RUN", "SOURCE", "OUTPUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(*args.child)

    args.dir.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(args.dir).free
    size = min(args.size_gb * GB, free / 5)  # two input formats, two outputs at a time, and room to spare
    layers = max(1, min(32, int((size - 2 * VOCAB * HIDDEN * 2) // (2 * (4 * HIDDEN * HIDDEN + 3 * HIDDEN * FFN)))))
    print(f"writing a {layers}-layer Vicuna-7B-shaped model (bf16) to {args.dir} ...", flush=True)
    facts = write_inputs(args.dir, layers, int(args.shard_gb * GB))
    out = args.dir / "out"
    out.mkdir(exist_ok=True)
    runs = [("mm-convert llm: safetensors shards -> .safetensors", args.dir / "llama-st", out / "llm.safetensors"),
            ("mm-convert llm: safetensors shards -> .pt", args.dir / "llama-st", out / "llm.pt"),
            ("mm-convert llm: .bin shards -> .pt", args.dir / "llama-bin", out / "llm-bin.pt"),
            ("naive: safetensors shards -> .pt", args.dir / "llama-st", out / "naive.pt"),
            ("naive: .bin shards -> .pt", args.dir / "llama-bin", out / "naive-bin.pt")]
    results = []
    for run, source, output in runs:
        results.append(measure(run, source, output))
        print(results[-1], flush=True)
        if output.name != "llm.safetensors":
            output.unlink()
    parts = write_small_parts(args.dir, out / "llm.safetensors", layers)
    results.append(measure("mm-convert export-hf: parts -> 2 GB safetensors shards", parts, out / "llava-hf"))
    print(results[-1], flush=True)

    cpu = f"{os.cpu_count()} CPU cores"
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    command = (f"python bench/convert_memory.py --dir {args.dir} --size-gb {args.size_gb:g} --shard-gb {args.shard_gb:g}"
               + (f" --write {args.write}" if args.write else ""))
    text = (f"{SECTION}\n\n{DESCRIPTION.format(layers=layers)}\n\n"
            f"Measured {datetime.date.today()} on {platform.node()}: {cpu}, {memory:.1f} GiB RAM, "
            f"torch {torch.__version__}, Python {platform.python_version()}. Command: `{command}`\n\n"
            f"{table(results, facts)}\n")
    print(text)
    if args.write:
        write_section(args.write, text)
    shutil.rmtree(args.dir)


if __name__ == "__main__":
    main()
