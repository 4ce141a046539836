"""The one table between our names and every source layout, with the QKV and gate/up regrouping.

Our names are megatron-core's (and MindSpeed-MM's part files'): a part's keys are relative to the
part (``converted_clip.pt``, ``converted_vicuna.pt``, ``mlp.pt``); the full model prefixes them with
``vision_model.``, ``vision_projection.`` and ``language_model.``.

Each row of the table is one of our tensors: its shape (from the part's dimensions) and, per source
layout, the source tensors it is made of and the functions both ways. The layouts:

* ``hf``: Hugging Face, relative to ``CLIPVisionTransformer``, ``LlavaMultiModalProjector`` and
  ``LlamaForCausalLM``; :data:`HF_PREFIXES` lists where each part sits in a LLaVA checkpoint, in every
  layout ``from_pretrained`` accepts.
* ``openai``: OpenAI CLIP's ``VisionTransformer`` (``visual.`` stripped), as in ``ViT-L-14-336px.pt``.
* ``llava``: the original LLaVA repository's ``mm_projector`` (``model.mm_projector.`` stripped).
* ``legacy``: legacy Megatron-LM / ModelLink ``model_optim_rng.pt`` (``model.language_model.`` stripped).
* ``megatron``: ours (Megatron-LM's and MindSpeed-MM's converters' outputs, our own part files).

Everything here is a pure function of tensors, so a converter can stream: ask :func:`part_keys` which
source tensors one output needs, read just those, convert, write, drop.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Callable, Iterator, Mapping

import torch

from mm_plugin.config import names

PARTS = tuple(part.field for part in names.PARTS)
HF_PREFIXES = {part.field: part.hf_prefixes for part in names.PARTS}
"""Where each part's Hugging Face keys sit inside a LLaVA checkpoint (see ``config.names.Part``)."""
# The language model's output layer lives outside its ``model.`` in a LlamaForCausalLM.
HF_LM_HEAD = ("lm_head.weight", "language_model.lm_head.weight")
OUR_PREFIXES = {**{part.field: part.module_prefix for part in names.PARTS},
                "linear_projector": names.PROJECTOR.module_prefix}

# Source spellings that name the same tensor as a layout's table column: ModelLink's legacy norms, and
# Megatron's ``--use-te`` layer norms fused into the following linear (TransformerEngine's LayerNormLinear).
ALIASES = {
    "legacy": ((r"^transformer\.", "encoder."),  # Megatron-LM before 2021
               (r"\.input_norm\.", ".input_layernorm."), (r"\.post_attention_norm\.", ".post_attention_layernorm."),
               (r"\.final_norm\.", ".final_layernorm.")),
    "megatron": ((r"\.self_attention\.linear_qkv\.layer_norm_(weight|bias)$", r".input_layernorm.\1"),
                 (r"\.mlp\.linear_fc1\.layer_norm_(weight|bias)$", r".pre_mlp_layernorm.\1")),
}
# Source tensors that are not weights of the part (buffers some versions save): skipped, never an error.
NOT_WEIGHTS = (r"(^|\.)position_ids$", r"(^|\.)inv_freq$", r"(^|\.)_extra_state$")


def canonical_key(layout: str, key: str) -> str:
    """A source key with the layout's alternative spellings replaced by the table's."""
    for pattern, replacement in ALIASES.get(layout, ()):
        key = re.sub(pattern, replacement, key)
    return key


def is_weight(key: str) -> bool:
    return not any(re.search(pattern, key) for pattern in NOT_WEIGHTS)


@dataclasses.dataclass(frozen=True)
class AttentionShape:
    """What the QKV regrouping needs to know about one part's attention."""

    num_heads: int
    num_groups: int
    head_dim: int


@dataclasses.dataclass(frozen=True)
class PartDims:
    """The sizes a part's tensor shapes are made of."""

    hidden: int
    num_layers: int = 0
    ffn: int = 0
    heads: int = 1
    groups: int = 1
    head_dim: int = 0
    vocab: int = 0
    positions: int = 0
    """Vision: patches plus the class token."""
    patch: int = 0
    channels: int = 3
    input_size: int = 0
    """Projector: the vision features' width."""

    @property
    def attention(self) -> AttentionShape:
        return AttentionShape(self.heads, self.groups, self.head_dim)

    @property
    def qkv_rows(self) -> int:
        return (self.heads + 2 * self.groups) * self.head_dim


