"""``export-hf``'s pieces: our parts (with trained weights laid over them) in Hugging Face's LLaVA layout,
and the config and processor files that make the directory loadable by transformers."""

from __future__ import annotations

import collections
import dataclasses
import json
from pathlib import Path
from typing import Any, Mapping, Optional

import torch

from mm_plugin.config.model import LlavaConfig, from_hf_config
from mm_plugin.config.names import VOCABULARY_TABLES, is_adapter
from mm_plugin.convert.errors import ConversionError
from mm_plugin.convert.pipeline import copy_file
from mm_plugin.convert.plan import Planned, describe, plan_part
from mm_plugin.convert.sources import Entry, TensorStore, in_memory, open_weight_file
from mm_plugin.models.hf_keys import OUR_PREFIXES, canonical_key, hub_key, is_weight, part_dims, projector_part
from mm_plugin.models.loading import vision_layers_in
from mm_plugin.models.lora import merged_weight
from mm_plugin.safe_io import write_text

PARTS = ("vision", "projector", "language")
_HF_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


def read_trained(checkpoint_dir: Path) -> Mapping[str, torch.Tensor]:
    """Full (TP=1) tensors, by our full-model names, of a training checkpoint directory (what it saved:
    a stage-1 checkpoint holds only the projector)."""
    from mm_plugin.checkpoint.reading import CheckpointError
    from mm_plugin.models.loading import read_model_tensors
    from mm_plugin.parallel.world import join_world, set_model_parallel

    join_world()
    set_model_parallel(1, 1)  # the checkpoint is read into a model built at TP=PP=1, in this process
    try:
        return read_model_tensors(checkpoint_dir)
    except CheckpointError as error:  # its message names the directory
        raise ConversionError(str(error)) from error


def write_trained(config: LlavaConfig, model_json: Path, trained: Mapping[str, torch.Tensor], root: Path) -> Path:
    """A training checkpoint of ``config``'s model whose trainable weights are ``trained`` (full tensors by our
    full-model names), as a run of that model.json saves it (weights only, iteration 0); its directory."""
    from mm_plugin.checkpoint.writing import weights_state, write_checkpoint
    from mm_plugin.config.model import to_mindspeed_json
    from mm_plugin.models.llava import LlavaModel
    from mm_plugin.parallel.world import join_world, set_model_parallel

    join_world()
    set_model_parallel(1, 1)
    model = LlavaModel(config, extra={"perform_initialization": False})  # only what trains is saved
    parameters = {name: parameter for name, parameter in model.named_parameters() if parameter.requires_grad}
    untrained = sorted(set(parameters) - set(trained))
    if untrained:
        raise ConversionError(f"{model_json} trains {', '.join(untrained[:3])}{'...' if len(untrained) > 3 else ''}, "
                              "which the input does not hold; set that part's freeze to true")
    with torch.no_grad():
        for name, parameter in parameters.items():
            tensor = trained[name]
            if name.removeprefix(OUR_PREFIXES["language"]) in VOCABULARY_TABLES:  # the real vocabulary's rows
                parameter.zero_()  # the padding rows (padded_vocab_size)
                parameter = parameter[: tensor.shape[0]]
            parameter.copy_(tensor)
    return write_checkpoint(root, 0, weights_state(model, 0, consumed_samples=0,
                                                   model_config=to_mindspeed_json(config)))


@dataclasses.dataclass
class ExportedModel:
    """Each part's tensors under our names: the part file, with trained tensors in place of its own."""

    config: LlavaConfig
    model_json: Path
    stores: dict[str, TensorStore]
    vision_layers: int
    inputs: list[str]
    notes: list[str]

    @classmethod
    def build(cls, config: LlavaConfig, model_json: Path, trained: Mapping[str, torch.Tensor],
              trained_from: str) -> "ExportedModel":
        check_hf_projector(config, model_json)
        overlay, notes = _split_trained(trained, trained_from, config.language.vocab_size)
        inputs = [trained_from] if trained else []
        stores, checkpoints = {}, {}
        for part, section in zip(PARTS, (config.vision, config.projector, config.language)):
            store = _part_store(part, section.ckpt_path, model_json, checkpoints)
            if section.ckpt_path:
                inputs.append(section.ckpt_path)
            if part == "language" and any(is_adapter(key) for key in overlay[part]):
                overlay[part] = _merged_adapters(overlay[part], store, config, model_json, trained_from)
                notes.append(f"the LoRA adapters of {trained_from} are merged into the language model's weights")
            if overlay[part]:
                store = _overlaid(store, overlay[part], trained_from, OUR_PREFIXES[part])
            if not len(store):
                raise ConversionError(f"{model_json}: no weights for the {part}: its ckpt_path is null and "
                                      f"{trained_from if trained else 'no training checkpoint'} has none")
            stores[part] = store
        layers = vision_layers_in(dict.fromkeys(stores["vision"].keys()))
        if layers < config.vision.num_layers_built:
            raise ConversionError(f"{stores['vision'].description}: {layers} vision layers; {model_json} builds "
                                  f"{config.vision.num_layers_built}")
        stores["vision"], filled = _identity_ln_post(stores["vision"])
        if filled:
            notes.append("the vision part has no ln_post (its converter dropped it); written as the identity "
                         "(weight 1, bias 0): LLaVA never uses it, and from_pretrained then finds every tensor")
        return cls(config, model_json, stores, layers, inputs, notes)

    def plan(self, dtype: Optional[torch.dtype]) -> list[Planned]:
        """Every Hugging Face tensor, under the hub's names."""
        tensors = []
        for part in PARTS:
            dims = part_dims(self.config, part, num_layers=self.vision_layers if part == "vision" else None)
            plan = plan_part(part, self.stores[part], dims, source_layout="megatron", target_layout="hf",
                             expected_from=str(self.model_json), dtype=dtype,
                             output_key=lambda key, part=part: hub_key(part, key))
            tensors += plan.tensors
            self.notes += plan.notes
        return tensors

    def dims(self, part: str):
        return part_dims(self.config, part, num_layers=self.vision_layers if part == "vision" else None)


