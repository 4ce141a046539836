"""Inputs for the tests/test_convert_* modules, built once per session from the tiny HF LLaVA models.

Every input format is derived from one tiny ``LlavaForConditionalGeneration`` (``model_fixtures``): its
vision tower saved as a Hugging Face CLIP, as OpenAI's state dict and TorchScript archive, as Megatron's
clip_converter output; its language model as a Hugging Face LLaMA and as a legacy Megatron checkpoint;
its projector as LLaVA's ``mm_projector.bin``. The layouts are written here from each format's own
conventions (not with the converter's key table), so the tests compare two independent descriptions.
"""

from __future__ import annotations

import argparse
import atexit
import functools
import io
import json
import random
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch
from torch import nn

from model_fixtures import SHAPES, tiny_hf_llava
from seeds import varied

ROOT = Path(tempfile.mkdtemp(prefix="mm_convert_tests."))
atexit.register(shutil.rmtree, ROOT, True)
TOKENIZER_PIECES = 100  # the tiny vocabularies (150, 202 rows) keep padding rows beyond the tokenizer


def folder(name: str) -> Path:
    path = ROOT / name
    path.mkdir(parents=True, exist_ok=True)
    return path


# --- tokenizer ------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def vicuna_tokenizer() -> Path:
    """A sentencepiece LLaMA tokenizer folder without LLaVA's tokens, as vicuna-7b-v1.5 ships."""
    import sentencepiece

    directory = folder("tokenizer-vicuna")
    words = "a red green blue circle square triangle at the top bottom left right of image describe what is".split()
    corpus = [" ".join(random.Random(seed).choices(words, k=12)) for seed in range(300)]
    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus), model_writer=model, vocab_size=TOKENIZER_PIECES, model_type="bpe",
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, byte_fallback=False, num_threads=1, minloglevel=2)
    (directory / "tokenizer.model").write_bytes(model.getvalue())
    config = {"tokenizer_class": "LlamaTokenizer", "add_bos_token": True, "add_eos_token": False, "legacy": False,
              "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "padding_side": "right"}
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    return directory


@functools.lru_cache(maxsize=None)
def llava_processor_files() -> Path:
    """The processor files of a llava-1.5-7b-hf style directory (``<image>`` and ``<pad>`` added)."""
    from transformers import AutoTokenizer, CLIPImageProcessor, LlavaProcessor

    tokenizer = AutoTokenizer.from_pretrained(vicuna_tokenizer())
    tokenizer.add_tokens(["<image>"], special_tokens=True)
    tokenizer.add_special_tokens({"pad_token": "<pad>"})
    directory = folder("processor-llava")
    size = SHAPES["gqa"]["vision"]["image_size"]
    processor = LlavaProcessor(CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size}),
                               tokenizer, patch_size=14, vision_feature_select_strategy="default",
                               num_additional_image_tokens=1, image_token="<image>")
    processor.save_pretrained(directory)
    return directory


def image_token_id() -> int:
    return TOKENIZER_PIECES  # the first token added after the sentencepiece pieces


# --- Hugging Face LLaVA ---------------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def hf_model(shape: str):
    """A tiny LLaVA of ``model_fixtures.SHAPES``, or ``wide``: gqa's LLaMA with the CLIP_SPEC tower, whose
    head count follows OpenAI's width/64 (which original-LLaVA files, storing no CLIP config, rely on).
    Its image token is model_fixtures' (``hf_reference`` uses it); saved directories use the processor's."""
    return tiny_hf_llava(shape) if shape != "wide" else _wide_llava()


def _wide_llava():
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    config = LlavaConfig(vision_config=CLIPVisionConfig(**CLIP_SPEC),
                         text_config=LlamaConfig(**SHAPES["gqa"]["text"], max_position_embeddings=256,
                                                 tie_word_embeddings=False),
                         vision_feature_layer=-2, vision_feature_select_strategy="default",
                         projector_hidden_act="gelu", image_seq_length=4, image_token_index=5)
    torch.manual_seed(varied(4))
    return LlavaForConditionalGeneration(config).eval()


