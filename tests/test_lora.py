"""LoRA on the language model: it starts from the base model, trains only adapters and projector, gives the
same numbers under TP, PP and DP, checkpoints hold what trains and resume exactly (across TP sizes), an export
merges the adapters into weights with the same logits, and wrong configurations are named before compute."""

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from seeds import varied
from training_fixtures import argv, build_setup, model_json, train

pytestmark = pytest.mark.numeric

LORA = {"rank": 4, "alpha": 8, "dropout": 0.0}
WITH_OUTPUT_LAYER = ("--lora-targets", "linear_qkv", "linear_proj", "linear_fc1", "linear_fc2", "output_layer")
"""The decoder's four linears and the output layer (PEFT's lm_head), as flags."""


def close(a, b, rtol=2e-5):
    return torch.allclose(torch.tensor(a, dtype=torch.float64), torch.tensor(b, dtype=torch.float64),
                          rtol=rtol, atol=0)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = build_setup(tmp_path_factory.mktemp("lora"))
    raw = json.loads(model_json(root, "stage2.json", train_language=True).read_text())
    raw["text_decoder"]["lora"] = LORA
    (root / "lora.json").write_text(json.dumps(raw))
    return root


def _argv(root: Path, iterations: int = 4, extra=()):
    return argv(root, model="lora.json", data="instruct", iterations=iterations, extra=extra)


def test_lora_starts_from_the_base_model_and_trains_only_adapters_and_projector(megatron_single, setup):
    from mm_plugin.safe_io import load_state

    full, _, _ = train(argv(setup, model="stage2.json", data="instruct", iterations=2))
    lora, _, weights = train(_argv(setup, iterations=3))
    assert lora[0] == full[0]  # B starts at zero: the first step is the base model's, bit for bit
    llm, clip = load_state(setup / "weights" / "llm.pt"), load_state(setup / "weights" / "clip.pt")
    for key, value in llm.items():
        assert torch.equal(weights["language_model." + key][: value.shape[0]], value), key  # base weights frozen
    for key, value in clip.items():
        if "vision_model." + key in weights:
            assert torch.equal(weights["vision_model." + key], value), key
    adapters = [name for name in weights if ".lora_" in name]
    assert len(adapters) == 2 * 4 * 2  # A and B, four targets, two layers
    assert all(weights[name].abs().sum() > 0 for name in adapters if ".lora_B." in name)  # B learned
    projector = load_state(setup / "weights" / "projector.pt")
    assert not torch.equal(weights["vision_projection.encoder.linear_fc1.weight"],
                           projector["encoder.linear_fc1.weight"])


@pytest.mark.compat
@pytest.mark.parametrize("layout, targets", [
    (("--tensor-model-parallel-size", "2"), ()), (("--pipeline-model-parallel-size", "2"), ()), ((), ()),
    (("--tensor-model-parallel-size", "2"), WITH_OUTPUT_LAYER),  # B split over the vocabulary like the weight
    (("--pipeline-model-parallel-size", "2"), WITH_OUTPUT_LAYER),  # the output layer on the last stage
], ids=["tp2", "pp2", "dp2", "tp2-output_layer", "pp2-output_layer"])
def test_lora_layouts_reproduce_a_single_process(megatron_single, pool, setup, layout, targets):
    single, _, _ = train(_argv(setup, iterations=5, extra=targets))
    results = pool.run(train, _argv(setup, iterations=5, extra=layout + targets))
    assert results[0][0] == results[1][0]
    assert close(results[0][0], single), (results[0][0], single)


def test_lora_checkpoints_hold_what_trains_and_resume_exactly(megatron_single, setup, tmp_path):
    from megatron.core import dist_checkpointing

    straight, _, _ = train(_argv(setup, iterations=6, extra=WITH_OUTPUT_LAYER))
    first, _, _ = train(_argv(setup, iterations=6, extra=WITH_OUTPUT_LAYER + (
        "--save", str(tmp_path / "ckpt"), "--exit-interval", "3")))
    rest, _, _ = train(_argv(setup, iterations=6, extra=WITH_OUTPUT_LAYER + ("--load", str(tmp_path / "ckpt"))))
    assert first + rest == straight
    saved = dist_checkpointing.load_tensors_metadata(str(tmp_path / "ckpt" / "iter_0000003"))
    weights = {key for key in saved if not key.startswith("optimizer")}
    assert weights and all(".lora_" in key or key.startswith("vision_projection.") for key in weights), weights
    assert "language_model.output_layer.lora_B.weight" in weights  # the output layer's weight itself stays frozen


