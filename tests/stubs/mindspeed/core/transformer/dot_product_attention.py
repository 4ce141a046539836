"""Stand-in for ``mindspeed.core.transformer.dot_product_attention``: the forward wrapper factory.

At 3da17d56 the wrapper's first statement replaces the caller's ``attention_mask`` with the global one;
from 4e126097 on it does so only when the caller passes None. (The real wrapper names six parameters,
the core_r0.6.0 signature; this one passes on whatever follows the mask, so that it runs on the
installed megatron-core, whose forward also takes ``attention_bias``.)
"""

import os
from functools import wraps

from mindspeed.arguments import get_args
from mindspeed.model.transformer import get_attention_mask

RELEASE = os.environ.get("MINDSPEED_STUB_RELEASE", "3da17d56")
if RELEASE not in ("3da17d56", "4e126097"):
    raise ImportError(f"MINDSPEED_STUB_RELEASE={RELEASE!r}: use 3da17d56 or 4e126097")
KEEPS_CALLERS_MASK = RELEASE == "4e126097"


def dot_product_attention_forward_wrapper(fn):
    @wraps(fn)
    def wrapper(self, query, key, value, attention_mask, *args, **kwargs):
        if attention_mask is None or not KEEPS_CALLERS_MASK:
            attention_mask = get_attention_mask()
        if get_args().use_flash_attn:
            raise NotImplementedError("NPU flash attention is not part of the MindSpeed stand-in")
        return fn(self, query, key, value, attention_mask, *args, **kwargs)

    return wrapper
