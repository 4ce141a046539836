"""LLaVA-1.5 on megatron-core: CLIP vision tower -> projector -> LLaMA decoder (GPTModel).

Read top to bottom: the model's parts are built from specs (``specs.py``) and configs
(``transformer_configs.py``); ``forward`` widens the image placeholders (``image_tokens.py``), runs
the vision tower and projector on the first pipeline stage, hands the features to the embedding
(the ``multimodal.embedding_injection`` patch writes them into the image positions), runs the
decoder and, on the last stage, returns the per-token loss with its mask — or the logits.
"""

from __future__ import annotations

import contextlib
import math
from typing import Optional, Sequence

import torch
from megatron.core import parallel_state, tensor_parallel
from megatron.core.models.gpt import GPTModel
from megatron.core.models.vision.multimodal_projector import MultimodalProjector
from megatron.core.transformer.module import MegatronModule

from mm_plugin import patches
from mm_plugin.config.model import LlavaConfig
from mm_plugin.config.names import PROJECTOR_MODEL_IDS, TORCH_DTYPES, is_adapter
from mm_plugin.models.attention import SDPAttention
from mm_plugin.models.image_tokens import ExpandedTokens, expand_image_tokens
from mm_plugin.models.lora import OUTPUT_LAYER, adapt_output_layer, initialise_adapters
from mm_plugin.models.packed_rows import attention_for_packed_rows, sample_positions, use_sample_positions
from mm_plugin.models.specs import core_attention, language_layer_spec, projector_submodules, vision_layer_spec
from mm_plugin.models.transformer_configs import language_config, projector_config, vision_config
from mm_plugin.models.vision import CLIPVisionTower


VOCAB_PADDING_MULTIPLE = 128
"""Embedding rows are padded to a multiple of this (Megatron-LM's ``make_vocab_size_divisible_by``) and of
the tensor-parallel size. Any TP that divides 128 gives the same padded table, so checkpoints reshard
across TP sizes; the extra rows are zeros and their logits are masked, so the math is that of the true
vocabulary (32000 stays 32000; llava-1.5-7b-hf's 32064 becomes 32128)."""