def hub_state(model) -> dict:
    """The state dict under the hub's llava-1.5-7b-hf names (``vision_tower.vision_model.*``, ...)."""
    renames = (("model.vision_tower.", "vision_tower.vision_model."), ("model.multi_modal_projector.", "multi_modal_projector."),
               ("model.language_model.", "language_model.model."), ("lm_head.", "language_model.lm_head."))
    state = {}
    for key, tensor in model.state_dict().items():
        old, new = next((old, new) for old, new in renames if key.startswith(old))
        state[new + key[len(old):]] = tensor.contiguous()
    return state


def save_sharded(state: dict, directory: Path, shards: int, fmt: str = "safetensors") -> Path:
    """Hugging Face's sharded layout with its index, written by hand (any key names)."""
    from safetensors.torch import save_file

    keys = list(state)
    groups = [keys[i::shards] for i in range(shards)]
    extension, index_name = (("safetensors", "model.safetensors.index.json") if fmt == "safetensors"
                             else ("bin", "pytorch_model.bin.index.json"))
    stem = "model" if fmt == "safetensors" else "pytorch_model"
    weight_map = {}
    for number, group in enumerate(groups, start=1):
        name = f"{stem}-{number:05d}-of-{shards:05d}.{extension}"
        part = {key: state[key] for key in group}
        if fmt == "safetensors":
            save_file(part, str(directory / name))
        else:
            torch.save(part, directory / name)
        weight_map.update(dict.fromkeys(group, name))
    (directory / index_name).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return directory


@functools.lru_cache(maxsize=None)
def hf_llava_dir(shape: str, layout: str = "transformers") -> Path:
    """``transformers``: save_pretrained's own files (sharded); ``hub``: the hub's key names, 3 shards."""
    model = hf_model(shape)
    directory = folder(f"llava-hf-{shape}-{layout}")
    if layout == "transformers":
        model.save_pretrained(directory, max_shard_size="40KB")
    else:
        model.config.save_pretrained(directory)
        save_sharded(hub_state(model), directory, shards=3)
    config = json.loads((directory / "config.json").read_text())
    config["image_token_index"] = image_token_id()  # the processor's <image>
    (directory / "config.json").write_text(json.dumps(config, indent=2))
    for file in llava_processor_files().iterdir():
        shutil.copy(file, directory / file.name)
    return directory


# --- the parts, each in the layouts users download ------------------------------------------------

def language_state(model) -> dict:
    """LlamaForCausalLM's state of the LLaVA's language model."""
    state = {}
    for key, tensor in model.state_dict().items():
        if key.startswith("model.language_model."):
            state["model." + key[len("model.language_model."):]] = tensor
        elif key == "lm_head.weight":
            state[key] = tensor
    return state


def vision_state(model) -> dict:
    """CLIPVisionTransformer's state (no prefix) of the LLaVA's vision tower."""
    prefix = "model.vision_tower."
    return {key[len(prefix):]: tensor for key, tensor in model.state_dict().items() if key.startswith(prefix)}


# OpenAI's files do not store the head count: its towers have width / 64 heads, and so does this one.
CLIP_SPEC = dict(hidden_size=128, intermediate_size=160, num_hidden_layers=2, num_attention_heads=2, image_size=28,
                 patch_size=14)


@functools.lru_cache(maxsize=None)
def clip_vision_model():
    from transformers import CLIPVisionConfig, CLIPVisionModel

    torch.manual_seed(varied(3))
    model = CLIPVisionModel(CLIPVisionConfig(**CLIP_SPEC)).eval()
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "norm" in name or "layrnorm" in name:
                parameter.add_(torch.randn_like(parameter) * 0.1)
    return model


def tower_state(tower: str) -> dict:
    """The CLIPVisionTransformer state of ``clip`` (the tower above) or of a tiny LLaVA's (``gqa``, ``mha``)."""
    if tower == "clip":
        return dict(clip_vision_model().state_dict())  # transformers 5's CLIPVisionModel has no vision_model.
    return vision_state(hf_model(tower))


def tower_config(tower: str):
    return clip_vision_model().config if tower == "clip" else hf_model(tower).config.vision_config


