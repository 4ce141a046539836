"""Putting weights into a built LlavaModel: part files, Hugging Face state dicts, training checkpoints.

A converted vision part file holds the whole CLIP tower (every layer and ``ln_post``) so it converts
back to Hugging Face unchanged; the model builds only up to its feature layer, so the rest is
dropped here — after checking that the file and the config agree on the tower.
"""

from __future__ import annotations

import logging
import re
from typing import Mapping

import torch

from mm_plugin.config.model import LlavaConfig, ModelConfigError

logger = logging.getLogger(__name__)

_VISION_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.")


def vision_layers_in(state: Mapping[str, torch.Tensor]) -> int:
    """Transformer layers a vision part state holds."""
    indices = {int(match.group(1)) for key in state if (match := _VISION_LAYER.match(key))}
    return max(indices) + 1 if indices else 0


def select_built_vision_layers(state: Mapping[str, torch.Tensor], config: LlavaConfig,
                               source: str) -> dict[str, torch.Tensor]:
    """The vision part's tensors the model builds: layers up to the feature layer, no ``ln_post``.

    ``select_layer`` counts from the end of the tower in the file, so with it set the file must hold
    exactly ``num_layers`` layers; MindSpeed-MM's convention (no ``select_layer``) builds
    ``num_layers`` layers and ignores any after them.
    """
    vision = config.vision
    held = vision_layers_in(state)
    built = vision.num_layers_built
    if vision.select_layer is not None and held != vision.num_layers:
        raise ModelConfigError(
            f"{source} holds a {held}-layer vision tower but {config.source} says num_layers "
            f"{vision.num_layers} with select_layer {vision.select_layer}. State it one way: "
            f"num_layers {held} with select_layer {vision.select_layer} (LLaVA's), or num_layers {built} "
            "without select_layer (MindSpeed-MM's: the layers built)"
        )
    if held < built:
        raise ModelConfigError(f"{source} holds {held} vision layers; {config.source} builds {built}")
    kept = {}
    for key, tensor in state.items():
        match = _VISION_LAYER.match(key)
        if key.startswith("ln_post.") or (match and int(match.group(1)) >= built):
            continue
        kept[key] = tensor
    if held > built:
        logger.info("%s: vision layers %d..%d and ln_post are not built (the feature is layer %d's output)",
                    source, built, held - 1, built)
    return kept
