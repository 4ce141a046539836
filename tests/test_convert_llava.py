"""``mm-convert llava-hf`` and ``export-hf``: Hugging Face LLaVA -> our parts -> Hugging Face, bit for bit,
and our parts (converted separately, or trained) -> a directory transformers loads and runs."""

import json

import pytest
import torch

import convert_fixtures as fixtures
from mm_plugin.config.model import from_hf_config, load_model_config, to_mindspeed_json
from mm_plugin.convert import (ConversionError, convert_clip, convert_llm, convert_projector, converted_llava,
                               export_hf, import_llava_hf, read_llava_hf)
from mm_plugin.convert.sources import open_hf_directory
from mm_plugin.models.hf_keys import llava_hf_to_ours
from mm_plugin.safe_io import load_state
from model_fixtures import SHAPES, hf_reference, mixed_batch
from seeds import varied

pytestmark = pytest.mark.numeric


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    """``llava-hf`` output per (shape, layout), converted once per module."""
    done = {}

    def get(shape: str, layout: str = "transformers"):
        if (shape, layout) not in done:
            output = tmp_path_factory.mktemp("imported") / f"{shape}-{layout}"
            import_llava_hf(fixtures.hf_llava_dir(shape, layout), output, progress=False)
            done[(shape, layout)] = output
        return done[(shape, layout)]

    return get


@pytest.mark.parametrize("shape,layout", [("gqa", "transformers"), ("mha", "hub")])
def test_imported_parts_reproduce_hugging_face_logits(megatron_single, imported, shape, layout):
    directory = imported(shape, layout)
    raw = json.loads((directory / "model.json").read_text())
    assert raw["text_decoder"]["ckpt_path"] == "converted_vicuna.pt"  # relative: the folder travels as a whole
    assert raw["image_encoder"]["vision_encoder"]["ckpt_path"] == "converted_clip.pt"
    assert (directory / "hf_config.json").read_bytes() == (fixtures.hf_llava_dir(shape, layout) / "config.json").read_bytes()
    assert {file.name for file in (directory / "tokenizer").iterdir()} == {
        file.name for file in fixtures.llava_processor_files().iterdir()}

    model = fixtures.load_converted(directory / "model.json")
    batch = mixed_batch(shape)
    reference_logits, _ = hf_reference(fixtures.hf_model(shape), batch)
    with torch.no_grad():
        logits, _ = model(batch["input_ids"], None, batch["images"], batch["image_counts"])
    for row, reference in enumerate(reference_logits):  # the model's vocabulary padding columns are masked
        ours = logits[row, : reference.shape[0], : reference.shape[1]]
        assert (ours - reference).abs().max() <= 1e-5 * reference.abs().max(), row


@pytest.mark.parametrize("shape,layout", [("gqa", "transformers"), ("gqa", "hub"), ("mha", "transformers")])
def test_round_trip_is_bit_identical_and_loads_in_transformers(imported, tmp_path, shape, layout):
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    output = tmp_path / "llava-hf"
    summary = export_hf(imported(shape, layout), output, max_shard_size="200KB", progress=False)
    assert len(summary.written) > 1 and (output / "model.safetensors.index.json").is_file()
    written = open_hf_directory(output)
    expected = fixtures.hub_state(fixtures.hf_model(shape))
    assert sorted(written.keys()) == sorted(expected)
    for key, tensor in expected.items():
        assert written.entry(key).dtype == tensor.dtype and torch.equal(written.read(key), tensor), key
    rows = written.entry("language_model.model.embed_tokens.weight").shape[0]
    assert rows == SHAPES[shape]["text"]["vocab_size"] > fixtures.TOKENIZER_PIECES + 2  # padding rows kept

    original = json.loads((fixtures.hf_llava_dir(shape, layout) / "config.json").read_text())
    assert json.loads((output / "config.json").read_text()) == original

    loaded = LlavaForConditionalGeneration.from_pretrained(output).state_dict()
    reference = fixtures.hf_model(shape).state_dict()
    assert loaded.keys() == reference.keys() and all(torch.equal(loaded[k], reference[k]) for k in reference)
    processor = AutoProcessor.from_pretrained(output)
    assert processor.tokenizer.convert_tokens_to_ids("<image>") == original["image_token_index"]


def test_round_trip_in_bf16_safetensors_parts(tmp_path):
    parts = tmp_path / "parts"
    summary = import_llava_hf(fixtures.hf_llava_dir("mha"), parts, dtype="bf16", safetensors=True, progress=False)
    assert sorted(file.path.name for file in summary.written) == [
        "converted_clip.safetensors", "converted_vicuna.safetensors", "mlp.safetensors"]
    assert load_model_config(str(parts / "model.json")).language.params_dtype == "bf16"
    export_hf(parts, tmp_path / "hf", progress=False)
    written = open_hf_directory(tmp_path / "hf")
    for key, tensor in fixtures.hub_state(fixtures.hf_model("mha")).items():
        assert torch.equal(written.read(key), tensor.bfloat16()), key
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["dtype"] == "bfloat16"