def padded_vocab_size(vocab_size: int, tensor_parallel_size: int) -> int:
    multiple = math.lcm(VOCAB_PADDING_MULTIPLE, tensor_parallel_size)
    return -(-vocab_size // multiple) * multiple


def _check_fits(config: LlavaConfig) -> None:
    """Refuse, before allocating, a model whose parameters cannot fit this process's device memory.

    The estimate is a lower bound (this rank's share of the parameters under tensor and pipeline
    parallelism, no activations, gradients or optimizer state), so a refusal is never a false alarm."""
    from mm_plugin import device
    from mm_plugin.config.model import ModelConfigError, parameter_bytes

    parts = parameter_bytes(config)
    shards = parallel_state.get_tensor_model_parallel_world_size()
    needed = (parts["vision"] + parts["projector"]) / shards + parts["language"] / (
        shards * parallel_state.get_pipeline_model_parallel_world_size())
    free = device.free_memory_bytes()
    if needed > free:
        raise ModelConfigError(
            f"{config.source}: the model's parameters alone need at least {needed / 2**30:.1f} GiB in this process "
            f"(vision {parts['vision'] / 2**30:.1f}, projector {parts['projector'] / 2**30:.1f}, language model "
            f"{parts['language'] / 2**30:.1f} GiB, split over tensor x pipeline parallelism), but only "
            f"{free / 2**30:.1f} GiB of {device.kind()} memory is free; check the sizes in model.json, or use more "
            "tensor/pipeline parallelism or a smaller params_dtype"
        )


class LlavaModel(MegatronModule):
    """``pre_process``/``post_process`` as in megatron-core: the first pipeline stage holds the vision
    tower, the projector and the embedding; the last holds the output layer.

    ``extra``: megatron ``TransformerConfig`` settings of the run, applied to every part (activation
    recompute, sequence parallel, ...).
    """

    def __init__(self, config: LlavaConfig, pre_process: bool = True, post_process: bool = True,
                 extra: Optional[dict] = None):
        extra = extra or {}
        patches.require("multimodal.embedding_injection")  # the image merge below embeds through it
        _check_fits(config)
        language = language_config(config.language, extra)
        super().__init__(config=language)
        self.llava_config = config
        self.pre_process, self.post_process = pre_process, post_process
        self.tokens_per_image = config.vision.num_image_tokens
        self.vocab_size = config.language.vocab_size
        self.share_embeddings_and_output_weights = False  # read by megatron's schedules and DDP

        if pre_process:
            self.vision_model = CLIPVisionTower(
                vision_config(config.vision, extra), vision_layer_spec(config.attention_backend), config.vision)
            self.vision_projection = _build_projector(config, extra)
        self.language_model = GPTModel(
            config=language,
            transformer_layer_spec=language_layer_spec(config.attention_backend, config.language.lora),
            vocab_size=padded_vocab_size(self.vocab_size, parallel_state.get_tensor_model_parallel_world_size()),
            max_sequence_length=config.language.max_sequence_length,
            pre_process=pre_process,
            post_process=post_process,
            parallel_output=True,
            share_embeddings_and_output_weights=False,
            position_embedding_type="rope",
            rotary_base=config.language.rotary_base,
        )
        use_sample_positions(self.language_model.rotary_pos_emb)  # for packed rows
        lora = config.language.lora
        if lora is not None:
            if post_process and OUTPUT_LAYER in lora.targets:  # GPTModel builds it itself, not from the spec
                adapt_output_layer(self.language_model, lora)
            initialise_adapters(self.language_model)
        self.cast_to_params_dtype()
        self.freeze()

    def cast_to_params_dtype(self) -> None:
        """Every part in its own ``params_dtype``. megatron-core builds its linear layers in
        ``params_dtype`` but its norms in fp32 (its training wrapper, ``Float16Module``, casts them);
        a bf16 model run without that wrapper would feed bf16 activations to fp32 norms, which CUDA's
        layer norm refuses."""
        for part, part_config in self._parts():
            part.to(TORCH_DTYPES[part_config.params_dtype])

    # --- freezing -----------------------------------------------------------------------------

    def freeze(self) -> None:
        """``requires_grad=False`` for every part whose config says ``freeze``: such parameters get
        no gradient and megatron's DDP and optimizer leave them out. Under LoRA the language model's own
        weights are frozen too, its adapters train."""
        for part, part_config in self._parts():
            if part_config.freeze:
                part.requires_grad_(False)
        if self.llava_config.language.lora is not None:
            for name, parameter in self.language_model.named_parameters():
                parameter.requires_grad_(is_adapter(name))

    def _parts(self):
        """``(module, its config)`` for each part this pipeline stage holds."""
        config = self.llava_config
        parts = ((getattr(self, "vision_model", None), config.vision),
                 (getattr(self, "vision_projection", None), config.projector),
                 (self.language_model, config.language))
        return [(part, part_config) for part, part_config in parts if part is not None]

    # --- pipeline hooks used by megatron's schedules ------------------------------------------

    def set_input_tensor(self, input_tensor) -> None:
        if isinstance(input_tensor, (list, tuple)):
            input_tensor = input_tensor[0]
        self.language_model.set_input_tensor(input_tensor)

    # --- forward ------------------------------------------------------------------------------

    def image_features(self, images: torch.Tensor) -> torch.Tensor:
        """[n, 3, H, W] -> projected features [n, tokens_per_image, lm_hidden]. A frozen vision tower
        runs without autograd (no activations kept for it)."""
        config = self.llava_config
        with torch.no_grad() if config.vision.freeze else contextlib.nullcontext():
            features = self.vision_model(images)
        with torch.no_grad() if config.vision.freeze and config.projector.freeze else contextlib.nullcontext():
            return self.vision_projection(features)

    def expand(self, input_ids: torch.Tensor, labels: Optional[torch.Tensor], image_counts: torch.Tensor,
               seq_length: Optional[int] = None, pad_token_id: int = 0,
               sample_ids: Optional[Sequence[str]] = None, segments: Optional[torch.Tensor] = None) -> ExpandedTokens:
        return expand_image_tokens(input_ids, labels, image_counts, self.tokens_per_image, seq_length,
                                   pad_token_id, sample_ids, segments)

    def embed(self, tokens: ExpandedTokens, images: Optional[torch.Tensor]) -> torch.Tensor:
        """Decoder input [s, b, h]: token embeddings with image features at ``tokens.image_mask``."""
        features = self.image_features(images) if images is not None and images.shape[0] else None
        return self.language_model.embedding(
            input_ids=tokens.input_ids, position_ids=None,
            image_features=features, image_mask=tokens.image_mask if features is not None else None,
        )

    def forward(self, input_ids: torch.Tensor, labels: Optional[torch.Tensor] = None,
                images: Optional[torch.Tensor] = None, image_counts: Optional[torch.Tensor] = None,
                seq_length: Optional[int] = None, pad_token_id: int = 0,
                sample_ids: Optional[Sequence[str]] = None, segments: Optional[torch.Tensor] = None):
        """One micro-batch in the data's layout (one -200 per image, labels aligned with ids); with
        ``segments``, rows are packed (``data.packing``) and every sample sees only itself.

        Returns ``(output, loss_mask)``: on the last pipeline stage with labels the per-token loss
        [b, s] and its mask; without labels the logits [b, s, vocab/TP] (padding columns masked) and
        None; on other stages the hidden states for the next stage and None.
        """
        if image_counts is None:
            image_counts = torch.zeros(input_ids.shape[0], dtype=torch.long)
        tokens = self.expand(input_ids, labels, image_counts, seq_length, pad_token_id, sample_ids, segments)
        decoder_input = self.embed(tokens, images) if self.pre_process else None
        attention_mask, rotary = None, self.language_model.rotary_pos_emb
        if tokens.segments is not None:
            per_sample = core_attention(self.llava_config.attention_backend) is SDPAttention
            attention_mask = attention_for_packed_rows(tokens.segments, per_sample)
            rotary.positions = sample_positions(tokens.segments)
        try:
            output = self.language_model(input_ids=tokens.input_ids, position_ids=None,
                                         attention_mask=attention_mask, decoder_input=decoder_input)
        finally:
            rotary.positions = None
        if not self.post_process:
            return output, None
        logits = self.mask_padded_vocab(output)
        if labels is None:
            return logits, None
        per_token_loss = tensor_parallel.vocab_parallel_cross_entropy(logits.float(), tokens.targets)
        return per_token_loss, tokens.loss_mask

    def mask_padded_vocab(self, logits: torch.Tensor) -> torch.Tensor:
        """Logits of the rows added to make the vocabulary divisible by TP can never win or count."""
        local = logits.shape[-1]
        first = parallel_state.get_tensor_model_parallel_rank() * local
        if first + local <= self.vocab_size:
            return logits
        padding = torch.arange(first, first + local, device=logits.device) >= self.vocab_size
        return logits.masked_fill(padding, torch.finfo(logits.dtype).min)


def _build_projector(config: LlavaConfig, extra: dict) -> torch.nn.Module:
    if config.projector.projector_type == "identity":
        return torch.nn.Identity()
    projector_type = PROJECTOR_MODEL_IDS[config.projector.projector_type]
    return MultimodalProjector(projector_config(config, extra), projector_submodules(), projector_type,
                               input_size=config.vision.hidden_size)
