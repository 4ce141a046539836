"""Recognising what a user downloaded: which part, which key layout, and the dimensions to check it against.

Each ``*_source`` function opens one input (file or directory), finds its layout in the key table's
terms, and returns a :class:`PartSource`: the part's tensors under the layout's relative names, the
dimensions they must have, and where those came from (a ``config.json``, Megatron's saved args, or the
tensors themselves when the format stores no config).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from pathlib import Path

from mm_plugin.config.names import PROJECTOR
from mm_plugin.convert.errors import ConversionError
from mm_plugin.convert.sources import (TensorStore, fields, open_hf_directory, open_safetensors, open_torch_file,
                                       open_weight_file)
from mm_plugin.convert.tensor_parallel import merge_tensor_parallel
from mm_plugin.models.hf_keys import PartDims, canonical_key, count_layers, source_keys

# OpenAI's published CLIP files and their sha256, which is the hex segment of each download URL
# (https://openaipublic.azureedge.net/clip/models/<sha256>/<name>, the _MODELS table of openai/CLIP's clip.py).
PUBLISHED_CLIP_SHA256 = {
    "ViT-L-14-336px.pt": "3035c92b350959924f9f00213499208652fc7ea050643e8b385c2dac08641f02",
    "ViT-L-14.pt": "b8cca3fd41ae0c99ba7e8951adf17d267cdb84cd88be6f7c2e0eca1737a03836",
}
# OpenAI's VisionTransformer has width / 64 heads (clip/model.py build_model); its files do not store it.
OPENAI_HEAD_DIM = 64
# What travels with a model besides its weights: tokenizer and processor files.
TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "added_tokens.json", "chat_template.json", "chat_template.jinja", "preprocessor_config.json",
                   "processor_config.json")


@dataclasses.dataclass
class PartSource:
    """One part's tensors (relative keys in ``layout``), the dimensions they must have, and from where."""

    part: str
    store: TensorStore
    layout: str
    dims: PartDims
    expected_from: str
    description: str
    notes: list[str] = dataclasses.field(default_factory=list)


def read_json(path: Path) -> dict:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError) as error:
        raise ConversionError(f"{path}: not readable JSON ({error})") from error


