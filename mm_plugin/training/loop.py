"""``pretrain()`` with Megatron-LM's signature, built on megatron-core's parts.

PyPI's megatron-core has no ``megatron.training``; this is the loop ``launch/pretrain.py`` runs then.
Everything parallel is megatron-core's: ``parallel_state`` (TP/PP/DP groups), ``get_forward_backward_func``
(micro-batches, gradient accumulation, pipeline schedules), ``DistributedDataParallel``,
``get_megatron_optimizer`` (Adam, distributed optimizer, loss scaling), ``OptimizerParamScheduler``
(warmup + cosine), ``dist_checkpointing``. What is ours: the order of those calls, skipping steps with
a NaN/Inf loss or gradient, and the log line.
"""

from __future__ import annotations

import argparse
import dataclasses
import fnmatch
import inspect
import logging
import math
from typing import Callable, Optional

import torch
from megatron.core import parallel_state
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.transformer.module import Float16Module

from mm_plugin import device
from mm_plugin.parallel.placement import unwrap
from mm_plugin.parallel.world import join_world, set_model_parallel, world_size
from mm_plugin.checkpoint.reading import holds_checkpoint, iteration_dir, latest_iteration
from mm_plugin.training import checkpointing
from mm_plugin.training.arguments import RunSettings, parse_args, validate
from mm_plugin.training.metrics import MetricsLogger

logger = logging.getLogger(__name__)


class TrainingStopped(RuntimeError):
    """The run stopped itself (too many skipped iterations); the last good checkpoint is intact."""


@dataclasses.dataclass
class TrainingResult:
    iteration: int
    consumed_samples: int
    losses: list  # (iteration, loss) of every iteration this run trained, on every rank
    skipped_iterations: int
    model: torch.nn.Module  # the DDP-wrapped model, for callers that evaluate it in-process


# --- set-up ----------------------------------------------------------------------------------


def initialize(args: argparse.Namespace) -> None:
    """Process group on the active device, megatron's TP/PP/DP groups, seeds."""
    join_world(args.distributed_timeout_minutes)
    set_model_parallel(args.tensor_model_parallel_size, args.pipeline_model_parallel_size, args.seed,
                       args.distributed_timeout_minutes)


def build_model(model_provider: Callable, model_type, args: argparse.Namespace) -> DistributedDataParallel:
    model = model_provider(pre_process=parallel_state.is_pipeline_first_stage(),
                           post_process=parallel_state.is_pipeline_last_stage())
    model.model_type = model_type
    model = model.to(device.current())
    if args.bf16 or args.fp16:
        model = Float16Module(model.config, model)
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True, overlap_grad_reduce=args.overlap_grad_reduce,
        use_distributed_optimizer=args.use_distributed_optimizer)
    return DistributedDataParallel(model.config, ddp_config, model)


def build_optimizer(model: DistributedDataParallel, args: argparse.Namespace, settings: RunSettings):
    config = OptimizerConfig(
        optimizer=args.optimizer, lr=args.lr, min_lr=args.min_lr, weight_decay=args.weight_decay,
        adam_beta1=args.adam_beta1, adam_beta2=args.adam_beta2, adam_eps=args.adam_eps,
        clip_grad=args.clip_grad, bf16=args.bf16, fp16=args.fp16,
        params_dtype=torch.bfloat16 if args.bf16 else torch.float16 if args.fp16 else torch.float32,
        loss_scale=args.loss_scale, initial_loss_scale=args.initial_loss_scale, min_loss_scale=args.min_loss_scale,
        loss_scale_window=args.loss_scale_window, hysteresis=args.hysteresis,
        use_distributed_optimizer=args.use_distributed_optimizer,
    )
    optimizer = get_megatron_optimizer(config, [model], **_projector_lr(config, args))
    # Schedules in samples, as Megatron-LM: warmup/decay lengths times the global batch.
    decay_iters = args.lr_decay_iters or settings.train_iters
    warmup_iters = args.lr_warmup_iters
    if args.lr_warmup_fraction is not None:
        warmup_iters = int(args.lr_warmup_fraction * decay_iters)
    scheduler = OptimizerParamScheduler(
        optimizer, init_lr=0.0 if warmup_iters else args.lr, max_lr=args.lr, min_lr=args.min_lr,
        lr_warmup_steps=warmup_iters * settings.global_batch_size,
        lr_decay_steps=decay_iters * settings.global_batch_size,
        lr_decay_style=args.lr_decay_style, start_wd=args.weight_decay, end_wd=args.weight_decay,
        wd_incr_steps=decay_iters * settings.global_batch_size, wd_incr_style="constant")
    return optimizer, scheduler


