"""mm_plugin: LLaVA-1.5 on megatron-core, on CUDA, Ascend NPU and CPU.

Importing the package applies the runtime patches (see ``mm_plugin.patches``); that is its only
import-time effect, and importing it again applies nothing twice.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys

__version__ = "0.1.0"


def _import_patches():
    """``mm_plugin.patches``: inside the package when installed, the top-level ``patches/`` in a checkout."""
    try:
        return importlib.import_module(f"{__name__}.patches")
    except ModuleNotFoundError as error:
        if error.name != f"{__name__}.patches":
            raise
        folder = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "patches")
        spec = importlib.util.spec_from_file_location(
            f"{__name__}.patches", os.path.join(folder, "__init__.py"), submodule_search_locations=[folder]
        )
        if spec is None:
            raise ImportError(f"mm_plugin.patches not found: neither installed nor at {folder}") from error
        patches = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = patches
        spec.loader.exec_module(patches)
    return patches


patches = _import_patches()
patches.apply_patches()

from .versions import warn_if_unsupported  # noqa: E402

warn_if_unsupported()
