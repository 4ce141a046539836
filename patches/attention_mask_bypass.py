"""MindSpeed's attention wrapper keeps the caller's attention mask.

MindSpeed (core_r0.6.0 line, e.g. commit 3da17d56) wraps megatron-core's ``DotProductAttention.forward``
with ``dot_product_attention_forward_wrapper``, whose first statement replaces the caller's
``attention_mask`` with a process-global mask built once from static settings (a causal mask of the
configured sequence length). LLaVA then loses the language model's padding mask and runs the CLIP ViT
causally; users were told to delete that line by hand.

MindSpeed's wrapper also dispatches to NPU kernels, so it stays. Instead, each forward it builds runs
with MindSpeed's global mask set to the caller's mask for the duration of the call (restored after);
when the caller passes None, MindSpeed's own global mask is used as before. Two patches make this hold
whichever of ``mindspeed.megatron_adaptor`` and ``mm_plugin`` is imported first:

* ``mindspeed.attention_mask_factory`` wraps the factory in its home module, so every forward MindSpeed
  builds after ``import mm_plugin`` keeps the caller's mask;
* ``mindspeed.attention_mask_forward`` wraps ``DotProductAttention.forward`` when MindSpeed built it
  before ``import mm_plugin`` (its code object is a constant of the factory's code).

Both are guarded by behaviour, not by a commit id: a forward built by the installed factory is called
once on dummy arguments, with a mask, to see whether it asks for the global mask. Releases with
MindSpeed's later fix (``if attention_mask is None``) do not, and both patches are skipped saying so.
"""

from __future__ import annotations

import functools
import inspect
import sys
import types
from typing import Callable, Optional

import torch

from .registry import Patch, wrapping

WRAPPER_MODULE = "mindspeed.core.transformer.dot_product_attention"
FACTORY = "dot_product_attention_forward_wrapper"
MASK_MODULE = "mindspeed.model.transformer"  # holds _GLOBAL_ATTN_MASK and set_attention_mask
_KEEPS_MARK = "_mm_plugin_keeps_callers_mask"


def _callers_mask(args: tuple, kwargs: dict):
    """The mask megatron-core passed: ``forward(query, key, value, attention_mask, ...)`` on 0.12 and 0.16,
    positionally (what ``Attention.forward`` does) or by keyword."""
    if "attention_mask" in kwargs:
        return kwargs["attention_mask"]
    return args[3] if len(args) > 3 else None


def keeping_callers_mask(forward: Callable) -> Callable:
    """``forward``, a method built by MindSpeed's factory, run with MindSpeed's global mask set to the caller's."""

    @functools.wraps(forward)
    def forward_with_callers_mask(self, *args, **kwargs):
        mask = _callers_mask(args, kwargs)
        if mask is None:
            return forward(self, *args, **kwargs)
        masks = sys.modules[MASK_MODULE]
        previous = masks._GLOBAL_ATTN_MASK
        masks.set_attention_mask(mask)
        try:
            return forward(self, *args, **kwargs)
        finally:
            masks.set_attention_mask(previous)

    setattr(forward_with_callers_mask, _KEEPS_MARK, True)
    return forward_with_callers_mask


def _factory_keeping_callers_mask(wrapped, instance, args, kwargs):
    return keeping_callers_mask(wrapped(*args, **kwargs))


class _AskedForGlobalMask(Exception):
    pass


def _probe_arguments(forward: Callable, mask: torch.Tensor) -> list:
    """Positional arguments for one call of ``forward``: a stand-in ``self``, the mask, None elsewhere."""
    parameters = inspect.signature(forward, follow_wrapped=False).parameters.values()
    positional = [p for p in parameters if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    required = [p for p in positional if p.default is p.empty]
    count = max(len(required), 5)  # self, query, key, value, attention_mask
    arguments = [None] * count
    arguments[0] = types.SimpleNamespace(attn_mask_type=None, config=types.SimpleNamespace())
    arguments[4] = mask
    return arguments


def _asks_for_global_mask(factory: Callable) -> Optional[str]:
    """None when a forward built by ``factory`` asks for MindSpeed's global mask although the caller passed
    one (the defect); otherwise why the patch does not apply."""
    forward = factory(lambda self, query, key, value, attention_mask, *args, **kwargs: attention_mask)
    namespace = getattr(forward, "__globals__", {})
    if "get_attention_mask" not in namespace:
        return f"the forward built by {FACTORY} does not look up get_attention_mask"
    masks = sys.modules.get(MASK_MODULE)
    if masks is None or not hasattr(masks, "set_attention_mask") or not hasattr(masks, "_GLOBAL_ATTN_MASK"):
        return f"{MASK_MODULE} has no settable global attention mask"

    def asked(*args, **kwargs):
        raise _AskedForGlobalMask

    saved = namespace["get_attention_mask"]
    namespace["get_attention_mask"] = asked
    try:
        forward(*_probe_arguments(forward, torch.zeros(1, 1, 2, 2, dtype=torch.bool)))
    except _AskedForGlobalMask:
        return None
    except Exception:  # it went on past the mask (e.g. to settings not parsed yet at import time)
        pass
    finally:
        namespace["get_attention_mask"] = saved
    return f"MindSpeed's {FACTORY} already keeps a mask the caller passes (its `if attention_mask is None` fix)"


def _chain(function) -> list:
    """``function`` and every function it wraps (``functools.wraps`` sets ``__wrapped__``)."""
    layers = []
    while function is not None and function not in layers:
        layers.append(function)
        function = getattr(function, "__wrapped__", None)
    return layers


def _built_by_factory_that_discards(forward: Callable) -> Optional[str]:
    module = sys.modules.get(WRAPPER_MODULE)
    if module is None:
        return "MindSpeed's attention wrapper is not loaded; forwards it builds later are covered by the factory patch"
    factory = inspect.unwrap(getattr(module, FACTORY))
    layers = _chain(forward)
    if any(getattr(layer, _KEEPS_MARK, False) for layer in layers):
        return "DotProductAttention.forward already keeps the caller's mask"
    built_by_factory = set(c for c in factory.__code__.co_consts if isinstance(c, types.CodeType))
    if not any(getattr(layer, "__code__", None) in built_by_factory for layer in layers):
        return f"DotProductAttention.forward was not built by MindSpeed's {FACTORY}"
    return _asks_for_global_mask(factory)


PATCHES = [
    Patch(
        name="mindspeed.attention_mask_factory",
        target=f"{WRAPPER_MODULE}:{FACTORY}",
        replace=wrapping(_factory_keeping_callers_mask),
        reason="MindSpeed's attention wrapper replaces the caller's attention mask with its global causal mask",
        guard=_asks_for_global_mask,
    ),
    Patch(
        name="mindspeed.attention_mask_forward",
        target="megatron.core.transformer.dot_product_attention:DotProductAttention.forward",
        replace=keeping_callers_mask,
        reason="MindSpeed wrapped DotProductAttention.forward before mm_plugin was imported and replaces the "
               "caller's attention mask with its global causal mask",
        guard=_built_by_factory_that_discards,
    ),
]