def test_a_tensor_parallel_lora_checkpoint_resumes_at_tp1(megatron_single, pool, setup, tmp_path):
    saved = str(tmp_path / "tp2")
    tp2 = pool.run(train, _argv(setup, iterations=5, extra=WITH_OUTPUT_LAYER + (
        "--tensor-model-parallel-size", "2", "--save", saved, "--save-interval", "4")))[0][0]
    tp1, _, _ = train(_argv(setup, iterations=5, extra=WITH_OUTPUT_LAYER + (
        "--load", str(Path(saved) / "iter_0000004"))))
    assert len(tp1) == 1 and close(tp1, tp2[4:])


def test_the_projector_learning_rate_is_its_own(megatron_single, setup):
    """Original LLaVA's mm_projector_lr: the projector's parameter group runs at its own rate."""
    from megatron.core.enums import ModelType

    from mm_plugin.config.model import load_model_config
    from mm_plugin.data.config import load_data_config
    from mm_plugin.training import loop
    from mm_plugin.training.arguments import parse_args
    from mm_plugin.training.providers import bind

    seen = {}
    args = parse_args(_argv(setup, extra=("--mm-projector-lr", "5e-4", "--lr-warmup-iters", "0")))
    providers = bind(args, load_model_config(args.mm_model), load_data_config(args.mm_data))
    loop.initialize(args)
    model = loop.build_model(providers.model_provider, ModelType.encoder_or_decoder, args)
    optimizer, _ = loop.build_optimizer(model, args, providers.settings)
    for group in optimizer.param_groups:
        names = {name for name, parameter in model.named_parameters() if any(parameter is p for p in group["params"])}
        if names:
            seen[all("vision_projection" in name for name in names)] = group
    projector_group, other_group = seen[True], seen[False]
    assert projector_group["lr"] == pytest.approx(5e-4) and other_group["lr"] == pytest.approx(2e-3)


@pytest.mark.parametrize("change, message", [
    (lambda raw: raw["text_decoder"].update(freeze=True), "text_decoder.freeze is true"),
    (lambda raw: raw["text_decoder"]["lora"].update(rank=65), "exceeds the narrowest side"),
    (lambda raw: raw["text_decoder"]["lora"].update(targets=["linear_q"]), "targets"),
    (lambda raw: raw["text_decoder"]["lora"].update(dropout=1.5), "dropout"),
    (lambda raw: raw["image_encoder"]["vision_encoder"].update(lora=LORA), "vision_encoder.lora: unknown field"),
])
def test_a_wrong_lora_section_is_named(setup, tmp_path, change, message):
    from mm_plugin.config.model import ModelConfigError, load_model_config

    raw = json.loads((setup / "lora.json").read_text())
    change(raw)
    (tmp_path / "bad.json").write_text(json.dumps(raw))
    with pytest.raises(ModelConfigError, match=message):
        load_model_config(str(tmp_path / "bad.json"))


def test_an_output_layer_adapter_on_a_tied_output_layer_is_refused():
    """Tied embedding and output weights (not LLaVA's LLaMA, which has its own lm_head) would adapt both."""
    from mm_plugin.config.model import LoraConfig, ModelConfigError
    from mm_plugin.models.lora import adapt_output_layer

    with pytest.raises(ModelConfigError, match="shares its weight with the embedding"):
        adapt_output_layer(SimpleNamespace(share_embeddings_and_output_weights=True), LoraConfig())


def test_lora_and_plain_checkpoints_do_not_mix_silently(megatron_single, setup, tmp_path):
    from mm_plugin.checkpoint.reading import CheckpointError

    train(_argv(setup, iterations=2, extra=("--save", str(tmp_path / "lora"))))
    with pytest.raises(CheckpointError, match="holds LoRA adapters but this model has none"):
        train(argv(setup, model="stage2.json", data="instruct", iterations=4,
                   extra=("--load", str(tmp_path / "lora"), "--finetune")))
    train(argv(setup, model="stage2.json", data="instruct", iterations=2, extra=("--save", str(tmp_path / "full"))))
    with pytest.raises(CheckpointError, match="holds no LoRA adapters.*--finetune"):
        train(_argv(setup, iterations=4, extra=("--load", str(tmp_path / "full"))))
    train(_argv(setup, iterations=2, extra=("--load", str(tmp_path / "full"), "--finetune")))  # fresh adapters