def fuse_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, shape: AttentionShape) -> torch.Tensor:
    """Separate q/k/v (weights or biases) -> megatron ``linear_qkv``: per query group, that group's
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


def _fuse_in_proj(packed: torch.Tensor, shape: AttentionShape) -> torch.Tensor:
    """``nn.MultiheadAttention.in_proj_*`` is ``[q; k; v]``, each with its heads in order."""
    return fuse_qkv(*packed.chunk(3, dim=0), shape)


def _split_in_proj(qkv: torch.Tensor, shape: AttentionShape) -> torch.Tensor:
    return torch.cat(split_qkv(qkv, shape), dim=0)


@dataclasses.dataclass(frozen=True)
class Column:
    """One layout's source tensors for a row, and the conversions ``(attention, *tensors)`` both ways."""

    keys: tuple[str, ...]
    to_ours: Callable = lambda shape, tensor: tensor
    from_ours: Callable = lambda shape, tensor: (tensor,)


def _same(key: str) -> Column:
    return Column((key,))


def _qkv(q: str, k: str, v: str) -> Column:
    return Column((q, k, v), lambda shape, q, k, v: fuse_qkv(q, k, v, shape), lambda shape, t: split_qkv(t, shape))


def _in_proj(key: str) -> Column:
    return Column((key,), lambda shape, t: _fuse_in_proj(t, shape), lambda shape, t: (_split_in_proj(t, shape),))


def _gate_up(gate: str, up: str) -> Column:
    return Column((gate, up), lambda shape, gate, up: _fuse_gate_up(gate, up), lambda shape, t: _split_gate_up(t))


# A vector stored flat by the source, as [1, 1, h] by megatron's CLIP.
_CLASS_TOKEN = dict(to_ours=lambda shape, t: t.reshape(1, 1, -1), from_ours=lambda shape, t: (t.reshape(-1),))


@dataclasses.dataclass(frozen=True)
class Row:
    """One of our tensors (``{i}``: layer index): its shape and its source tensors per layout."""

    ours: str
    shape: Callable[[PartDims], tuple]
    columns: Mapping[str, Column]
    optional: bool = False
    """May be absent from a source (then absent from the output): CLIP's ``ln_post``, which LLaVA never
    uses and Megatron's and MindSpeed-MM's CLIP converters drop."""


def _hidden(d: PartDims) -> tuple:
    return (d.hidden,)