def check_hf_projector(config: LlavaConfig, model_json: Path) -> None:
    """The model's projector is one Hugging Face's LLaVA has."""
    if projector_part(config) != "projector":
        raise ConversionError(f"{model_json}: projector type {config.projector.projector_type!r}; Hugging Face's "
                              "LLaVA has only the two-layer MLP projector (mlp2x_gelu)")
    if (config.projector.ffn_hidden_size or config.language.hidden_size) != config.language.hidden_size:
        raise ConversionError(f"{model_json}: projector ffn_hidden_size {config.projector.ffn_hidden_size} != text "
                              f"hidden_size {config.language.hidden_size}; Hugging Face's projector needs them equal")


def _split_trained(trained: Mapping[str, torch.Tensor], trained_from: str,
                   vocab: int) -> tuple[dict[str, dict[str, torch.Tensor]], list[str]]:
    overlay: dict[str, dict[str, torch.Tensor]] = {part: {} for part in PARTS}
    notes = []
    for key in trained:
        if not is_weight(key):  # e.g. TransformerEngine's _extra_state in a model's state_dict()
            continue
        part = next((part for part in PARTS if key.startswith(OUR_PREFIXES[part])), None)
        if part is None:
            raise ConversionError(f"{trained_from}: {key!r} is not a LLaVA model tensor (expected a name under "
                                  f"{', '.join(OUR_PREFIXES[p] for p in PARTS)})")
        relative, tensor = key[len(OUR_PREFIXES[part]):], trained[key]
        if part == "language" and relative in VOCABULARY_TABLES and tensor.shape[0] > vocab:
            notes.append(f"{key}: {tensor.shape[0] - vocab} padding rows beyond the vocabulary ({vocab}) dropped")
            tensor = tensor[:vocab]
        overlay[part][relative] = tensor
    return overlay, notes


def _merged_adapters(trained: dict[str, torch.Tensor], base: TensorStore, config: LlavaConfig, model_json: Path,
                     trained_from: str) -> dict[str, torch.Tensor]:
    """The language model's trained tensors with each adapter folded into its target's weight (taken from the
    trained tensors, else from the part file)."""
    lora = config.language.lora
    if lora is None:
        raise ConversionError(f"{trained_from} holds LoRA adapters but {model_json} has no text_decoder.lora: pass "
                              "the model.json the run was trained with (its scaling, alpha / rank, is needed)")
    merged = {key: tensor for key, tensor in trained.items() if not is_adapter(key)}
    for key in (key for key in trained if ".lora_A." in key):
        target = key.replace(".lora_A.weight", ".weight")
        weight = merged[target] if target in merged else base.read(target)
        merged[target] = merged_weight(weight, trained[key], trained[key.replace(".lora_A.", ".lora_B.")],
                                       lora.scaling)
    return merged


def _part_store(part: str, ckpt_path: Optional[str], model_json: Path, checkpoints: dict) -> TensorStore:
    """A part's tensors under our names: a part file, or (as the model loader also accepts) a training
    checkpoint directory, read once however many parts point to it."""
    if not ckpt_path:
        return TensorStore({}, f"{model_json} ({part})")
    path = Path(ckpt_path)
    if not path.is_dir():
        return open_weight_file(path).view(rename=lambda key: canonical_key("megatron", key))
    if path.resolve() not in checkpoints:
        checkpoints[path.resolve()] = read_trained(path)
    prefix = OUR_PREFIXES[part]
    saved = {key[len(prefix):]: tensor for key, tensor in checkpoints[path.resolve()].items() if key.startswith(prefix)}
    return TensorStore(in_memory(saved, path), str(path), lambda key: prefix + key)


