"""The three functions of Megatron-LM's ``pretrain()`` contract, for LLaVA-1.5.

    model_provider(pre_process, post_process)            -> LlavaModel (one pipeline stage)
    forward_step(data_iterator, model)                   -> (output, partial(loss_func, loss_mask))
    train_valid_test_datasets_provider(num_samples)      -> (train, valid, test) micro-batch iterators

They take the run's settings as keyword arguments; :func:`bind` fixes those with ``functools.partial``
so the results have exactly Megatron's signatures (no global ``get_args()``), and both Megatron-LM's
stock ``pretrain`` and ours (``mm_plugin.training.loop.pretrain``) can call them.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import functools
import logging
from typing import Any, Iterator, Optional

import torch
from megatron.core import parallel_state

from mm_plugin import device
from mm_plugin.config.model import LlavaConfig, lora_config
from mm_plugin.config.names import IMAGE_TOKEN_INDEX, PARTS
from mm_plugin.models.llava import LlavaModel
from mm_plugin.parallel.placement import unwrap
from mm_plugin.parallel.world import world_size
from mm_plugin.training.arguments import RunSettings, validate

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class BatchStats:
    """What forward_step saw since the last log line (summed over data-parallel ranks by the loop)."""

    samples: int = 0
    positions: int = 0
    images: int = 0
    bad_counts: Optional[torch.Tensor] = None

    def add(self, batch: dict, positions: int) -> None:
        self.samples += len(batch["sample_ids"])
        self.positions += positions
        self.images += int(batch["image_counts"].sum())
        counts = batch["bad_counts"].clone()
        self.bad_counts = counts if self.bad_counts is None else self.bad_counts + counts

    def reset(self) -> None:
        self.samples = self.positions = self.images = 0
        self.bad_counts = None


def run_dtype(args: argparse.Namespace) -> str:
    return "bf16" if args.bf16 else "fp16" if args.fp16 else "fp32"


def model_provider(pre_process: bool = True, post_process: bool = True, vp_stage: Optional[int] = None,
                   config=None, pg_collection=None, *, model_config: LlavaConfig, args: argparse.Namespace,
                   settings: RunSettings, text_only: bool = False) -> LlavaModel:
    """One pipeline stage of the model, in the run's dtype, with its part files loaded.

    ``text_only``: the data has no images (template ``lm``), so the vision parts' weights do not matter.
    ``config`` and ``pg_collection`` are what Megatron-LM 0.16's ``get_model`` passes: model.json defines
    the model (not a TransformerConfig built from flags), and the model uses megatron's global process
    groups, which are the collection Megatron-LM passes unless a caller builds its own.
    """
    from mm_plugin.models.loading import load_parts

    if vp_stage is not None:
        raise NotImplementedError("virtual pipeline stages are not supported")
    dtype = run_dtype(args)
    model_config = copy.deepcopy(model_config)  # this run's; the caller's config stays as model.json says
    flags = {field: value for field, value in (("rank", args.lora_rank), ("alpha", args.lora_alpha),
                                               ("dropout", args.lora_dropout), ("targets", args.lora_targets))
             if value is not None}
    if flags:
        given = dataclasses.asdict(model_config.language.lora) if model_config.language.lora else {}
        model_config.language.lora = lora_config({**given, **flags}, f"{model_config.source} with --lora-* flags")
        model_config.validate()
    for names in PARTS:
        part = getattr(model_config, names.field)
        if part.params_dtype != dtype:
            logger.info("%s: params_dtype %s in %s; this run computes in %s (--bf16/--fp16 decide)",
                        names.json_key, part.params_dtype, model_config.source, dtype)
        part.params_dtype = dtype
    extra = {"calculate_per_token_loss": settings.per_token_loss}
    if args.recompute_granularity:
        extra.update(recompute_granularity=args.recompute_granularity, recompute_method=args.recompute_method,
                     recompute_num_layers=args.recompute_num_layers)
    model = LlavaModel(model_config, pre_process=pre_process, post_process=post_process, extra=extra)
    load_parts(model, model_config, text_only)
    return model


def expanded_length(batch: dict, tokens_per_image: int) -> int:
    """Decoder positions of the batch's longest sample once its images are expanded."""
    is_image = batch["input_ids"] == IMAGE_TOKEN_INDEX
    return int((is_image.sum(dim=1) * (tokens_per_image - 1) + batch["input_ids"].shape[1]).max())


