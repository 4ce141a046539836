"""Rotary positions and a preallocated key/value cache for the language model's self-attention.

megatron-core's ``SelfAttention`` computes a step's queries, keys and values and hands them to its
core attention. The decoder is run here without a rotary embedding. For each forward the cache holds
the rotary angles of the new positions (computed once, not per layer): :meth:`KVCache.rotate` rotates
queries and keys at each token's true position, and :meth:`KVCache.append` writes a layer's keys and
values into the cache and returns everything cached so far. With ``layers``, :meth:`KVCache.forward`
calls both from a forward pre-hook on every layer's core attention, so megatron's layers run unchanged
with the whole history; the direct layers
(:func:`~mm_plugin.inference.direct_layers.cached_attention`) call them themselves.

The buffers are laid out ``[layers, batch, groups, capacity, head_dim]``, scaled-dot-product
attention's layout: a step writes one column, and the history is one strided view, no copy.
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Optional

import torch


class KVCache:
    def __init__(self, num_layers: int, batch: int, groups: int, capacity: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device):
        shape = (num_layers, batch, groups, capacity, head_dim)
        self.keys = torch.empty(shape, dtype=dtype, device=device)
        self.values = torch.empty(shape, dtype=dtype, device=device)
        self.capacity = capacity
        self.length = 0
        """Positions already cached: the current forward writes from here."""
        self._cos: Optional[torch.Tensor] = None
        self._signed_sin: Optional[torch.Tensor] = None

    @contextlib.contextmanager
    def forward(self, angles: torch.Tensor, layers: Optional[torch.nn.ModuleList] = None) -> Iterator["KVCache"]:
        """One forward over new positions whose rotary angles are ``angles`` [s, b, 1, dim], appended after
        :attr:`length`. With ``layers`` (a megatron ``TransformerBlock.layers``), their core attention rotates and
        appends through a pre-hook."""
        if layers is not None and len(layers) != self.keys.shape[0]:
            raise ValueError(f"the cache holds {self.keys.shape[0]} layers, the decoder has {len(layers)}")
        handles = [
            layer.self_attention.core_attention.register_forward_pre_hook(self._hook(index), with_kwargs=True)
            for index, layer in enumerate(layers or ())
        ]
        try:
            with self.rotation(angles):
                yield self
            self.length += angles.shape[0]
        finally:
            for handle in handles:
                handle.remove()

    @contextlib.contextmanager
    def rotation(self, angles: torch.Tensor) -> Iterator["KVCache"]:
        """:meth:`rotate` turns by ``angles`` [s, b, 1, dim] inside this block; :attr:`length` is left alone
        (a static decode step writes at a column held on the device, :meth:`write`)."""
        half = angles.shape[-1] // 2
        sin = angles.sin()
        self._cos = angles.cos().to(self.keys.dtype)
        # LLaMA's x * cos + [-x2, x1] * sin as x * cos + [x2, x1] * [-sin1, sin2]: negating the angle's sine
        # once instead of every layer's x gives the same numbers with one kernel less per rotation.
        self._signed_sin = torch.cat((-sin[..., :half], sin[..., half:]), dim=-1).to(self.keys.dtype)
        try:
            yield self
        finally:
            self._cos = self._signed_sin = None

    def rotate(self, x: torch.Tensor) -> torch.Tensor:
        """Non-interleaved RoPE (LLaMA's, megatron's ``rotary_interleaved=False``) of the new positions' ``x``
        [s, b, ..., dim] (any number of head dimensions: one call can rotate queries and keys together)."""
        shape = (*x.shape[:2], *([1] * (x.dim() - 3)), x.shape[-1])
        # [x2, x1] as the two halves flipped: one kernel, like a cat, but the CPU's cat of the halves of a
        # strided view (the fused QKV's queries and keys, without the values) is slower than the flip.
        swapped = x.unflatten(-1, (2, x.shape[-1] // 2)).flip(-2).flatten(-2)
        # The same products and sum, in place where the operand is new: fewer fresh tensors for the CPU
        # to page-fault in a long prompt.
        return (x * self._cos.view(shape)).add_(swapped.mul_(self._signed_sin.view(shape)))

    def append(self, index: int, key: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer ``index``'s new (rotated) ``key`` and ``value`` [s, b, groups, dim] into the cache -> all keys
        and values so far [b, groups, positions, dim]."""
        end = self.length + key.shape[0]
        if end > self.capacity:
            raise RuntimeError(f"KV cache full: {end} positions needed, capacity {self.capacity}")
        keys, values = self.keys[index], self.values[index]
        keys[:, :, self.length:end] = key.permute(1, 2, 0, 3)
        values[:, :, self.length:end] = value.permute(1, 2, 0, 3)
        return keys[:, :, :end], values[:, :, :end]

    def write(self, index: int, key: torch.Tensor, value: torch.Tensor,
              column: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer ``index``'s one new (rotated) ``key`` and ``value`` [1, b, groups, dim] into ``column`` (a [1]
        tensor on the cache's device) -> the whole buffers [b, groups, capacity, dim]. The same shapes and
        addresses at every step, whatever the column: what a CUDA graph can replay."""
        keys, values = self.keys[index], self.values[index]
        keys.index_copy_(2, column, key.permute(1, 2, 0, 3))
        values.index_copy_(2, column, value.permute(1, 2, 0, 3))
        return keys, values

    def keep(self, rows: torch.Tensor) -> None:
        """Keep only these batch rows (a copy of what is cached so far)."""
        self.keys = self.keys.index_select(1, rows)
        self.values = self.values.index_select(1, rows)

    def _hook(self, index: int):
        def extend(module, args, kwargs):
            query, key, value = args[:3]
            keys, values = self.append(index, self.rotate(key), value)
            # megatron's core attention takes [s, b, groups, dim]
            return (self.rotate(query), keys.permute(2, 0, 1, 3), values.permute(2, 0, 1, 3), *args[3:]), kwargs

        return extend