def full_hf_config(raw: dict, model_type: str) -> dict:
    """A config.json with transformers' defaults filled in: published configs omit fields at their default
    (llava-1.5-7b-hf's text_config has no hidden_size, no num_attention_heads)."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    return CONFIG_MAPPING[model_type].from_dict(raw).to_dict()


def model_type(config_path: Path, config: dict, accepted: tuple[str, ...], what: str) -> str:
    found = config.get("model_type")
    if found not in accepted:
        raise ConversionError(f"{config_path}: model_type {found!r} is not {what} "
                              f"(expected {' or '.join(map(repr, accepted))}); wrong directory for this command?")
    return found


# --- CLIP -----------------------------------------------------------------------------------------

def clip_source(path: Path) -> PartSource:
    """OpenAI's TorchScript file or state dict, Megatron's clip_converter output, or a Hugging Face CLIP directory."""
    path = Path(path)
    if path.is_dir() and (path / "config.json").is_file():
        return _hf_clip(path)
    if path.is_dir():
        ranks = sorted(path.glob("state_dict_tp_*.pt"), key=lambda file: int(re.findall(r"\d+", file.name)[-1]))
        files = ranks or megatron_rank_files(path)
        stores = [_unwrap_model(open_torch_file(file).store) for file in files]
        return _megatron_clip(merge_tensor_parallel(stores, gated=False, description=str(path)),
                              f"Megatron clip_converter output {path} (TP={len(files)})")
    if not path.is_file():
        raise ConversionError(f"{path}: no such file or directory")
    if path.suffix == ".safetensors":
        store, torchscript = open_safetensors(path), False
    else:
        opened = open_torch_file(path)
        store, torchscript = opened.store, opened.is_torchscript
    if any(key.startswith("visual.") for key in store.keys()):
        return _openai_clip(path, store, torchscript)
    store = _unwrap_model(store)
    if "conv1.weight" in store and "class_token" in store:
        return _megatron_clip(store, f"Megatron-layout CLIP {path}")
    if any(key.startswith("vision_model.") for key in store.keys()):
        raise ConversionError(f"{path}: a Hugging Face CLIP file; pass its directory, whose config.json gives "
                              "the head count the QKV regrouping needs")
    raise ConversionError(f"{path}: not a CLIP vision tower in a known layout (no 'visual.conv1.weight', "
                          f"'conv1.weight' or 'vision_model.*'; found e.g. {store.keys()[:3]})")


def _hf_clip(directory: Path) -> PartSource:
    config_path = directory / "config.json"
    config = read_json(config_path)
    kind = model_type(config_path, config, ("clip", "clip_vision_model"), "a CLIP model")
    config = full_hf_config(config, kind)
    dims = hf_clip_dims(config["vision_config"] if kind == "clip" else config)
    store = open_hf_directory(directory)
    # CLIPModel (the published clip-vit-large-patch14-336) and older CLIPVisionModels prefix the tower with
    # vision_model.; transformers 5's CLIPVisionModel saves it bare.
    prefix = "vision_model." if any(key.startswith("vision_model.") for key in store.keys()) else ""
    view = store.view(prefix)
    left = len(store) - len(view)
    notes = [f"{left} tensors outside vision_model (text tower, projections) are not part of LLaVA"] if left else []
    return PartSource("vision", view, "hf", dims, str(config_path), f"Hugging Face CLIP {directory}", notes)


def hf_clip_dims(vision: dict) -> PartDims:
    """A full ``CLIPVisionConfig`` (dict) -> dims."""
    hidden, heads, patch = vision["hidden_size"], vision["num_attention_heads"], vision["patch_size"]
    return PartDims(hidden=hidden, num_layers=vision["num_hidden_layers"], ffn=vision["intermediate_size"],
                    heads=heads, groups=heads, head_dim=hidden // heads,
                    positions=(vision["image_size"] // patch) ** 2 + 1, patch=patch, channels=vision["num_channels"])


def _openai_clip(path: Path, store: TensorStore, torchscript: bool) -> PartSource:
    notes = []
    description = f"OpenAI CLIP {'TorchScript archive' if torchscript else 'state dict'} {path}"
    if torchscript:
        digest = sha256_of(path)
        published = PUBLISHED_CLIP_SHA256.get(path.name)
        if published is not None and digest != published:
            raise ConversionError(
                f"{path}: sha256 {digest} differs from the published {published} (the hex segment of its download "
                "URL): an incomplete or altered download. Download it again.")
        known = [name for name, value in PUBLISHED_CLIP_SHA256.items() if value == digest]
        description += f" (sha256 {digest[:12]}…: " + (f"the published {known[0]})" if known else "not a published file)")
    other = len([key for key in store.keys() if not key.startswith("visual.")])
    if other:
        notes.append(f"{other} tensors outside visual. (text tower) are not part of LLaVA")
    if "visual.proj" in store:
        notes.append("visual.proj (CLIP's image-text projection) is not part of LLaVA: LLaVA uses features before it")
    view = store.view("visual.", exclude=("proj",))
    return PartSource("vision", view, "openai", vision_dims_from_tensors(view, "openai"),
                      f"the tensors of {path} (OpenAI's VisionTransformer has width/64 heads)", description, notes)


def _megatron_clip(store: TensorStore, description: str) -> PartSource:
    view = store.view(rename=lambda key: canonical_key("megatron", key))
    return PartSource("vision", view, "megatron", vision_dims_from_tensors(view, "megatron"),
                      f"the tensors of {store.description}", description)


def vision_dims_from_tensors(store: TensorStore, layout: str) -> PartDims:
    def shape(ours: str) -> tuple:
        key = source_keys("vision", ours, layout)[0]
        if key not in store:
            raise ConversionError(f"{store.description}: no {key!r}; not a complete CLIP vision tower")
        return store.entry(key).shape

    hidden, channels, patch, _ = shape("conv1.weight")
    if hidden % OPENAI_HEAD_DIM == 0:
        heads, head_dim = hidden // OPENAI_HEAD_DIM, OPENAI_HEAD_DIM
    elif layout == "megatron":  # QKV already in megatron's order: copying it needs no head count
        heads, head_dim = 1, hidden
    else:
        raise ConversionError(f"{store.description}: width {hidden} is not a multiple of {OPENAI_HEAD_DIM}, so not "
                              "an OpenAI CLIP tower; its head count is unknown (convert its Hugging Face directory)")
    return PartDims(hidden=hidden, num_layers=count_layers("vision", store.entry, layout),
                    ffn=shape("decoder.layers.0.mlp.linear_fc1.weight")[0], heads=heads, groups=heads,
                    head_dim=head_dim, positions=shape("position_embeddings.weight")[0], patch=patch, channels=channels)


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        while chunk := file.read(2**22):
            digest.update(chunk)
    return digest.hexdigest()


def _unwrap_model(store: TensorStore) -> TensorStore:
    """Megatron's converters save ``{"model": state}``, its checkpoints also args, RNG and optimizer state."""
    if any(key.startswith("model.") for key in store.keys()):
        return store.view("model.")
    return store