DECODER_TARGETS = ["linear_qkv", "linear_proj", "linear_fc1", "linear_fc2"]
ALL_TARGETS = pytest.param(DECODER_TARGETS + ["output_layer"], id="output_layer")
"""``adapted``'s targets (indirect): the default (the decoder's linears), or these and the output layer."""


@pytest.fixture(scope="module")
def adapted(megatron_single, tmp_path_factory, request):
    """The tiny Hugging Face LLaVA as part files, with LoRA on its language model (``request.param``: the targets,
    default the decoder's linears) and a random B (a trained adapter), saved as training saves it: its folder,
    the checkpoint, the model and a batch in our layout."""
    import convert_fixtures as fixtures
    from mm_plugin.config.model import load_model_config, to_mindspeed_json
    from mm_plugin.convert import import_llava_hf
    from mm_plugin.training.checkpointing import save_checkpoint
    from model_fixtures import mixed_batch

    root = tmp_path_factory.mktemp("adapted")
    base = root / "llava-mm"
    import_llava_hf(fixtures.hf_llava_dir("gqa"), base, progress=False)
    raw = json.loads((base / "model.json").read_text())
    raw["text_decoder"].update(freeze=False, lora={**LORA, "targets": getattr(request, "param", DECODER_TARGETS)})
    (base / "lora.json").write_text(json.dumps(raw))
    model = fixtures.load_converted(base / "lora.json")
    generator = torch.Generator().manual_seed(varied(0))
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if ".lora_B." in name:  # a trained adapter: B is no longer zero
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.05)
    save_checkpoint(root / "checkpoints", 3, model, None, None, consumed_samples=0,
                    model_config=to_mindspeed_json(load_model_config(str(base / "lora.json"))),
                    trainable_only=True, save_optimizer=False, save_rng=False)
    return SimpleNamespace(base=base, checkpoint=root / "checkpoints", model=model, batch=mixed_batch("gqa"))


def ours_equal(model, batch, reference_logits) -> None:
    """Our model's logits on ``batch`` are the Hugging Face reference's (``hf_reference``), 1e-5 relative."""
    with torch.no_grad():
        logits, _ = model(batch["input_ids"], None, batch["images"], batch["image_counts"])
    for row, reference in enumerate(reference_logits):
        ours = logits[row, : reference.shape[0], : reference.shape[1]]
        assert (ours - reference).abs().max() <= 1e-5 * reference.abs().max(), row


def hf_llava(directory):
    from transformers import LlavaForConditionalGeneration

    from model_fixtures import HF_IMAGE_TOKEN

    model = LlavaForConditionalGeneration.from_pretrained(directory).eval()
    model.config.image_token_id = HF_IMAGE_TOKEN  # hf_reference's placeholder (the file keeps the processor's)
    return model


@pytest.mark.parametrize("adapted", [DECODER_TARGETS, ALL_TARGETS], indirect=True)
def test_export_merges_the_adapters_with_the_same_logits(adapted, tmp_path):
    """A LoRA model, saved as training saves it, exported to Hugging Face: the merged model's logits are ours."""
    import convert_fixtures as fixtures
    from mm_plugin.convert import export_hf
    from model_fixtures import hf_reference

    export_hf(adapted.base / "lora.json", tmp_path / "llava-hf", load=adapted.checkpoint, progress=False)
    reference_logits, _ = hf_reference(hf_llava(tmp_path / "llava-hf"), adapted.batch)
    ours_equal(adapted.model, adapted.batch, reference_logits)
    original, _ = hf_reference(fixtures.hf_model("gqa"), adapted.batch)
    assert (original[0] - reference_logits[0]).abs().max() > 1e-3  # the adapters changed what it computes