def _projector_lr(config: OptimizerConfig, args: argparse.Namespace) -> dict:
    """``get_megatron_optimizer``'s arguments that give the projector ``--mm-projector-lr`` (its minimum scaled
    alike): megatron-core 0.16 takes per-group overrides, 0.12 a learning-rate multiplier."""
    if args.mm_projector_lr is None:
        return {}
    is_projector = "*vision_projection.*"
    if "config_overrides" in inspect.signature(get_megatron_optimizer).parameters:
        from megatron.core.optimizer import get_standard_config_overrides
        from megatron.core.optimizer.optimizer_config import ParamKey

        overrides = get_standard_config_overrides(config)
        overrides[ParamKey(name=is_projector)] = {"max_lr": args.mm_projector_lr,
                                                  "min_lr": args.min_lr * args.mm_projector_lr / args.lr}
        return {"config_overrides": overrides}
    return {"scale_lr_cond": lambda name, parameter: fnmatch.fnmatch(name, is_projector),
            "lr_mult": args.mm_projector_lr / args.lr}


def wire_schedule(model: DistributedDataParallel, optimizer, args) -> None:
    config = model.config
    config.finalize_model_grads_func = finalize_model_grads
    config.grad_scale_func = optimizer.scale_loss if args.fp16 else None
    if args.overlap_grad_reduce:
        config.no_sync_func = model.no_sync


# --- one iteration ---------------------------------------------------------------------------


def _reduce_losses(losses: list[dict]) -> torch.Tensor:
    """This iteration's loss on every rank: the mean of the micro-batch means over the data-parallel ranks,
    or with a per-token loss (entries of [sum, count]) the global batch's sum over its count."""
    value = torch.zeros(2, device=device.current())
    if parallel_state.is_pipeline_last_stage() and losses:
        if losses[0]["lm loss"].numel() == 2:
            value += sum(entry["lm loss"].to(value) for entry in losses)
        else:
            value[0] = sum(float(entry["lm loss"]) for entry in losses) / len(losses)
            value[1] = 1.0
        torch.distributed.all_reduce(value, group=parallel_state.get_data_parallel_group())
        value[0] /= value[1]
        value[1] = 1.0
    # The last stage knows the loss; give it to the other stages.
    torch.distributed.all_reduce(value, group=parallel_state.get_pipeline_model_parallel_group())
    return value[0]


def _gradients_finite(model: DistributedDataParallel) -> bool:
    finite = all(bool(torch.isfinite(p.main_grad).all()) for p in model.parameters()
                 if p.requires_grad and getattr(p, "main_grad", None) is not None)
    flag = torch.tensor([1.0 if finite else 0.0], device=device.current())
    torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MIN)
    return bool(flag.item())


def train_step(forward_step_func, data_iterator, model, optimizer, scheduler, args, settings: RunSettings):
    """Returns (loss, grad_norm or None, updated: bool)."""
    model.zero_grad_buffer()
    optimizer.zero_grad()
    num_microbatches = settings.num_microbatches
    if settings.sequence_packing:  # one item per step: this rank's packed micro-batches, as many as it needs
        step = next(data_iterator)
        data_iterator, num_microbatches = iter(step), len(step)
    losses = get_forward_backward_func()(
        forward_step_func=forward_step_func, data_iterator=data_iterator, model=[model],
        num_microbatches=num_microbatches, seq_length=args.seq_length, micro_batch_size=args.micro_batch_size,
        decoder_seq_length=args.seq_length, forward_only=False)
    loss = _reduce_losses(losses)
    # fp16's loss scaler finds overflows itself (and must see them, to back off); bf16/fp32 have no such check.
    if not args.fp16 and not (math.isfinite(float(loss)) and _gradients_finite(model)):
        return loss, None, False
    updated, grad_norm, _ = optimizer.step()
    if updated:
        scheduler.step(increment=settings.global_batch_size)
    return loss, grad_norm, bool(updated)


def evaluate(forward_step_func, data_iterator, model, args) -> float:
    model.eval()
    with torch.no_grad():
        losses = get_forward_backward_func()(
            forward_step_func=forward_step_func, data_iterator=data_iterator, model=[model],
            num_microbatches=args.eval_batches, seq_length=args.seq_length, micro_batch_size=args.micro_batch_size,
            decoder_seq_length=args.seq_length, forward_only=True)
    model.train()
    return float(_reduce_losses(losses))


