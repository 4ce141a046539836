"""Stand-in for the parsed arguments MindSpeed reads through ``megatron.training.get_args()``.

megatron-core's wheel has no ``megatron.training``; the static settings live here instead. As with the
real ``get_args``, reading them before they are set (e.g. at import time) fails.
"""

from types import SimpleNamespace

DEFAULTS = dict(
    use_flash_attn=False,
    cp_attention_mask_type="causal",
    pre_tockens=65536,  # MindSpeed's spelling
    next_tockens=0,
    sparse_mode=0,
    micro_batch_size=1,
    seq_length=2048,
)

_args = None


def set_args(**settings) -> SimpleNamespace:
    global _args
    _args = SimpleNamespace(**{**DEFAULTS, **settings})
    return _args


def get_args() -> SimpleNamespace:
    assert _args is not None, "MindSpeed stand-in: arguments are not initialized"
    return _args
