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
from .registry import Patch, PatchMissingError, Record, applied, register, registered, require, undo, wrapping
from .registry import apply as apply_patches

register(
    device_adaptation.PATCHES
    + megatron_compat.PATCHES
    + attention_mask_bypass.PATCHES
    + embedding_injection.PATCHES
)

__all__ = ["Patch", "PatchMissingError", "Record", "applied", "apply_patches", "register", "registered", "require",
           "undo", "wrapping", "describe", "missing_required"]


def missing_required() -> list[Record]:
    """The patches mm_plugin's model needs that are not applied (``Patch.required``)."""
    return [record for record in applied() if record.patch.required and record.status != "applied"]


def describe() -> str:
    """The patch list as printed by ``doctor``: one line per patch with its status and reason; a required
    patch that is not applied shows as ERROR."""
    missing = {record.patch.name for record in missing_required()}
    lines = []
    for record in applied():
        status = "ERROR" if record.patch.name in missing else record.status
        detail = f"{record.status}, but mm_plugin's model needs it: {record.detail}" if status == "ERROR" \
            else record.detail
        lines.append(f"  {status:<8} {record.patch.name:<44} {detail}")
    return "\n".join(lines)
