"""Packed rows in the decoder: each sample attends only to itself, and its rotary positions start at 0.

A packed row holds several samples one after another (``data.packing``); ``segments`` ``[b, s]`` numbers
them, with the image positions already expanded. From it come the attention mask (causal within a
sample, nothing across samples) and the position of every token within its sample, which the rotary
embedding uses instead of its position in the row. Together with targets that never cross a sample
boundary (``image_tokens.expand_image_tokens``), every sample computes exactly what it computes alone.

What the decoder's core attention is given (``attention_for_packed_rows``): ``SDPAttention`` takes the
sample numbers themselves and attends sample by sample, never computing a block between two samples;
megatron-core's ``DotProductAttention`` (and MindSpeed's kernels behind it on NPU) takes the dense
``[b, 1, s, s]`` mask, computing those blocks and discarding them. Both are the same math.
"""

from __future__ import annotations

from typing import Optional

import torch
from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding


def sample_positions(segments: torch.Tensor) -> torch.Tensor:
    """``[b, s]``: each token's position within its sample (a new sample starts where ``segments`` changes)."""
    index = torch.arange(segments.shape[1], device=segments.device).expand_as(segments)
    starts = torch.ones_like(segments, dtype=torch.bool)
    starts[:, 1:] = segments[:, 1:] != segments[:, :-1]
    return index - torch.where(starts, index, 0).cummax(dim=1).values


def sample_attention_mask(segments: torch.Tensor) -> torch.Tensor:
    """``[b, 1, s, s]`` bool, True where attention is masked (megatron-core's convention): a query sees the
    keys of its own sample up to itself."""
    length = segments.shape[1]
    causal = torch.ones(length, length, dtype=torch.bool, device=segments.device).tril()
    same_sample = segments.unsqueeze(2) == segments.unsqueeze(1)
    return ~(same_sample & causal).unsqueeze(1)


def sample_runs(segments: torch.Tensor) -> list[list[tuple[int, int]]]:
    """Per row, the ``(start, end)`` of each run of equal sample numbers (padding is a run of its own).
    Computed once per forward (``attention_for_packed_rows`` keeps them on the tensor), not once per layer."""
    runs = getattr(segments, "sample_runs", None)
    if runs is not None:
        return runs
    runs = []
    for row in segments.tolist():
        starts = [0] + [k for k in range(1, len(row)) if row[k] != row[k - 1]]
        runs.append(list(zip(starts, starts[1:] + [len(row)])))
    return runs


def attention_for_packed_rows(segments: torch.Tensor, per_sample_attention: bool) -> torch.Tensor:
    """The ``attention_mask`` the decoder gets for packed rows: with ``per_sample_attention`` (the core
    attention is ``SDPAttention``) the sample numbers, their runs computed here once; else the dense mask."""
    if not per_sample_attention:
        return sample_attention_mask(segments)
    segments.sample_runs = sample_runs(segments)
    return segments


class SampleRotaryEmbedding(RotaryEmbedding):
    """megatron-core's rotary embedding, by position within the sample while ``positions`` is set.

    megatron-core's ``GPTModel`` computes one table of rotary angles ``[s, 1, 1, d]`` for every row from
    the row length and takes no position ids for it; with ``positions`` ``[b, s]`` set, the table becomes
    ``[s, b, 1, d]``, row ``b``'s angles at its own positions, which megatron's rotary application
    broadcasts over the heads exactly as the shared one. The model sets ``positions`` for the duration of
    one forward: the decoder receives the finished table, so activation recompute reuses it.
    """

    positions: Optional[torch.Tensor] = None

    def forward(self, *args, **kwargs) -> torch.Tensor:
        angles = super().forward(*args, **kwargs)
        if self.positions is None:
            return angles
        return angles[:, 0, 0][self.positions.t()].unsqueeze(2)


def use_sample_positions(rotary: RotaryEmbedding) -> SampleRotaryEmbedding:
    """Make the GPTModel's own rotary module (its buffers and settings kept) a ``SampleRotaryEmbedding``.
    Re-classing it, rather than building a new one, keeps whatever arguments this megatron-core release
    built it with."""
    if type(rotary) is not RotaryEmbedding:
        raise TypeError(f"packed rows need megatron-core's RotaryEmbedding, found {type(rotary).__name__}")
    rotary.__class__ = SampleRotaryEmbedding
    return rotary
