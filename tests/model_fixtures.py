"""Tiny Hugging Face LLaVA models and batches in our data layout, with the Hugging Face reference.

Shared by the model, conversion, training and inference tests (and by the 2-process pool, so every
function here is module-level and picklable by reference).
"""

from __future__ import annotations

import torch

from seeds import varied

IMAGE = -200
HF_IMAGE_TOKEN = 5  # a real row of the tiny vocabularies below, as 32000 is in llava-1.5-7b-hf

# Two shapes: odd head counts ("mha"), grouped-query attention that splits over TP=2 ("gqa"), several
# layers, vocabularies not a power of two.
SHAPES = {
    "gqa": dict(vision=dict(hidden_size=48, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
                            image_size=42, patch_size=14),
                text=dict(hidden_size=60, intermediate_size=136, num_hidden_layers=4, num_attention_heads=6,
                          num_key_value_heads=2, vocab_size=202, rms_norm_eps=1e-6, rope_theta=10000.0)),
    "mha": dict(vision=dict(hidden_size=40, intermediate_size=72, num_hidden_layers=4, num_attention_heads=5,
                            image_size=28, patch_size=14),
                text=dict(hidden_size=36, intermediate_size=84, num_hidden_layers=2, num_attention_heads=3,
                          num_key_value_heads=3, vocab_size=150, rms_norm_eps=1e-5, rope_theta=500000.0)),
}


def tiny_hf_llava(shape: str, seed: int = 0):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    spec = SHAPES[shape]
    vision = CLIPVisionConfig(**spec["vision"])
    text = LlamaConfig(**spec["text"], max_position_embeddings=256, tie_word_embeddings=False)
    patches = (vision.image_size // vision.patch_size) ** 2
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_index=HF_IMAGE_TOKEN,
                         vision_feature_layer=-2, vision_feature_select_strategy="default",
                         projector_hidden_act="gelu", image_seq_length=patches)
    torch.manual_seed(varied(seed))
    model = LlavaForConditionalGeneration(config).eval()
    with torch.no_grad():  # HF initialises some tensors to constants; random values test more
        for name, parameter in model.named_parameters():
            if "norm" in name or "layrnorm" in name:
                parameter.add_(torch.randn_like(parameter) * 0.1)
    return model


def our_config(hf_model, attention_backend: str = "sdpa"):
    from mm_plugin.config.model import from_hf_config

    config = from_hf_config(hf_model.config)
    config.attention_backend = attention_backend
    config.language.max_sequence_length = 256
    return config.validate()


def our_full_state(hf_model, config) -> dict:
    """Our full (TP=1) model state for the HF weights, with unbuilt vision layers dropped."""
    from mm_plugin.models.hf_keys import OUR_PREFIXES, llava_hf_to_ours
    from mm_plugin.models.loading import select_built_vision_layers

    state = llava_hf_to_ours(hf_model.state_dict(), config)
    prefix = OUR_PREFIXES["vision"]
    vision = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    kept = {prefix + k: v for k, v in select_built_vision_layers(vision, config, "test").items()}
    return {**{k: v for k, v in state.items() if not k.startswith(prefix)}, **kept}


def mixed_batch(shape: str, seed: int = 0):
    """Four samples: one image, two images, a text-only one, and an image mid-text; right-padded."""
    spec = SHAPES[shape]
    vocab, size = spec["text"]["vocab_size"], spec["vision"]["image_size"]
    generator = torch.Generator().manual_seed(varied(seed))

    def words(n):
        return torch.randint(6, vocab, (n,), generator=generator).tolist()

    rows = [
        [1, IMAGE] + words(5),
        [1, IMAGE] + words(2) + [IMAGE] + words(3),
        [1] + words(9),
        [1] + words(3) + [IMAGE] + words(4),
    ]
    length = max(map(len, rows)) + 2
    input_ids = torch.tensor([row + [0] * (length - len(row)) for row in rows])
    labels = input_ids.clone()
    labels[(input_ids == IMAGE) | (input_ids == 0)] = -100
    labels[:, 0] = -100  # BOS
    labels[2, :4] = -100  # a prompt that is not trained
    image_counts = (input_ids == IMAGE).sum(dim=1)
    images = torch.randn(int(image_counts.sum()), 3, size, size, generator=generator)
    return dict(input_ids=input_ids, labels=labels, images=images, image_counts=image_counts)


def hf_reference(hf_model, batch) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Hugging Face logits per row (unpadded) and loss for a batch in our layout."""
    patches = hf_model.config.image_seq_length
    rows, row_labels = [], []
    for ids, labels in zip(batch["input_ids"].tolist(), batch["labels"].tolist()):
        expanded, expanded_labels = [], []
        for token, label in zip(ids, labels):
            expanded += [HF_IMAGE_TOKEN] * patches if token == IMAGE else [token]
            expanded_labels += [-100] * patches if token == IMAGE else [label]
        while expanded and expanded[-1] == 0 and expanded_labels[-1] == -100:
            expanded.pop(), expanded_labels.pop()
        rows.append(expanded)
        row_labels.append(expanded_labels)
    width = max(map(len, rows))
    input_ids = torch.tensor([r + [0] * (width - len(r)) for r in rows])
    labels = torch.tensor([r + [-100] * (width - len(r)) for r in row_labels])
    attention = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
    with torch.no_grad():
        output = hf_model(input_ids=input_ids, attention_mask=attention, labels=labels,
                          pixel_values=batch["images"] if batch["images"].shape[0] else None)
    return [output.logits[i, : len(r)] for i, r in enumerate(rows)], output.loss
