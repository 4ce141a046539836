"""Which samples each data-parallel rank reads, in which order: deterministic, resumable, optionally grouped by
length, or by modality and length.

Every step consumes one global micro-batch of ``micro_batch_size * data_parallel_size`` samples from the
epoch's order; rank ``r`` takes the ``r``-th slice of it (as Megatron's pretraining samplers do). The
epoch's order is a pure function of ``(seed, epoch)``, so ``consumed_samples`` alone says where a
restarted run continues: the same samples, in the same order, on the same ranks.
"""

from __future__ import annotations

from typing import Iterator, Optional

import numpy as np

from .errors import DataError
from .packing import balance_over_ranks

LENGTH_GROUP_STEPS = 16
"""Length grouping sorts windows of this many global micro-batches by length."""


class TrainingSampler:
    """Batches of dataset positions for one data-parallel rank, forever (epoch after epoch)."""

    def __init__(
        self,
        num_samples: int,
        *,
        micro_batch_size: int,
        data_parallel_rank: int,
        data_parallel_size: int,
        consumed_samples: int = 0,
        seed: int = 1234,
        shuffle: bool = True,
        drop_last: bool = True,
        lengths: Optional[np.ndarray] = None,
        with_images: Optional[np.ndarray] = None,
    ):
        """``lengths`` (one per sample) turns on length grouping, ``with_images`` too (one bool per sample) on
        grouping by modality and length; ``consumed_samples`` counts all ranks."""
        if not 0 <= data_parallel_rank < data_parallel_size:
            raise ValueError(f"data_parallel_rank {data_parallel_rank} not in [0, {data_parallel_size})")
        self.num_samples = num_samples
        self.micro_batch_size = micro_batch_size
        self.rank = data_parallel_rank
        self.global_batch = micro_batch_size * data_parallel_size
        self.seed = seed
        self.shuffle = shuffle
        self.lengths = None if lengths is None else np.asarray(lengths)
        if self.lengths is not None and len(self.lengths) != num_samples:
            raise ValueError(f"{len(self.lengths)} lengths for {num_samples} samples")
        self.with_images = None if with_images is None else np.asarray(with_images, dtype=bool)
        if self.with_images is not None and (self.lengths is None or len(self.with_images) != num_samples):
            raise ValueError("grouping by modality needs one length and one with_images flag per sample")
        if drop_last:
            self.samples_per_epoch = num_samples // self.global_batch * self.global_batch
        else:
            self.samples_per_epoch = -(-num_samples // self.global_batch) * self.global_batch
        if self.samples_per_epoch == 0:
            raise DataError(
                f"the data set has {num_samples} samples, fewer than one global micro-batch "
                f"({micro_batch_size} x {data_parallel_size} ranks)"
            )
        if consumed_samples % self.global_batch:
            raise DataError(f"consumed_samples={consumed_samples} is not a multiple of micro_batch_size x "
                            f"data_parallel_size = {self.global_batch}")
        self.consumed_samples = consumed_samples

    def epoch_order(self, epoch: int) -> np.ndarray:
        """All positions of one epoch in the order every rank steps through them together."""
        if self.shuffle:
            order = np.random.default_rng([self.seed, epoch]).permutation(self.num_samples)
        else:
            order = np.arange(self.num_samples)
        # drop_last cuts the tail; otherwise the last global batch is filled from the epoch's start.
        order = np.resize(order, self.samples_per_epoch)
        if self.with_images is not None:
            order = self._group_by_modality_length(order, np.random.default_rng([self.seed, epoch, 2]))
        elif self.lengths is not None:
            order = self._group_by_length(order, np.random.default_rng([self.seed, epoch, 1]))
        return order

    def _group_by_modality_length(self, order: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """Original LLaVA's ``group_by_modality_length``: samples with images and text-only samples in
        separate global micro-batches, each modality grouped by length (``_group_by_length``); what is left
        of the two fills mixed micro-batches (at most one, the epoch being whole micro-batches); then the
        micro-batches of both are shuffled together.

        A micro-batch then runs the vision tower for all its samples or for none, and pads little."""
        batches, rest = [], []
        for modality in (True, False):
            part = order[self.with_images[order] == modality]
            whole = len(part) // self.global_batch * self.global_batch
            if whole:
                batches.append(self._group_by_length(part[:whole], rng).reshape(-1, self.global_batch))
            rest.append(part[whole:])
        mixed = np.concatenate(rest)
        if len(mixed):
            batches.append(mixed.reshape(-1, self.global_batch))
        batches = np.concatenate(batches)
        return batches[rng.permutation(len(batches))].reshape(-1)

    def _group_by_length(self, order: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """Sort windows of ``LENGTH_GROUP_STEPS`` steps by length, keep each step's samples together, shuffle steps.

        A step's micro-batches then hold samples of similar length (little padding, and ranks of one step
        do similar work), while the order of steps stays random.
        """
        window = self.global_batch * LENGTH_GROUP_STEPS
        grouped = []
        for start in range(0, len(order), window):
            chunk = order[start:start + window]
            chunk = chunk[np.argsort(-self.lengths[chunk], kind="stable")]
            steps = chunk.reshape(-1, self.global_batch)
            grouped.append(steps[rng.permutation(len(steps))].reshape(-1))
        return np.concatenate(grouped)

    def global_micro_batches(self) -> Iterator[np.ndarray]:
        """The positions of every global micro-batch from ``consumed_samples`` on, epoch after epoch."""
        epoch, offset = divmod(self.consumed_samples, self.samples_per_epoch)
        while True:
            order = self.epoch_order(epoch)
            for start in range(offset, self.samples_per_epoch, self.global_batch):
                yield order[start:start + self.global_batch]
            epoch, offset = epoch + 1, 0

    def __iter__(self) -> Iterator[list[int]]:
        first = self.rank * self.micro_batch_size
        for batch in self.global_micro_batches():
            yield batch[first:first + self.micro_batch_size].tolist()


class PackedStepSampler(TrainingSampler):
    """This rank's share of each step's global batch, one list per step, for packing.

    A step is the ``num_microbatches`` global micro-batches the unpacked sampler would give it (the same
    epoch order, grouping included), so packing changes which rank and row a sample lands in, never which
    step it belongs to. The step's samples are spread over the ranks by ``estimated_lengths`` so that
    each rank gets about the same number of positions (``packing.balance_over_ranks``).
    """

    def __init__(self, num_samples: int, *, num_microbatches: int, estimated_lengths: np.ndarray, **kwargs):
        super().__init__(num_samples, **kwargs)
        self.num_microbatches = num_microbatches
        self.ranks = self.global_batch // self.micro_batch_size
        self.estimated_lengths = np.asarray(estimated_lengths)
        if self.consumed_samples % (self.global_batch * num_microbatches):
            raise DataError(f"consumed_samples={self.consumed_samples} is not a whole number of steps of "
                            f"{self.global_batch * num_microbatches} samples")

    def __iter__(self) -> Iterator[list[int]]:
        batches = self.global_micro_batches()
        while True:
            step = np.concatenate([next(batches) for _ in range(self.num_microbatches)])
            share = balance_over_ranks(self.estimated_lengths[step], self.ranks)[self.rank]
            yield step[share].tolist()
