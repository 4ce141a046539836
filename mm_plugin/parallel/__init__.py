"""Full <-> sharded state dicts for tensor- and pipeline-parallel megatron-core models.

    >>> from mm_plugin.parallel import load_full_state_dict, gather_full_state_dict
    >>> load_full_state_dict(model, "converted_vicuna.safetensors", prefix="language_model.")
    >>> full = gather_full_state_dict(model, vocab_size=32000)   # on rank 0, None elsewhere

See ``placement`` for how each tensor maps to the full dict, ``sources`` for how files are read.
"""

from .gather import gather_full_state_dict
from .load import FullStateDictError, LoadResult, load_full_state_dict

__all__ = ["FullStateDictError", "LoadResult", "gather_full_state_dict", "load_full_state_dict"]
