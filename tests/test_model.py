"""The LLaVA model against Hugging Face's LlavaForConditionalGeneration (CPU, fp32, random weights)."""

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from model_fixtures import IMAGE, hf_reference, mixed_batch, our_config, our_full_state, tiny_hf_llava

pytestmark = pytest.mark.numeric

REPO = Path(__file__).resolve().parents[1]


def build(config):
    from mm_plugin.models.llava import LlavaModel

    return LlavaModel(config).eval()


def load_hf_weights(model, hf, config):
    from mm_plugin.parallel import load_full_state_dict

    load_full_state_dict(model, our_full_state(hf, config), vocab_size=config.language.vocab_size)


def loaded_model(shape: str, backend: str = "sdpa"):
    hf = tiny_hf_llava(shape)
    config = our_config(hf, backend)
    model = build(config)
    load_hf_weights(model, hf, config)
    return hf, config, model


def mean_loss(loss, mask):
    return (loss * mask).sum() / mask.sum()


@pytest.mark.compat
@pytest.mark.parametrize("backend", ["sdpa", "local"])
@pytest.mark.parametrize("shape", ["gqa", "mha"])
def test_logits_and_loss_match_hugging_face(megatron_single, shape, backend):
    hf, config, model = loaded_model(shape, backend)
    batch = mixed_batch(shape)
    reference_logits, reference_loss = hf_reference(hf, batch)
    with torch.no_grad():
        logits, _ = model(batch["input_ids"], None, batch["images"], batch["image_counts"])
        loss, mask = model(batch["input_ids"], batch["labels"], batch["images"], batch["image_counts"])
    vocab = config.language.vocab_size
    assert logits.shape[-1] > vocab and (logits[..., vocab:] == torch.finfo(logits.dtype).min).all()
    for row, reference in enumerate(reference_logits):
        ours = logits[row, : reference.shape[0], :vocab]
        assert (ours - reference).abs().max() <= 1e-5 * reference.abs().max(), f"row {row}"
    assert torch.allclose(mean_loss(loss, mask), reference_loss, rtol=1e-6, atol=0)


def test_fixed_length_padding_changes_nothing(megatron_single):
    _, config, model = loaded_model("gqa")
    batch = mixed_batch("gqa")
    with torch.no_grad():
        dynamic, dynamic_mask = model(batch["input_ids"], batch["labels"], batch["images"], batch["image_counts"])
        fixed, fixed_mask = model(batch["input_ids"], batch["labels"], batch["images"], batch["image_counts"],
                                  seq_length=dynamic.shape[1] + 13)
    assert fixed.shape[1] == dynamic.shape[1] + 13
    assert torch.equal(fixed_mask[:, : dynamic.shape[1]], dynamic_mask) and fixed_mask[:, dynamic.shape[1]:].sum() == 0
    assert torch.allclose(mean_loss(fixed, fixed_mask), mean_loss(dynamic, dynamic_mask), rtol=1e-6, atol=0)


def test_expansion_trains_the_first_caption_token_after_an_image():
    from mm_plugin.models.image_tokens import expand_image_tokens

    ids = torch.tensor([[1, IMAGE, 7, 8, 9]])
    labels = torch.tensor([[-100, -100, 7, 8, 9]])
    tokens = expand_image_tokens(ids, labels, torch.tensor([1]), tokens_per_image=3, seq_length=8)
    assert tokens.image_mask.tolist() == [[False, True, True, True, False, False, False, False]]
    # Position 3 (the last image position) predicts 7; BOS and the first two image positions are not trained.
    assert tokens.loss_mask.tolist() == [[0, 0, 0, 1, 1, 1, 0, 0]]
    assert tokens.targets[0, 3:6].tolist() == [7, 8, 9]
    assert tokens.input_ids[0, [0, 4, 5, 6]].tolist() == [1, 7, 8, 9]


def test_placeholder_count_mismatch_names_the_sample():
    from mm_plugin.models.image_tokens import ImageTokenError, expand_image_tokens

    ids = torch.tensor([[1, IMAGE, 7], [1, 7, 8]])
    with pytest.raises(ImageTokenError, match="sample 'rec-2'.*0 image placeholder.*1 image"):
        expand_image_tokens(ids, None, torch.tensor([1, 1]), 4, None, sample_ids=["rec-1", "rec-2"])


