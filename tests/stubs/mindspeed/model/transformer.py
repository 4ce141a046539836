"""Stand-in for MindSpeed's process-global attention mask (``mindspeed.model.transformer``).

The mask is built once from static settings (micro-batch size, sequence length), never from the batch:
a ``[micro_batch_size, 1, seq_length, seq_length]`` boolean causal mask (True = masked).
"""

import torch

from mindspeed.arguments import get_args

_GLOBAL_ATTN_MASK = None


def set_attention_mask(attn_mask):
    global _GLOBAL_ATTN_MASK
    _GLOBAL_ATTN_MASK = attn_mask


def generate_attention_mask():
    global _GLOBAL_ATTN_MASK
    args = get_args()
    shape = (args.micro_batch_size, 1, args.seq_length, args.seq_length)
    too_far_back = torch.ones(shape, dtype=torch.bool).tril(diagonal=-(args.pre_tockens + 1))
    ahead = torch.ones(shape, dtype=torch.bool).triu(diagonal=args.next_tockens + 1)
    _GLOBAL_ATTN_MASK = too_far_back | ahead


def get_attention_mask():
    args = get_args()
    if args.cp_attention_mask_type == "causal" and _GLOBAL_ATTN_MASK is None:
        generate_attention_mask()
    return _GLOBAL_ATTN_MASK
