"""The demo's vision tower: a tiny CLIP that first learns to see the synthetic pictures.

A real LLaVA starts from a CLIP that already sees (OpenAI trained it on 400M image-text pairs); stage 1
only teaches the projector to translate what it sees. A *random* tiny tower carries colour well, but the
shape only weakly and differently on every processor's rounding (held-out shapes named 23% of the time on
one machine, 30% on another; chance is 17%). So, as the demo's language model first learns language, its
vision tower first learns the pictures: every output patch token of the layer LLaVA reads (``select_layer``)
is trained to classify the whole scene (colour, shape, position) with linear heads that are then thrown
away. The tower is written as the converted part file ``model.json`` names and stays frozen in stage 1.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from mm_plugin.data.synthetic import COLOURS, POSITIONS, SHAPES, parse_caption

CLASSES = (len(COLOURS), len(SHAPES), len(POSITIONS))
STEPS, BATCH, LR = 1000, 64, 1e-3


def build_clip(vision: dict, image_size: int, patch_size: int, seed: int):
    """A Hugging Face ``CLIPVisionModel`` of the model.json vision section ``vision``, randomly initialised."""
    from transformers import CLIPVisionConfig, CLIPVisionModel

    config = CLIPVisionConfig(hidden_size=vision["hidden_size"], intermediate_size=vision["ffn_hidden_size"],
                              num_hidden_layers=vision["num_layers"], num_attention_heads=vision["num_attention_heads"],
                              image_size=image_size, patch_size=patch_size)
    torch.manual_seed(seed)
    return CLIPVisionModel(config)


def save_clip(model, vision: dict, path: Path) -> None:
    """``model`` converted from Hugging Face's layout to our part file (what `mm-convert clip` writes)."""
    from mm_plugin.models.hf_keys import AttentionShape, to_ours
    from mm_plugin.safe_io import save_state

    heads = vision["num_attention_heads"]
    shape = AttentionShape(heads, heads, vision["hidden_size"] // heads)
    state = model.state_dict()
    save_state(dict(to_ours("vision", vision["num_layers"], shape, state.__getitem__)), path)


def _labelled_images(data_json: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """Every image of a synthetic pretrain set, preprocessed as training reads it, and its scene's labels."""
    from mm_plugin.data.config import load_data_config
    from mm_plugin.data.images import ImageProcessor

    config = load_data_config(data_json)
    processor = ImageProcessor(config.image)
    records = json.loads(Path(config.data_path).read_text(encoding="utf-8"))
    images = torch.stack([processor.load(str(Path(config.data_folder) / record["image"])) for record in records])
    labels = torch.tensor([parse_caption(record["conversations"][-1]["value"]).labels for record in records])
    return images, labels


def teach_to_see(model, select_layer: int, data_json: Path, seed: int) -> float:
    """Train ``model`` in place to classify each scene from every patch token of ``hidden_states[select_layer]``.

    AdamW with a cosine learning rate, ``STEPS`` batches of ``BATCH`` images drawn with ``seed``. Returns the
    last batch's accuracy on the hardest attribute (the shape), read from the tokens' mean logits.
    """
    images, labels = _labelled_images(data_json)
    heads = torch.nn.Linear(model.config.hidden_size, sum(CLASSES))
    parameters = list(model.parameters()) + list(heads.parameters())
    optimizer = torch.optim.AdamW(parameters, lr=LR, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.5 * (1 + math.cos(math.pi * step / STEPS)))
    generator = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(STEPS):
        batch = torch.randint(len(images), (BATCH,), generator=generator)
        tokens = model(pixel_values=images[batch], output_hidden_states=True).hidden_states[select_layer][:, 1:]
        logits = heads(tokens).split(CLASSES, dim=-1)
        target = labels[batch]
        loss = sum(torch.nn.functional.cross_entropy(part.flatten(0, 1), target[:, k].repeat_interleave(part.shape[1]))
                   for k, part in enumerate(logits))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
    model.eval()
    return float((logits[1].mean(dim=1).argmax(dim=-1) == target[:, 1]).float().mean())