def megatron_rank_files(path: Path) -> list[Path]:
    """The ``model_optim_rng.pt`` of each tensor-parallel rank of a Megatron checkpoint directory (the
    folder with ``latest_checkpointed_iteration.txt``, an ``iter_*`` or ``release`` folder); PP must be 1."""
    tracker = path / "latest_checkpointed_iteration.txt"
    if tracker.is_file():
        iteration = tracker.read_text().strip()
        path = path / ("release" if iteration == "release" else f"iter_{int(iteration):07d}")
    ranks = sorted(p for p in path.glob("mp_rank_*") if p.is_dir()) if path.is_dir() else []
    if not ranks:
        raise ConversionError(f"{path}: neither a weight file nor a Megatron checkpoint directory "
                              "(no latest_checkpointed_iteration.txt, mp_rank_* or state_dict_tp_*.pt)")
    if any(re.fullmatch(r"mp_rank_\d+_\d+", rank.name) for rank in ranks):
        raise ConversionError(f"{path}: a pipeline-parallel checkpoint ({ranks[-1].name}); convert it to "
                              "pipeline-parallel size 1 with Megatron's checkpoint tool first")
    files = [rank / "model_optim_rng.pt" for rank in ranks]
    missing = [str(file) for file in files if not file.is_file()]
    if missing:
        raise ConversionError(f"{path}: missing rank file(s) {', '.join(missing)}")
    return files


# --- language model -------------------------------------------------------------------------------

def language_source(path: Path) -> PartSource:
    """A Hugging Face LLaMA/Vicuna directory, or a legacy Megatron-LM/ModelLink checkpoint."""
    path = Path(path)
    if path.is_dir() and (path / "config.json").is_file():
        config_path = path / "config.json"
        config = read_json(config_path)
        model_type(config_path, config, ("llama",), "a LLaMA model")
        dims = llama_dims(full_hf_config(config, "llama"), config_path)
        return PartSource("language", open_hf_directory(path), "hf", dims, str(config_path),
                          f"Hugging Face LLaMA {path}")
    if path.is_file() and (path.parent / "config.json").is_file():
        raise ConversionError(f"{path}: a file of the Hugging Face model in {path.parent}; pass that directory")
    return _legacy_language(megatron_rank_files(path) if path.is_dir() else [path], path)