def test_a_sample_that_does_not_fit_is_an_error():
    from mm_plugin.models.image_tokens import ImageTokenError, expand_image_tokens

    ids = torch.tensor([[1, IMAGE, 7, 8]])
    labels = torch.tensor([[-100, -100, 7, 8]])
    with pytest.raises(ImageTokenError, match="needs 7 positions.*sequence length is 6"):
        expand_image_tokens(ids, labels, torch.tensor([1]), 4, seq_length=6, sample_ids=["too-long"])


def test_feature_count_mismatch_in_the_embedding_is_an_error(megatron_single):
    from mm_plugin.patches.embedding_injection import ImageFeatureCountError

    _, _, model = loaded_model("gqa")
    batch = mixed_batch("gqa")
    tokens = model.expand(batch["input_ids"], None, batch["image_counts"])
    with pytest.raises(ImageFeatureCountError, match="image positions"):
        model.language_model.embedding(input_ids=tokens.input_ids, position_ids=None,
                                       image_features=torch.zeros(3, 60), image_mask=tokens.image_mask)


def test_without_images_the_embedding_is_the_stock_one(megatron_single):
    _, _, model = loaded_model("gqa")
    ids = torch.randint(6, 200, (2, 9))
    embedding = model.language_model.embedding
    stock = embedding.word_embeddings(ids).transpose(0, 1)
    assert torch.equal(embedding(input_ids=ids, position_ids=None), stock)


def test_freezing_from_config(megatron_single):
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    hf = tiny_hf_llava("gqa")
    config = our_config(hf)
    config.vision.freeze, config.projector.freeze, config.language.freeze = True, False, True
    model = build(config).train()
    load_hf_weights(model, hf, config)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(name.startswith("vision_projection.") for name in trainable)

    batch = mixed_batch("gqa")
    vision_outputs = []
    model.vision_model.register_forward_hook(lambda module, args, output: vision_outputs.append(output))
    loss, mask = model(batch["input_ids"], batch["labels"], batch["images"], batch["image_counts"])
    assert not vision_outputs[0].requires_grad  # the frozen tower ran without autograd
    mean_loss(loss, mask).backward()
    for name, parameter in model.named_parameters():
        assert (parameter.grad is not None) == (name in trainable), name

    model.zero_grad(set_to_none=True)
    ddp = DistributedDataParallel(model.config, DistributedDataParallelConfig(), model)
    optimizer = get_megatron_optimizer(OptimizerConfig(optimizer="adam", lr=1e-2), [ddp])
    in_optimizer = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert in_optimizer == {id(p) for n, p in model.named_parameters() if n in trainable}
    ddp.zero_grad_buffer()
    loss, mask = ddp(batch["input_ids"], batch["labels"], batch["images"], batch["image_counts"])
    mean_loss(loss, mask).backward()
    ddp.finish_grad_sync()
    assert optimizer.step()[0]
    for name, parameter in model.named_parameters():
        changed = not torch.equal(parameter.detach(), before[name])
        assert changed == (name in trainable), name


def test_every_part_is_built_in_its_params_dtype(megatron_single):
    """megatron-core builds norms in fp32 whatever params_dtype says; CUDA's layer norm then refuses a bf16
    model's activations (seen on an H100). Every parameter, norms included, must be in its part's dtype."""
    config = our_config(tiny_hf_llava("gqa"))
    config.vision.params_dtype, config.projector.params_dtype, config.language.params_dtype = "fp32", "bf16", "bf16"
    model = build(config)
    dtypes = {name: parameter.dtype for name, parameter in model.named_parameters()}
    norms = [name for name in dtypes if "norm" in name]
    assert any(name.startswith("language_model.") for name in norms)
    for name, dtype in dtypes.items():
        assert dtype == (torch.float32 if name.startswith("vision_model.") else torch.bfloat16), name


@pytest.mark.parametrize("projector_type", ["linear", "identity"])
def test_other_projector_types_run(megatron_single, projector_type):
    hf = tiny_hf_llava("gqa")
    config = our_config(hf)
    config.projector.projector_type = projector_type
    if projector_type == "identity":
        config.vision.hidden_size = config.language.hidden_size = 60
        config.vision.num_attention_heads = 3
    model = build(config.validate())
    batch = mixed_batch("gqa")
    loss, mask = model(batch["input_ids"], batch["labels"], batch["images"], batch["image_counts"])
    assert torch.isfinite(mean_loss(loss, mask))