@pytest.mark.parametrize("adapted", [DECODER_TARGETS, ALL_TARGETS], indirect=True)
def test_a_peft_folder_on_the_unmerged_base_computes_what_the_lora_model_does(adapted, tmp_path):
    """export-hf --peft: the adapters split into PEFT's q/k/v and gate/up adapters under the names PEFT gives a
    transformers LlavaForConditionalGeneration, the projector as modules_to_save; on the base's export (no --load)
    PeftModel computes our LoRA model's logits."""
    from peft import LoraConfig, PeftModel, get_peft_model, get_peft_model_state_dict
    from safetensors.torch import load_file

    from mm_plugin.convert.cli import main
    from model_fixtures import hf_reference

    assert main(["export-hf", "--input", str(adapted.base / "lora.json"), "--output", str(tmp_path / "base"),
                 "--no-progress"]) == 0
    assert main(["export-hf", "--input", str(adapted.base / "lora.json"), "--load", str(adapted.checkpoint),
                 "--peft", "--base-model", str(tmp_path / "base"), "--output", str(tmp_path / "peft"),
                 "--no-progress"]) == 0
    settings = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert (settings["r"], settings["lora_alpha"], settings["lora_dropout"]) == (4, 8, 0.0)
    assert settings["base_model_name_or_path"] == str(tmp_path / "base")
    saved = load_file(tmp_path / "peft" / "adapter_model.safetensors")
    fresh = get_peft_model(hf_llava(tmp_path / "base"), LoraConfig(**{
        key: settings[key] for key in ("r", "lora_alpha", "target_modules", "modules_to_save")}))
    # PEFT's own names, nothing on the CLIP tower (and not lm_head's base weight, which PEFT saves by default for a
    # targeted lm_head: it is the base's, unchanged)
    assert saved.keys() == get_peft_model_state_dict(fresh, save_embedding_layers=False).keys()

    peft_model = PeftModel.from_pretrained(hf_llava(settings["base_model_name_or_path"]), tmp_path / "peft").eval()
    reference_logits, _ = hf_reference(peft_model, adapted.batch)
    ours_equal(adapted.model, adapted.batch, reference_logits)
    base_logits, _ = hf_reference(hf_llava(tmp_path / "base"), adapted.batch)
    assert (base_logits[0] - reference_logits[0]).abs().max() > 1e-3  # the adapters are in use


def test_an_unmerged_lora_checkpoint_loads_as_a_part_and_answers_as_the_trained_model(megatron_single, setup, tmp_path):
    """text_decoder.ckpt_path may name the LoRA run's checkpoint: its adapters load, the frozen weights come from
    the part file the run was trained from, and the model computes what the trained one did."""
    from mm_plugin.config.model import load_model_config
    from mm_plugin.models.llava import LlavaModel
    from mm_plugin.models.loading import load_parts

    _, _, trained = train(_argv(setup, iterations=3, extra=("--save", str(tmp_path / "ckpt"))))
    config = load_model_config(str(setup / "lora.json"))
    config.language.ckpt_path = config.projector.ckpt_path = str(tmp_path / "ckpt")
    model = LlavaModel(config, extra={"perform_initialization": False})
    load_parts(model, config)
    loaded = dict(model.named_parameters())
    assert trained.keys() == loaded.keys()
    assert all(torch.equal(trained[name], loaded[name].detach()) for name in trained)


HF_LINEARS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def llava_lora_folder(directory: Path, rank: int = 4, alpha: int = 8, lm_head: bool = False):
    """What original LLaVA's finetune_lora.sh writes, for the tiny model: PEFT adapters on every linear of the
    language model, each with its own A and a random B, under LlavaLlamaForCausalLM's names in adapter_model.bin,
    and the trained projector in non_lora_trainables.bin (llava/train/train.py); and the PEFT model (on
    transformers' LlavaForConditionalGeneration) that computes what they describe. ``lm_head``: an adapter on the
    output layer too (PEFT's name for it)."""
    from peft import LoraConfig, get_peft_model, get_peft_model_state_dict

    from model_fixtures import tiny_hf_llava

    peft_model = get_peft_model(tiny_hf_llava("gqa"), LoraConfig(
        r=rank, lora_alpha=alpha,
        target_modules=rf".*language_model\..*\.({'|'.join(HF_LINEARS)})" + ("|lm_head" if lm_head else ""),
        modules_to_save=["multi_modal_projector"])).eval()
    generator = torch.Generator().manual_seed(varied(1))
    with torch.no_grad():
        for name, parameter in peft_model.named_parameters():
            if ".lora_B." in name or ".modules_to_save." in name:  # trained
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.05)
    adapters, others = {}, {}
    for key, tensor in get_peft_model_state_dict(peft_model).items():
        if ".multi_modal_projector." in key:
            layer = {"linear_1": "0", "linear_2": "2"}[key.split(".")[-2]]
            others[f"base_model.model.model.mm_projector.{layer}.{key.split('.')[-1]}"] = tensor
        else:
            adapters[key.replace("model.language_model.layers.", "model.layers.")] = tensor
    directory.mkdir()
    torch.save(adapters, directory / "adapter_model.bin")
    torch.save(others, directory / "non_lora_trainables.bin")
    (directory / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": "lmsys/vicuna-7b-v1.5", "r": rank,
        "lora_alpha": alpha, "lora_dropout": 0.05, "target_modules": HF_LINEARS[::-1] + ["lm_head"] * lm_head,
        "bias": "none",
        "fan_in_fan_out": False, "inference_mode": True, "init_lora_weights": True, "modules_to_save": None,
        "layers_to_transform": None, "layers_pattern": None, "revision": None}))
    return peft_model


