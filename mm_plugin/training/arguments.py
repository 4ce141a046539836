"""Megatron-style command-line arguments of the pretraining loop.

The flags and their meaning are Megatron-LM's (``--tensor-model-parallel-size``, ``--micro-batch-size``,
``--lr``, ``--save``...), plus ``--mm-model``/``--mm-data``. Every flag MindSpeed-MM's published
``pretrain_llava1_5.sh`` passes is accepted; those without effect here are listed in ``NO_EFFECT``
and logged once, never silently dropped. Checks that need no model (batch arithmetic, paths) run
before anything is built.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import math
from typing import Callable, Optional, Sequence

from mm_plugin.parallel.world import DEFAULT_TIMEOUT_MINUTES

logger = logging.getLogger(__name__)

# Flag -> why it changes nothing in this package (logged once when given).
NO_EFFECT = {
    "tokenizer_type": "the tokenizer is data.json's tokenizer_config.from_pretrained",
    "no_masked_softmax_fusion": "core attention is SDPA or megatron's unfused local attention",
    "no_gradient_accumulation_fusion": "gradient-accumulation fusion is off (it needs apex/TransformerEngine)",
    "use_fused_rotary_pos_emb": "the RoPE fusion needs TransformerEngine; the unfused RoPE is exact",
    "use_flash_attn": "core attention is chosen by model.json attention_backend (SDPA uses flash kernels on GPU)",
    "mm_tool": "MindSpeed-MM's tool config (profiling, memory snapshots) has no counterpart here",
    "ckpt_format": "checkpoints are always megatron dist_checkpointing (torch_dist), reshardable across TP/PP/DP",
    "distributed_backend": "the backend follows the device: nccl on CUDA, hccl on NPU, gloo on CPU",
    "eval_iters": "validation runs the --eval-batches micro-batches of the held-out set",
    "no_load_rng_state_on_resume": "see --no-load-rng",
}


# Megatron flags that restate model.json's text_decoder: (model.json field, how to read it from our config).
ARCHITECTURE_FLAGS = {
    "--num-layers": "num_layers", "--hidden-size": "hidden_size", "--num-attention-heads": "num_attention_heads",
    "--max-position-embeddings": "max_sequence_length", "--vocab-size": "vocab_size",
    "--attention-dropout": "attention_dropout", "--hidden-dropout": "hidden_dropout",
}


class ArgumentError(ValueError):
    """An argument combination that cannot run; raised before any compute."""


def _integer(low: int) -> Callable[[str], int]:
    """An argparse type: a whole number of at least ``low`` (argparse names the flag in its error)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be at least {low}, got {value}")
        return value

    return parse