_VISION_TOP = [
    Row("class_token", lambda d: (1, 1, d.hidden),
        {"hf": Column(("embeddings.class_embedding",), **_CLASS_TOKEN),
         "openai": Column(("class_embedding",), **_CLASS_TOKEN)}),
    Row("conv1.weight", lambda d: (d.hidden, d.channels, d.patch, d.patch),
        {"hf": _same("embeddings.patch_embedding.weight"), "openai": _same("conv1.weight")}),
    Row("position_embeddings.weight", lambda d: (d.positions, d.hidden),
        {"hf": _same("embeddings.position_embedding.weight"), "openai": _same("positional_embedding")}),
    Row("ln_pre.weight", _hidden, {"hf": _same("pre_layrnorm.weight"), "openai": _same("ln_pre.weight")}),
    Row("ln_pre.bias", _hidden, {"hf": _same("pre_layrnorm.bias"), "openai": _same("ln_pre.bias")}),
    # Not used by LLaVA (the feature precedes it) but kept, so a converted file round-trips to HF.
    Row("ln_post.weight", _hidden, {"hf": _same("post_layernorm.weight"), "openai": _same("ln_post.weight")},
        optional=True),
    Row("ln_post.bias", _hidden, {"hf": _same("post_layernorm.bias"), "openai": _same("ln_post.bias")},
        optional=True),
]
_HF_VISION = "encoder.layers.{i}."
_OPENAI_VISION = "transformer.resblocks.{i}."
_VISION_LAYER = [
    Row("decoder.layers.{i}.self_attention.linear_qkv.weight", lambda d: (d.qkv_rows, d.hidden),
        {"hf": _qkv(*(f"{_HF_VISION}self_attn.{x}_proj.weight" for x in "qkv")),
         "openai": _in_proj(f"{_OPENAI_VISION}attn.in_proj_weight")}),
    Row("decoder.layers.{i}.self_attention.linear_qkv.bias", lambda d: (d.qkv_rows,),
        {"hf": _qkv(*(f"{_HF_VISION}self_attn.{x}_proj.bias" for x in "qkv")),
         "openai": _in_proj(f"{_OPENAI_VISION}attn.in_proj_bias")}),
    Row("decoder.layers.{i}.self_attention.linear_proj.weight", lambda d: (d.hidden, d.heads * d.head_dim),
        {"hf": _same(f"{_HF_VISION}self_attn.out_proj.weight"), "openai": _same(f"{_OPENAI_VISION}attn.out_proj.weight")}),
    Row("decoder.layers.{i}.self_attention.linear_proj.bias", _hidden,
        {"hf": _same(f"{_HF_VISION}self_attn.out_proj.bias"), "openai": _same(f"{_OPENAI_VISION}attn.out_proj.bias")}),
    Row("decoder.layers.{i}.input_layernorm.weight", _hidden,
        {"hf": _same(f"{_HF_VISION}layer_norm1.weight"), "openai": _same(f"{_OPENAI_VISION}ln_1.weight")}),
    Row("decoder.layers.{i}.input_layernorm.bias", _hidden,
        {"hf": _same(f"{_HF_VISION}layer_norm1.bias"), "openai": _same(f"{_OPENAI_VISION}ln_1.bias")}),
    Row("decoder.layers.{i}.pre_mlp_layernorm.weight", _hidden,
        {"hf": _same(f"{_HF_VISION}layer_norm2.weight"), "openai": _same(f"{_OPENAI_VISION}ln_2.weight")}),
    Row("decoder.layers.{i}.pre_mlp_layernorm.bias", _hidden,
        {"hf": _same(f"{_HF_VISION}layer_norm2.bias"), "openai": _same(f"{_OPENAI_VISION}ln_2.bias")}),
    Row("decoder.layers.{i}.mlp.linear_fc1.weight", lambda d: (d.ffn, d.hidden),
        {"hf": _same(f"{_HF_VISION}mlp.fc1.weight"), "openai": _same(f"{_OPENAI_VISION}mlp.c_fc.weight")}),
    Row("decoder.layers.{i}.mlp.linear_fc1.bias", lambda d: (d.ffn,),
        {"hf": _same(f"{_HF_VISION}mlp.fc1.bias"), "openai": _same(f"{_OPENAI_VISION}mlp.c_fc.bias")}),
    Row("decoder.layers.{i}.mlp.linear_fc2.weight", lambda d: (d.hidden, d.ffn),
        {"hf": _same(f"{_HF_VISION}mlp.fc2.weight"), "openai": _same(f"{_OPENAI_VISION}mlp.c_proj.weight")}),
    Row("decoder.layers.{i}.mlp.linear_fc2.bias", _hidden,
        {"hf": _same(f"{_HF_VISION}mlp.fc2.bias"), "openai": _same(f"{_OPENAI_VISION}mlp.c_proj.bias")}),
]
_PROJECTOR = [
    Row("encoder.linear_fc1.weight", lambda d: (d.ffn, d.input_size),
        {"hf": _same("linear_1.weight"), "llava": _same("0.weight")}),
    Row("encoder.linear_fc1.bias", lambda d: (d.ffn,), {"hf": _same("linear_1.bias"), "llava": _same("0.bias")}),
    Row("encoder.linear_fc2.weight", lambda d: (d.hidden, d.ffn),
        {"hf": _same("linear_2.weight"), "llava": _same("2.weight")}),
    Row("encoder.linear_fc2.bias", _hidden, {"hf": _same("linear_2.bias"), "llava": _same("2.bias")}),
]
# LLaVA's ``mm_projector_type: linear``: one nn.Linear (megatron's "affine" projector). Hugging Face's
# LlavaMultiModalProjector has no such variant.
_LINEAR_PROJECTOR = [
    Row("encoder.weight", lambda d: (d.hidden, d.input_size), {"llava": _same("weight")}),
    Row("encoder.bias", _hidden, {"llava": _same("bias")}),
]
_HF_LM = "model.layers.{i}."
_LEGACY_LM = "encoder.layers.{i}."
_LANGUAGE_LAYER = [
    Row("decoder.layers.{i}.self_attention.linear_qkv.weight", lambda d: (d.qkv_rows, d.hidden),
        {"hf": _qkv(*(f"{_HF_LM}self_attn.{x}_proj.weight" for x in "qkv")),
         # Legacy Megatron already groups query_key_value rows per query group, as megatron-core does.
         "legacy": _same(f"{_LEGACY_LM}self_attention.query_key_value.weight")}),
    Row("decoder.layers.{i}.self_attention.linear_proj.weight", lambda d: (d.hidden, d.heads * d.head_dim),
        {"hf": _same(f"{_HF_LM}self_attn.o_proj.weight"), "legacy": _same(f"{_LEGACY_LM}self_attention.dense.weight")}),
    Row("decoder.layers.{i}.mlp.linear_fc1.weight", lambda d: (2 * d.ffn, d.hidden),
        {"hf": _gate_up(f"{_HF_LM}mlp.gate_proj.weight", f"{_HF_LM}mlp.up_proj.weight"),
         "legacy": _same(f"{_LEGACY_LM}mlp.dense_h_to_4h.weight")}),
    Row("decoder.layers.{i}.mlp.linear_fc2.weight", lambda d: (d.hidden, d.ffn),
        {"hf": _same(f"{_HF_LM}mlp.down_proj.weight"), "legacy": _same(f"{_LEGACY_LM}mlp.dense_4h_to_h.weight")}),
    Row("decoder.layers.{i}.input_layernorm.weight", _hidden,
        {"hf": _same(f"{_HF_LM}input_layernorm.weight"), "legacy": _same(f"{_LEGACY_LM}input_layernorm.weight")}),
    Row("decoder.layers.{i}.pre_mlp_layernorm.weight", _hidden,
        {"hf": _same(f"{_HF_LM}post_attention_layernorm.weight"),
         "legacy": _same(f"{_LEGACY_LM}post_attention_layernorm.weight")}),
]
_LANGUAGE_TOP = [
    Row("embedding.word_embeddings.weight", lambda d: (d.vocab, d.hidden),
        {"hf": _same("model.embed_tokens.weight"), "legacy": _same("embedding.word_embeddings.weight")}),
    Row("decoder.final_layernorm.weight", _hidden,
        {"hf": _same("model.norm.weight"), "legacy": _same("encoder.final_layernorm.weight")}),
    Row("output_layer.weight", lambda d: (d.vocab, d.hidden),
        {"hf": _same("lm_head.weight"), "legacy": _same("output_layer.weight")}),
]
_TABLE = {
    "vision": (_VISION_TOP, _VISION_LAYER),
    "projector": (_PROJECTOR, []),
    "linear_projector": (_LINEAR_PROJECTOR, []),
    "language": (_LANGUAGE_TOP, _LANGUAGE_LAYER),
}


