"""The names every layer shares, each spelled once: LLaVA's token conventions, the dtype and projector names,
and how each of the model's three parts is called in the configuration, in the model and in Hugging Face's
checkpoints."""

from __future__ import annotations

import dataclasses

import torch

IMAGE_TOKEN_INDEX = -200
"""LLaVA's placeholder for one image in token ids (the model widens it to the image's positions)."""
IGNORE_INDEX = -100
"""The label of a position that is not trained (torch's cross-entropy ignore index, as LLaVA's)."""
TORCH_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
"""Parameter dtype names in model.json and on the command line, and their torch dtypes."""
DTYPES = tuple(TORCH_DTYPES)

PROJECTOR_MODEL_IDS = {"mlp2x_gelu": "mlp", "linear": "affine", "identity": "identity"}
"""LLaVA's projector types -> MindSpeed-MM's ``vision_projector.model_id``, which are also the types of
megatron-core's ``MultimodalProjector`` (``mlp``, ``affine``)."""


@dataclasses.dataclass(frozen=True)
class Part:
    """One of LLaVA's three parts, by every name it goes by."""

    field: str
    """``LlavaConfig``'s attribute (and the key of per-part tables such as the converters')."""
    json_key: str
    """MindSpeed-MM's model.json key (``text_decoder``, or under ``image_encoder``)."""
    module_prefix: str
    """Where ``LlavaModel`` holds it: the prefix of its parameter names."""
    hf_prefixes: tuple[str, ...]
    """Where a Hugging Face LLaVA checkpoint holds it: the first is what transformers 5 holds in memory, the
    others are file layouts ``from_pretrained`` also accepts (the hub's llava-1.5-7b-hf, save_pretrained's)."""


VISION = Part("vision", "vision_encoder", "vision_model.",
              ("model.vision_tower.", "vision_tower.vision_model.", "vision_tower."))
PROJECTOR = Part("projector", "vision_projector", "vision_projection.",
                 ("model.multi_modal_projector.", "multi_modal_projector."))
LANGUAGE = Part("language", "text_decoder", "language_model.", ("model.language_model.", "language_model.model."))
PARTS = (VISION, PROJECTOR, LANGUAGE)

VOCABULARY_TABLES = ("embedding.word_embeddings.weight", "output_layer.weight", "output_layer.lora_B.weight")
"""The language model's tensors with a row per token (the output layer adapter's ``B`` too), by names within it:
a built model pads them to ``padded_vocab_size``, and the padding rows are no part of a file."""


def is_adapter(name: str) -> bool:
    """Whether a parameter (or checkpoint key) is a LoRA adapter's (``models.lora``)."""
    return ".lora_A." in name or ".lora_B." in name