def _overlaid(store: TensorStore, trained: dict[str, torch.Tensor], trained_from: str, prefix: str) -> TensorStore:
    """The part file's tensors with the trained ones in their place (named by their full names in messages)."""
    entries = {key: store.entry(key) for key in store.keys()}
    entries.update(in_memory(trained, Path(trained_from)))
    return TensorStore(entries, store.description,
                       lambda key: prefix + key if key in trained else store.display(key))


def _identity_ln_post(store: TensorStore) -> tuple[TensorStore, bool]:
    if "ln_post.weight" in store or "ln_pre.weight" not in store:
        return store, False
    reference = store.entry("ln_pre.weight")
    shape, dtype = reference.shape, reference.dtype
    return store.with_entries({
        "ln_post.weight": Entry(shape, dtype, reference.file, lambda: torch.ones(shape, dtype=dtype)),
        "ln_post.bias": Entry(shape, dtype, reference.file, lambda: torch.zeros(shape, dtype=dtype)),
    }), True


def grow_vocabulary(tensors: list[Planned], rows: int) -> list[Planned]:
    """The embedding and output layer with rows appended up to ``rows``, for tokens the tokenizer gained."""
    grown = {hub_key("language", key) for key in ("model.embed_tokens.weight", "lm_head.weight")}
    return [_grow_rows(planned, rows) if planned.key in grown else planned for planned in tensors]


def _grow_rows(planned: Planned, rows: int) -> Planned:
    """New rows hold the mean row: its logit is the mean logit, so greedy decoding never picks them."""
    def make() -> torch.Tensor:
        tensor = planned.make()
        mean = tensor.float().mean(dim=0, keepdim=True).to(tensor.dtype)
        return torch.cat([tensor, mean.expand(rows - tensor.shape[0], -1)])

    return dataclasses.replace(planned, shape=(rows,) + planned.shape[1:], make=make)


def hf_dtype_name(tensors: list[Planned]) -> str:
    counts = collections.Counter(planned.dtype for planned in tensors)
    return _HF_DTYPE_NAMES.get(counts.most_common(1)[0][0], "float32")


def hf_side_files(model: ExportedModel, tokenizer: Optional[Path]):
    """What goes beside the weights: the carried config and tokenizer files (a folder ``llava-hf`` wrote),
    or a config and processor made from model.json and a plain tokenizer."""
    folder = model.model_json.parent
    tokenizer = tokenizer or folder / "tokenizer"
    if (folder / "hf_config.json").is_file():
        return CarriedFiles.check(folder / "hf_config.json", model, tokenizer)
    if not tokenizer.is_dir():
        raise ConversionError(f"{model.model_json}: no tokenizer; pass --tokenizer (e.g. the Vicuna directory)")
    return NewProcessor.build(tokenizer, model)


@dataclasses.dataclass
class CarriedFiles:
    """The Hugging Face config ``llava-hf`` kept (checked against the model.json it travels with), and the
    tokenizer and processor files, carried over as they were."""

    raw: dict
    tokenizer: Path
    generation: Path
    notes: list[str]
    rows = None  # the vocabulary is the one the config describes

    @classmethod
    def check(cls, path: Path, model: ExportedModel, tokenizer: Path) -> "CarriedFiles":
        try:
            raw = json.loads(path.read_text())
        except (OSError, ValueError) as error:
            raise ConversionError(f"{path}: not readable JSON ({error})") from error
        theirs = from_hf_config(raw, source=str(path))
        for part in PARTS:
            ours, carried = model.dims(part), part_dims(theirs, part)
            if ours != carried:
                raise ConversionError(f"{path} and {model.model_json} describe different {part}s: "
                                      f"{describe(part, carried)} vs {describe(part, ours)}")
        if (theirs.vision.num_layers_built, theirs.vision.select_feature) != (
                model.config.vision.num_layers_built, model.config.vision.select_feature):
            raise ConversionError(f"{path} and {model.model_json} select different vision features")
        notes = [] if tokenizer.is_dir() else [
            f"no tokenizer folder at {tokenizer}; AutoProcessor will not load the output"]
        return cls(raw, tokenizer, path.parent / "generation_config.json", notes)

    def write(self, directory: Path, dtype_name: str) -> None:
        raw = dict(self.raw)
        raw["dtype"] = dtype_name
        if "torch_dtype" in raw:
            raw["torch_dtype"] = dtype_name
        write_text(directory / "config.json", json.dumps(raw, indent=2, sort_keys=True) + "\n")
        files = sorted(self.tokenizer.iterdir()) if self.tokenizer.is_dir() else []
        for file in files + [self.generation]:
            if file.is_file():
                copy_file(file, directory / file.name)


