"""Samples to one micro-batch: right-padded ids and labels, stacked images, bad-record counts."""

from __future__ import annotations

from typing import Any, Sequence

import torch

from .errors import BAD_REASONS
from .tokenization import IGNORE_INDEX


class Collator:
    """``collate_fn`` of the DataLoader (a class, so spawned workers can pickle it).

    The batch:

    * ``input_ids`` ``[b, L]`` long, right-padded with ``pad_token_id``; one -200 per image.
    * ``labels`` ``[b, L]`` long, ``IGNORE_INDEX`` (-100) on padding and untrained positions.
    * ``images`` ``[n, 3, H, W]`` float32, the batch's images in order of appearance, sample by sample.
    * ``image_counts`` ``[b]`` long: images of each sample.
    * ``bad_counts`` ``[len(BAD_REASONS)]`` long: records replaced while producing this batch, by reason.
    * ``sample_ids``: the records' ids; ``bad_records``: ``(reason, message)`` per replaced record.
    """

    def __init__(self, pad_token_id: int):
        self.pad_token_id = pad_token_id

    def __call__(self, samples: Sequence[dict[str, Any]]) -> dict[str, Any]:
        length = max(len(sample["input_ids"]) for sample in samples)
        input_ids = torch.full((len(samples), length), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(samples), length), IGNORE_INDEX, dtype=torch.long)
        bad_counts = torch.zeros(len(BAD_REASONS), dtype=torch.long)
        bad_records = []
        for row, sample in enumerate(samples):
            input_ids[row, : len(sample["input_ids"])] = sample["input_ids"]
            labels[row, : len(sample["labels"])] = sample["labels"]
            for reason, message in sample["bad"]:
                bad_counts[BAD_REASONS.index(reason)] += 1
                bad_records.append((reason, message))
        return {
            "input_ids": input_ids,
            "labels": labels,
            "images": torch.cat([sample["images"] for sample in samples]),
            "image_counts": torch.tensor([len(sample["images"]) for sample in samples], dtype=torch.long),
            "bad_counts": bad_counts,
            "sample_ids": [sample["id"] for sample in samples],
            "bad_records": bad_records,
        }