@functools.lru_cache(maxsize=None)
def hf_llama_dir(shape: str, fmt: str = "safetensors", rows: int = 0) -> Path:
    """The LLaVA's LLaMA as a Hugging Face directory; ``rows``: keep only the first rows of the vocabulary
    (the tokenizer's size, as Vicuna's 32000 before LLaVA adds its tokens)."""
    import copy

    from transformers import LlamaForCausalLM

    model = hf_model(shape)
    config = copy.deepcopy(model.config.text_config)
    state = language_state(model)
    if rows:
        config.vocab_size = rows
        for key in ("model.embed_tokens.weight", "lm_head.weight"):
            state[key] = state[key][:rows].clone()
    llama = LlamaForCausalLM(config)
    llama.load_state_dict(state, strict=True)
    directory = folder(f"vicuna-{shape}-{fmt}-{rows}")
    llama.save_pretrained(directory, max_shard_size="30KB", safe_serialization=fmt == "safetensors")
    for file in vicuna_tokenizer().iterdir():
        shutil.copy(file, directory / file.name)
    return directory


@functools.lru_cache(maxsize=None)
def hf_clip_dir(tower: str, fmt: str = "safetensors") -> Path:
    """A CLIPModel directory (text tower included) as clip-vit-large-patch14-336 is published."""
    from transformers import CLIPConfig, CLIPModel

    vision = tower_config(tower)
    config = CLIPConfig(text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=2, vocab_size=64, bos_token_id=1, eos_token_id=2),
                        vision_config=vision.to_dict(), projection_dim=16)
    clip = CLIPModel(config)
    clip.vision_model.load_state_dict(tower_state(tower), strict=True)
    directory = folder(f"clip-{tower}-{fmt}")
    clip.save_pretrained(directory, safe_serialization=fmt == "safetensors")
    size = vision.image_size
    (directory / "preprocessor_config.json").write_text(json.dumps({
        "crop_size": {"height": size, "width": size}, "do_center_crop": True, "do_normalize": True,
        "do_resize": True, "image_processor_type": "CLIPImageProcessor", "size": {"shortest_edge": size},
        "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711]}))
    return directory


def openai_visual_state() -> dict:
    """OpenAI CLIP's ``visual.*`` names (of the CLIP_SPEC tower): nn.MultiheadAttention's in_proj is [q; k; v]."""
    hf = tower_state("clip")
    layers, hidden = CLIP_SPEC["num_hidden_layers"], CLIP_SPEC["hidden_size"]
    state = {
        "visual.class_embedding": hf["embeddings.class_embedding"],
        "visual.positional_embedding": hf["embeddings.position_embedding.weight"],
        "visual.conv1.weight": hf["embeddings.patch_embedding.weight"],
        "visual.ln_pre.weight": hf["pre_layrnorm.weight"], "visual.ln_pre.bias": hf["pre_layrnorm.bias"],
        "visual.ln_post.weight": hf["post_layernorm.weight"], "visual.ln_post.bias": hf["post_layernorm.bias"],
        "visual.proj": torch.randn(hidden, 16, generator=torch.Generator().manual_seed(varied(1))),
    }
    for i in range(layers):
        ours, theirs = f"visual.transformer.resblocks.{i}.", f"encoder.layers.{i}."
        for kind in ("weight", "bias"):
            state[f"{ours}attn.in_proj_{kind}"] = torch.cat(
                [hf[f"{theirs}self_attn.{x}_proj.{kind}"] for x in "qkv"])
            state[f"{ours}attn.out_proj.{kind}"] = hf[f"{theirs}self_attn.out_proj.{kind}"]
            state[f"{ours}ln_1.{kind}"] = hf[f"{theirs}layer_norm1.{kind}"]
            state[f"{ours}ln_2.{kind}"] = hf[f"{theirs}layer_norm2.{kind}"]
            state[f"{ours}mlp.c_fc.{kind}"] = hf[f"{theirs}mlp.fc1.{kind}"]
            state[f"{ours}mlp.c_proj.{kind}"] = hf[f"{theirs}mlp.fc2.{kind}"]
    return state


def openai_text_state() -> dict:
    """A stand-in for OpenAI CLIP's text tower (not converted; must be left out)."""
    generator = torch.Generator().manual_seed(varied(2))
    return {"token_embedding.weight": torch.randn(64, 16, generator=generator),
            "positional_embedding": torch.randn(8, 16, generator=generator),
            "ln_final.weight": torch.ones(16), "ln_final.bias": torch.zeros(16),
            "text_projection": torch.randn(16, 16, generator=generator), "logit_scale": torch.tensor(4.6)}


@functools.lru_cache(maxsize=None)
def openai_state_dict_file() -> Path:
    path = folder("openai") / "clip_state_dict.pt"
    torch.save({**openai_visual_state(), **openai_text_state()}, path)
    return path


class _Block(nn.Module):
    def __init__(self, width: int, heads: int, ffn: int):
        super().__init__()
        self.attn = nn.MultiheadAttention(width, heads)
        self.ln_1, self.ln_2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.mlp = nn.Sequential()
        self.mlp.add_module("c_fc", nn.Linear(width, ffn))
        self.mlp.add_module("c_proj", nn.Linear(ffn, width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.ln_1(x)
        x = x + self.attn(y, y, y, need_weights=False)[0]
        hidden = self.mlp.c_fc(self.ln_2(x))
        return x + self.mlp.c_proj(hidden * torch.sigmoid(1.702 * hidden))  # QuickGELU


class _Transformer(nn.Module):
    def __init__(self, width: int, layers: int, heads: int, ffn: int):
        super().__init__()
        self.resblocks = nn.Sequential(*[_Block(width, heads, ffn) for _ in range(layers)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.resblocks(x)


class OpenAIVisionTransformer(nn.Module):
    """OpenAI CLIP's VisionTransformer (clip/model.py), returning every token before ``ln_post``."""

    def __init__(self, width: int, layers: int, heads: int, ffn: int, patch: int, image: int):
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, patch, patch, bias=False)
        self.class_embedding = nn.Parameter(torch.zeros(width))
        self.positional_embedding = nn.Parameter(torch.zeros((image // patch) ** 2 + 1, width))
        self.ln_pre, self.ln_post = nn.LayerNorm(width), nn.LayerNorm(width)
        self.transformer = _Transformer(width, layers, heads, ffn)
        self.proj = nn.Parameter(torch.zeros(width, 16))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.conv1(images).flatten(2).permute(0, 2, 1)
        x = torch.cat([self.class_embedding.expand(x.shape[0], 1, -1), x], dim=1) + self.positional_embedding
        x = self.ln_pre(x).permute(1, 0, 2)  # nn.MultiheadAttention is sequence-first
        return self.transformer(x).permute(1, 0, 2)


class OpenAICLIP(nn.Module):
    def __init__(self, visual: OpenAIVisionTransformer):
        super().__init__()
        self.visual = visual
        text = openai_text_state()
        self.token_embedding = nn.Embedding(*text["token_embedding.weight"].shape)
        self.positional_embedding = nn.Parameter(text["positional_embedding"])
        self.ln_final = nn.LayerNorm(16)
        self.text_projection = nn.Parameter(text["text_projection"])
        self.logit_scale = nn.Parameter(text["logit_scale"])

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.visual(images)


def openai_module() -> OpenAICLIP:
    spec = CLIP_SPEC
    visual = OpenAIVisionTransformer(spec["hidden_size"], spec["num_hidden_layers"], spec["num_attention_heads"],
                                     spec["intermediate_size"], spec["patch_size"], spec["image_size"])
    model = OpenAICLIP(visual)
    model.load_state_dict({**openai_visual_state(), **openai_text_state()}, strict=True)
    return model.eval()


@functools.lru_cache(maxsize=None)
def openai_torchscript_file(name: str = "ViT-tiny.pt", dtype: torch.dtype = torch.float32) -> Path:
    """A TorchScript archive as OpenAI publishes (code + weights), from the module above."""
    path = folder(f"openai-jit-{dtype}".replace("torch.", "")) / name
    torch.jit.save(torch.jit.script(openai_module().to(dtype)), str(path))
    return path


def megatron_clip_state(use_te: bool) -> dict:
    """Megatron's clip_converter output: our names (TransformerEngine's with --use-te), per-head
    interleaved QKV, no ln_post, no visual.proj."""
    hf = tower_state("clip")
    spec = CLIP_SPEC
    heads, head_dim = spec["num_attention_heads"], spec["hidden_size"] // spec["num_attention_heads"]
    state = {"class_token": hf["embeddings.class_embedding"].reshape(1, 1, -1),
             "position_embeddings.weight": hf["embeddings.position_embedding.weight"],
             "conv1.weight": hf["embeddings.patch_embedding.weight"],
             "ln_pre.weight": hf["pre_layrnorm.weight"], "ln_pre.bias": hf["pre_layrnorm.bias"]}
    norms = ({"input": "self_attention.linear_qkv.layer_norm_", "pre_mlp": "mlp.linear_fc1.layer_norm_"} if use_te
             else {"input": "input_layernorm.", "pre_mlp": "pre_mlp_layernorm."})
    for i in range(spec["num_hidden_layers"]):
        ours, theirs = f"decoder.layers.{i}.", f"encoder.layers.{i}."
        for kind in ("weight", "bias"):
            q, k, v = (hf[f"{theirs}self_attn.{x}_proj.{kind}"] for x in "qkv")
            state[f"{ours}self_attention.linear_qkv.{kind}"] = torch.cat(
                [part[h * head_dim:(h + 1) * head_dim] for h in range(heads) for part in (q, k, v)])
            state[f"{ours}self_attention.linear_proj.{kind}"] = hf[f"{theirs}self_attn.out_proj.{kind}"]
            state[f"{ours}{norms['input']}{kind}"] = hf[f"{theirs}layer_norm1.{kind}"]
            state[f"{ours}{norms['pre_mlp']}{kind}"] = hf[f"{theirs}layer_norm2.{kind}"]
            state[f"{ours}mlp.linear_fc1.{kind}"] = hf[f"{theirs}mlp.fc1.{kind}"]
            state[f"{ours}mlp.linear_fc2.{kind}"] = hf[f"{theirs}mlp.fc2.{kind}"]
    return state


@functools.lru_cache(maxsize=None)
def megatron_clip_dir(tensor_parallel: int, use_te: bool, checkpoint: bool = False) -> Path:
    """``state_dict_tp_N.pt`` files as Megatron's clip_converter writes them (chunked per its chunk_dim); with
    ``checkpoint``, its older layout: a Megatron checkpoint (``iter_0000001/mp_rank_0N/model_optim_rng.pt``
    with args and RNG state beside the model)."""
    directory = folder(f"megatron-clip-tp{tensor_parallel}-te{int(use_te)}-{int(checkpoint)}")
    state = megatron_clip_state(use_te)
    ranks = [{} for _ in range(tensor_parallel)]
    for key, tensor in state.items():
        dim = (0 if any(name in key for name in ("linear_qkv.weight", "linear_qkv.bias", "linear_fc1.weight",
                                                 "linear_fc1.bias"))
               else 1 if key.endswith(("linear_proj.weight", "linear_fc2.weight")) else None)
        pieces = [tensor] * tensor_parallel if dim is None else torch.chunk(tensor, tensor_parallel, dim=dim)
        for rank, piece in zip(ranks, pieces):
            rank[key] = piece.clone()
    for number, rank in enumerate(ranks):
        if not checkpoint:
            torch.save({"model": rank}, directory / f"state_dict_tp_{number}.pt")
            continue
        (directory / "latest_checkpointed_iteration.txt").write_text("1")
        rank_dir = directory / "iter_0000001" / f"mp_rank_{number:02d}"
        rank_dir.mkdir(parents=True, exist_ok=True)
        torch.save({"model": rank, "args": argparse.Namespace(tensor_model_parallel_size=tensor_parallel),
                    "iteration": 1, "rng_state": [{"torch_rng_state": torch.get_rng_state(),
                                                   "np_rng_state": np.random.get_state()}]},
                   rank_dir / "model_optim_rng.pt")
    return directory


def legacy_megatron_args(shape: str, tensor_parallel: int) -> argparse.Namespace:
    text = SHAPES[shape]["text"]
    return argparse.Namespace(
        num_layers=text["num_hidden_layers"], hidden_size=text["hidden_size"],
        num_attention_heads=text["num_attention_heads"], group_query_attention=True,
        num_query_groups=text["num_key_value_heads"], ffn_hidden_size=text["intermediate_size"],
        kv_channels=text["hidden_size"] // text["num_attention_heads"], swiglu=True,
        padded_vocab_size=text["vocab_size"], tensor_model_parallel_size=tensor_parallel,
        pipeline_model_parallel_size=1, params_dtype=torch.float32, position_embedding_type="rope")


def legacy_language_encoder(shape: str, modellink_names: bool) -> tuple[dict, dict, dict]:
    """(embedding, encoder, output layer) of a legacy Megatron GPT with the LLaVA's LLaMA weights."""
    hf = language_state(hf_model(shape))
    text = SHAPES[shape]["text"]
    heads, groups = text["num_attention_heads"], text["num_key_value_heads"]
    head_dim = text["hidden_size"] // heads
    per_group = heads // groups
    norm_in, norm_post, norm_final = (("input_norm", "post_attention_norm", "final_norm") if modellink_names
                                      else ("input_layernorm", "post_attention_layernorm", "final_layernorm"))
    encoder = {f"{norm_final}.weight": hf["model.norm.weight"]}
    for i in range(text["num_hidden_layers"]):
        theirs = f"model.layers.{i}."
        q, k, v = (hf[f"{theirs}self_attn.{x}_proj.weight"] for x in "qkv")
        rows = []
        for g in range(groups):  # legacy Megatron's grouped order: a group's query heads, its key, its value
            rows += [q[g * per_group * head_dim:(g + 1) * per_group * head_dim], k[g * head_dim:(g + 1) * head_dim],
                     v[g * head_dim:(g + 1) * head_dim]]
        encoder[f"layers.{i}.self_attention.query_key_value.weight"] = torch.cat(rows)
        encoder[f"layers.{i}.self_attention.dense.weight"] = hf[f"{theirs}self_attn.o_proj.weight"]
        encoder[f"layers.{i}.mlp.dense_h_to_4h.weight"] = torch.cat(
            [hf[f"{theirs}mlp.gate_proj.weight"], hf[f"{theirs}mlp.up_proj.weight"]])
        encoder[f"layers.{i}.mlp.dense_4h_to_h.weight"] = hf[f"{theirs}mlp.down_proj.weight"]
        encoder[f"layers.{i}.{norm_in}.weight"] = hf[f"{theirs}input_layernorm.weight"]
        encoder[f"layers.{i}.{norm_post}.weight"] = hf[f"{theirs}post_attention_layernorm.weight"]
    return hf["model.embed_tokens.weight"], encoder, hf["lm_head.weight"]


def _split_rank(key: str, tensor: torch.Tensor, ranks: int) -> list[torch.Tensor]:
    """Megatron's tensor-parallel split of one legacy tensor."""
    if key.endswith("dense_h_to_4h.weight"):  # each rank holds [its gate rows; its up rows]
        gate, up = tensor.chunk(2)
        return [torch.cat([g, u]) for g, u in zip(gate.chunk(ranks), up.chunk(ranks))]
    if key.endswith(("query_key_value.weight", "word_embeddings.weight", "output_layer.weight")):
        return list(tensor.chunk(ranks, dim=0))
    if key.endswith(("dense.weight", "dense_4h_to_h.weight")):
        return list(tensor.chunk(ranks, dim=1))
    return [tensor] * ranks


@functools.lru_cache(maxsize=None)
def legacy_megatron_dir(shape: str, tensor_parallel: int = 1, modellink_names: bool = True) -> Path:
    """A ``--save`` directory of ModelLink's ``convert_ckpt.py --saver megatron``: tracker file,
    ``iter_0000001/mp_rank_0N/model_optim_rng.pt`` with nested legacy names, args and RNG state."""
    embedding, encoder, output = legacy_language_encoder(shape, modellink_names)
    directory = folder(f"legacy-{shape}-tp{tensor_parallel}-ml{int(modellink_names)}")
    (directory / "latest_checkpointed_iteration.txt").write_text("1")
    random.seed(0)
    for rank in range(tensor_parallel):
        split = lambda key, tensor: _split_rank(key, tensor, tensor_parallel)[rank]  # noqa: E731
        checkpoint = {
            "args": legacy_megatron_args(shape, tensor_parallel), "checkpoint_version": 3.0, "iteration": 1,
            "model": {"language_model": {
                "embedding": {"word_embeddings": {"weight": split("word_embeddings.weight", embedding).clone()}},
                "encoder": {key: split(key, tensor).clone() for key, tensor in encoder.items()},
                "output_layer": {"weight": split("output_layer.weight", output).clone()}}},
            "rng_state": [{"random_rng_state": random.getstate(), "np_rng_state": np.random.get_state(),
                           "torch_rng_state": torch.get_rng_state()}],
        }
        rank_dir = directory / "iter_0000001" / f"mp_rank_{rank:02d}"
        rank_dir.mkdir(parents=True, exist_ok=True)
        torch.save(checkpoint, rank_dir / "model_optim_rng.pt")
    return directory


def projector_state(shape: str) -> dict:
    prefix = "model.multi_modal_projector."
    return {key[len(prefix):]: tensor for key, tensor in hf_model(shape).state_dict().items()
            if key.startswith(prefix)}


@functools.lru_cache(maxsize=None)
def mm_projector_file(shape: str) -> Path:
    """LLaVA's ``mm_projector.bin``: ``model.mm_projector.{0,2}.*`` (nn.Sequential(Linear, GELU, Linear))."""
    hf = projector_state(shape)
    path = folder(f"llava-projector-{shape}") / "mm_projector.bin"
    torch.save({f"model.mm_projector.{index}.{kind}": hf[f"linear_{number}.{kind}"]
                for index, number in ((0, 1), (2, 2)) for kind in ("weight", "bias")}, path)
    return path


@functools.lru_cache(maxsize=None)
def original_llava_dir(shape: str, vision_inside: bool) -> Path:
    """The original LLaVA repository's layout (LlavaLlamaForCausalLM): LLaMA names, ``model.mm_projector.*``,
    the tower as ``model.vision_tower.vision_tower.vision_model.*`` when it was saved with the model."""
    model = hf_model(shape)
    text = model.config.text_config.to_dict()
    directory = folder(f"llava-original-{shape}-{int(vision_inside)}")
    config = {key: text[key] for key in ("hidden_size", "intermediate_size", "num_hidden_layers",
                                         "num_attention_heads", "num_key_value_heads", "vocab_size", "rms_norm_eps",
                                         "max_position_embeddings", "tie_word_embeddings")}
    config.update(model_type="llava_llama", architectures=["LlavaLlamaForCausalLM"],
                  rope_theta=model.config.text_config.rope_parameters["rope_theta"],
                  mm_vision_tower="openai/clip-vit-large-patch14-336", mm_projector_type="mlp2x_gelu",
                  mm_vision_select_layer=-2, mm_vision_select_feature="patch", mm_hidden_size=48)
    (directory / "config.json").write_text(json.dumps(config))
    state = dict(language_state(model))
    hf = projector_state(shape)
    state.update({f"model.mm_projector.{index}.{kind}": hf[f"linear_{number}.{kind}"]
                  for index, number in ((0, 1), (2, 2)) for kind in ("weight", "bias")})
    if vision_inside:
        state.update({f"model.vision_tower.vision_tower.vision_model.{key}": tensor
                      for key, tensor in vision_state(model).items()})
    save_sharded({key: tensor.contiguous() for key, tensor in state.items()}, directory, shards=2, fmt="bin")
    for file in vicuna_tokenizer().iterdir():
        shutil.copy(file, directory / file.name)
    return directory


def load_converted(model_json: Path):
    """A LlavaModel with the part files of a model.json loaded, as training and inference load them."""
    from mm_plugin.config.model import load_model_config
    from mm_plugin.models.llava import LlavaModel
    from mm_plugin.models.loading import load_parts

    config = load_model_config(str(model_json))
    config.attention_backend = "sdpa"
    model = LlavaModel(config, extra={"perform_initialization": False})
    load_parts(model, config)
    return model.eval()


def files_under(directory: Path) -> list[str]:
    """Every path under a directory (hidden ones too), relative: to see that nothing partial is left."""
    return sorted(str(path.relative_to(directory)) for path in Path(directory).rglob("*"))