@pytest.mark.parametrize("vision_inside", [True, False])
def test_original_llava_layout_gives_the_same_parts(imported, tmp_path, vision_inside):
    shape = "wide" if vision_inside else "mha"  # mha: a RoPE base of 500000
    output = tmp_path / "original"
    import_llava_hf(fixtures.original_llava_dir(shape, vision_inside), output,
                    vision=None if vision_inside else fixtures.hf_clip_dir(shape), progress=False)
    reference = imported(shape)
    for name in ("converted_clip.pt", "mlp.pt", "converted_vicuna.pt", "model.json"):
        assert (output / name).read_bytes() == (reference / name).read_bytes(), name


def test_original_llava_without_its_tower_asks_for_it(tmp_path):
    with pytest.raises(ConversionError, match=r"without its vision tower; pass --vision .*'openai/clip-vit-large-"
                                              r"patch14-336'"):
        import_llava_hf(fixtures.original_llava_dir("gqa", False), tmp_path / "out", progress=False)
    assert fixtures.files_under(tmp_path) == []


def test_separately_converted_parts_export_to_a_working_hugging_face_llava(tmp_path):
    """The seed recipe's inputs (CLIP, Vicuna, mm_projector.bin) -> model.json -> a transformers LLaVA whose
    logits are the original model's, with LLaVA's tokens added to Vicuna's tokenizer."""
    from PIL import Image
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    shape, vocabulary = "gqa", fixtures.TOKENIZER_PIECES
    parts = tmp_path / "parts"
    convert_clip(fixtures.hf_clip_dir(shape), parts / "converted_clip.pt", progress=False)
    convert_llm(fixtures.hf_llama_dir(shape, rows=vocabulary), parts / "converted_vicuna.pt", progress=False)
    convert_projector(fixtures.mm_projector_file(shape), parts / "mlp.pt", progress=False)
    config = from_hf_config(fixtures.hf_model(shape).config)
    config.language.vocab_size = vocabulary
    config.vision.ckpt_path, config.projector.ckpt_path, config.language.ckpt_path = (
        "converted_clip.pt", "mlp.pt", "converted_vicuna.pt")
    (parts / "model.json").write_text(json.dumps(to_mindspeed_json(config)))

    summary = export_hf(parts / "model.json", tmp_path / "hf", tokenizer=fixtures.vicuna_tokenizer(), progress=False)
    assert any("grown from 100 to 128 rows" in note for note in summary.notes)
    model = LlavaForConditionalGeneration.from_pretrained(tmp_path / "hf").eval()
    processor = AutoProcessor.from_pretrained(tmp_path / "hf")
    image = Image.fromarray((torch.rand(50, 60, 3, generator=torch.Generator().manual_seed(varied(0))) * 255).byte().numpy())
    inputs = processor(text="USER: <image>\nwhat is at the top left ASSISTANT:", images=image, return_tensors="pt")
    image_id = model.config.image_token_index
    assert image_id == vocabulary and (inputs["input_ids"] == image_id).sum() == model.config.image_seq_length == 9
    with torch.no_grad():
        exported = model(**inputs).logits[0]
        reference_ids = inputs["input_ids"].masked_fill(inputs["input_ids"] == image_id,
                                                        fixtures.hf_model(shape).config.image_token_index)
        reference = fixtures.hf_model(shape)(input_ids=reference_ids, pixel_values=inputs["pixel_values"],
                                             attention_mask=inputs["attention_mask"]).logits[0]
    assert exported.shape[-1] == 128
    assert torch.allclose(exported[:, :vocabulary], reference[:, :vocabulary], atol=1e-5, rtol=0)
    # The added rows hold the mean row: their logit is the mean logit, never the largest.
    mean = exported[:, :vocabulary].mean(dim=-1, keepdim=True)
    assert torch.allclose(exported[:, vocabulary:], mean.expand(-1, 128 - vocabulary), atol=1e-5, rtol=0)
    assert (exported.argmax(dim=-1) < vocabulary).all()


def test_trained_weights_replace_the_parts_own(imported, tmp_path):
    base = imported("gqa")
    ours = load_state(base / "converted_vicuna.pt")
    projector = torch.randn(60, 48, generator=torch.Generator().manual_seed(varied(5)))
    padded = torch.cat([ours["embedding.word_embeddings.weight"], torch.zeros(2, 60)])  # TP's padding rows
    summary = export_hf(base, tmp_path / "hf", progress=False, trained={
        "vision_projection.encoder.linear_fc1.weight": projector,
        "language_model.embedding.word_embeddings.weight": padded})
    assert any("2 padding rows" in note for note in summary.notes)
    written = open_hf_directory(tmp_path / "hf")
    expected = fixtures.hub_state(fixtures.hf_model("gqa"))
    expected["multi_modal_projector.linear_1.weight"] = projector
    assert all(torch.equal(written.read(key), tensor) for key, tensor in expected.items())