@dataclasses.dataclass(frozen=True)
class KeyRule:
    """One of our keys, the source keys it is made of in one layout, and the conversions both ways."""

    ours: str
    source: tuple[str, ...]
    to_ours: Callable
    from_ours: Callable
    shape: Callable[[PartDims], tuple]
    optional: bool = False


def _column(row: Row, layout: str) -> Column:
    if layout == "megatron":
        return _same(row.ours)
    if layout not in row.columns:
        raise KeyError(f"the {layout!r} layout has no tensor for our {row.ours!r}")
    return row.columns[layout]


def part_keys(part: str, num_layers: int, layout: str = "hf") -> list[KeyRule]:
    """Every rule of a part with ``{i}`` expanded over its layers (the part's whole state)."""
    top, per_layer = _TABLE[part]
    expanded = []
    for row in top:
        column = _column(row, layout)
        expanded.append(KeyRule(row.ours, column.keys, column.to_ours, column.from_ours, row.shape, row.optional))
    for index in range(num_layers):
        for row in per_layer:
            column = _column(row, layout)
            expanded.append(KeyRule(row.ours.format(i=index), tuple(key.format(i=index) for key in column.keys),
                                    column.to_ours, column.from_ours, row.shape, row.optional))
    return expanded


def to_ours(part: str, num_layers: int, shape: AttentionShape,
            read_hf: Callable[[str], torch.Tensor], layout: str = "hf") -> Iterator[tuple[str, torch.Tensor]]:
    """Stream our part state from source tensors; ``read_hf(key)`` fetches one (relative) source key."""
    for rule in part_keys(part, num_layers, layout):
        yield rule.ours, rule.to_ours(shape, *(read_hf(key) for key in rule.source))


