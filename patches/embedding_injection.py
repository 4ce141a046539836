"""Multimodal embedding injection: projected image features replace the image positions' embeddings.

megatron-core's ``LanguageModelEmbedding.forward(input_ids, position_ids, tokentype_ids=None)`` gains
two keyword arguments, ``image_features`` [n, hidden] and ``image_mask`` [b, s] (True where a feature
goes, row-major), and optionally ``image_positions``, the number of True in the mask when the caller
already knows it (counting a mask on a GPU waits for everything queued before). The caller — the LLaVA
model's own forward, or generation — passes them explicitly; nothing is kept in process-global state.
Without them the stock embedding runs unchanged.
"""

from __future__ import annotations

from .registry import MEGATRON_CORE, Patch, wrapping


class ImageFeatureCountError(ValueError):
    """The image positions and the projected features disagree in number."""


def _inject_image_features(wrapped, instance, args, kwargs):
    image_features = kwargs.pop("image_features", None)
    image_mask = kwargs.pop("image_mask", None)
    positions = kwargs.pop("image_positions", None)
    embeddings = wrapped(*args, **kwargs)  # [s, b, h]
    if image_features is None:
        return embeddings
    if getattr(instance.config, "sequence_parallel", False):
        raise NotImplementedError("image features cannot be injected into a sequence-parallel embedding")
    features = image_features.reshape(-1, embeddings.shape[-1])
    if positions is None:
        positions = int(image_mask.sum())
    if positions != features.shape[0]:
        raise ImageFeatureCountError(
            f"{positions} image positions in the sequence but {features.shape[0]} image feature vectors"
        )
    merged = embeddings.transpose(0, 1).masked_scatter(image_mask.unsqueeze(-1), features.to(embeddings.dtype))
    # .view gives [s, b, h] true row-major strides: for b == 1 a transposed tensor counts as contiguous,
    # and its odd strides make the first linear several times slower.
    return merged.transpose(0, 1).contiguous().view(embeddings.shape)


PATCHES = [
    Patch(
        name="multimodal.embedding_injection",
        target="megatron.core.models.common.embeddings.language_model_embedding:LanguageModelEmbedding.forward",
        replace=wrapping(_inject_image_features),
        reason="writes projected image features into the image positions of the decoder's input embeddings",
        versions=MEGATRON_CORE,
        required=True,  # LlavaModel embeds through it (models/llava.py checks it when built)
    ),
]