def test_a_built_models_state_dict_exports_to_the_original(megatron_single, imported, tmp_path):
    """What a training process holds (padded vocabulary, only the built vision layers) goes back bit for bit."""
    base = imported("mha")
    model = fixtures.load_converted(base / "model.json")
    export_hf(base, tmp_path / "hf", trained=model.state_dict(), progress=False)
    written = open_hf_directory(tmp_path / "hf")
    expected = fixtures.hub_state(fixtures.hf_model("mha"))
    assert sorted(written.keys()) == sorted(expected)
    assert all(torch.equal(written.read(key), tensor) for key, tensor in expected.items())


@pytest.mark.parametrize("case,message", [
    ("unknown key", r"'optimizer\.step' is not a LLaVA model tensor"),
    ("wrong shape", r"'vision_projection\.encoder\.linear_fc2\.bias' has shape \[59\], expected \[60\]"),
    ("output exists", r"already exists and is not an empty directory"),
])
def test_export_errors_are_explained_and_write_nothing(imported, tmp_path, case, message):
    trained = {"unknown key": {"optimizer.step": torch.zeros(1)},
               "wrong shape": {"vision_projection.encoder.linear_fc2.bias": torch.zeros(59)}}.get(case, {})
    output = tmp_path / "hf"
    if case == "output exists":
        output.mkdir()
        (output / "keep.txt").write_text("mine")
    with pytest.raises(ConversionError, match=message):
        export_hf(imported("gqa"), output, trained=trained, progress=False)
    assert fixtures.files_under(tmp_path) == (["hf", "hf/keep.txt"] if case == "output exists" else [])


def test_export_needs_every_part_and_a_tokenizer(imported, tmp_path):
    base, parts = imported("gqa"), tmp_path / "parts"
    config = load_model_config(str(base / "model.json"))  # absolute ckpt_paths into the imported folder

    def export_with(**paths):
        for section, path in paths.items():
            getattr(config, section).ckpt_path = path
        parts.mkdir(exist_ok=True)
        (parts / "model.json").write_text(json.dumps(to_mindspeed_json(config)))
        export_hf(parts, tmp_path / "hf", progress=False)

    with pytest.raises(ConversionError, match=r"no tokenizer; pass --tokenizer"):
        export_with()  # no tokenizer/ and no hf_config.json beside this model.json
    with pytest.raises(ConversionError, match=r"no weights for the vision: its ckpt_path is null"):
        export_with(vision=None)
    with pytest.raises(ConversionError, match=r"converted_clip\.pt (holds|: missing).* language model"):
        export_with(vision=str(base / "converted_clip.pt"), language=str(base / "converted_clip.pt"))
    assert not (tmp_path / "hf").exists()


def test_published_config_with_fields_left_at_their_default_is_understood():
    """llava-1.5-7b-hf's config.json names only what differs from transformers' defaults."""
    from mm_plugin.convert.inputs import full_hf_config

    published = {
        "architectures": ["LlavaForConditionalGeneration"], "ignore_index": -100, "image_token_index": 32000,
        "model_type": "llava", "pad_token_id": 32001, "projector_hidden_act": "gelu", "tie_word_embeddings": False,
        "text_config": {"_name_or_path": "lmsys/vicuna-7b-v1.5", "architectures": ["LlamaForCausalLM"],
                        "max_position_embeddings": 4096, "model_type": "llama", "rms_norm_eps": 1e-05,
                        "torch_dtype": "float16", "vocab_size": 32064},
        "vision_config": {"hidden_size": 1024, "image_size": 336, "intermediate_size": 4096,
                          "model_type": "clip_vision_model", "num_attention_heads": 16, "num_hidden_layers": 24,
                          "patch_size": 14, "projection_dim": 768, "vocab_size": 32000},
        "vision_feature_layer": -2, "vision_feature_select_strategy": "default", "vocab_size": 32064}
    config = from_hf_config(full_hf_config(published, "llava"))
    language, vision = config.language, config.vision
    assert (language.num_layers, language.hidden_size, language.num_attention_heads, language.ffn_hidden_size,
            language.vocab_size) == (32, 4096, 32, 11008, 32064)
    assert (vision.num_layers, vision.num_layers_built, vision.num_patches) == (24, 23, 576)


def test_read_llava_hf_streams_the_full_model_state():
    config, tensors = read_llava_hf(fixtures.hf_llava_dir("mha", "hub"))
    state = dict(tensors)
    expected = llava_hf_to_ours(fixtures.hf_model("mha").state_dict(), config)
    assert list(state) == list(expected) and all(torch.equal(state[key], expected[key]) for key in expected)


def test_converted_llava_converts_once(tmp_path):
    first = converted_llava(fixtures.hf_llava_dir("gqa"), cache_dir=tmp_path)
    stamp = first.stat().st_mtime_ns
    again = converted_llava(fixtures.hf_llava_dir("gqa"), cache_dir=tmp_path)
    assert again == first and again.stat().st_mtime_ns == stamp
    assert load_model_config(str(first)).language.num_layers == SHAPES["gqa"]["text"]["num_hidden_layers"]