# --- configuration ---------------------------------------------------------------------------------

def published_model_json() -> dict:
    return json.loads((REPO / "examples/llava1.5/model.json").read_text())


def test_published_model_json_loads_unchanged(tmp_path):
    from mm_plugin.config.model import load_model_config

    path = tmp_path / "model.json"
    path.write_text(json.dumps(published_model_json()))
    config = load_model_config(str(path))
    assert config.vision.num_layers_built == 23 and config.vision.num_image_tokens == 576
    assert config.language.vocab_size == 32000 and config.language.freeze and not config.projector.freeze
    assert config.projector.projector_type == "mlp2x_gelu" and config.projector.ffn_hidden_size == 4096
    assert config.language.transformer_overrides["recompute_granularity"] == "full"
    assert config.vision.params_dtype == "bf16"


def test_older_published_layout_loads(tmp_path):
    """MindSpeed-MM 1.0.RC3 said num_layers 24 for the vision tower and gave the projector attention heads."""
    from mm_plugin.config.model import load_model_config

    raw = published_model_json()
    raw["image_encoder"]["vision_encoder"]["num_layers"] = 24
    raw["image_encoder"]["vision_projector"]["num_attention_heads"] = 1
    del raw["text_decoder"]["max_position_embeddings"]
    path = tmp_path / "model.json"
    path.write_text(json.dumps(raw))
    assert load_model_config(str(path)).vision.num_layers_built == 24


def first_published_model_json() -> dict:
    """MindSpeed-MM's first llava1.5 model.json (be78bc61, 2024-09-29), as a difference to today's: the vision
    geometry one level up in image_encoder, gelu in the vision tower, no freeze/ckpt_path/recompute/
    max_position_embeddings fields, no projector input_size, and projector attention heads."""
    raw = published_model_json()
    vision = raw["image_encoder"]["vision_encoder"]
    for key in ("add_class_token", "class_token_len", "patch_size", "image_size"):
        raw["image_encoder"][key] = vision.pop(key)
    vision["activation_func"] = "gelu"
    for section in (raw["text_decoder"], vision, raw["image_encoder"]["vision_projector"]):
        for key in ("freeze", "ckpt_path", "recompute_granularity", "recompute_method", "recompute_num_layers",
                    "max_position_embeddings", "input_size"):
            section.pop(key, None)
    raw["image_encoder"]["vision_projector"]["num_attention_heads"] = 1
    return raw


def test_the_first_published_layout_loads_with_a_warning_about_its_gelu(tmp_path, caplog):
    from mm_plugin.config.model import ModelConfigError, load_model_config

    path = tmp_path / "model.json"
    path.write_text(json.dumps(first_published_model_json()))
    today = tmp_path / "today.json"
    today.write_text(json.dumps(published_model_json()))
    config, current = load_model_config(str(path)), load_model_config(str(today))
    assert (config.vision.patch_size, config.vision.image_size, config.vision.class_token_len) == \
        (current.vision.patch_size, current.vision.image_size, current.vision.class_token_len) == (14, 336, 1)
    assert config.vision.num_image_tokens == 576
    assert any("said gelu" in record.getMessage() and "quick_gelu" in record.getMessage()
               for record in caplog.records if record.levelname == "WARNING")
    raw = first_published_model_json()
    raw["image_encoder"]["vision_encoder"]["patch_size"] = 16  # stated twice, differently
    path.write_text(json.dumps(raw))
    with pytest.raises(ModelConfigError, match="image_encoder.patch_size = 14 but image_encoder.vision_encoder."
                                               "patch_size = 16; keep one"):
        load_model_config(str(path))


