"""The training log: one line per ``--log-interval`` on stdout, the same numbers to TensorBoard and to
``metrics.jsonl`` (what ``mm-plot`` reads).

Per line: loss, learning rate, grad norm, loss scale (fp16), skipped iterations, records replaced by
reason (summed over data-parallel ranks), samples/s, tokens/s (decoder positions, images expanded),
TFLOP/s per device and MFU (see ``flops.py`` for what is counted).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import time
from pathlib import Path
from typing import Optional

import torch
from megatron.core import parallel_state

from mm_plugin import device
from mm_plugin.training.flops import peak_tflops, training_flops

logger = logging.getLogger(__name__)


def _device_name() -> str:
    if device.kind() == "cuda":
        return torch.cuda.get_device_name()
    if device.kind() == "npu":
        return "Ascend" + str(torch.npu.get_device_name())
    return "cpu"


class MetricsLogger:
    def __init__(self, args, train_iters: int, model_config, stats):
        self.args, self.train_iters, self.model_config, self.stats = args, train_iters, model_config, stats
        self.is_logger = torch.distributed.get_rank() == torch.distributed.get_world_size() - 1
        self.peak = peak_tflops(_device_name(), args.peak_tflops)
        self.window_start, self.window_iterations, self.window_paused = time.perf_counter(), 0, 0.0
        self.loss_sum, self.loss_count = 0.0, 0
        folder = args.tensorboard_dir or (str(Path(args.save) / "tensorboard") if args.save else None)
        self.folder = Path(folder) if folder and self.is_logger else None
        self.writer = None
        if self.folder:
            from torch.utils.tensorboard import SummaryWriter

            self.folder.mkdir(parents=True, exist_ok=True)
            self.writer = SummaryWriter(str(self.folder))
            self.jsonl = open(self.folder / "metrics.jsonl", "a")

    def _window_totals(self) -> tuple[int, int, int, torch.Tensor]:
        """Samples, positions, images and replaced records since the last line, over data-parallel ranks."""
        from mm_plugin.data.errors import BAD_REASONS

        stats = self.stats
        bad = stats.bad_counts if stats and stats.bad_counts is not None else torch.zeros(len(BAD_REASONS),
                                                                                           dtype=torch.long)
        values = torch.tensor([stats.samples if stats else 0, stats.positions if stats else 0,
                               stats.images if stats else 0, *bad.tolist()], dtype=torch.float64)
        values = values.to(device.current())
        torch.distributed.all_reduce(values, group=parallel_state.get_data_parallel_group())
        if stats:
            stats.reset()
        values = values.cpu()
        return int(values[0]), int(values[1]), int(values[2]), values[3:].long()

    def iteration_done(self, iteration: int, consumed: int, loss: float, grad_norm: Optional[float], lr: float,
                       loss_scale: Optional[float], skipped: int) -> None:
        self.window_iterations += 1
        if math_finite(loss):
            self.loss_sum += loss
            self.loss_count += 1
        if iteration % self.args.log_interval:
            return
        from mm_plugin.data.loader import bad_counts_by_reason

        samples, positions, images, bad = self._window_totals()  # collective: every rank
        elapsed = time.perf_counter() - self.window_start - self.window_paused
        # Summed over data-parallel ranks: the whole model's work in the window, done by all devices.
        flops = training_flops(self.model_config, samples=samples, positions=positions, images=images)
        per_device = flops / elapsed / torch.distributed.get_world_size() / 1e12
        record = {
            "iteration": iteration, "consumed_samples": consumed,
            "loss": self.loss_sum / self.loss_count if self.loss_count else float("nan"),
            "lr": lr, "grad_norm": float(grad_norm) if grad_norm is not None else None,
            "skipped_iterations": skipped, "bad_samples": bad_counts_by_reason(bad),
            "iteration_ms": 1000 * elapsed / self.window_iterations,
            "samples_per_s": samples / elapsed, "tokens_per_s": positions / elapsed,
            "tflops_per_device": per_device, "mfu": per_device / self.peak if self.peak else None,
        }
        if loss_scale is not None:
            record["loss_scale"] = loss_scale
        self.window_start, self.window_iterations, self.window_paused = time.perf_counter(), 0, 0.0
        self.loss_sum, self.loss_count = 0.0, 0
        if not self.is_logger:
            return
        print(format_line(record, self.train_iters), flush=True)
        if self.writer:
            for key, value in record.items():
                if isinstance(value, (int, float)) and value is not None and key != "iteration":
                    self.writer.add_scalar(f"train/{key}", value, iteration)
            self.jsonl.write(json.dumps(record) + "\n")
            self.jsonl.flush()

    @contextlib.contextmanager
    def paused(self):
        """Time and samples here (saving, validating) are not training: left out of the throughput."""
        start = time.perf_counter()
        counted = dataclasses.replace(self.stats) if self.stats else None
        try:
            yield
        finally:
            self.window_paused += time.perf_counter() - start
            if counted is not None:
                for field in dataclasses.fields(counted):
                    setattr(self.stats, field.name, getattr(counted, field.name))

    def validation(self, iteration: int, loss: float) -> None:
        if not self.is_logger:
            return
        print(f" validation at iteration {iteration} | lm loss: {loss:.6E}", flush=True)
        if self.writer:
            self.writer.add_scalar("valid/loss", loss, iteration)
            self.jsonl.write(json.dumps({"iteration": iteration, "valid_loss": loss}) + "\n")
            self.jsonl.flush()

    def close(self) -> None:
        if self.writer:
            self.writer.close()
            self.jsonl.close()


def math_finite(value: float) -> bool:
    return value == value and value not in (float("inf"), float("-inf"))


def format_line(record: dict, train_iters: int) -> str:
    parts = [
        f" iteration {record['iteration']:>8d}/{train_iters:>8d}",
        f"consumed samples: {record['consumed_samples']:>10d}",
        f"elapsed time per iteration (ms): {record['iteration_ms']:.1f}",
        f"learning rate: {record['lr']:.6E}",
        f"lm loss: {record['loss']:.6E}",
    ]
    if record.get("loss_scale") is not None:
        parts.append(f"loss scale: {record['loss_scale']:.1f}")
    if record["grad_norm"] is not None:
        parts.append(f"grad norm: {record['grad_norm']:.3f}")
    parts.append(f"skipped iterations: {record['skipped_iterations']}")
    if record["bad_samples"]:
        parts.append("replaced samples: " + ", ".join(f"{k} {v}" for k, v in record["bad_samples"].items()))
    parts += [f"samples/s: {record['samples_per_s']:.2f}", f"tokens/s: {record['tokens_per_s']:.0f}",
              f"TFLOP/s/device: {record['tflops_per_device']:.3g}"]
    if record["mfu"] is not None:
        parts.append(f"MFU: {100 * record['mfu']:.1f}%")
    return " | ".join(parts) + " |"
