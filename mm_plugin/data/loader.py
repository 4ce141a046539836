"""What the training loop calls: (train, valid) iterators of collated micro-batches.

    tokenizer = load_tokenizer(config.tokenizer_path)
    train_iter, valid_iter = build_data_iterators(
        config, tokenizer, micro_batch_size=8, data_parallel_rank=dp_rank, data_parallel_size=dp_size,
        consumed_samples=consumed, seed=1234, num_workers=8, image_size=336, patch_size=14,
        model_max_length=2048)
    batch = next(train_iter)          # see collate.Collator for the keys
    counts = batch["bad_counts"]      # all-reduce (sum) over DP ranks, then log bad_counts_by_reason(counts)

Both iterators are endless. The training iterator stops the run with :class:`TooManyBadSamples` once more
than ``max_bad_fraction`` of the samples this rank has read were replacements (checked after
``min(1000, len(dataset))`` samples, so a few bad records early on do not end a run).
"""

from __future__ import annotations

import collections
import dataclasses
import logging
from typing import Any, Iterator, Optional

import numpy as np
import torch

from .config import DataConfig
from .dataset import LlavaDataset
from .errors import BAD_REASONS, REASON_HINTS, DataError, TooManyBadSamples
from .images import ImageProcessor
from .index import RecordIndex
from .sampler import PackedStepSampler, TrainingSampler
from .collate import Collator
from .packing import PackingCollator
from .tokenization import get_template

logger = logging.getLogger(__name__)

VALID_SPLIT_SEED = 0x11A7A
"""Seed of the held-out split: fixed, so the validation records never change with the training seed."""
LOGGED_PER_REASON = 5
"""Replaced records logged in full per reason; the rest are only counted."""


def bad_counts_by_reason(counts: torch.Tensor) -> dict[str, int]:
    """``{reason: count}`` of a (summed) ``bad_counts`` tensor, non-zero reasons only."""
    return {reason: int(count) for reason, count in zip(BAD_REASONS, counts.tolist()) if count}


