"""The language model run incrementally: the prompt once, then one decoder step per new token.

``GPTModel.forward`` always rotates positions ``0..s-1`` of the tokens it is given (it ignores
``position_ids`` under RoPE), which is right for a whole sequence and wrong for a decode step. So
this drives the model's parts itself: the embedding; the decoder layers without their rotary
embedding (the :class:`KVCache` rotates queries and keys at each token's true position and supplies
the keys and values of earlier positions); the output layer on the last position only. The layers
run as plain tensor operations on their own weights (:mod:`.direct_layers`) where those describe them
(LLaVA-1.5's LLaMA with SDPA attention), through megatron's modules otherwise.

Batches are left-padded: every row ends at the same column, so each step appends one column for
all rows. Each row's positions count from its first real token (``column - padding``), exactly the
positions it has alone, and pad keys are masked; so a row in a batch computes what it computes on
its own.
"""

from __future__ import annotations

from typing import Optional

import torch
from megatron.core import parallel_state

from mm_plugin.inference.cpu_linear import linear_for
from mm_plugin.inference.kv_cache import KVCache
from mm_plugin.inference.direct_layers import cached_attention, forward_layers, norm, runs_direct
from mm_plugin.inference.static_step import StaticDecodeStep


class IncrementalDecoder:
    """One batch of left-padded prompts on ``model`` (an :class:`~mm_plugin.models.llava.LlavaModel`
    built with ``pre_process`` and ``post_process``), with room for ``capacity`` columns."""

    def __init__(self, model, padding: torch.Tensor, capacity: int, direct: Optional[bool] = None,
                 static: Optional[bool] = None):
        """``padding``: [b] left-padding columns of each row. ``direct``: run the layers as
        :func:`~mm_plugin.inference.direct_layers.forward_layers` (default: where it applies) rather than
        through megatron's modules. ``static``: decode steps on fixed buffers, captured as a CUDA graph on a GPU
        (:class:`~mm_plugin.inference.static_step.StaticDecodeStep`; default: on CUDA, with direct layers)."""
        self.language_model = language_model = model.language_model
        self.vocab_size = model.vocab_size
        config = language_model.config
        attention = language_model.decoder.layers[0].self_attention
        tensor_parallel_size = parallel_state.get_tensor_model_parallel_world_size()
        weight = language_model.embedding.word_embeddings.weight
        self.cache = KVCache(
            num_layers=len(language_model.decoder.layers), batch=padding.shape[0],
            groups=config.num_query_groups // tensor_parallel_size, capacity=capacity,
            head_dim=attention.hidden_size_per_attention_head, dtype=weight.dtype, device=weight.device,
        )
        self.padding = padding.to(weight.device)
        # Rotary angles of positions 0..capacity-1: [capacity, head_dim].
        self.angles = language_model.rotary_pos_emb(capacity)[:, 0, 0, :]
        if self.angles.shape[-1] != self.cache.keys.shape[-1]:
            raise NotImplementedError("partial rotary embeddings (rotary_percent < 1) are not LLaMA's")
        columns = torch.arange(capacity, device=weight.device)
        self.key_is_padding = columns[None, :] < self.padding[:, None]  # [b, capacity]
        self.positions = (columns[None, :] - self.padding[:, None]).clamp(min=0)  # [b, capacity]
        self.padded = bool(padding.any())
        supported = runs_direct(language_model, language_model.decoder.layers)
        if direct and not supported:
            raise ValueError("direct layers need a decoder that direct_layers.runs_direct describes (SDPA attention)")
        self.direct = supported if direct is None else direct
        if static and not self.direct:
            raise ValueError("a static decode step runs the direct layers, which this decoder does not")
        self.static = (self.direct and weight.device.type == "cuda") if static is None else static
        self._static_step: Optional[StaticDecodeStep] = None

    @torch.no_grad()
    def prefill(self, embeddings: torch.Tensor) -> torch.Tensor:
        """``embeddings`` [s, b, h] (the whole prompts) -> next-token logits [b, vocab]."""
        length = embeddings.shape[0]
        masked = None  # causal, which the attention applies itself when no row is padded
        if self.padded:
            causal = torch.ones(length, length, dtype=torch.bool, device=embeddings.device).triu(1)
            masked = causal | self.key_is_padding[:, None, None, :length]
            # A pad query would see no key at all (NaN); let it see itself. Nothing reads its output.
            masked &= ~torch.eye(length, dtype=torch.bool, device=embeddings.device)
        logits = self._forward(embeddings, masked)
        if self.static:
            self._static_step = StaticDecodeStep(self, capture=embeddings.device.type == "cuda")
        return logits

    @torch.no_grad()
    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """``tokens`` [b], the tokens just chosen -> logits [b, vocab] for the following position."""
        if self._static_step is not None:
            return self._static_step(tokens)
        embeddings = self.embed(tokens)
        masked = None  # one new position sees all earlier ones
        if self.padded or not self.direct:  # except padding (megatron's local attention wants a mask)
            masked = self.key_is_padding[:, None, None, : self.cache.length + 1]
        return self._forward(embeddings, masked)

    def keep(self, rows: torch.Tensor) -> None:
        """Continue with these rows of the batch only (the others have finished)."""
        if self._static_step is not None:  # its buffers keep their shapes: it computes the finished rows idly
            self._static_step.keep(rows)
            return
        self.cache.keep(rows)
        self.padding, self.key_is_padding, self.positions = (
            t.index_select(0, rows) for t in (self.padding, self.key_is_padding, self.positions))
        self.padded = bool(self.padding.any())

    def _forward(self, embeddings: torch.Tensor, masked: Optional[torch.Tensor]) -> torch.Tensor:
        """New positions' embeddings [s, b, h] through the decoder (``masked``: True where a query must not
        see a key, megatron's convention) -> the last position's logits [b, vocab] on every rank."""
        # A single prompt's [s, 1, h], transposed from [1, s, h], keeps its transposed strides (the size-1
        # dimension makes it count as contiguous), and torch.matmul then runs one small matmul per position:
        # 4x slower in the first layer. A view gives it the standard strides, without a copy.
        embeddings = embeddings.view(embeddings.shape)
        start, count = self.cache.length, embeddings.shape[0]
        angles = self.rotary_angles(self.positions[:, start:start + count])
        decoder = self.language_model.decoder
        with self.cache.forward(angles, None if self.direct else decoder.layers):
            if self.direct:
                return self.direct_logits(embeddings, cached_attention(self.cache, None if masked is None else ~masked))
            hidden = decoder(hidden_states=embeddings, attention_mask=masked, rotary_pos_emb=None)
            logits, _ = self.language_model.output_layer(hidden[-1])
        return self._whole_vocabulary(logits)

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        """``tokens`` [b] -> their embeddings [1, b, h] (row-major strides, see :meth:`_forward`)."""
        embeddings = self.language_model.embedding(input_ids=tokens[:, None], position_ids=None)
        return embeddings.view(embeddings.shape)

    def rotary_angles(self, positions: torch.Tensor) -> torch.Tensor:
        """Positions [b, s] -> their rotary angles [s, b, 1, dim], as :class:`KVCache` takes them."""
        return self.angles[positions].transpose(0, 1).unsqueeze(2)

    def direct_logits(self, embeddings: torch.Tensor, attention) -> torch.Tensor:
        """New positions' ``embeddings`` [s, b, h] through the direct layers with ``attention`` (a
        :func:`~mm_plugin.inference.direct_layers.cached_attention`) -> the last position's logits [b, vocab]."""
        hidden = forward_layers(self.language_model.decoder.layers, embeddings, attention)
        # The norm works row by row: only the last position's is needed.
        last = norm(self.language_model.decoder.final_layernorm, hidden[-1])
        return self._whole_vocabulary(linear_for(last)(last, self._output_weight()))  # [b, vocab / TP] gathered

    def _whole_vocabulary(self, logits: torch.Tensor) -> torch.Tensor:
        # The rows that pad the vocabulary (for tensor parallelism) are no tokens.
        return _gather_vocabulary(logits)[:, : self.vocab_size].float()

    def _output_weight(self) -> torch.Tensor:
        language_model = self.language_model
        if language_model.share_embeddings_and_output_weights:
            return language_model.shared_embedding_or_output_weight()
        return language_model.output_layer.weight


def _gather_vocabulary(logits: torch.Tensor) -> torch.Tensor:
    """This rank's vocabulary slice [b, vocab / TP] -> the whole vocabulary [b, vocab] on every rank."""
    size = parallel_state.get_tensor_model_parallel_world_size()
    if size == 1:
        return logits
    slices = [torch.empty_like(logits) for _ in range(size)]
    torch.distributed.all_gather(slices, logits.contiguous(), group=parallel_state.get_tensor_model_parallel_group())
    return torch.cat(slices, dim=-1)
