"""The one table between Hugging Face names and ours, with the QKV and gate/up regrouping.

Our names are megatron-core's (and MindSpeed-MM's part files'): a part's keys are relative to the
part (``converted_clip.pt``, ``converted_vicuna.pt``, ``mlp.pt``); the full model prefixes them with
``vision_model.``, ``vision_projection.`` and ``language_model.``. Hugging Face names are relative to
``CLIPVisionTransformer``, ``LlavaMultiModalProjector`` and ``LlamaForCausalLM``; :data:`HF_PREFIXES`
lists where each part sits in a LLaVA checkpoint, in every layout ``from_pretrained`` accepts.

Everything here is a pure function of tensors, so a converter can stream: ask :func:`part_keys` which
source tensors one output needs, read just those, convert, write, drop.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Iterator, Mapping

import torch

PARTS = ("vision", "projector", "language")

# Where each part's Hugging Face keys sit inside a LLaVA checkpoint. The first prefix is what
# transformers 5 holds in memory; the others are file layouts from_pretrained also accepts
# (the hub's llava-1.5-7b-hf, and files written by transformers' save_pretrained).
HF_PREFIXES = {
    "vision": ("model.vision_tower.", "vision_tower.vision_model.", "vision_tower."),
    "projector": ("model.multi_modal_projector.", "multi_modal_projector."),
    "language": ("model.language_model.", "language_model.model."),
}
# The language model's output layer lives outside its ``model.`` in a LlamaForCausalLM.
HF_LM_HEAD = ("lm_head.weight", "language_model.lm_head.weight")
OUR_PREFIXES = {"vision": "vision_model.", "projector": "vision_projection.", "language": "language_model."}


@dataclasses.dataclass(frozen=True)
class AttentionShape:
    """What the QKV regrouping needs to know about one part's attention."""

    num_heads: int
    num_groups: int
    head_dim: int


def fuse_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, shape: AttentionShape) -> torch.Tensor:
    """HF separate q/k/v (weights or biases) -> megatron ``linear_qkv``: per query group, that group's
    query heads, then its key head, then its value head."""
    heads_per_group = shape.num_heads // shape.num_groups
    rest = q.shape[1:]
    q = q.reshape(shape.num_groups, heads_per_group * shape.head_dim, *rest)
    k = k.reshape(shape.num_groups, shape.head_dim, *rest)
    v = v.reshape(shape.num_groups, shape.head_dim, *rest)
    return torch.cat([q, k, v], dim=1).reshape(-1, *rest)


def split_qkv(qkv: torch.Tensor, shape: AttentionShape) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    heads_per_group = shape.num_heads // shape.num_groups
    rest = qkv.shape[1:]
    grouped = qkv.reshape(shape.num_groups, (heads_per_group + 2) * shape.head_dim, *rest)
    q, k, v = grouped.split([heads_per_group * shape.head_dim, shape.head_dim, shape.head_dim], dim=1)
    return (q.reshape(-1, *rest).contiguous(), k.reshape(-1, *rest).contiguous(), v.reshape(-1, *rest).contiguous())