def _real(low: float = 0.0, high: float = math.inf, high_open: bool = False) -> Callable[[str], float]:
    """An argparse type: a finite number in ``[low, high]`` (``[low, high)`` with ``high_open``)."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not math.isfinite(value) or value < low or value > high or (high_open and value == high):
            bound = f"below {high:g}" if high_open else (f"at most {high:g}" if math.isfinite(high) else "finite")
            raise argparse.ArgumentTypeError(f"must be at least {low:g} and {bound}, got {text}")
        return value

    return parse


POSITIVE, NON_NEGATIVE, FRACTION = _integer(1), _integer(0), _real(0.0, 1.0)


def build_parser(extra_args_provider: Optional[Callable] = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="LLaVA-1.5 pretraining on megatron-core (Megatron-LM compatible flags)",
        allow_abbrev=False,
    )
    mm = parser.add_argument_group("multimodal")
    mm.add_argument("--mm-model", required=True, help="model.json (MindSpeed-MM layout) or a preset name")
    mm.add_argument("--mm-data", required=True, help="data.json (MindSpeed-MM layout)")
    mm.add_argument("--mm-tool", default=None, help="accepted for MindSpeed-MM scripts; no effect")

    parallel = parser.add_argument_group("parallelism")
    parallel.add_argument("--tensor-model-parallel-size", type=POSITIVE, default=1)
    parallel.add_argument("--pipeline-model-parallel-size", type=POSITIVE, default=1)
    parallel.add_argument("--context-parallel-size", type=POSITIVE, default=1)
    parallel.add_argument("--sequence-parallel", action="store_true")
    parallel.add_argument("--use-distributed-optimizer", action="store_true")
    parallel.add_argument("--overlap-grad-reduce", action="store_true")
    parallel.add_argument("--distributed-backend", default=None)
    parallel.add_argument("--distributed-timeout-minutes", type=POSITIVE, default=DEFAULT_TIMEOUT_MINUTES,
                          help="how long every rank waits for one that stopped answering before the job ends "
                               f"(default {DEFAULT_TIMEOUT_MINUTES}; raise it for slow checkpoint file systems)")

    batch = parser.add_argument_group("batches and length")
    batch.add_argument("--micro-batch-size", type=POSITIVE, required=True)
    batch.add_argument("--global-batch-size", type=POSITIVE, default=None,
                       help="default: micro-batch size x data-parallel size")
    batch.add_argument("--seq-length", type=POSITIVE, required=True,
                       help="decoder length, each image counted as its image tokens (model_max_length)")
    batch.add_argument("--sequence-packing", action="store_true",
                       help="pack each step's samples into rows of --seq-length positions, images expanded; "
                            "samples never attend to each other (also data.json dataloader_param."
                            "sequence_packing); turns on --calculate-per-token-loss")
    batch.add_argument("--calculate-per-token-loss", action="store_true",
                       help="normalise the loss by the trained tokens of the whole global batch (megatron-core); "
                            "default: each micro-batch's mean, as original LLaVA")
    batch.add_argument("--train-iters", type=POSITIVE, default=None)
    batch.add_argument("--train-samples", type=POSITIVE, default=None)
    batch.add_argument("--num-workers", type=NON_NEGATIVE, default=2)
    batch.add_argument("--seed", type=int, default=1234)
    batch.add_argument("--position-embedding-type", default="rope", choices=["rope"])
    batch.add_argument("--tokenizer-type", default=None)

    architecture = parser.add_argument_group(
        "architecture (model.json defines it; these older MindSpeed-MM script flags must agree with it)")
    for flag in ARCHITECTURE_FLAGS:
        architecture.add_argument(flag, type=float if "dropout" in flag else int, default=None)

    optim = parser.add_argument_group("optimizer and schedule")
    optim.add_argument("--optimizer", default="adam", choices=["adam", "sgd"])
    optim.add_argument("--lr", type=_real(), required=True)
    optim.add_argument("--min-lr", type=_real(), default=0.0)
    optim.add_argument("--lr-decay-style", default="cosine", choices=["constant", "linear", "cosine"])
    optim.add_argument("--lr-warmup-fraction", type=FRACTION, default=None)
    optim.add_argument("--lr-warmup-iters", type=NON_NEGATIVE, default=0)
    optim.add_argument("--lr-decay-iters", type=POSITIVE, default=None)
    optim.add_argument("--weight-decay", type=_real(), default=0.0)
    optim.add_argument("--mm-projector-lr", type=_real(), default=None,
                       help="the projector's peak learning rate (original LLaVA's mm_projector_lr; default --lr), "
                            "its minimum scaled alike")

    lora = parser.add_argument_group("LoRA (model.json text_decoder.lora; these override or create it)")
    lora.add_argument("--lora-rank", type=POSITIVE, default=None)
    lora.add_argument("--lora-alpha", type=_real(), default=None)
    lora.add_argument("--lora-dropout", type=_real(0.0, 1.0, high_open=True), default=None)
    lora.add_argument("--lora-targets", nargs="+", default=None,
                      help="of linear_qkv linear_proj linear_fc1 linear_fc2 (the decoder layers' linears, the default) "
                           "and output_layer (PEFT's lm_head)")
    optim.add_argument("--clip-grad", type=_real(), default=1.0, help="0 turns clipping off")
    optim.add_argument("--adam-beta1", type=_real(0.0, 1.0, high_open=True), default=0.9)
    optim.add_argument("--adam-beta2", type=_real(0.0, 1.0, high_open=True), default=0.999)
    optim.add_argument("--adam-eps", type=_real(), default=1e-8)

    precision = parser.add_argument_group("precision")
    precision.add_argument("--bf16", action="store_true")
    precision.add_argument("--fp16", action="store_true")
    precision.add_argument("--initial-loss-scale", type=_real(1.0), default=2.0 ** 16)
    precision.add_argument("--min-loss-scale", type=_real(1.0), default=1.0)
    precision.add_argument("--loss-scale-window", type=POSITIVE, default=1000)
    precision.add_argument("--hysteresis", type=POSITIVE, default=2)
    precision.add_argument("--loss-scale", type=_real(1.0), default=None, help="a static loss scale (fp16)")

    recompute = parser.add_argument_group("activation recompute")
    recompute.add_argument("--recompute-granularity", default=None, choices=["full", "selective"])
    recompute.add_argument("--recompute-method", default=None, choices=["uniform", "block"])
    recompute.add_argument("--recompute-num-layers", type=POSITIVE, default=None)

    checkpoint = parser.add_argument_group("checkpoints")
    checkpoint.add_argument("--save", default=None)
    checkpoint.add_argument("--load", default=None)
    checkpoint.add_argument("--save-interval", type=POSITIVE, default=None)
    checkpoint.add_argument("--save-frozen", action="store_true",
                            help="also save frozen weights (default: only the trainable ones)")
    checkpoint.add_argument("--no-save-optim", action="store_true")
    checkpoint.add_argument("--no-save-rng", action="store_true")
    checkpoint.add_argument("--no-load-optim", action="store_true")
    checkpoint.add_argument("--no-load-rng", action="store_true")
    checkpoint.add_argument("--finetune", action="store_true",
                            help="load only the model weights and start at iteration 0")
    checkpoint.add_argument("--ckpt-format", default=None)
    checkpoint.add_argument("--exit-interval", type=POSITIVE, default=None, help="stop after this iteration")

    logging_group = parser.add_argument_group("logging")
    logging_group.add_argument("--log-interval", type=POSITIVE, default=10)
    logging_group.add_argument("--tensorboard-dir", default=None, help="default: <save>/tensorboard")
    logging_group.add_argument("--eval-interval", type=POSITIVE, default=None)
    logging_group.add_argument("--eval-iters", type=int, default=None)
    logging_group.add_argument("--eval-batches", type=NON_NEGATIVE, default=10)
    logging_group.add_argument("--peak-tflops", type=_real(), default=None,
                               help="peak dense TFLOP/s of one device for MFU (default: known GPUs)")

    faults = parser.add_argument_group("numerical faults")
    faults.add_argument("--max-skipped-iterations", type=POSITIVE, default=10,
                        help="stop after this many iterations in a row skipped for a NaN/Inf loss or gradient")

    ignored = parser.add_argument_group("accepted from MindSpeed-MM scripts without effect here")
    for flag in ("--no-masked-softmax-fusion", "--no-gradient-accumulation-fusion", "--use-fused-rotary-pos-emb",
                 "--use-flash-attn", "--no-load-rng-state-on-resume"):
        ignored.add_argument(flag, action="store_true")

    if extra_args_provider is not None:
        parser = extra_args_provider(parser)
    return parser


def parse_args(argv: Optional[Sequence[str]] = None, extra_args_provider: Optional[Callable] = None,
               defaults: Optional[dict] = None, allow_unknown: bool = False) -> argparse.Namespace:
    """``allow_unknown``: leave flags this parser does not know to another one (Megatron-LM's own parser
    reads the whole command line when its stock pretrain() runs)."""
    parser = build_parser(extra_args_provider)
    if defaults:
        parser.set_defaults(**defaults)
    args = parser.parse_known_args(argv)[0] if allow_unknown else parser.parse_args(argv)
    for name, reason in NO_EFFECT.items():
        if getattr(args, name, None) not in (None, False):
            logger.info("--%s: accepted without effect here: %s", name.replace("_", "-"), reason)
    return args


@dataclasses.dataclass(frozen=True)
class RunSettings:
    """What validation decides from the flags, which themselves stay as parsed."""

    data_parallel_size: int
    global_batch_size: int
    """Samples per step: ``--global-batch-size``, else micro-batch size x data-parallel size."""
    num_microbatches: int
    """Micro-batches per step and rank (a packed step has as many as its rows need)."""
    train_iters: int
    """``--train-iters``, or ``--train-samples`` in whole steps."""
    sequence_packing: bool
    """``--sequence-packing`` or data.json's ``sequence_packing``."""
    per_token_loss: bool
    """``--calculate-per-token-loss``, which packing turns on."""


