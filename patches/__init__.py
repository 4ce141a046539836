"""Runtime patches, registered in one place (shipped as ``mm_plugin.patches``).

Each module here is one monkey-patch: its targets, wrappers, guards and reasons. ``import mm_plugin``
calls :func:`apply_patches` once; nothing else happens at import.

    >>> from mm_plugin import patches
    >>> for record in patches.applied(): print(record.patch.name, record.status, record.detail)
    >>> patches.undo()            # restore every original
    >>> patches.apply_patches()   # and apply again
"""

from __future__ import annotations

from . import attention_mask_bypass, device_adaptation, embedding_injection, megatron_compat
from .registry import Patch, Record, applied, register, registered, undo, wrapping
from .registry import apply as apply_patches

register(
    device_adaptation.PATCHES
    + megatron_compat.PATCHES
    + attention_mask_bypass.PATCHES
    + embedding_injection.PATCHES
)

__all__ = ["Patch", "Record", "applied", "apply_patches", "register", "registered", "undo", "wrapping",
           "describe"]


def describe() -> str:
    """The patch list as printed by ``doctor``: one line per patch with its status and reason."""
    lines = []
    for record in applied():
        lines.append(f"  {record.status:<8} {record.patch.name:<44} {record.detail}")
    return "\n".join(lines)
