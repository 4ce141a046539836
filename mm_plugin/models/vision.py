"""The CLIP ViT vision tower, built from megatron-core's TransformerBlock.

Up to the feature layer only: LLaVA-1.5 takes the output of the penultimate layer with the class
token dropped, so the last layer (and ``ln_post``) are never built. Keys match MindSpeed-MM's
``converted_clip.pt``: ``conv1``, ``class_token``, ``position_embeddings``, ``ln_pre``, ``decoder.layers.N``.
"""

from __future__ import annotations

import torch
from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import TransformerBlock

from mm_plugin import device
from mm_plugin.config.model import VisionEncoderConfig


class CLIPVisionTower(MegatronModule):
    def __init__(self, config: TransformerConfig, layer_spec: ModuleSpec, vision: VisionEncoderConfig):
        super().__init__(config=config)
        width, patch = vision.hidden_size, vision.patch_size
        factory = dict(dtype=config.params_dtype, device="cpu" if config.use_cpu_initialization else device.current())
        self.class_token_len = vision.class_token_len
        self.keep_class_token = vision.select_feature == "cls_patch"
        self.conv1 = torch.nn.Conv2d(3, width, kernel_size=patch, stride=patch, bias=False, **factory)
        self.class_token = torch.nn.Parameter(torch.empty(1, vision.class_token_len, width, **factory))
        self.position_embeddings = torch.nn.Embedding(vision.num_patches + vision.class_token_len, width, **factory)
        self.ln_pre = torch.nn.LayerNorm(width, eps=vision.layernorm_epsilon, **factory)
        self.decoder = TransformerBlock(config=config, spec=layer_spec, post_layer_norm=False,
                                        pre_process=True, post_process=False)
        # megatron's own core attention gets an explicit all-False mask: under MindSpeed a None mask is
        # replaced by its process-global (causal) one, which would make CLIP causal.
        attention = layer_spec.submodules.self_attention.submodules.core_attention
        self.explicit_no_mask = attention is DotProductAttention
        if config.perform_initialization:
            config.init_method(self.class_token)
            config.init_method(self.position_embeddings.weight)

    def set_input_tensor(self, tensor) -> None:
        self.decoder.set_input_tensor(tensor)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """``images`` [n, 3, H, W] -> features [n, tokens, hidden] (class token dropped for ``patch``)."""
        tokens = self.embed(images)
        mask = None
        if self.explicit_no_mask:
            mask = torch.zeros(1, 1, tokens.shape[0], tokens.shape[0], dtype=torch.bool, device=tokens.device)
        return self.select(self.decoder(tokens, attention_mask=mask))

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """``images`` [n, 3, H, W] -> the layers' input [s, n, hidden]: patches after the class token, with
        position embeddings, normalised."""
        patches = self.conv1(images.to(self.conv1.weight.dtype)).flatten(2).transpose(1, 2)
        tokens = torch.cat([self.class_token.expand(patches.shape[0], -1, -1), patches], dim=1)
        return self.ln_pre(tokens + self.position_embeddings.weight).transpose(0, 1).contiguous()

    def select(self, hidden: torch.Tensor) -> torch.Tensor:
        """The layers' output [s, n, hidden] -> the features LLaVA takes [n, tokens, hidden]."""
        hidden = hidden.transpose(0, 1)
        return (hidden if self.keep_class_token else hidden[:, self.class_token_len:]).contiguous()
