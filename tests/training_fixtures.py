"""A tiny training setup shared by the training tests: synthetic data, fixed random part files, model.json.

Every part has a part file, so every parallel layout starts from the same weights; the vocabulary
(the synthetic tokenizer's) is not divisible by 2, so tensor parallelism exercises vocabulary padding.
All functions are module-level so the 2-process pool can call them.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from seeds import varied

IMAGE_SIZE = 56


def build_setup(root: Path) -> Path:
    """Data (pretrain + instruct), tokenizer and part files under ``root``; returns ``root``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from mm_plugin.data.synthetic import synthesize
    from mm_plugin.data.tokenization import load_tokenizer
    from mm_plugin.models.hf_keys import AttentionShape, to_ours
    from mm_plugin.safe_io import save_state
    from mm_plugin.training.demo import write_random_clip

    synthesize(root / "pretrain", 96, kind="pretrain", seed=varied(0), image_size=IMAGE_SIZE, workers=1)
    tokenizer = root / "pretrain" / "tokenizer"
    synthesize(root / "instruct", 96, kind="instruct", seed=varied(1), image_size=IMAGE_SIZE, tokenizer=tokenizer, workers=1)
    vocab = len(load_tokenizer(tokenizer))
    weights = root / "weights"
    write_random_clip(weights / "clip.pt", seed=varied(3))
    torch.manual_seed(varied(4))
    llama = LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, vocab_size=vocab,
                                         rms_norm_eps=1e-6, tie_word_embeddings=False)).state_dict()
    save_state(dict(to_ours("language", 2, AttentionShape(4, 2, 16), llama.__getitem__)), weights / "llm.pt")
    generator = torch.Generator().manual_seed(varied(5))
    projector = {"encoder.linear_fc1.weight": torch.randn(64, 64, generator=generator) * 0.05,
                 "encoder.linear_fc1.bias": torch.zeros(64),
                 "encoder.linear_fc2.weight": torch.randn(64, 64, generator=generator) * 0.05,
                 "encoder.linear_fc2.bias": torch.zeros(64)}
    save_state(projector, weights / "projector.pt")
    (root / "vocab.txt").write_text(str(vocab))
    return root


def model_json(root: Path, name: str, *, train_language: bool, projector_ckpt: str = "weights/projector.pt") -> Path:
    vocab = int((root / "vocab.txt").read_text())
    raw = {
        "model_id": "llava",
        "text_decoder": {"num_layers": 2, "hidden_size": 64, "num_attention_heads": 4, "num_query_groups": 2,
                         "ffn_hidden_size": 160, "language_vocab_size": vocab, "language_max_sequence_length": 128,
                         "layernorm_epsilon": 1e-6, "params_dtype": "fp32", "freeze": not train_language,
                         "ckpt_path": "weights/llm.pt"},
        "image_encoder": {
            "vision_encoder": {"model_id": "clip", "num_layers": 3, "select_layer": -2, "hidden_size": 64,
                               "num_attention_heads": 4, "ffn_hidden_size": 128, "patch_size": 14,
                               "image_size": IMAGE_SIZE, "freeze": True, "ckpt_path": "weights/clip.pt"},
            "vision_projector": {"model_id": "mlp", "input_size": 64, "hidden_size": 64, "ffn_hidden_size": 64,
                                 "freeze": False, "ckpt_path": projector_ckpt},
        },
        "text_encoder": None, "video_encoder": None,
    }
    path = root / name
    path.write_text(json.dumps(raw))
    return path


def argv(root: Path, *, model: str = "stage1.json", data: str = "pretrain", iterations: int = 6,
         micro_batch: int = 2, global_batch: int = 4, extra: tuple = ()) -> list[str]:
    return ["--mm-model", str(root / model), "--mm-data", str(root / data / "data.json"),
            "--micro-batch-size", str(micro_batch), "--global-batch-size", str(global_batch),
            "--seq-length", "96", "--lr", "2e-3", "--lr-warmup-iters", "1", "--train-iters", str(iterations),
            "--log-interval", "1000", "--num-workers", "0", "--clip-grad", "1.0", *extra]


def train(arguments: list[str], forward_step_wrapper=None, after=None):
    """Run the package's pretrain() in this process (a rank of the pool, or the test process) and
    return ``(losses, skipped iterations, {name: tensor} of the trained model)``; ``after`` is called with
    the trained (unwrapped) model first."""
    import mm_plugin  # noqa: F401
    from megatron.core.enums import ModelType

    from mm_plugin.config.model import load_model_config
    from mm_plugin.data.config import load_data_config
    from mm_plugin.training.arguments import parse_args
    from mm_plugin.training.loop import pretrain
    from mm_plugin.training.providers import bind

    args = parse_args(arguments)
    model_config = load_model_config(args.mm_model)
    providers = bind(args, model_config, load_data_config(args.mm_data))
    forward_step = providers.forward_step if forward_step_wrapper is None else forward_step_wrapper(
        providers.forward_step)
    result = pretrain(providers.datasets_provider, providers.model_provider, ModelType.encoder_or_decoder,
                      forward_step, args=args, stats=providers.stats,
                      settings=providers.settings)
    from mm_plugin.parallel.placement import unwrap

    if after is not None:
        after(unwrap(result.model))
    weights = {name: p.detach().clone() for name, p in unwrap(result.model).named_parameters()}
    return [loss for _, loss in result.losses], result.skipped_iterations, weights


class NaNFrom:
    """A forward_step wrapper whose loss turns NaN from the ``first``-th call on (picklable)."""

    def __init__(self, first: int):
        self.first = first

    def __call__(self, forward_step):
        calls = {"count": 0}

        def poisoned(data_iterator, model):
            output, loss_func = forward_step(data_iterator, model)
            calls["count"] += 1
            if calls["count"] >= self.first:
                output = output * float("nan")
            return output, loss_func

        return poisoned


def save_as_megatron_lm(root: Path, iteration: int, model, model_config) -> Path:
    """A checkpoint as Megatron-LM's pretrain() saves it through launch/pretrain.py: the same layout, every
    weight of the model, and Megatron-LM's bookkeeping, its argument Namespace (holding ``mm_model_config``:
    None saves one without it) in place of ours."""
    import argparse

    from megatron.core import dist_checkpointing

    from mm_plugin.checkpoint.reading import TRACKER, iteration_dir

    directory = iteration_dir(root, iteration)
    directory.mkdir(parents=True)
    args = argparse.Namespace(tensor_model_parallel_size=1, pipeline_model_parallel_size=1, bf16=True,
                              **({} if model_config is None else {"mm_model_config": model_config}))
    dist_checkpointing.save({"args": args, "checkpoint_version": 3.0, "iteration": iteration,
                             "model": model.sharded_state_dict()}, str(directory))
    (root / TRACKER).write_text(f"{iteration}\n")
    return directory
