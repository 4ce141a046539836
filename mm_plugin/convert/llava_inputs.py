"""Recognising a whole LLaVA download: a ``llava-1.5-7b-hf`` style directory (either key layout that
``from_pretrained`` accepts) or the original LLaVA repository's layout, as one :class:`PartSource` per part
plus the configuration and the files that travel with the weights."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Optional

from mm_plugin.config.model import (LanguageModelConfig, LlavaConfig, ProjectorConfig, VisionEncoderConfig,
                                    from_hf_config)
from mm_plugin.convert.errors import ConversionError
from mm_plugin.convert.inputs import (TOKENIZER_FILES, PartSource, clip_source, full_hf_config, llama_dims, model_type,
                                      read_json, vision_dims_from_tensors)
from mm_plugin.convert.sources import Entry, TensorStore, open_hf_directory
from mm_plugin.models.hf_keys import HF_LM_HEAD, HF_PREFIXES, hf_candidates, is_weight, part_dims


@dataclasses.dataclass
class LlavaSource:
    config: LlavaConfig
    parts: dict[str, PartSource]
    hf_config: Optional[dict]
    """The Hugging Face ``config.json`` (None for the original LLaVA layout, which has no such config)."""
    side_files: list[Path]
    """Tokenizer and processor files to carry along."""
    generation_config: Optional[Path]


def llava_source(directory: Path, vision: Optional[Path] = None) -> LlavaSource:
    """A ``llava-1.5-7b-hf`` style directory (either key layout), or the original LLaVA repository's
    layout (``model.mm_projector.*``, vision tower inside as ``model.vision_tower.*`` or given as ``vision``)."""
    directory = Path(directory)
    config_path = directory / "config.json"
    if not config_path.is_file():
        raise ConversionError(f"{directory}: no config.json; not a LLaVA model directory")
    raw = read_json(config_path)
    store = open_hf_directory(directory)
    side = [directory / name for name in TOKENIZER_FILES if (directory / name).is_file()]
    generation = directory / "generation_config.json"
    generation = generation if generation.is_file() else None
    if any(key.startswith("model.mm_projector.") for key in store.keys()):
        return _original_llava(directory, raw, store, vision, side, generation)
    model_type(config_path, raw, ("llava",), "a LLaVA model")
    config = from_hf_config(raw, source=str(config_path))
    parts = {}
    for part, view in _split_hf_llava(store).items():
        parts[part] = PartSource(part, view, "hf", part_dims(config, part), str(config_path),
                                 f"Hugging Face LLaVA {directory}")
    return LlavaSource(config, parts, raw, side, generation)


def _split_hf_llava(store: TensorStore) -> dict[str, TensorStore]:
    """A LLaVA checkpoint's tensors per part, under the part's relative Hugging Face names."""
    split: dict[str, dict[str, Entry]] = {part: {} for part in HF_PREFIXES}
    layouts: dict[str, set] = {part: set() for part in HF_PREFIXES}
    unplaced = []
    for key in store.keys():
        placed = _place_hf_llava_key(key)
        if placed is None:
            if is_weight(key):
                unplaced.append(key)
            continue
        part, layout, relative = placed
        split[part][relative] = store.entry(key)
        layouts[part].add(layout)
    if unplaced:
        raise ConversionError(f"{store.description}: {len(unplaced)} tensor(s) belong to no LLaVA part: "
                              f"{unplaced[:5]}{' ...' if len(unplaced) > 5 else ''}")
    for part, used in layouts.items():
        if len(used) > 1:
            raise ConversionError(f"{store.description}: the {part} tensors mix key layouts "
                                  f"{sorted(HF_PREFIXES[part][index] for index in used)}; "
                                  "the shards are from different downloads")
    def display(part: str):
        index = next(iter(layouts[part]), 1)  # the hub's names when the part has no tensors at all
        return lambda key: hf_candidates(part, key)[index]

    return {part: TensorStore(entries, store.description, display(part)) for part, entries in split.items()}


def _place_hf_llava_key(key: str) -> Optional[tuple[str, int, str]]:
    """(part, index of its layout in HF_PREFIXES, relative key) of a LLaVA checkpoint key, or None."""
    if key in HF_LM_HEAD:
        return "language", HF_LM_HEAD.index(key), "lm_head.weight"
    for part, prefixes in HF_PREFIXES.items():
        for index, prefix in enumerate(prefixes):
            if key.startswith(prefix):
                return part, index, ("model." if part == "language" else "") + key[len(prefix):]
    return None


def _original_llava(directory: Path, raw: dict, store: TensorStore, vision: Optional[Path], side: list[Path],
                    generation: Optional[Path]) -> LlavaSource:
    config_path = directory / "config.json"
    model_type(config_path, raw, ("llava_llama", "llava", "llama"), "an original LLaVA (llava_llama) model")
    projector_type = raw.get("mm_projector_type", "linear")
    if projector_type not in ("mlp2x_gelu", "linear"):
        raise ConversionError(f"{config_path}: mm_projector_type {projector_type!r}; LLaVA-1.5 uses mlp2x_gelu")
    tower_prefix = "model.vision_tower.vision_tower.vision_model."
    inside = [key for key in store.keys() if key.startswith("model.vision_tower.")]
    if inside:
        vision_store = store.view(tower_prefix)
        if len(vision_store) != len([key for key in inside if is_weight(key)]):
            raise ConversionError(f"{directory}: vision tower tensors outside {tower_prefix}*: {inside[:3]}")
        vision_part = PartSource("vision", vision_store, "hf", vision_dims_from_tensors(vision_store, "hf"),
                                 f"the tensors of {directory} (OpenAI's CLIP towers have width/64 heads)",
                                 f"original LLaVA {directory}")
    elif vision is not None:
        vision_part = clip_source(vision)
        processor = Path(vision) / "preprocessor_config.json"
        if processor.is_file() and not any(file.name == processor.name for file in side):
            side.append(processor)
    else:
        raise ConversionError(
            f"{directory}: an original LLaVA checkpoint without its vision tower; pass --vision with the CLIP it "
            f"names (mm_vision_tower = {raw.get('mm_vision_tower')!r}), e.g. a clip-vit-large-patch14-336 directory")
    language = store.view(exclude=[key for key in store.keys()
                                   if key.startswith(("model.mm_projector.", "model.vision_tower."))])
    projector_store = store.view("model.mm_projector.")
    part = "projector" if projector_type == "mlp2x_gelu" else "linear_projector"
    raw = full_hf_config(raw, "llama")  # LlavaLlamaConfig is LlamaConfig plus the mm_* fields
    text = llama_dims(raw, config_path)
    tower = vision_part.dims
    side_image = int(round(math.sqrt(tower.positions - 1))) * tower.patch
    rope = raw.get("rope_parameters") or {}  # transformers 5 moved rope_theta there
    config = LlavaConfig(
        vision=VisionEncoderConfig(num_layers=tower.num_layers, select_layer=raw.get("mm_vision_select_layer", -2),
                                   select_feature=raw.get("mm_vision_select_feature", "patch"),
                                   hidden_size=tower.hidden, num_attention_heads=tower.heads, ffn_hidden_size=tower.ffn,
                                   image_size=side_image, patch_size=tower.patch),
        projector=ProjectorConfig(projector_type=projector_type, ffn_hidden_size=text.hidden),
        language=LanguageModelConfig(num_layers=text.num_layers, hidden_size=text.hidden, num_attention_heads=text.heads,
                                     num_query_groups=text.groups, ffn_hidden_size=text.ffn, kv_channels=text.head_dim,
                                     vocab_size=text.vocab, max_sequence_length=raw.get("max_position_embeddings", 4096),
                                     layernorm_epsilon=raw.get("rms_norm_eps", 1e-6),
                                     rotary_base=float(rope.get("rope_theta", raw.get("rope_theta", 10000.0)))),
        source=str(config_path),
    ).validate()
    parts = {
        "vision": vision_part,
        part: PartSource(part, projector_store, "llava", part_dims(config, part), str(config_path),
                         f"original LLaVA projector {directory}"),
        "language": PartSource("language", language, "hf", text, str(config_path), f"original LLaVA {directory}"),
    }
    return LlavaSource(config, parts, None, side, generation)