def llama_dims(config: dict, config_path: Path) -> PartDims:
    if config.get("tie_word_embeddings", False):
        raise ConversionError(f"{config_path}: tie_word_embeddings is true; LLaVA's LLaMA has its own output layer")
    hidden, heads = config["hidden_size"], config["num_attention_heads"]
    return PartDims(hidden=hidden, num_layers=config["num_hidden_layers"], ffn=config["intermediate_size"],
                    heads=heads, groups=config.get("num_key_value_heads") or heads,
                    head_dim=config.get("head_dim") or hidden // heads, vocab=config["vocab_size"])


def _legacy_language(files: list[Path], path: Path) -> PartSource:
    opened = [open_torch_file(file) for file in files]
    args = fields(opened[0].root.get("args") if isinstance(opened[0].root, dict) else None)
    if not args:
        raise ConversionError(f"{files[0]}: no Megatron 'args' in the checkpoint; not a Megatron-LM/ModelLink "
                              "model_optim_rng.pt")
    if not args.get("swiglu", False):
        raise ConversionError(f"{files[0]}: args.swiglu is false: not a LLaMA-style model (its first MLP linear "
                              "would not be [gate; up])")
    tp = int(args.get("tensor_model_parallel_size", 1))
    if int(args.get("pipeline_model_parallel_size", 1)) != 1 or tp != len(files):
        raise ConversionError(f"{files[0]}: saved with TP={tp}, PP={args.get('pipeline_model_parallel_size', 1)} "
                              f"but {len(files)} rank file(s) found; pass the checkpoint directory (PP must be 1)")
    prefix = "model.language_model."
    ranks = [file.store.view(prefix) for file in opened]
    if not len(ranks[0]):
        raise ConversionError(f"{files[0]}: no {prefix}* tensors; not a legacy Megatron GPT checkpoint")
    store = merge_tensor_parallel(ranks, gated=True, description=str(path))
    store = store.view(rename=lambda key: canonical_key("legacy", key))
    heads = args["num_attention_heads"]
    groups = args.get("num_query_groups") if args.get("group_query_attention") else heads
    embedding = "embedding.word_embeddings.weight"
    vocab = store.entry(embedding).shape[0] if embedding in store else args.get("padded_vocab_size", 0)
    dims = PartDims(hidden=args["hidden_size"], num_layers=args["num_layers"], ffn=args["ffn_hidden_size"],
                    heads=heads, groups=groups or heads, head_dim=args.get("kv_channels") or args["hidden_size"] // heads,
                    vocab=vocab)
    return PartSource("language", store, "legacy", dims, f"the args saved in {files[0]}",
                      f"Megatron-LM/ModelLink checkpoint {path} (TP={tp})")


# --- projector ------------------------------------------------------------------------------------

# Where a projector's tensors may sit, and in which layout; the first prefix found wins.
_PROJECTOR_PREFIXES = (("model.mm_projector.", "llava"), ("mm_projector.", "llava"),
                       *((prefix, "hf") for prefix in PROJECTOR.hf_prefixes), ("encoder.", "megatron"))
_PROJECTOR_LAYOUT_NAMES = {"llava": "original LLaVA", "hf": "Hugging Face LLaVA", "megatron": "Megatron-layout"}


def projector_source(path: Path) -> PartSource:
    """LLaVA's ``mm_projector.bin``, a Hugging Face LLaVA's projector, or a Megatron-layout ``mlp.pt``."""
    path = Path(path)
    store = open_hf_directory(path) if path.is_dir() else open_weight_file(path)
    for prefix, layout in _PROJECTOR_PREFIXES:
        if any(key.startswith(prefix) for key in store.keys()):
            break
    else:
        raise ConversionError(f"{path}: no projector tensors (none under {', '.join(p for p, _ in _PROJECTOR_PREFIXES)}; "
                              f"found e.g. {store.keys()[:3]})")
    view = store if layout == "megatron" else store.view(prefix)
    part = "projector" if any(key in view for key in ("0.weight", "linear_1.weight", "encoder.linear_fc1.weight")) \
        else "linear_projector"
    notes = []
    if len(view) < len(store):
        notes.append(f"{len(store) - len(view)} tensors outside {prefix}* are not the projector")
    return PartSource(part, view, layout, projector_dims_from_tensors(view, part, layout),
                      f"the tensors of {path}", f"{_PROJECTOR_LAYOUT_NAMES[layout]} projector {path}", notes)


def projector_dims_from_tensors(store: TensorStore, part: str, layout: str) -> PartDims:
    first = "encoder.linear_fc1.weight" if part == "projector" else "encoder.weight"
    key = source_keys(part, first, layout)[0]
    if key not in store:
        raise ConversionError(f"{store.description}: no {key!r}; not a complete {part.replace('_', ' ')}")
    rows, input_size = store.entry(key).shape
    if part == "linear_projector":
        return PartDims(hidden=rows, input_size=input_size)
    second = source_keys(part, "encoder.linear_fc2.weight", layout)[0]
    hidden = store.entry(second).shape[0] if second in store else rows
    return PartDims(hidden=hidden, ffn=rows, input_size=input_size)
