"""Packed rows in the decoder: each sample attends only to itself, and its rotary positions start at 0.

A packed row holds several samples one after another (``data.packing``); ``segments`` ``[b, s]`` numbers
them, with the image positions already expanded. From it come the attention mask (causal within a
sample, nothing across samples) and the position of every token within its sample, which the rotary
embedding uses instead of its position in the row. Together with targets that never cross a sample
boundary (``image_tokens.expand_image_tokens``), every sample computes exactly what it computes alone.

The mask is a full ``[b, 1, s, s]`` tensor: on the CPU and through SDPA this is the same math as the
unpacked run, computing the masked blocks and discarding them.
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
