"""LoRA on the language model: it starts from the base model, trains only adapters and projector, gives the
same numbers under TP, PP and DP, checkpoints hold what trains and resume exactly (across TP sizes), an export
merges the adapters into weights with the same logits, and wrong configurations are named before compute."""

import json
from pathlib import Path

import pytest
import torch

from training_fixtures import argv, build_setup, model_json, train

pytestmark = pytest.mark.numeric

LORA = {"rank": 4, "alpha": 8, "dropout": 0.0}


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
@pytest.mark.parametrize("layout", [("--tensor-model-parallel-size", "2"), ("--pipeline-model-parallel-size", "2"), ()],
                         ids=["tp2", "pp2", "dp2"])
def test_lora_layouts_reproduce_a_single_process(megatron_single, pool, setup, layout):
    single, _, _ = train(_argv(setup, iterations=5))
    results = pool.run(train, _argv(setup, iterations=5, extra=layout))
    assert results[0][0] == results[1][0]
    assert close(results[0][0], single), (results[0][0], single)


def test_lora_checkpoints_hold_what_trains_and_resume_exactly(megatron_single, setup, tmp_path):
    from megatron.core import dist_checkpointing

    straight, _, _ = train(_argv(setup, iterations=6))
    first, _, _ = train(_argv(setup, iterations=6, extra=("--save", str(tmp_path / "ckpt"), "--exit-interval", "3")))
    rest, _, _ = train(_argv(setup, iterations=6, extra=("--load", str(tmp_path / "ckpt"))))
    assert first + rest == straight
    saved = dist_checkpointing.load_tensors_metadata(str(tmp_path / "ckpt" / "iter_0000003"))
    weights = {key for key in saved if not key.startswith("optimizer")}
    assert weights and all(".lora_" in key or key.startswith("vision_projection.") for key in weights), weights


def test_a_tensor_parallel_lora_checkpoint_resumes_at_tp1(megatron_single, pool, setup, tmp_path):
    saved = str(tmp_path / "tp2")
    tp2 = pool.run(train, _argv(setup, iterations=5, extra=("--tensor-model-parallel-size", "2", "--save", saved,
                                                             "--save-interval", "4")))[0][0]
    tp1, _, _ = train(_argv(setup, iterations=5, extra=("--load", str(Path(saved) / "iter_0000004"))))
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


def test_export_merges_the_adapters_with_the_same_logits(megatron_single, tmp_path):
    """A LoRA model, saved as training saves it, exported to Hugging Face: the merged model's logits are ours."""
    from transformers import LlavaForConditionalGeneration

    import convert_fixtures as fixtures
    from mm_plugin.config.model import load_model_config, to_mindspeed_json
    from mm_plugin.convert import export_hf, import_llava_hf
    from mm_plugin.training.checkpointing import save_checkpoint
    from model_fixtures import HF_IMAGE_TOKEN, hf_reference, mixed_batch

    base = tmp_path / "llava-mm"
    import_llava_hf(fixtures.hf_llava_dir("gqa"), base, progress=False)
    raw = json.loads((base / "model.json").read_text())
    raw["text_decoder"].update(freeze=False, lora=LORA)
    (base / "model.json").write_text(json.dumps(raw))
    model = fixtures.load_converted(base / "model.json")
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if ".lora_B." in name:  # a trained adapter: B is no longer zero
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.05)
    save_checkpoint(tmp_path / "checkpoints", 3, model, None, None, consumed_samples=0,
                    model_config=to_mindspeed_json(load_model_config(str(base / "model.json"))),
                    trainable_only=True, save_optimizer=False, save_rng=False)
    export_hf(base, tmp_path / "llava-hf", load=tmp_path / "checkpoints", progress=False)

    batch = mixed_batch("gqa")
    merged = LlavaForConditionalGeneration.from_pretrained(tmp_path / "llava-hf").eval()
    merged.config.image_token_id = HF_IMAGE_TOKEN  # hf_reference's placeholder (the file keeps the processor's)
    reference_logits, _ = hf_reference(merged, batch)
    with torch.no_grad():
        logits, _ = model(batch["input_ids"], None, batch["images"], batch["image_counts"])
    for row, reference in enumerate(reference_logits):
        ours = logits[row, : reference.shape[0], : reference.shape[1]]
        assert (ours - reference).abs().max() <= 1e-5 * reference.abs().max(), row
    original, _ = hf_reference(fixtures.hf_model("gqa"), batch)
    assert (original[0] - reference_logits[0]).abs().max() > 1e-3  # the adapters changed what it computes


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
