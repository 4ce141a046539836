"""Sequence packing: one step's samples rearranged into fewer, fuller rows, and nothing else changed.

A packed step holds exactly the samples of the unpacked step (the same global batch, the same
samples in it); packing only decides where each sample sits:

1. ``balance_over_ranks``: the global batch is spread over the data-parallel ranks so that each gets
   about the same number of positions (by the record index's length estimate, known before anything is
   read: every rank computes the same spread on its own);
2. ``pack_rows``: a rank's samples are placed, first-fit decreasing, into rows of at most
   ``seq_length`` positions counted with every image expanded (boundaries are computed before the
   model expands the images, from the exact lengths, so no sample is ever split);
3. ``PackingCollator``: the rows become micro-batches of ``micro_batch_size`` rows, with ``segments``
   saying which sample each token belongs to. The model turns them into attention that never crosses
   samples and rotary positions that restart at every sample (``models.packed_rows``).

With the loss normalised per trained token over the whole global batch (``--calculate-per-token-loss``,
which packing turns on), losses and gradients are those of the unpacked run.
"""

from __future__ import annotations

import heapq
from typing import Any, Sequence

import numpy as np
import torch

from .collate import Collator
from .errors import DataError
from .tokenization import IGNORE_INDEX

PADDING_SEGMENT = -1
"""``segments`` value of padding positions (they belong to no sample)."""


def balance_over_ranks(lengths: np.ndarray, ranks: int) -> list[list[int]]:
    """Positions ``0..len(lengths)-1`` spread over ``ranks`` lists of about equal total length (longest
    first onto the least loaded rank, ties to the lower rank); each list in ascending order.

    Every rank must hold at least one sample, so the first ``ranks`` go one to each."""
    if len(lengths) < ranks:
        raise DataError(f"a packed step needs at least one sample per data-parallel rank: {len(lengths)} "
                        f"samples for {ranks} ranks")
    order = np.argsort(-np.asarray(lengths), kind="stable")
    loads = [(0, rank) for rank in range(ranks)]
    shares: list[list[int]] = [[] for _ in range(ranks)]
    for position in order.tolist():
        load, rank = heapq.heappop(loads)
        shares[rank].append(position)
        heapq.heappush(loads, (load + int(lengths[position]), rank))
    return [sorted(share) for share in shares]


def pack_rows(lengths: Sequence[int], seq_length: int) -> list[list[int]]:
    """Sample positions grouped into rows of total length at most ``seq_length`` (first-fit decreasing);
    within a row, samples keep their order. Rows are ordered by their first sample."""
    rows: list[list[int]] = []
    room: list[int] = []
    for position in sorted(range(len(lengths)), key=lambda p: (-lengths[p], p)):
        length = lengths[position]
        if length > seq_length:
            raise DataError(f"a sample of {length} positions does not fit a packed row of {seq_length}; the data "
                            "layer truncates samples to --seq-length, so this is a bug")
        row = next((r for r, free in enumerate(room) if free >= length), None)
        if row is None:
            rows.append([position])
            room.append(seq_length - length)
        else:
            rows[row].append(position)
            room[row] -= length
    return sorted((sorted(row) for row in rows), key=lambda row: row[0])


def expanded_length(sample: dict[str, Any], tokens_per_image: int) -> int:
    """Decoder positions of a dataset sample once each of its image placeholders is expanded."""
    return len(sample["input_ids"]) + len(sample["images"]) * (tokens_per_image - 1)


class PackingCollator:
    """``collate_fn`` for one rank's share of a packed step: a list of micro-batches.

    Each micro-batch has the keys of ``Collator``'s, rows being packed rows (``image_counts`` per row,
    ``sample_ids`` per sample), plus ``segments`` ``[b, L]``: the index of each token's sample within its
    row, ``PADDING_SEGMENT`` on padding. ``fixed_rows`` (pipeline parallelism, whose stages exchange
    tensors of one fixed shape) pads every micro-batch to ``micro_batch_size`` rows of ``seq_length``
    positions once expanded; otherwise a micro-batch is as wide as its longest row.
    """

    def __init__(self, pad_token_id: int, *, seq_length: int, tokens_per_image: int, micro_batch_size: int,
                 fixed_rows: bool):
        self.rows = Collator(pad_token_id)
        self.pad_token_id = pad_token_id
        self.seq_length = seq_length
        self.tokens_per_image = tokens_per_image
        self.micro_batch_size = micro_batch_size
        self.fixed_rows = fixed_rows

    def __call__(self, samples: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
        lengths = [expanded_length(sample, self.tokens_per_image) for sample in samples]
        rows = pack_rows(lengths, self.seq_length)
        # Rows of similar length share a micro-batch, which is as wide as its longest row.
        rows.sort(key=lambda row: -sum(lengths[p] for p in row))
        return [self._micro_batch([[samples[p] for p in row] for row in rows[start:start + self.micro_batch_size]])
                for start in range(0, len(rows), self.micro_batch_size)]

    def _micro_batch(self, rows: list[list[dict[str, Any]]]) -> dict[str, Any]:
        joined = [_join(row) for row in rows]
        if self.fixed_rows:
            empty = {"input_ids": torch.full((1,), self.pad_token_id, dtype=torch.long),
                     "labels": torch.full((1,), IGNORE_INDEX, dtype=torch.long),
                     "segments": torch.full((1,), PADDING_SEGMENT, dtype=torch.long),
                     "images": torch.zeros(0, *rows[0][0]["images"].shape[1:]), "ids": [], "bad": []}
            joined += [empty] * (self.micro_batch_size - len(joined))
        batch = self.rows([{**row, "id": None} for row in joined])
        segments = torch.full(batch["input_ids"].shape, PADDING_SEGMENT, dtype=torch.long)
        for index, row in enumerate(joined):
            segments[index, :len(row["segments"])] = row["segments"]
        batch["segments"] = segments
        batch["sample_ids"] = [sample_id for row in joined for sample_id in row["ids"]]
        return batch


def _join(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """One packed row: the samples' ids, labels and images one after another, with their segment numbers."""
    return {
        "input_ids": torch.cat([sample["input_ids"] for sample in samples]),
        "labels": torch.cat([sample["labels"] for sample in samples]),
        "segments": torch.cat([torch.full((len(sample["input_ids"]),), index, dtype=torch.long)
                               for index, sample in enumerate(samples)]),
        "images": torch.cat([sample["images"] for sample in samples]),
        "ids": [sample["id"] for sample in samples],
        "bad": [entry for sample in samples for entry in sample["bad"]],
    }