def load_lora_checkpoint(checkpoint: Path):
    """Our model of a LoRA checkpoint, its adapters and projector from it and the rest as it was trained from."""
    from mm_plugin.checkpoint.reading import trained_model_config
    from mm_plugin.models.llava import LlavaModel
    from mm_plugin.models.loading import load_parts

    config = trained_model_config(checkpoint)
    config.attention_backend = "sdpa"
    config.language.ckpt_path = config.projector.ckpt_path = str(checkpoint)
    model = LlavaModel(config, extra={"perform_initialization": False})
    load_parts(model, config)
    return model.eval()


@pytest.mark.parametrize("lm_head", [False, True], ids=["decoder", "lm_head"])
def test_original_llava_lora_output_imports_as_our_checkpoint_with_the_same_logits(adapted, tmp_path, lm_head):
    """mm-convert llava-lora: q/k/v and gate/up adapters, each with its own A, fused exactly into ours (rank 3 r,
    alpha 3 alpha); the checkpoint loads as a LoRA run's and computes what PEFT computes with the adapters."""
    from mm_plugin.convert.cli import main
    from model_fixtures import hf_reference

    peft_model = llava_lora_folder(tmp_path / "llava-v1.5-lora", lm_head=lm_head)
    assert main(["llava-lora", "--input", str(tmp_path / "llava-v1.5-lora"), "--model", str(adapted.base),
                 "--output", str(tmp_path / "imported"), "--no-progress"]) == 0
    model = load_lora_checkpoint(tmp_path / "imported")
    assert model.llava_config.language.lora.rank == 12 and model.llava_config.language.lora.scaling == 2.0
    reference_logits, _ = hf_reference(peft_model, adapted.batch)
    ours_equal(model, adapted.batch, reference_logits)
    assert main(["export-hf", "--input", str(adapted.base), "--load", str(tmp_path / "imported"),  # the base's
                 "--output", str(tmp_path / "merged"), "--no-progress"]) == 0  # model.json: the checkpoint's scaling
    merged_logits, _ = hf_reference(hf_llava(tmp_path / "merged"), adapted.batch)
    ours_equal(model, adapted.batch, merged_logits)


@pytest.mark.parametrize("adapted", [DECODER_TARGETS, ALL_TARGETS], indirect=True)
def test_a_peft_export_imports_back(adapted, tmp_path):
    """export-hf --peft, then llava-lora: the same adapters (q/k/v sharing their A), the same logits."""
    from mm_plugin.convert import export_peft, import_llava_lora
    from model_fixtures import hf_reference

    export_peft(adapted.base / "lora.json", tmp_path / "peft", load=adapted.checkpoint, progress=False)
    import_llava_lora(tmp_path / "peft", tmp_path / "imported", model=adapted.base / "model.json", progress=False)
    model = load_lora_checkpoint(tmp_path / "imported")
    with torch.no_grad():
        expected, _ = adapted.model(adapted.batch["input_ids"], None, adapted.batch["images"],
                                    adapted.batch["image_counts"])
    ours_equal(model, adapted.batch, [row for row in expected])


