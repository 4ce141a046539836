"""Expanding each image placeholder (-200) to the positions its features will occupy.

The data emits one placeholder per image; the model widens it here, before the decoder, in input ids,
labels and the loss mask, then pads to a fixed length. Image positions never enter the loss; the
last image position predicts the first caption token and is trained, as in original LLaVA (megatron-
core's own LLaVAModel masks it out). The embedding patch later writes the features where
``image_mask`` is True, in row-major order, i.e. sample by sample, image by image.
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Sequence

import torch

from mm_plugin.config.names import IGNORE_INDEX, IMAGE_TOKEN_INDEX


class ImageTokenError(ValueError):
    """A sample whose placeholders and images disagree, or whose expanded length does not fit."""


@dataclasses.dataclass
class ExpandedTokens:
    input_ids: torch.Tensor
    """[b, s] token ids; image positions hold ``pad_token_id`` (their embeddings are overwritten)."""
    targets: torch.Tensor
    """[b, s] next-token targets (0 where not trained)."""
    loss_mask: torch.Tensor
    """[b, s] float, 1 where the target is trained."""
    image_mask: torch.Tensor
    """[b, s] bool, True at the positions that receive image features."""
    segments: Optional[torch.Tensor] = None
    """[b, s] packed rows only: the sample each position belongs to (``data.packing``), -1 on padding."""


def _name(sample_ids: Optional[Sequence[str]], row: int) -> str:
    return f"sample {sample_ids[row]!r}" if sample_ids is not None else f"batch row {row}"


def expand_image_tokens(
    input_ids: torch.Tensor,
    labels: Optional[torch.Tensor],
    image_counts: torch.Tensor,
    tokens_per_image: int,
    seq_length: Optional[int],
    pad_token_id: int = 0,
    sample_ids: Optional[Sequence[str]] = None,
    segments: Optional[torch.Tensor] = None,
) -> ExpandedTokens:
    """Widen every placeholder of ``input_ids`` [b, L] to ``tokens_per_image`` positions.

    ``labels`` are aligned with ``input_ids`` (the token itself where trained, -100 elsewhere; None
    for inference). The result has ``seq_length`` positions (None: the longest expanded row). Only
    trailing padding may be cut; a row whose labels or images would be cut raises. ``segments`` [b, L]
    (packed rows) are widened with the ids, and no target crosses from one sample to the next.
    """
    is_image = input_ids == IMAGE_TOKEN_INDEX
    placeholders = is_image.sum(dim=1)
    for row in torch.nonzero(placeholders != image_counts.to(placeholders.device)).flatten().tolist():
        raise ImageTokenError(
            f"{_name(sample_ids, row)}: {int(placeholders[row])} image placeholder(s) in the text but "
            f"{int(image_counts[row])} image(s); each image needs exactly one <image> in its text"
        )
    width = torch.where(is_image, tokens_per_image, 1)
    start = torch.cumsum(width, dim=1) - width  # first expanded position of every source token
    expanded_lengths = width.sum(dim=1)
    length = int(expanded_lengths.max()) if seq_length is None else seq_length
    batch, device = input_ids.shape[0], input_ids.device

    if labels is None:
        labels = torch.full_like(input_ids, IGNORE_INDEX)
    image_end = torch.where(is_image, start + tokens_per_image, 0).amax(dim=1)
    trained_end = torch.where(labels != IGNORE_INDEX, start + 1, 0).amax(dim=1)
    for row in torch.nonzero((image_end > length) | (trained_end > length)).flatten().tolist():
        raise ImageTokenError(
            f"{_name(sample_ids, row)}: needs {int(max(image_end[row], trained_end[row]))} positions with its "
            f"images expanded ({tokens_per_image} per image) but the sequence length is {length}; "
            "the data layer should have truncated or rejected it"
        )

    rows = torch.arange(batch, device=device).unsqueeze(1).expand_as(input_ids)
    keep = (~is_image) & (start < length)
    expanded_ids = torch.full((batch, length), pad_token_id, dtype=input_ids.dtype, device=device)
    expanded_labels = torch.full((batch, length), IGNORE_INDEX, dtype=labels.dtype, device=device)
    expanded_ids[rows[keep], start[keep]] = input_ids[keep]
    expanded_labels[rows[keep], start[keep]] = labels[keep]

    image_mask = torch.zeros((batch, length), dtype=torch.bool, device=device)
    image_starts = start[is_image]
    if image_starts.numel():
        offsets = torch.arange(tokens_per_image, device=device)
        image_mask[rows[is_image].unsqueeze(1), image_starts.unsqueeze(1) + offsets] = True

    # Position t predicts token t+1: the last image position predicts the first caption token.
    targets = torch.full_like(expanded_labels, IGNORE_INDEX)
    targets[:, :-1] = expanded_labels[:, 1:]
    expanded_segments = None
    if segments is not None:  # a sample's last token predicts nothing, as before padding when unpacked
        positions = torch.arange(length, device=device).expand(batch, length).contiguous()
        source = torch.searchsorted(start.contiguous(), positions, right=True) - 1  # the token covering each
        expanded_segments = segments.gather(1, source).masked_fill(positions >= expanded_lengths.unsqueeze(1), -1)
        targets[:, :-1].masked_fill_(expanded_segments[:, 1:] != expanded_segments[:, :-1], IGNORE_INDEX)
    loss_mask = targets != IGNORE_INDEX
    targets = targets.masked_fill(~loss_mask, 0)
    return ExpandedTokens(expanded_ids, targets, loss_mask.float(), image_mask, expanded_segments)