def validate(args: argparse.Namespace, world_size: int, *, packing_in_data: bool = False) -> RunSettings:
    """Batch arithmetic and flag combinations, checked before any model is built; ``packing_in_data``: data.json
    asks for sequence packing."""
    model_parallel = args.tensor_model_parallel_size * args.pipeline_model_parallel_size
    if world_size % model_parallel:
        raise ArgumentError(
            f"{world_size} processes cannot be split into tensor-parallel {args.tensor_model_parallel_size} x "
            f"pipeline-parallel {args.pipeline_model_parallel_size} groups"
        )
    data_parallel = world_size // model_parallel
    per_step = args.micro_batch_size * data_parallel
    global_batch = args.global_batch_size if args.global_batch_size is not None else per_step
    if global_batch % per_step:
        raise ArgumentError(
            f"--global-batch-size {global_batch} is not divisible by --micro-batch-size "
            f"{args.micro_batch_size} x data-parallel size {data_parallel} = {per_step}"
        )
    if args.context_parallel_size != 1:
        raise ArgumentError("--context-parallel-size > 1 is not supported (LLaVA-1.5 sequences are short)")
    if args.sequence_parallel:
        raise ArgumentError("--sequence-parallel is not supported: image features are injected per position")
    if args.bf16 and args.fp16:
        raise ArgumentError("--bf16 and --fp16 exclude each other")
    if (args.train_iters is None) == (args.train_samples is None):
        raise ArgumentError("give exactly one of --train-iters and --train-samples")
    train_iters = args.train_iters if args.train_samples is None else -(-args.train_samples // global_batch)
    if args.save_interval and not args.save:
        raise ArgumentError("--save-interval needs --save DIR")
    decay = args.lr_decay_iters or train_iters
    warmup = int(args.lr_warmup_fraction * decay) if args.lr_warmup_fraction is not None else args.lr_warmup_iters
    if warmup >= decay:  # megatron-core's scheduler asserts it
        raise ArgumentError(f"the learning-rate warm-up ({warmup} iterations, --lr-warmup-iters or "
                            f"--lr-warmup-fraction) must be shorter than its decay ({decay} iterations, "
                            "--lr-decay-iters, else --train-iters)")
    if args.min_lr > args.lr:
        raise ArgumentError(f"--min-lr {args.min_lr:g} is above --lr {args.lr:g}")
    packing = args.sequence_packing or packing_in_data
    if packing_in_data and not args.sequence_packing:
        logger.info("%s: sequence_packing is on (dataloader_param)", args.mm_data)
    if packing and not args.calculate_per_token_loss:
        logger.info("sequence packing: the loss is normalised per trained token over the global batch "
                    "(--calculate-per-token-loss), so that packing changes no number")
    return RunSettings(data_parallel_size=data_parallel, global_batch_size=global_batch,
                       num_microbatches=global_batch // per_step, train_iters=train_iters, sequence_packing=packing,
                       per_token_loss=args.calculate_per_token_loss or packing)