def _drop_a_key(folder: Path) -> None:
    state = torch.load(folder / "adapter_model.bin")
    del state["base_model.model.model.layers.1.self_attn.k_proj.lora_B.weight"]
    torch.save(state, folder / "adapter_model.bin")


def _narrow_v(folder: Path) -> None:
    state = torch.load(folder / "adapter_model.bin")
    key = "base_model.model.model.layers.0.self_attn.v_proj.lora_A.weight"
    state[key] = state[key][:2]
    torch.save(state, folder / "adapter_model.bin")


def _add_embeddings(folder: Path) -> None:
    state = torch.load(folder / "non_lora_trainables.bin")
    state["base_model.model.model.embed_tokens.weight"] = torch.zeros(3, 3)
    torch.save(state, folder / "non_lora_trainables.bin")


def _edit_settings(**changes):
    def edit(folder: Path) -> None:
        settings = json.loads((folder / "adapter_config.json").read_text())
        (folder / "adapter_config.json").write_text(json.dumps({**settings, **changes}))
    return edit


@pytest.mark.parametrize("damage, message", [
    (_drop_a_key, r"adapter_model.bin: no base_model.model.model.layers.1.self_attn.k_proj.lora_B.weight"),
    (_narrow_v, r"adapter_model.bin: 'base_model.*v_proj.lora_A.weight' has shape \(2, 60\).*rank differs"),
    (_add_embeddings, r"non_lora_trainables.bin: 'base_model.model.model.embed_tokens.weight' is neither"),
    (_edit_settings(peft_type="IA3"), r"adapter_config.json: peft_type 'IA3'"),
    (_edit_settings(rank_pattern={"q_proj": 8}), r"adapter_config.json: rank_pattern"),
    (lambda folder: (folder / "adapter_model.bin").unlink(), r"no adapter_model.safetensors or adapter_model.bin"),
])
def test_an_adapter_folder_that_does_not_fit_is_named(adapted, tmp_path, damage, message):
    from mm_plugin.convert import ConversionError, import_llava_lora

    llava_lora_folder(tmp_path / "lora")
    damage(tmp_path / "lora")
    with pytest.raises(ConversionError, match=message):
        import_llava_lora(tmp_path / "lora", tmp_path / "imported", model=adapted.base / "model.json")
    assert not (tmp_path / "imported").exists()


@pytest.mark.parametrize("adapted", [DECODER_TARGETS, ALL_TARGETS], indirect=True)
def test_the_pipeline_on_an_unmerged_lora_checkpoint_answers_as_on_the_merged_export(adapted, tmp_path):
    """LlavaPipeline.from_config with text_decoder.ckpt_path naming the LoRA checkpoint (the model.json without a
    lora section: the checkpoint's is used): the same greedy tokens as the pipeline on the merged Hugging Face
    export, and not the base model's."""
    import numpy as np
    from PIL import Image

    from mm_plugin.convert import export_hf
    from mm_plugin.inference.config import Query
    from mm_plugin.inference.pipeline import LlavaPipeline

    image = tmp_path / "photo.png"
    Image.fromarray(np.random.default_rng(varied(2)).integers(0, 256, (50, 40, 3), dtype=np.uint8)).save(image)
    queries = [Query("What is in the picture?", [image]), Query("Tell me a story.")]
    raw = json.loads((adapted.base / "model.json").read_text())
    raw.update(tokenizer={"from_pretrained": "tokenizer"}, image_processer_path="tokenizer")
    (adapted.base / "inference_base.json").write_text(json.dumps(raw))
    raw["text_decoder"]["ckpt_path"] = raw["image_encoder"]["vision_projector"]["ckpt_path"] = str(adapted.checkpoint)
    (adapted.base / "inference_lora.json").write_text(json.dumps(raw))
    export_hf(adapted.base / "lora.json", tmp_path / "merged", load=adapted.checkpoint, progress=False)

    def tokens(pipe) -> list[list[int]]:
        return [answer.tokens for answer in pipe.answer(queries, max_new_tokens=12, pad_token_id=0)]

    unmerged = tokens(LlavaPipeline.from_config(adapted.base / "inference_lora.json"))
    merged = tokens(LlavaPipeline.from_pretrained(tmp_path / "merged", cache_dir=tmp_path / "cache"))
    assert unmerged == merged and all(unmerged)
    assert tokens(LlavaPipeline.from_config(adapted.base / "inference_base.json")) != unmerged
