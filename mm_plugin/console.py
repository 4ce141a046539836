"""What the console shows: known, harmless third-party warnings are counted and summarised in one line.

megatron-core imported without TransformerEngine or apex warns, once per module and process, that it falls
back to its local implementations; torch and megatron-core warn about deprecations inside megatron-core's own
code. A user of this package can act on none of them, and a two-process demo printed about forty such lines.
Every entry point calls :func:`quiet_third_party_warnings` before it imports megatron-core (the console
scripts through the functions at the end of this module, which import their CLI only then): those warnings are
counted instead of shown, and rank 0 prints one line about them at exit. ``MM_PLUGIN_VERBOSE=1`` shows them
as before. Every other warning is shown.
"""

from __future__ import annotations

import atexit
import collections
import importlib
import os
import re
import sys
import warnings

KNOWN_WARNINGS = {
    "TransformerEngine/apex fallbacks": r"(Transformer Engine|Apex)( and Apex)? (is|are) not installed",
    "deprecations inside megatron-core": r"full scope is deprecated|`load_state_dict` is deprecated|"
                                         r"deprecating ShardedTensor|tp_group is None",
}

_hidden: collections.Counter = collections.Counter()
_installed = False


def quiet_third_party_warnings() -> None:
    """Count the ``KNOWN_WARNINGS`` instead of showing them (idempotent; off with ``MM_PLUGIN_VERBOSE=1``)."""
    global _installed
    if _installed or os.environ.get("MM_PLUGIN_VERBOSE", "0") not in ("", "0"):
        return
    _installed = True
    show = warnings.showwarning

    def counting(message, category, filename, lineno, file=None, line=None):
        label = next((label for label, pattern in KNOWN_WARNINGS.items() if re.search(pattern, str(message))), None)
        if label is None:
            show(message, category, filename, lineno, file, line)
        else:
            _hidden[label] += 1

    warnings.showwarning = counting
    atexit.register(_summarise)


def _summarise() -> None:
    if _hidden and int(os.environ.get("RANK", "0")) == 0:
        counts = ", ".join(f"{count} {label}" for label, count in _hidden.items())
        print(f"mm_plugin: hid known third-party warnings ({counts}); MM_PLUGIN_VERBOSE=1 shows them",
              file=sys.stderr, flush=True)


# --- console scripts (setup.py): each imports its command-line module after the warnings are quieted ------


def _main_of(module: str) -> int:
    quiet_third_party_warnings()
    return importlib.import_module(module).main()


def mm_convert() -> int:
    return _main_of("mm_plugin.convert.cli")


def mm_data() -> int:
    return _main_of("mm_plugin.data.cli")


def mm_pretrain() -> int:
    return _main_of("mm_plugin.training.cli")


def mm_infer() -> int:
    return _main_of("mm_plugin.inference.cli")


def mm_plot() -> int:
    return _main_of("mm_plugin.training.plot")