def split_positions(num_records: int, valid_fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """``(train, valid)`` record positions; ``valid_fraction`` of the records, chosen by a fixed seed."""
    valid_count = int(round(num_records * valid_fraction))
    if valid_fraction and valid_count == 0:
        valid_count = 1
    shuffled = np.random.default_rng(VALID_SPLIT_SEED).permutation(num_records)
    return np.sort(shuffled[valid_count:]), np.sort(shuffled[:valid_count])


def build_datasets(
    config: DataConfig,
    tokenizer: Any,
    *,
    image_tokens: int,
    model_max_length: int,
) -> tuple[LlavaDataset, Optional[LlavaDataset]]:
    """The training dataset and the validation one (``None`` when the config names none)."""
    template = get_template(config.template)
    processor = ImageProcessor(config.image)

    def dataset(path: str, folder: str, positions=None) -> LlavaDataset:
        return LlavaDataset(RecordIndex.open(path, config.index_cache_dir), folder, template, processor,
                            tokenizer=tokenizer, image_tokens=image_tokens, model_max_length=model_max_length,
                            positions=positions)

    if config.valid_data_path:
        return (dataset(config.data_path, config.data_folder),
                dataset(config.valid_data_path, config.valid_data_folder or config.data_folder))
    if config.valid_fraction:
        records = len(RecordIndex.open(config.data_path, config.index_cache_dir))
        train, valid = split_positions(records, config.valid_fraction)
        return (dataset(config.data_path, config.data_folder, train),
                dataset(config.data_path, config.data_folder, valid))
    return dataset(config.data_path, config.data_folder), None


@dataclasses.dataclass(frozen=True)
class PackedSteps:
    """How a packed run reads: ``num_microbatches`` global micro-batches per step (the unpacked run's),
    ``fixed_rows`` when the model's stages need every micro-batch as ``micro_batch_size`` x ``seq_length``
    (pipeline parallelism)."""

    num_microbatches: int
    fixed_rows: bool


class BadSampleGuard:
    """Passes batches through; logs replaced records and stops when there are too many."""

    def __init__(self, batches: Iterator[dict[str, Any]], max_fraction: float, min_samples: int, source: str):
        self.batches = batches
        self.max_fraction = max_fraction
        self.min_samples = min_samples
        self.source = source
        self.samples = 0
        self.bad = torch.zeros(len(BAD_REASONS), dtype=torch.long)
        self._logged = collections.Counter()

    def __iter__(self) -> "BadSampleGuard":
        return self

    def __next__(self) -> Any:
        batch = next(self.batches)
        self.count(batch if isinstance(batch, dict) else _merged_counts(batch))
        return batch

    def count(self, batch: dict[str, Any]) -> None:
        self.samples += len(batch["sample_ids"])
        self.bad += batch["bad_counts"]
        for reason, message in batch["bad_records"]:
            self._logged[reason] += 1
            if self._logged[reason] <= LOGGED_PER_REASON:
                logger.warning("replaced bad record: %s", message)
        total = int(self.bad.sum())
        if self.samples >= self.min_samples and total > self.max_fraction * self.samples:
            reasons = bad_counts_by_reason(self.bad)
            hints = "; ".join(f"{reason}: {REASON_HINTS[reason]}" for reason in reasons)
            raise TooManyBadSamples(
                f"{self.source}: {total} bad records replaced in {self.samples} samples read on this rank "
                f"({total / self.samples:.2%}, limit max_bad_fraction={self.max_fraction:.2%}); by reason: {reasons}. "
                f"Run `mm-data check` for a full report. {hints}"
            )


def _merged_counts(micro_batches: list[dict[str, Any]]) -> dict[str, Any]:
    """What a packed step's micro-batches read, for the guard's counts (each micro-batch carries its own)."""
    return {"sample_ids": [sample for batch in micro_batches for sample in batch["sample_ids"]],
            "bad_counts": sum(batch["bad_counts"] for batch in micro_batches),
            "bad_records": [record for batch in micro_batches for record in batch["bad_records"]]}


def build_data_iterators(
    config: DataConfig,
    tokenizer: Any,
    *,
    micro_batch_size: int,
    data_parallel_rank: int,
    data_parallel_size: int,
    consumed_samples: int,
    seed: int,
    num_workers: int,
    image_size: int,
    patch_size: int,
    model_max_length: Optional[int] = None,
    image_tokens: Optional[int] = None,
    packed_steps: Optional[PackedSteps] = None,
) -> tuple[Iterator[Any], Optional[Iterator[dict[str, Any]]]]:
    """Endless (train, valid) micro-batch iterators for one data-parallel rank.

    ``image_tokens`` (positions one image takes in the decoder) defaults to ``(image_size // patch_size)**2``;
    ``model_max_length`` defaults to the data config's. Training resumes exactly at ``consumed_samples``
    (counted over all ranks). Validation reads its records in order, from the start, cycling.

    ``packed_steps``: the training iterator yields one list of packed micro-batches per step instead
    (``packing.PackingCollator``); validation stays unpacked.
    """
    crop = (config.image.crop_height, config.image.crop_width)
    if crop != (image_size, image_size):
        raise DataError(f"{config.data_path}: data.json crops images to {crop[0]}x{crop[1]} but the vision model "
                        f"takes {image_size}x{image_size}; set crop_size and size in train_pipeline to {image_size}")
    image_tokens = image_tokens or (image_size // patch_size) ** 2
    model_max_length = model_max_length or config.model_max_length
    if not model_max_length:
        raise DataError("model_max_length is not set: pass it (the decoder's sequence length) or set "
                        "tokenizer_config.model_max_length in data.json")
    train, valid = build_datasets(config, tokenizer, image_tokens=image_tokens, model_max_length=model_max_length)
    pad_token_id = config.pad_token_id if config.pad_token_id is not None else tokenizer.pad_token_id
    if pad_token_id is None:
        raise DataError("no padding id: set dataloader_param.collate_param.pad_token_id in data.json")

    def iterator(dataset: LlavaDataset, sampler: TrainingSampler, collate=Collator(pad_token_id)) -> Iterator[Any]:
        from .. import device

        loader = torch.utils.data.DataLoader(
            dataset,
            batch_sampler=sampler,
            num_workers=num_workers,
            collate_fn=collate,
            pin_memory=config.pin_memory and device.kind() != "cpu",
            persistent_workers=num_workers > 0,
            # Its workers' base seed comes from this generator, not the global one: building the data
            # iterators must not move the model's random state (dropout after an exact resume).
            generator=torch.Generator().manual_seed(seed),
        )
        return BadSampleGuard(iter(loader), config.max_bad_fraction, min(1000, len(dataset)),
                              str(dataset.index.source))

    rank = dict(micro_batch_size=micro_batch_size, data_parallel_rank=data_parallel_rank,
                data_parallel_size=data_parallel_size)
    grouped = config.group_by_length or config.group_by_modality_length
    order = dict(consumed_samples=consumed_samples, seed=seed, shuffle=config.shuffle, drop_last=config.drop_last,
                 lengths=train.lengths() if grouped else None,
                 with_images=train.with_images() if config.group_by_modality_length else None, **rank)
    valid_iterator = None
    if valid is not None:
        valid_iterator = iterator(valid, TrainingSampler(len(valid), shuffle=False, drop_last=False, **rank))
    if packed_steps is None:
        return iterator(train, TrainingSampler(len(train), **order)), valid_iterator
    sampler = PackedStepSampler(len(train), num_microbatches=packed_steps.num_microbatches,
                                estimated_lengths=train.lengths(), **order)
    collate = PackingCollator(pad_token_id, seq_length=model_max_length, tokens_per_image=image_tokens,
                              micro_batch_size=micro_batch_size, fixed_rows=packed_steps.fixed_rows)
    return iterator(train, sampler, collate), valid_iterator