# --- the loop --------------------------------------------------------------------------------


def pretrain(train_valid_test_dataset_provider, model_provider, model_type, forward_step_func,
             process_non_loss_data_func=None, extra_args_provider=None, args_defaults=None, *,
             args: Optional[argparse.Namespace] = None, stats=None,
             settings: Optional[RunSettings] = None) -> TrainingResult:
    """Megatron-LM's ``pretrain`` contract. ``args`` (already parsed), ``stats`` (the providers' BatchStats, for
    the log line) and ``settings`` (the providers', what validation decided) are optional extras."""
    from mm_plugin.config.model import to_mindspeed_json

    args = args or parse_args(None, extra_args_provider, args_defaults)
    settings = settings or validate(args, world_size())
    initialize(args)
    model = build_model(model_provider, model_type, args)
    optimizer, scheduler = build_optimizer(model, args, settings)
    wire_schedule(model, optimizer, args)
    unwrapped = unwrap(model)
    config_json = to_mindspeed_json(unwrapped.llava_config)  # as built: this run's dtype

    iteration, consumed = 0, 0
    if args.load and holds_checkpoint(args.load):
        iteration, consumed = checkpointing.load_checkpoint(
            args.load, unwrapped, optimizer, scheduler, load_optimizer=not args.no_load_optim,
            load_rng=not args.no_load_rng, finetune=args.finetune)
    elif args.load:
        logger.warning("--load %s holds no checkpoint yet: starting from the part files", args.load)

    provider_parameters = inspect.signature(train_valid_test_dataset_provider).parameters
    samples = [settings.train_iters * settings.global_batch_size, args.eval_batches * settings.global_batch_size, 0]
    if "consumed_samples" in provider_parameters:
        train_data, valid_data, _ = train_valid_test_dataset_provider(samples, consumed_samples=consumed)
    else:
        train_data, valid_data, _ = train_valid_test_dataset_provider(samples)

    metrics = MetricsLogger(args, settings.train_iters, unwrapped.llava_config, stats)
    result = TrainingResult(iteration, consumed, [], 0, model)
    skipped_in_a_row = 0
    model.train()
    while iteration < settings.train_iters:
        loss, grad_norm, updated = train_step(forward_step_func, train_data, model, optimizer, scheduler, args,
                                              settings)
        iteration += 1
        consumed += settings.global_batch_size
        result.losses.append((iteration, float(loss)))
        if updated:
            skipped_in_a_row = 0
        else:
            result.skipped_iterations += 1
            skipped_in_a_row += 1
            logger.warning("iteration %d: loss %s or a gradient is not finite: step skipped (%d in a row)",
                           iteration, float(loss), skipped_in_a_row)
            if skipped_in_a_row >= args.max_skipped_iterations:
                last = latest_iteration(args.save) if args.save else None
                raise TrainingStopped(
                    f"{skipped_in_a_row} iterations in a row skipped for NaN/Inf (--max-skipped-iterations); "
                    + (f"the last good checkpoint is {iteration_dir(args.save, last)}" if last
                       else "no checkpoint was saved")
                )
        metrics.iteration_done(iteration, consumed, float(loss), grad_norm, optimizer.param_groups[0]["lr"],
                               optimizer.get_loss_scale().item() if args.fp16 else None, result.skipped_iterations)
        if valid_data is not None and args.eval_interval and iteration % args.eval_interval == 0:
            with metrics.paused():
                metrics.validation(iteration, evaluate(forward_step_func, valid_data, model, args))
        if args.save and args.save_interval and iteration % args.save_interval == 0 and updated:
            with metrics.paused():
                _save(args, iteration, consumed, unwrapped, optimizer, scheduler, config_json)
        if args.exit_interval and iteration % args.exit_interval == 0:
            break
    if args.save and (latest_iteration(args.save) or 0) < iteration:
        _save(args, iteration, consumed, unwrapped, optimizer, scheduler, config_json)
    metrics.close()
    result.iteration, result.consumed_samples = iteration, consumed
    return result


def _save(args, iteration, consumed, model, optimizer, scheduler, config_json) -> None:
    directory = checkpointing.save_checkpoint(
        args.save, iteration, model, optimizer, scheduler, consumed_samples=consumed, model_config=config_json,
        trainable_only=not args.save_frozen, save_optimizer=not args.no_save_optim, save_rng=not args.no_save_rng)
    logger.info("saved %s", directory)
