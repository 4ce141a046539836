"""``mm-convert clip``: every published CLIP layout gives the same converted_clip.pt."""

import json
import shutil

import pytest
import torch

import convert_fixtures as fixtures
from mm_plugin.convert import ConversionError, convert_clip
from mm_plugin.convert import inputs as convert_inputs
from mm_plugin.safe_io import load_state
from seeds import varied

pytestmark = pytest.mark.numeric

# Every tower layer's tensors plus the tower's own; ln_post when the source has it.
TOWER_KEYS = 7 + 12 * fixtures.CLIP_SPEC["num_hidden_layers"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The Hugging Face directory's conversion, against which every other source is compared."""
    path = tmp_path_factory.mktemp("clip") / "converted_clip.pt"
    convert_clip(fixtures.hf_clip_dir("clip"), path, progress=False)
    return path


def test_reference_holds_the_whole_tower_in_megatron_layout(reference):
    state = load_state(reference)
    hidden, heads = fixtures.CLIP_SPEC["hidden_size"], fixtures.CLIP_SPEC["num_attention_heads"]
    assert len(state) == TOWER_KEYS and state["class_token"].shape == (1, 1, hidden)
    hf = fixtures.tower_state("clip")
    # megatron's QKV rows: per head, that head's q, k and v rows.
    head_dim = hidden // heads
    q, k, v = (hf[f"encoder.layers.1.self_attn.{x}_proj.weight"] for x in "qkv")
    fused = state["decoder.layers.1.self_attention.linear_qkv.weight"].reshape(heads, 3, head_dim, hidden)
    for head in range(heads):
        rows = slice(head * head_dim, (head + 1) * head_dim)
        assert torch.equal(fused[head, 0], q[rows]) and torch.equal(fused[head, 1], k[rows])
        assert torch.equal(fused[head, 2], v[rows])
    assert torch.equal(state["ln_post.weight"], hf["post_layernorm.weight"])


@pytest.mark.parametrize("source", ["hf-bin", "openai-state-dict", "openai-torchscript"])
def test_full_sources_give_a_byte_identical_file(reference, tmp_path, source):
    path = {"hf-bin": lambda: fixtures.hf_clip_dir("clip", "bin"),
            "openai-state-dict": fixtures.openai_state_dict_file,
            "openai-torchscript": fixtures.openai_torchscript_file}[source]()
    summary = convert_clip(path, tmp_path / "converted_clip.pt", progress=False)
    assert (tmp_path / "converted_clip.pt").read_bytes() == reference.read_bytes()
    if source.startswith("openai"):
        assert any("visual.proj" in note for note in summary.notes)


@pytest.mark.parametrize("tensor_parallel,use_te,checkpoint", [(1, False, False), (2, True, False), (2, True, True)])
def test_megatron_converter_output_gives_the_same_tensors_without_ln_post(reference, tmp_path, tensor_parallel,
                                                                         use_te, checkpoint):
    source = fixtures.megatron_clip_dir(tensor_parallel, use_te, checkpoint)
    summary = convert_clip(source, tmp_path / "c.pt", progress=False)
    ours, expected = load_state(tmp_path / "c.pt"), load_state(reference)
    assert set(expected) - set(ours) == {"ln_post.weight", "ln_post.bias"} and set(ours) < set(expected)
    assert all(torch.equal(ours[key], expected[key]) for key in ours)
    assert any("ln_post.weight, ln_post.bias" in note for note in summary.notes)


def test_the_openai_layout_fixture_computes_what_hugging_face_clip_computes():
    """The OpenAI-layout weights the tests convert are OpenAI's semantics, checked by running them."""
    images = torch.randn(2, 3, fixtures.CLIP_SPEC["image_size"], fixtures.CLIP_SPEC["image_size"],
                         generator=torch.Generator().manual_seed(varied(0)))
    with torch.no_grad():
        theirs = fixtures.openai_module()(images)
        hf = fixtures.clip_vision_model()(pixel_values=images, output_hidden_states=True).hidden_states[-1]
    assert torch.allclose(theirs, hf, atol=1e-5, rtol=0)


def test_published_file_name_requires_the_published_sha256(tmp_path, monkeypatch):
    download = tmp_path / "ViT-L-14-336px.pt"
    shutil.copy(fixtures.openai_torchscript_file(), download)
    with pytest.raises(ConversionError, match=r"ViT-L-14-336px\.pt: sha256 [0-9a-f]{64} differs from the published "
                                              r"3035c92b350959924f9f00213499208652fc7ea050643e8b385c2dac08641f02"):
        convert_clip(download, tmp_path / "out.pt", progress=False)
    assert not (tmp_path / "out.pt").exists()

    monkeypatch.setitem(convert_inputs.PUBLISHED_CLIP_SHA256, download.name, convert_inputs.sha256_of(download))
    summary = convert_clip(download, tmp_path / "out.pt", progress=False)
    assert "the published ViT-L-14-336px.pt" in summary.inputs[0]


def test_half_precision_download_keeps_or_converts_its_dtype(tmp_path, reference):
    half = fixtures.openai_torchscript_file("ViT-half.pt", torch.float16)
    convert_clip(half, tmp_path / "kept.pt", progress=False)
    convert_clip(half, tmp_path / "fp32.safetensors", dtype="fp32", progress=False)
    kept, widened, full = load_state(tmp_path / "kept.pt"), load_state(tmp_path / "fp32.safetensors"), load_state(reference)
    assert {t.dtype for t in kept.values()} == {torch.float16}
    assert all(widened[key].dtype == torch.float32 and torch.equal(widened[key], full[key].half().float())
               for key in full)


def broken_clip_dir(tmp_path, edit_config=None, edit_state=None):
    from safetensors.torch import load_file, save_file

    directory = tmp_path / "clip"
    shutil.copytree(fixtures.hf_clip_dir("clip"), directory)
    if edit_config:
        config = json.loads((directory / "config.json").read_text())
        edit_config(config)
        (directory / "config.json").write_text(json.dumps(config))
    if edit_state:
        state = load_file(str(directory / "model.safetensors"))
        edit_state(state)
        save_file(state, str(directory / "model.safetensors"))
    return directory


@pytest.mark.parametrize("case,message", [
    ("ffn", r"model\.safetensors: 'vision_model\.encoder\.layers\.0\.mlp\.fc1\.weight' has shape \[160, 128\], expected "
            r"\[150, 128\] for .*config\.json \(2 layers, hidden 128, ffn 150"),
    ("layers", r"holds 2 CLIP vision tower layers; .*config\.json says 3"),
    ("missing", r"missing tensor 'vision_model\.encoder\.layers\.1\.layer_norm2\.bias' \(part of our "
                r"'decoder\.layers\.1\.pre_mlp_layernorm\.bias'\) of a CLIP vision tower with 2 layers"),
    ("unexpected", r"1 unexpected tensor\(s\) .*'vision_model\.encoder\.layers\.0\.self_attn\.extra\.weight' \(model\.safetensors\)"),
    ("model type", r"config\.json: model_type 'llama' is not a CLIP model"),
])
def test_bad_input_names_file_key_and_shapes_and_writes_nothing(tmp_path, case, message):
    def drop(state):
        del state["vision_model.encoder.layers.1.layer_norm2.bias"]

    def add(state):
        state["vision_model.encoder.layers.0.self_attn.extra.weight"] = torch.zeros(2)

    directory = {
        "ffn": lambda: broken_clip_dir(tmp_path, lambda c: c["vision_config"].update(intermediate_size=150)),
        "layers": lambda: broken_clip_dir(tmp_path, lambda c: c["vision_config"].update(num_hidden_layers=3)),
        "missing": lambda: broken_clip_dir(tmp_path, edit_state=drop),
        "unexpected": lambda: broken_clip_dir(tmp_path, edit_state=add),
        "model type": lambda: fixtures.hf_llama_dir("gqa"),
    }[case]()
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(ConversionError, match=message):
        convert_clip(directory, out / "converted_clip.pt", progress=False)
    assert fixtures.files_under(out) == []


def test_openai_state_dict_with_a_missing_layer_tensor_is_named(tmp_path):
    state = torch.load(fixtures.openai_state_dict_file(), weights_only=True)
    del state["visual.transformer.resblocks.1.mlp.c_proj.bias"]
    torch.save(state, tmp_path / "partial.pt")
    with pytest.raises(ConversionError, match=r"partial\.pt: missing tensor 'visual\.transformer\.resblocks\.1\.mlp\.c_proj\.bias'"):
        convert_clip(tmp_path / "partial.pt", tmp_path / "out.pt", progress=False)
