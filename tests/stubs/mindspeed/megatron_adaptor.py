"""Stand-in for ``mindspeed.megatron_adaptor``: importing it patches megatron-core (as the real one does)."""


def megatron_core_adaptation(aspm):
    from .core.transformer.dot_product_attention import dot_product_attention_forward_wrapper

    aspm.register_patch("megatron.core.transformer.dot_product_attention.DotProductAttention.forward",
                        dot_product_attention_forward_wrapper)


def exe_adaptation():
    from .patch_utils import MindSpeedPatchesManager as aspm

    megatron_core_adaptation(aspm)
    aspm.apply_patches()


exe_adaptation()