@pytest.mark.parametrize("section,field,value,message", [
    ("text_decoder", "num_layer", 32, "text_decoder.num_layer: unknown field"),
    ("vision_encoder", "normalization", "RMSNorm", "vision_encoder.normalization = 'RMSNorm': LLaVA-1.5 needs 'LayerNorm'"),
    ("vision_projector", "bias_activation_fusion", True, "bias_activation_fusion = True: LLaVA-1.5 needs False"),
    ("vision_projector", "input_size", 768, "input_size = 768 but vision_encoder.hidden_size = 1024"),
    # types and ranges, before anything is built
    ("text_decoder", "hidden_size", "4096", "text_decoder.hidden_size = '4096': expected a whole number"),
    ("text_decoder", "hidden_size", None, "text_decoder.hidden_size = null: give a int"),
    ("text_decoder", "num_layers", 2.5, "text_decoder.num_layers = 2.5: expected a whole number"),
    ("text_decoder", "num_attention_heads", 0, "text_decoder.num_attention_heads = 0: must be positive"),
    ("text_decoder", "ffn_hidden_size", -1, "text_decoder.ffn_hidden_size = -1: must be positive"),
    ("text_decoder", "layernorm_epsilon", "1e-6", "layernorm_epsilon = '1e-6': expected a finite number"),
    ("text_decoder", "freeze", "false", "text_decoder.freeze = 'false': expected true or false"),
    ("text_decoder", "ckpt_path", 5, "text_decoder.ckpt_path = 5: expected a string"),
    ("text_decoder", "hidden_dropout", 1.5, "hidden_dropout = 1.5: a dropout probability is at least 0 and below 1"),
    ("text_decoder", "init_method_std", "big", "init_method_std = 'big': expected a finite number"),
    ("vision_encoder", "patch_size", 0, "vision_encoder.patch_size = 0: must be positive"),
])
def test_bad_model_json_fields_are_named(tmp_path, section, field, value, message):
    from mm_plugin.config.model import ModelConfigError, load_model_config

    raw = published_model_json()
    target = raw["text_decoder"] if section == "text_decoder" else raw["image_encoder"][section]
    target[field] = value
    path = tmp_path / "model.json"
    path.write_text(json.dumps(raw))
    with pytest.raises(ModelConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_model_config(str(path))


@pytest.mark.parametrize("section, field", [("text_decoder", "hidden_size"), ("text_decoder", "language_vocab_size"),
                                            ("vision_encoder", "ffn_hidden_size")])
def test_a_model_too_large_for_memory_is_refused_before_allocating(megatron_single, tmp_path, section, field):
    from mm_plugin.config.model import ModelConfigError, load_model_config
    from mm_plugin.models.llava import LlavaModel
    from mm_plugin.training.demo import model_json

    raw = model_json(256, language_ckpt=None, train_language=True)
    target = raw["text_decoder"] if section == "text_decoder" else raw["image_encoder"][section]
    target[field] = 10**9 if field != "hidden_size" else 4 * 10**8  # a multiple of the head count
    raw["image_encoder"]["vision_projector"].pop("hidden_size", None)
    path = tmp_path / "model.json"
    path.write_text(json.dumps(raw))
    with pytest.raises(ModelConfigError, match=r"parameters alone need at least [\d.]+ GiB .* but only [\d.]+ GiB"):
        LlavaModel(load_model_config(str(path)))


def test_invalid_json_names_file_and_line(tmp_path):
    from mm_plugin.config.model import ModelConfigError, load_model_config

    path = tmp_path / "model.json"
    path.write_text('{\n  "model_id": "llava",\n  oops\n}')
    with pytest.raises(ModelConfigError, match=r"model.json: not valid JSON \(line 3"):
        load_model_config(str(path))


def test_both_vision_layer_conventions_build_the_same_model(megatron_single):
    """MindSpeed-MM's num_layers=23 (built) and LLaVA's num_layers=24 + select_layer=-2 agree."""
    from mm_plugin.config.model import ModelConfigError
    from mm_plugin.models.loading import select_built_vision_layers

    hf, config, model = loaded_model("mha")  # 4-layer tower, select_layer -2
    mindspeed_style = dataclasses.replace(config, vision=dataclasses.replace(config.vision, num_layers=3,
                                                                             select_layer=None))
    assert mindspeed_style.vision.num_layers_built == config.vision.num_layers_built == 3
    other = build(mindspeed_style)
    other.load_state_dict(model.state_dict(), strict=True)
    batch = mixed_batch("mha")
    with torch.no_grad():
        a, _ = model(batch["input_ids"], None, batch["images"], batch["image_counts"])
        b, _ = other(batch["input_ids"], None, batch["images"], batch["image_counts"])
    assert torch.equal(a, b)

    tower = {k.removeprefix("vision_model."): v for k, v in
             __import__("mm_plugin.models.hf_keys", fromlist=["x"]).llava_hf_to_ours(hf.state_dict(), config).items()
             if k.startswith("vision_model.")}
    assert set(select_built_vision_layers(tower, mindspeed_style, "clip.pt")) == set(
        select_built_vision_layers(tower, config, "clip.pt"))
    mixed_up = dataclasses.replace(config, vision=dataclasses.replace(config.vision, num_layers=3, select_layer=-2))
    with pytest.raises(ModelConfigError, match="holds a 4-layer vision tower but .* num_layers 3 with select_layer -2"):
        select_built_vision_layers(tower, mixed_up, "clip.pt")


def test_presets_validate():
    from mm_plugin.config.model import PRESETS, load_model_config

    for name in PRESETS:
        config = load_model_config(name)
        assert config.vision.num_layers_built >= 1
    assert load_model_config("llava-1.5-7b").vision.num_image_tokens == 576
    assert load_model_config("llava-1.5-13b").language.hidden_size == 5120


# --- tensor and pipeline parallel against Hugging Face (2 processes) -------------------------------

def _sharded_model(shape: str, tensor_parallel: int, pipeline_parallel: int):
    from megatron.core import parallel_state
    from megatron.core.enums import ModelType

    from mm_plugin.models.llava import LlavaModel
    from process_pool import parallel

    parallel(tensor_parallel, pipeline_parallel)
    hf = tiny_hf_llava(shape)
    config = our_config(hf)
    model = LlavaModel(config, pre_process=parallel_state.is_pipeline_first_stage(),
                       post_process=parallel_state.is_pipeline_last_stage()).eval()
    model.model_type = ModelType.encoder_or_decoder
    load_hf_weights(model, hf, config)
    return model, config, mixed_batch(shape)


def _tensor_parallel_logits_and_loss(shape: str):
    """Each rank holds half of every layer; the vocabulary-parallel logits are gathered."""
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    model, config, batch = _sharded_model(shape, 2, 1)
    with torch.no_grad():
        logits, _ = model(batch["input_ids"], None, batch["images"], batch["image_counts"])
        loss, mask = model(batch["input_ids"], batch["labels"], batch["images"], batch["image_counts"])
    logits = gather_from_tensor_model_parallel_region(logits)[..., : config.language.vocab_size]
    return logits, mean_loss(loss, mask)


def _pipeline_parallel_loss(shape: str):
    """Two stages through megatron's pipeline schedule (fixed sequence length); the loss on the last."""
    from megatron.core import parallel_state
    from megatron.core.pipeline_parallel import get_forward_backward_func

    model, _, batch = _sharded_model(shape, 1, 2)
    seq_length = 96

    def forward_step(data_iterator, module):
        loss, mask = module(batch["input_ids"], batch["labels"], batch["images"], batch["image_counts"],
                            seq_length=seq_length)
        return loss, lambda output: (mean_loss(output, mask), {"loss": mean_loss(output, mask)})

    with torch.no_grad():
        losses = get_forward_backward_func()(forward_step_func=forward_step, data_iterator=iter([None]),
                                             model=[model], num_microbatches=1, seq_length=seq_length,
                                             micro_batch_size=batch["input_ids"].shape[0], forward_only=True)
    return losses[0]["loss"] if parallel_state.is_pipeline_last_stage() else None


@pytest.mark.compat
def test_tensor_parallel_model_matches_hugging_face(pool):
    (logits, loss), other = pool.run(_tensor_parallel_logits_and_loss, "gqa")
    assert torch.equal(logits, other[0])
    reference_logits, reference_loss = hf_reference(tiny_hf_llava("gqa"), mixed_batch("gqa"))
    for row, reference in enumerate(reference_logits):
        ours = logits[row, : reference.shape[0]]
        assert (ours - reference).abs().max() <= 1e-5 * reference.abs().max(), f"row {row}"
    assert torch.allclose(loss, reference_loss, rtol=1e-6, atol=0)


@pytest.mark.compat
@pytest.mark.parametrize("shape", ["gqa", "mha"])
def test_pipeline_parallel_loss_matches_hugging_face(pool, shape):
    first, last = pool.run(_pipeline_parallel_loss, shape)
    assert first is None
    _, reference_loss = hf_reference(tiny_hf_llava(shape), mixed_batch(shape))
    assert torch.allclose(last, reference_loss, rtol=1e-6, atol=0)
