"""What can be wrong with LLaVA data, named once for the whole package.

Two kinds of problem, handled differently:

* :class:`BadSample` — one record cannot be trained on (a missing image, an empty caption, ...). It
  never stops training: the dataset replaces the record by the next valid one and counts the reason.
  ``BAD_REASONS`` fixes the names and their order, so the per-batch ``bad_counts`` tensor can be
  summed over DataLoader workers and all-reduced over data-parallel ranks element by element.
* :class:`DataError` — the data set or its configuration as a whole is unusable (a JSON file that does
  not parse, a missing tokenizer, more bad records than the configured limit). It stops the run with a
  message that names the file and says what to do.
"""

from __future__ import annotations

BAD_REASONS: tuple[str, ...] = (
    "malformed_record",
    "unsafe_image_path",
    "missing_image",
    "empty_image_file",
    "not_an_image",
    "corrupt_image",
    "decompression_bomb",
    "image_token_mismatch",
    "empty_caption",
    "too_long",
    "tokenization_mismatch",
)
"""Reasons a record is replaced, in the order of the ``bad_counts`` tensor of every batch."""

REASON_HINTS: dict[str, str] = {
    "malformed_record": "each record needs 'conversations': a list of {'from': 'human'|'gpt', 'value': str} "
    "turns alternating human/gpt and ending with gpt, and an optional 'image' path (string or list)",
    "unsafe_image_path": "image paths must be relative to data_folder and stay inside it (no absolute paths, "
    "no '..', no symlinks pointing outside)",
    "missing_image": "check data_folder in data.json and that the image archive was fully extracted",
    "empty_image_file": "the image file has zero bytes; re-download or re-extract it",
    "not_an_image": "the file is not in an image format Pillow can read",
    "corrupt_image": "the image file is truncated or damaged; re-download or re-extract it",
    "decompression_bomb": "the image has more pixels than max_image_pixels allows; raise the limit in "
    "data.json if the image is genuine",
    "image_token_mismatch": "the number of '<image>' tags in the text must equal the number of images "
    "(template 'plain' takes exactly one image, template 'lm' none)",
    "empty_caption": "every assistant ('gpt') turn needs non-empty text",
    "too_long": "the images alone (image_tokens each) do not fit model_max_length, or nothing trainable is "
    "left after truncation; raise model_max_length or drop the record",
    "tokenization_mismatch": "the vicuna_v1 per-round length arithmetic (as in original LLaVA) disagrees with "
    "the tokenized conversation; check the tokenizer's 'legacy' setting and turns containing ' ASSISTANT: ' "
    "or '</s>'",
}


class BadSample(Exception):
    """One record cannot be used; ``reason`` is one of :data:`BAD_REASONS`."""

    def __init__(self, reason: str, detail: str):
        if reason not in BAD_REASONS:
            raise ValueError(f"unknown bad-sample reason {reason!r}; expected one of {BAD_REASONS}")
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


class DataError(RuntimeError):
    """The data set or its configuration is unusable as a whole; the message says what to fix."""


class TooManyBadSamples(DataError):
    """More records were bad than ``max_bad_fraction`` allows."""