def to_hf(part: str, num_layers: int, shape: AttentionShape,
          read_ours: Callable[[str], torch.Tensor], layout: str = "hf") -> Iterator[tuple[str, torch.Tensor]]:
    """Stream source-layout part tensors (relative keys) from ours."""
    for rule in part_keys(part, num_layers, layout):
        for key, tensor in zip(rule.source, rule.from_ours(shape, read_ours(rule.ours))):
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


def count_layers(part: str, read: Callable[[str], object], layout: str = "hf") -> int:
    """How many layers a source holds, probing its first per-layer key (``read`` raises KeyError)."""
    per_layer = _TABLE[part][1]
    if not per_layer:
        return 0
    first = _column(per_layer[0], layout).keys[0]
    count = 0
    while True:
        try:
            read(first.format(i=count))
        except KeyError:
            return count
        count += 1


def _reader(hf_state: Mapping[str, torch.Tensor], part: str) -> Callable[[str], torch.Tensor]:
    def read(key: str) -> torch.Tensor:
        candidates = hf_candidates(part, key)
        for candidate in candidates:
            if candidate in hf_state:
                return hf_state[candidate]
        raise KeyError(f"Hugging Face checkpoint has no {candidates[0]!r} (nor {list(candidates[1:])})")

    return read


def hf_candidates(part: str, key: str) -> list[str]:
    """The names a part's relative Hugging Face key may have in a LLaVA checkpoint, in prefix order."""
    if (part, key) == ("language", "lm_head.weight"):
        return list(HF_LM_HEAD)
    return [prefix + key.removeprefix("model.") if part == "language" else prefix + key
            for prefix in HF_PREFIXES[part]]


def attention_shape(config, part: str) -> AttentionShape:
    return part_dims(config, part).attention


def part_dims(config, part: str, num_layers: int | None = None) -> PartDims:
    """A part's dimensions from our ``LlavaConfig``; ``num_layers`` overrides the config's (a vision
    file holds the whole tower, the model may build fewer)."""
    vision, language = config.vision, config.language
    if part == "vision":
        head_dim = vision.kv_channels or vision.hidden_size // vision.num_attention_heads
        return PartDims(hidden=vision.hidden_size, num_layers=vision.num_layers if num_layers is None else num_layers,
                        ffn=vision.ffn_hidden_size, heads=vision.num_attention_heads,
                        groups=vision.num_attention_heads, head_dim=head_dim,
                        positions=vision.num_patches + vision.class_token_len, patch=vision.patch_size)
    if part in ("projector", "linear_projector"):
        return PartDims(hidden=language.hidden_size, ffn=config.projector.ffn_hidden_size or language.hidden_size,
                        input_size=vision.hidden_size)
    heads = language.num_attention_heads
    return PartDims(hidden=language.hidden_size, num_layers=language.num_layers if num_layers is None else num_layers,
                    ffn=language.ffn_hidden_size, heads=heads, groups=language.num_query_groups or heads,
                    head_dim=language.kv_channels or language.hidden_size // heads, vocab=language.vocab_size)


def projector_part(config) -> str:
    """The table part of the config's projector type (an identity projector has no tensors)."""
    return {"mlp2x_gelu": "projector", "linear": "linear_projector", "identity": ""}[config.projector.projector_type]


def source_keys(part: str, ours: str, layout: str) -> tuple[str, ...]:
    """The source keys (in ``layout``) one of our tensors is made of."""
    layer = re.match(r"decoder\.layers\.(\d+)\.", ours)
    for rule in part_keys(part, int(layer.group(1)) + 1 if layer else 0, layout):
        if rule.ours == ours:
            return rule.source
    raise KeyError(f"no {ours!r} in the {part} table")


def hub_key(part: str, key: str) -> str:
    """A part's relative Hugging Face key as the hub's llava-1.5-7b-hf names it, the layout transformers 4
    and 5 (and serving engines built on their names) all load."""
    return hf_candidates(part, key)[1]