def _fuse_gate_up(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return torch.cat([gate, up], dim=0)


def _split_gate_up(fused: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    gate, up = fused.chunk(2, dim=0)
    return gate.contiguous(), up.contiguous()


@dataclasses.dataclass(frozen=True)
class KeyRule:
    """One of our keys and the Hugging Face keys it is made of (``{i}``: layer index)."""

    ours: str
    hf: tuple[str, ...]
    to_ours: Callable = lambda shape, tensor: tensor
    to_hf: Callable = lambda shape, tensor: (tensor,)


def _copy(ours: str, hf: str) -> KeyRule:
    return KeyRule(ours, (hf,))


def _qkv(ours: str, q: str, k: str, v: str) -> KeyRule:
    return KeyRule(ours, (q, k, v), lambda shape, q, k, v: fuse_qkv(q, k, v, shape), lambda shape, t: split_qkv(t, shape))


_VISION_LAYER = [
    _qkv("decoder.layers.{i}.self_attention.linear_qkv.weight", "encoder.layers.{i}.self_attn.q_proj.weight",
         "encoder.layers.{i}.self_attn.k_proj.weight", "encoder.layers.{i}.self_attn.v_proj.weight"),
    _qkv("decoder.layers.{i}.self_attention.linear_qkv.bias", "encoder.layers.{i}.self_attn.q_proj.bias",
         "encoder.layers.{i}.self_attn.k_proj.bias", "encoder.layers.{i}.self_attn.v_proj.bias"),
    _copy("decoder.layers.{i}.self_attention.linear_proj.weight", "encoder.layers.{i}.self_attn.out_proj.weight"),
    _copy("decoder.layers.{i}.self_attention.linear_proj.bias", "encoder.layers.{i}.self_attn.out_proj.bias"),
    _copy("decoder.layers.{i}.input_layernorm.weight", "encoder.layers.{i}.layer_norm1.weight"),
    _copy("decoder.layers.{i}.input_layernorm.bias", "encoder.layers.{i}.layer_norm1.bias"),
    _copy("decoder.layers.{i}.pre_mlp_layernorm.weight", "encoder.layers.{i}.layer_norm2.weight"),
    _copy("decoder.layers.{i}.pre_mlp_layernorm.bias", "encoder.layers.{i}.layer_norm2.bias"),
    _copy("decoder.layers.{i}.mlp.linear_fc1.weight", "encoder.layers.{i}.mlp.fc1.weight"),
    _copy("decoder.layers.{i}.mlp.linear_fc1.bias", "encoder.layers.{i}.mlp.fc1.bias"),
    _copy("decoder.layers.{i}.mlp.linear_fc2.weight", "encoder.layers.{i}.mlp.fc2.weight"),
    _copy("decoder.layers.{i}.mlp.linear_fc2.bias", "encoder.layers.{i}.mlp.fc2.bias"),
]
_VISION_TOP = [
    KeyRule("class_token", ("embeddings.class_embedding",),
            lambda shape, t: t.reshape(1, 1, -1), lambda shape, t: (t.reshape(-1),)),
    _copy("conv1.weight", "embeddings.patch_embedding.weight"),
    _copy("position_embeddings.weight", "embeddings.position_embedding.weight"),
    _copy("ln_pre.weight", "pre_layrnorm.weight"),
    _copy("ln_pre.bias", "pre_layrnorm.bias"),
    # Not used by LLaVA (the feature precedes it) but kept, so a converted file round-trips to HF.
    _copy("ln_post.weight", "post_layernorm.weight"),
    _copy("ln_post.bias", "post_layernorm.bias"),
]
_PROJECTOR = [
    _copy("encoder.linear_fc1.weight", "linear_1.weight"),
    _copy("encoder.linear_fc1.bias", "linear_1.bias"),
    _copy("encoder.linear_fc2.weight", "linear_2.weight"),
    _copy("encoder.linear_fc2.bias", "linear_2.bias"),
]
_LANGUAGE_LAYER = [
    _qkv("decoder.layers.{i}.self_attention.linear_qkv.weight", "model.layers.{i}.self_attn.q_proj.weight",
         "model.layers.{i}.self_attn.k_proj.weight", "model.layers.{i}.self_attn.v_proj.weight"),
    _copy("decoder.layers.{i}.self_attention.linear_proj.weight", "model.layers.{i}.self_attn.o_proj.weight"),
    KeyRule("decoder.layers.{i}.mlp.linear_fc1.weight",
            ("model.layers.{i}.mlp.gate_proj.weight", "model.layers.{i}.mlp.up_proj.weight"),
            lambda shape, gate, up: _fuse_gate_up(gate, up), lambda shape, t: _split_gate_up(t)),
    _copy("decoder.layers.{i}.mlp.linear_fc2.weight", "model.layers.{i}.mlp.down_proj.weight"),
    _copy("decoder.layers.{i}.input_layernorm.weight", "model.layers.{i}.input_layernorm.weight"),
    _copy("decoder.layers.{i}.pre_mlp_layernorm.weight", "model.layers.{i}.post_attention_layernorm.weight"),
]
_LANGUAGE_TOP = [
    _copy("embedding.word_embeddings.weight", "model.embed_tokens.weight"),
    _copy("decoder.final_layernorm.weight", "model.norm.weight"),
    _copy("output_layer.weight", "lm_head.weight"),
]
_RULES = {
    "vision": (_VISION_TOP, _VISION_LAYER),
    "projector": (_PROJECTOR, []),
    "language": (_LANGUAGE_TOP, _LANGUAGE_LAYER),
}


def part_keys(part: str, num_layers: int) -> list[KeyRule]:
    """Every rule of a part with ``{i}`` expanded over its layers (the part's whole state)."""
    top, per_layer = _RULES[part]
    expanded = list(top)
    for index in range(num_layers):
        for rule in per_layer:
            expanded.append(dataclasses.replace(
                rule, ours=rule.ours.format(i=index), hf=tuple(key.format(i=index) for key in rule.hf)))
    return expanded


def to_ours(part: str, num_layers: int, shape: AttentionShape,
            read_hf: Callable[[str], torch.Tensor]) -> Iterator[tuple[str, torch.Tensor]]:
    """Stream our part state from Hugging Face tensors; ``read_hf(key)`` fetches one (relative) HF key."""
    for rule in part_keys(part, num_layers):
        yield rule.ours, rule.to_ours(shape, *(read_hf(key) for key in rule.hf))


def to_hf(part: str, num_layers: int, shape: AttentionShape,
          read_ours: Callable[[str], torch.Tensor]) -> Iterator[tuple[str, torch.Tensor]]:
    """Stream Hugging Face part tensors (relative keys) from ours."""
    for rule in part_keys(part, num_layers):
        for key, tensor in zip(rule.hf, rule.to_hf(shape, read_ours(rule.ours))):
            yield key, tensor


def llava_hf_to_ours(hf_state: Mapping[str, torch.Tensor], config) -> dict[str, torch.Tensor]:
    """A whole ``LlavaForConditionalGeneration`` state dict (any accepted layout) -> our full model state.

    The vision tower is converted whole (all layers, ``ln_post``); loading it into a model that builds
    fewer layers drops the rest (see ``mm_plugin.models.loading``).
    """
    ours = {}
    for part in PARTS:
        read = _reader(hf_state, part)
        for key, tensor in to_ours(part, count_layers(part, read), attention_shape(config, part), read):
            ours[OUR_PREFIXES[part] + key] = tensor
    return ours


def count_layers(part: str, read: Callable[[str], torch.Tensor]) -> int:
    """How many layers a source holds, probing its first per-layer key (``read`` raises KeyError)."""
    per_layer = _RULES[part][1]
    if not per_layer:
        return 0
    count = 0
    while True:
        try:
            read(per_layer[0].hf[0].format(i=count))
        except KeyError:
            return count
        count += 1


def _reader(hf_state: Mapping[str, torch.Tensor], part: str) -> Callable[[str], torch.Tensor]:
    def read(key: str) -> torch.Tensor:
        candidates = HF_LM_HEAD if (part, key) == ("language", "lm_head.weight") else [
            prefix + key.removeprefix("model.") if part == "language" else prefix + key
            for prefix in HF_PREFIXES[part]
        ]
        for candidate in candidates:
            if candidate in hf_state:
                return hf_state[candidate]
        raise KeyError(f"Hugging Face checkpoint has no {candidates[0]!r} (nor {list(candidates[1:])})")

    return read


def attention_shape(config, part: str) -> AttentionShape:
    if part == "vision":
        vision = config.vision
        return AttentionShape(vision.num_attention_heads, vision.num_attention_heads,
                              vision.kv_channels or vision.hidden_size // vision.num_attention_heads)
    language = config.language
    return AttentionShape(language.num_attention_heads, language.num_query_groups or language.num_attention_heads,
                          language.kv_channels or language.hidden_size // language.num_attention_heads)
