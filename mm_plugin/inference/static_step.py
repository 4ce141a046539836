"""A decode step on fixed buffers, replayed as a CUDA graph on a GPU.

At batch 1 a 7B decode step is a few hundred small kernels, and launching them from Python takes longer
than the GPU takes to run them: the step is bound by the host, not by reading the weights. A CUDA graph
records the step's kernels once and replays them with one launch. For that everything the step reads and
writes must keep its address and shape from step to step, so this step differs from
:meth:`IncrementalDecoder.step <mm_plugin.inference.decoder.IncrementalDecoder.step>` in three ways, none
of them in the math:

* the new token ids and the column they go to are copied into buffers made once (the column as a device
  tensor, not a Python number), and the keys and values are written there with ``index_copy_``
  (:meth:`~mm_plugin.inference.kv_cache.KVCache.write`);
* attention reads the cache's whole capacity, with a mask that hides the columns not yet written and
  the left padding (masked keys weigh exactly zero; the columns not yet written hold zeros, not
  uninitialised memory, whose NaNs would survive a zero weight);
* the batch keeps its rows: a request that has finished is computed idly and its logits are not
  returned.

On the CPU the same step runs without capture (tested: the same greedy tokens as the dynamic step).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Optional

import torch

from mm_plugin.inference.direct_layers import cached_attention

if TYPE_CHECKING:
    from mm_plugin.inference.decoder import IncrementalDecoder

log = logging.getLogger(__name__)


class StaticDecodeStep:
    """Decode steps of ``decoder`` after its prefill; ``capture``: record the first and replay it as a CUDA graph."""

    def __init__(self, decoder: "IncrementalDecoder", capture: bool):
        cache = decoder.cache
        self.decoder, self.capture = decoder, capture
        device = cache.keys.device
        self.tokens = torch.zeros(cache.keys.shape[1], dtype=torch.long, device=device)
        self.column = torch.zeros(1, dtype=torch.long, device=device)
        self.columns = torch.arange(cache.capacity, device=device)
        self.rows: Optional[torch.Tensor] = None
        """The rows still generating, or None for all."""
        self.graph: Optional[torch.cuda.CUDAGraph] = None
        self.logits: Optional[torch.Tensor] = None
        cache.keys[:, :, :, cache.length:].zero_()
        cache.values[:, :, :, cache.length:].zero_()

    def __call__(self, tokens: torch.Tensor) -> torch.Tensor:
        """``tokens`` [rows still generating] -> their logits for the next position."""
        cache = self.decoder.cache
        if cache.length >= cache.capacity:
            raise RuntimeError(f"KV cache full: {cache.length + 1} positions needed, capacity {cache.capacity}")
        if self.rows is None:
            self.tokens.copy_(tokens)
        else:
            self.tokens.index_copy_(0, self.rows, tokens)
        self.column.fill_(cache.length)
        if self.graph is not None:
            self.graph.replay()
        elif self.capture:
            self._capture()
        else:
            self.logits = self._compute()
        cache.length += 1
        # A replay overwrites the logits in place: hand out a copy.
        logits = self.logits.clone() if self.graph is not None else self.logits
        return logits if self.rows is None else logits.index_select(0, self.rows)

    def keep(self, rows: torch.Tensor) -> None:
        """Return only these of the rows still generating from now on."""
        self.rows = rows if self.rows is None else self.rows.index_select(0, rows)

    def _compute(self) -> torch.Tensor:
        decoder = self.decoder
        embeddings = decoder.embed(self.tokens)
        angles = decoder.rotary_angles(decoder.positions.index_select(1, self.column))
        seen = (self.columns <= self.column) & ~decoder.key_is_padding  # [b, capacity]
        with decoder.cache.rotation(angles):
            return decoder.direct_logits(embeddings, cached_attention(decoder.cache, seen[:, None, None, :], self.column))

    def _capture(self) -> None:
        """Run the step once eagerly on a side stream (CUDA's advice before capture: lazy initialisations happen
        there), then record it and replay the recording for this step. Running a step twice is harmless: it
        writes the same keys and values into the same column. If recording fails, the steps run uncaptured
        and a warning says why."""
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            self.logits = self._compute()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph):
                self.logits = self._compute()
        except RuntimeError as error:
            log.warning("decode steps run without a CUDA graph, capture failed: %s", error)
            self.capture = False
            self.logits = self._compute()
            return
        graph.replay()
        self.graph = graph