def loss_func(loss_mask: torch.Tensor, output_tensor: torch.Tensor, *, per_token: bool = False):
    """By default the mean loss over the micro-batch's trained tokens, as original LLaVA: each micro-batch's
    mean, which megatron's schedule averages over micro-batches and DDP over data-parallel ranks, so a
    token of a short micro-batch weighs more than one of a long micro-batch.

    ``per_token`` (``--calculate-per-token-loss``, megatron-core's convention): the sum and the count of the
    micro-batch's trained tokens; megatron-core adds them up over the global batch and divides the
    gradients by the total, so every trained token of the global batch weighs the same, however the
    samples are split into micro-batches, ranks or packed rows. The logged loss is the global ratio."""
    trained = loss_mask.sum()
    total = (output_tensor.float() * loss_mask).sum()
    if per_token:
        return total, trained.int(), {"lm loss": torch.stack([total.detach(), trained.detach()])}
    loss = total / trained.clamp(min=1)
    return loss, {"lm loss": loss.detach().clone()}


def forward_step(data_iterator: Iterator[dict], model, *, seq_length: Optional[int], pad_token_id: int,
                 stats: BatchStats, per_token_loss: bool = False):
    """Megatron's forward_step: read one micro-batch (packed rows carry ``segments``), run this stage; the
    loss function gets the mask."""
    batch = next(data_iterator)
    unwrapped = unwrap(model)
    positions = seq_length or expanded_length(batch, unwrapped.tokens_per_image)
    stats.add(batch, positions * batch["input_ids"].shape[0])
    target = device.current()
    output, loss_mask = model(
        batch["input_ids"].to(target, non_blocking=True),
        batch["labels"].to(target, non_blocking=True),
        batch["images"].to(target, non_blocking=True),
        batch["image_counts"].to(target),
        seq_length=seq_length, pad_token_id=pad_token_id, sample_ids=batch["sample_ids"],
        segments=batch["segments"].to(target) if "segments" in batch else None,
    )
    return output, functools.partial(loss_func, loss_mask, per_token=per_token_loss)


def train_valid_test_datasets_provider(train_val_test_num_samples, *, data_config, tokenizer,
                                       model_config: LlavaConfig, args: argparse.Namespace, settings: RunSettings,
                                       consumed_samples: int = 0):
    """Endless (train, valid, None) iterators of collated micro-batches for this data-parallel rank."""
    from mm_plugin.data.loader import PackedSteps, build_data_iterators

    vision = model_config.vision
    packed = PackedSteps(settings.num_microbatches, fixed_rows=args.pipeline_model_parallel_size > 1) \
        if settings.sequence_packing else None
    train, valid = build_data_iterators(
        data_config, tokenizer,
        micro_batch_size=args.micro_batch_size,
        data_parallel_rank=parallel_state.get_data_parallel_rank(),
        data_parallel_size=parallel_state.get_data_parallel_world_size(),
        consumed_samples=consumed_samples, seed=args.seed, num_workers=args.num_workers,
        image_size=vision.image_size, patch_size=vision.patch_size,
        model_max_length=args.seq_length, image_tokens=vision.num_image_tokens, packed_steps=packed,
    )
    return train, valid, None


@dataclasses.dataclass
class Providers:
    model_provider: Any
    forward_step: Any
    datasets_provider: Any
    stats: BatchStats
    settings: RunSettings


def bind(args: argparse.Namespace, model_config: LlavaConfig, data_config) -> Providers:
    """The three functions with Megatron's signatures, this run's settings fixed by ``partial``; the flags are
    validated here, before anything is built (``arguments.validate``)."""
    from mm_plugin.data.errors import DataError
    from mm_plugin.data.tokenization import load_tokenizer

    tokenizer = load_tokenizer(data_config.tokenizer_path)
    pad_token_id = data_config.pad_token_id if data_config.pad_token_id is not None else tokenizer.pad_token_id
    vocab = model_config.language.vocab_size
    if isinstance(pad_token_id, bool) or not isinstance(pad_token_id, int) or not 0 <= pad_token_id < vocab:
        raise DataError(f"{args.mm_data}: the padding id {pad_token_id!r} (dataloader_param.collate_param."
                        f"pad_token_id, else the tokenizer's) is not a token of the model's {vocab}-row vocabulary")
    settings = validate(args, world_size(), packing_in_data=data_config.sequence_packing)
    stats = BatchStats()
    fixed_length = args.seq_length if args.pipeline_model_parallel_size > 1 else None
    return Providers(
        model_provider=functools.partial(model_provider, model_config=model_config, args=args, settings=settings,
                                         text_only=data_config.template == "lm"),
        forward_step=functools.partial(forward_step, seq_length=fixed_length, pad_token_id=pad_token_id,
                                       stats=stats, per_token_loss=settings.per_token_loss),
        datasets_provider=functools.partial(train_valid_test_datasets_provider, data_config=data_config,
                                            tokenizer=tokenizer, model_config=model_config, args=args,
                                            settings=settings),
        stats=stats, settings=settings,
    )