@dataclasses.dataclass
class NewProcessor:
    """A LLaVA processor made from a plain tokenizer (e.g. Vicuna's) and the model's image settings."""

    processor: Any
    image_token_id: int
    rows: Optional[int]
    """Embedding rows when the added tokens do not fit the vocabulary, else None."""
    notes: list[str]
    model: ExportedModel
    tokenizer_dir: Path

    @classmethod
    def build(cls, tokenizer_dir: Path, model: ExportedModel) -> "NewProcessor":
        from transformers import AutoImageProcessor, AutoTokenizer, CLIPImageProcessor, LlavaProcessor

        config = model.config
        try:
            tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
        except (OSError, ValueError, TypeError) as error:
            raise ConversionError(f"{tokenizer_dir}: not a loadable Hugging Face tokenizer ({error})") from error
        notes = []
        if "<image>" not in tokenizer.get_vocab():
            tokenizer.add_tokens(["<image>"], special_tokens=True)
            notes.append(f"added the <image> token (id {tokenizer.convert_tokens_to_ids('<image>')}) to the tokenizer")
        if tokenizer.pad_token is None:
            tokenizer.add_special_tokens({"pad_token": "<pad>"})
            notes.append(f"added a <pad> token (id {tokenizer.pad_token_id}) to the tokenizer")
        vocab, rows = config.language.vocab_size, None
        if len(tokenizer) > vocab:
            rows = -(-len(tokenizer) // 64) * 64
            notes.append(f"embedding and output layer grown from {vocab} to {rows} rows (a multiple of 64, as "
                         "llava-1.5-7b-hf); the new rows hold the mean row, so greedy decoding never picks them")
        size = config.vision.image_size
        if (tokenizer_dir / "preprocessor_config.json").is_file():
            image_processor = AutoImageProcessor.from_pretrained(str(tokenizer_dir))
        else:  # CLIP's own preprocessing (its mean, std and bicubic resize are CLIPImageProcessor's defaults)
            image_processor = CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
            notes.append(f"image processor: CLIP's preprocessing at {size} px (no preprocessor_config.json given)")
        processor = LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer,
                                   patch_size=config.vision.patch_size,
                                   vision_feature_select_strategy=_strategy(config),
                                   num_additional_image_tokens=config.vision.class_token_len, image_token="<image>")
        return cls(processor, tokenizer.convert_tokens_to_ids("<image>"), rows, notes, model, tokenizer_dir)

    def write(self, directory: Path, dtype_name: str) -> None:
        write_text(directory / "config.json", self._hf_config_json(dtype_name))
        self.processor.save_pretrained(str(directory))
        for folder in (self.tokenizer_dir, self.model.model_json.parent):
            if (folder / "generation_config.json").is_file():
                copy_file(folder / "generation_config.json", directory / "generation_config.json")
                break

    def _hf_config_json(self, dtype_name: str) -> str:
        from transformers import CLIPVisionConfig, LlamaConfig
        from transformers import LlavaConfig as HfLlavaConfig

        model = self.model
        vision, language, tokenizer = model.config.vision, model.config.language, self.processor.tokenizer
        text_dims = model.dims("language")
        hf = HfLlavaConfig(
            vision_config=CLIPVisionConfig(
                hidden_size=vision.hidden_size, intermediate_size=vision.ffn_hidden_size,
                num_hidden_layers=model.vision_layers, num_attention_heads=vision.num_attention_heads,
                image_size=vision.image_size, patch_size=vision.patch_size, layer_norm_eps=vision.layernorm_epsilon,
                hidden_act="quick_gelu"),
            text_config=LlamaConfig(
                hidden_size=language.hidden_size, intermediate_size=language.ffn_hidden_size,
                num_hidden_layers=language.num_layers, num_attention_heads=text_dims.heads,
                num_key_value_heads=text_dims.groups, head_dim=text_dims.head_dim,
                vocab_size=self.rows or language.vocab_size, max_position_embeddings=language.max_sequence_length,
                rms_norm_eps=language.layernorm_epsilon, rope_theta=language.rotary_base, tie_word_embeddings=False,
                bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id),
            image_token_index=self.image_token_id,
            # A negative index into Hugging Face's hidden states (embeddings, then each layer's output).
            vision_feature_layer=vision.num_layers_built - model.vision_layers - 1,
            vision_feature_select_strategy=_strategy(model.config), projector_hidden_act="gelu",
            image_seq_length=vision.num_image_tokens, multimodal_projector_bias=True, tie_word_embeddings=False)
        hf.architectures = ["LlavaForConditionalGeneration"]
        raw = hf.to_dict()
        raw["dtype"] = dtype_name
        return json.dumps(raw, indent=2, sort_keys=True) + "\n"


def _strategy(config: LlavaConfig) -> str:
    return "default" if config.vision.select_feature == "patch" else "full"
