"""A stand-in for MindSpeed (Ascend/MindSpeed, not on PyPI), for tests only.

It reproduces, under the same dotted paths, the behaviour of the pieces our attention-mask patch meets
(as described in the project's notes on MindSpeed commit 3da17d56, core_r0.6.0 line): the patch manager,
the process-global attention mask, ``dot_product_attention_forward_wrapper`` and an adaptor module
that registers it when imported. No MindSpeed code is copied; NPU kernels are not reproduced.

``MINDSPEED_STUB_RELEASE`` picks the wrapper: ``3da17d56`` (default: the caller's mask is replaced by
the global one) or ``4e126097`` (the later fix: the global mask only when the caller passes None).
"""
