"""The LLaVA dataset: record -> (input_ids, labels, images), with bad records replaced and counted.

``dataset[i]`` is a pure function of the data and ``i``: if record ``i`` is bad it is replaced by the
next valid record (``i+1``, ``i+2``, ... wrapping around), and record ``i``'s reason travels with the
sample, so the collated batch can count it. Bad records passed over on the way are counted when their
own position is read: each bad record counts once per epoch, as ``mm-data check`` counts it, however long
the run of bad records it stands in. A restarted run therefore sees the same samples, replacements
included, and a DataLoader worker never fails on bad data.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any, Optional, Sequence

import numpy as np
import torch

from .errors import BadSample, DataError
from .images import ImageProcessor, resolve_image_path
from .index import RecordIndex
from .records import Record, parse_record, record_id
from .tokenization import IGNORE_INDEX, Encoded, TextEncoder, Template, fit_to_length

logger = logging.getLogger(__name__)

MAX_CONSECUTIVE_BAD = 10_000
"""A run of this many bad records in a row means the data set is broken, not dirty: stop."""


@dataclasses.dataclass
class Inspection:
    """What ``mm-data check`` learns about one valid record."""

    record: Record
    image_sizes: list[tuple[int, int]]
    image_modes: list[str]
    target_tokens: Optional[int]
    """Tokens in the loss (None without a tokenizer)."""
    sequence_length: Optional[int]
    """Length with every image expanded, before truncation (None without a tokenizer)."""
    truncated: bool


class LlavaDataset(torch.utils.data.Dataset):
    """LLaVA records of one JSON file, tokenized with a template and with their images preprocessed."""

    def __init__(
        self,
        index: RecordIndex,
        data_folder: str,
        template: Template,
        image_processor: ImageProcessor,
        *,
        tokenizer: Any = None,
        image_tokens: int,
        model_max_length: int,
        positions: Optional[Sequence[int]] = None,
    ):
        """``positions`` selects and orders the records (a train or validation split); default all."""
        if not os.path.isdir(data_folder):
            raise DataError(f"data_folder {data_folder!r} is not a directory; check data.json")
        self.index = index
        self.data_folder = os.path.realpath(data_folder)
        self.template = template
        self.image_processor = image_processor
        self.encoder = TextEncoder(tokenizer) if tokenizer is not None else None
        self.image_tokens = image_tokens
        self.model_max_length = model_max_length
        self.positions = np.arange(len(index), dtype=np.int64) if positions is None else np.asarray(positions, np.int64)
        self.output_size = image_processor.output_size

    def __len__(self) -> int:
        return len(self.positions)

    def lengths(self) -> np.ndarray:
        """Approximate length of each sample in tokens (words + image tokens), for length grouping."""
        records = self.positions
        return self.index.word_counts[records].astype(np.int64) + self.index.image_counts[records] * self.image_tokens

    def with_images(self) -> np.ndarray:
        """Whether each sample's record names an image, for grouping by modality."""
        return self.index.image_counts[self.positions] > 0

    # -- one record, no replacement -------------------------------------------------------------------

    def _record(self, position: int) -> tuple[Record, list[str]]:
        """The parsed record at ``position`` and its image files, checked for everything but the files."""
        number = int(self.positions[position])
        try:
            raw = self.index.record(number)
        except ValueError as error:  # bad UTF-8 or JSON inside one record of an otherwise valid file
            raise BadSample("malformed_record", f"record #{number} of {self.index.source}: {error}") from None
        record = parse_record(raw, number)
        self.template.check(record)
        paths = [resolve_image_path(self.data_folder, path, self.data_folder) for path in record.images]
        return record, paths

    def _encode(self, record: Record) -> tuple[Encoded, Encoded, bool]:
        full = self.template.encode(record, self.encoder)
        fitted, truncated = fit_to_length(full, record, self.image_tokens, self.model_max_length)
        return full, fitted, truncated

    def load(self, position: int) -> dict[str, Any]:
        """Sample ``position`` or ``BadSample``; never replaces."""
        return self._guarded(self._load, position)

    def inspect(self, position: int) -> Inspection:
        """Everything ``load`` checks (images fully decoded, not preprocessed), for ``mm-data check``."""
        return self._guarded(self._inspect, position)

    def _load(self, position: int) -> dict[str, Any]:
        record, paths = self._record(position)
        _, encoded, _ = self._encode(record)
        height, width = self.output_size
        images = torch.stack([self.image_processor.load(path) for path in paths]) if paths \
            else torch.zeros(0, 3, height, width)
        return {
            "input_ids": torch.tensor(encoded.input_ids, dtype=torch.long),
            "labels": torch.tensor(encoded.labels, dtype=torch.long),
            "images": images,
            "id": record.id,
        }

    def _inspect(self, position: int) -> Inspection:
        record, paths = self._record(position)
        target_tokens = sequence_length = None
        truncated = False
        if self.encoder is not None:
            full, _, truncated = self._encode(record)
            target_tokens = sum(1 for label in full.labels if label != IGNORE_INDEX)
            sequence_length = len(full.input_ids) + len(record.images) * (self.image_tokens - 1)
        sizes, modes = [], []
        for path in paths:
            size, mode = self.image_processor.inspect(path)
            sizes.append(size)
            modes.append(mode)
        return Inspection(record, sizes, modes, target_tokens, sequence_length, truncated)

    def _guarded(self, method, position: int):
        try:
            return method(position)
        except BadSample:
            raise
        except Exception as error:  # noqa: BLE001 - a worker must not die on data it could not foresee
            number = int(self.positions[position])
            logger.exception("unexpected error reading record #%d of %s", number, self.index.source)
            raise BadSample("malformed_record", f"record #{number}: unexpected {type(error).__name__}: {error}") \
                from None

    # -- with replacement -----------------------------------------------------------------------------

    def __getitem__(self, position: int) -> dict[str, Any]:
        """Sample ``position``, or the next valid one; ``bad`` holds ``(reason, message)`` of record ``position``
        when it was bad (the others skipped are counted at their own positions)."""
        bad: list[tuple[str, str]] = []
        for step in range(min(len(self), MAX_CONSECUTIVE_BAD)):
            current = (position + step) % len(self)
            try:
                sample = self.load(current)
            except BadSample as error:
                bad.append((error.reason, self.describe_bad(current, error)))
                continue
            sample["bad"] = bad[:1]
            return sample
        reasons = sorted({reason for reason, _ in bad})
        raise DataError(
            f"{self.index.source}: {len(bad)} records in a row from position {position} are bad ({', '.join(reasons)}); "
            f"first: {bad[0][1]}. The data set looks broken; run `mm-data check` on it."
        )

    def describe_bad(self, position: int, error: BadSample) -> str:
        """One line naming the file, the record and what is wrong with it."""
        number = int(self.positions[position])
        try:
            rid = record_id(self.index.record(number), number)
        except ValueError:
            rid = f"#{number}"
        return f"{self.index.source.name} record {rid} (#{number}): {error}"
