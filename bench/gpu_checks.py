"""The checks a lent GPU machine should run, in one script (tried on the CPU first with ``--shape tiny``).

    # on the GPU machine, megatron-core carried as a wheel (see the facts note, "On the lent GPU machine"):
    python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl
    PYTHONPATH=/tmp/site:. python3 bench/gpu_checks.py --device cuda --out "$OUT"
    # here, as a dry run:
    PYTHONPATH=. python bench/gpu_checks.py --device cpu --shape tiny --out /tmp/gpu_checks

1. **bf16 + SDPA parity**: our model against Hugging Face's ``LlavaForConditionalGeneration`` on the same
   random weights in bf16 (logits' relative error, greedy next tokens), with the forward and a backward
   forced onto the flash-attention kernel on CUDA (``sdpa_kernel(FLASH_ATTENTION)`` raises where it cannot).
2. **Stage-1 training step throughput**: the projector trains, CLIP and the language model are frozen;
   samples/s and TFLOP/s per device at micro-batch ``--micro-batch`` and LLaVA-1.5's sequence layout
   (576 image tokens + ``--text-tokens``), with the FLOP count of ``mm_plugin/training/flops.py``.
3. **Inference speed** against Hugging Face ``generate``: ``bench/inference_speed.py`` with the same shape.

Results go to ``OUT/gpu_checks.json`` and the inference benchmark's JSON beside it.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

SHAPES = {
    "tiny": dict(vision=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4),
                 text=dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=4)),
    "7b": dict(vision=dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16),
               text=dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                         num_key_value_heads=32)),
}
IMAGE_TOKEN, VOCAB = 32000, 32064


def build(shape: str, device: str, dtype: torch.dtype):
    """A random Hugging Face LLaVA of this shape and our model with the same weights, both on ``device``."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    from mm_plugin.config.model import from_hf_config
    from mm_plugin.models.hf_keys import llava_hf_to_ours
    from mm_plugin.models.llava import LlavaModel
    from mm_plugin.models.loading import select_built_vision_layers
    from mm_plugin.parallel import load_full_state_dict

    spec = SHAPES[shape]
    hf_config = LlavaConfig(
        vision_config=CLIPVisionConfig(**spec["vision"], image_size=336, patch_size=14),
        text_config=LlamaConfig(**spec["text"], vocab_size=VOCAB, max_position_embeddings=4096, rms_norm_eps=1e-5,
                                tie_word_embeddings=False),
        image_token_index=IMAGE_TOKEN, vision_feature_layer=-2, image_seq_length=576)
    torch.manual_seed(0)
    hf = LlavaForConditionalGeneration(hf_config).to(device=device, dtype=dtype).eval()
    config = from_hf_config(hf.config)
    config.attention_backend = "sdpa"
    for part in (config.vision, config.projector, config.language):
        part.params_dtype = {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, "fp32")
    config.language.max_sequence_length = 4096
    ours = LlavaModel(config, extra={"perform_initialization": False}).to(device)
    state = llava_hf_to_ours(hf.state_dict(), config)
    vision = {k[len("vision_model."):]: v for k, v in state.items() if k.startswith("vision_model.")}
    state = {k: v for k, v in state.items() if not k.startswith("vision_model.")}
    state.update({"vision_model." + k: v for k, v in select_built_vision_layers(vision, config, "hf").items()})
    load_full_state_dict(ours, state, vocab_size=VOCAB)
    return hf, ours.eval(), config


def inputs(batch: int, text_tokens: int, device: str, dtype: torch.dtype):
    generator = torch.Generator().manual_seed(1)
    text = torch.randint(2, IMAGE_TOKEN, (batch, text_tokens), generator=generator)
    ours = torch.cat([torch.ones(batch, 1, dtype=torch.long), torch.full((batch, 1), -200), text], dim=1)
    theirs = torch.cat([torch.ones(batch, 1, dtype=torch.long), torch.full((batch, 576), IMAGE_TOKEN), text], dim=1)
    images = torch.randn(batch, 3, 336, 336, generator=generator).to(device=device, dtype=dtype)
    return ours.to(device), theirs.to(device), images


def flash_only(device: str):
    if device != "cuda":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel(SDPBackend.FLASH_ATTENTION)


def parity(hf, ours, device: str, dtype: torch.dtype, text_tokens: int) -> dict:
    ids, hf_ids, images = inputs(2, text_tokens, device, dtype)
    counts = torch.ones(2, dtype=torch.long, device=device)
    with torch.no_grad():
        reference = hf(input_ids=hf_ids, pixel_values=images).logits.float()
    with torch.no_grad(), flash_only(device):
        logits, _ = ours(ids, None, images, counts)
    logits = logits[..., :VOCAB].float()
    error = ((logits - reference).norm() / reference.norm()).item()
    agree = (logits.argmax(-1) == reference.argmax(-1)).float().mean().item()
    ours.vision_projection.requires_grad_(True)
    labels = ids.masked_fill(ids < 0, -100)
    with flash_only(device):  # the backward through SDPA, on the flash kernel too
        loss, mask = ours(ids, labels, images, counts)
        ((loss * mask).sum() / mask.sum()).backward()
    return {"relative_logit_error": error, "argmax_agreement": agree,
            "projector_grad_norm": ours.vision_projection.encoder.linear_fc1.weight.grad.norm().item(),
            "flash_kernel_forced": device == "cuda"}


def training_throughput(ours, config, device: str, dtype: torch.dtype, micro_batch: int, text_tokens: int,
                        steps: int) -> dict:
    from mm_plugin.training.flops import training_flops

    ours.train()
    parameters = [p for p in ours.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=1e-3)
    ids, _, images = inputs(micro_batch, text_tokens, device, dtype)
    labels = ids.masked_fill(ids < 0, -100)
    counts = torch.ones(micro_batch, dtype=torch.long, device=device)
    times = []
    for step in range(steps + 2):
        start = time.perf_counter()
        with flash_only(device):
            loss, mask = ours(ids, labels, images, counts)
            ((loss * mask).sum() / mask.sum()).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()
        if step >= 2:  # warm-up steps excluded
            times.append(time.perf_counter() - start)
    seconds = sum(times) / len(times)
    positions = micro_batch * (576 + 1 + text_tokens)
    flops = training_flops(config, samples=micro_batch, positions=positions, images=micro_batch)
    return {"micro_batch": micro_batch, "step_s": seconds, "samples_per_s": micro_batch / seconds,
            "tflops_per_device": flops / seconds / 1e12,
            "peak_memory_gb": torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--shape", choices=SHAPES, default="7b")
    parser.add_argument("--micro-batch", type=int, default=16)
    parser.add_argument("--text-tokens", type=int, default=64)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)

    import mm_plugin  # noqa: F401  (patches)
    from mm_plugin.parallel.world import join_world, set_model_parallel

    join_world()
    set_model_parallel(1, 1)
    dtype = torch.bfloat16
    args.out.mkdir(parents=True, exist_ok=True)
    results = {"device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu", "shape": args.shape,
               "torch": torch.__version__}
    hf, ours, config = build(args.shape, args.device, dtype)
    results["parity_bf16"] = parity(hf, ours, args.device, dtype, args.text_tokens)
    del hf
    results["stage1_training"] = training_throughput(ours, config, args.device, dtype, args.micro_batch,
                                                     args.text_tokens, args.steps)
    del ours
    (args.out / "gpu_checks.json").write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2), flush=True)
    speed = [sys.executable, str(Path(__file__).with_name("inference_speed.py")), "--device", args.device,
             "--dtype", "bf16", "--batch", "1", "8", "--output", str(args.out / "inference_speed.json"),
             "--shape", "7b" if args.shape == "7b" else "cpu-small"]
    return subprocess.run(speed, check=False).returncode


if __name__ == "__main__":
    sys.exit(main())
