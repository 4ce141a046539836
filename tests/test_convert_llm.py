"""``mm-convert llm``: Hugging Face LLaMA directories and legacy Megatron/ModelLink checkpoints."""

import json
import shutil

import pytest
import torch

import convert_fixtures as fixtures
from mm_plugin.convert import ConversionError, convert_llm
from mm_plugin.safe_io import load_state
from model_fixtures import SHAPES


@pytest.fixture(scope="module", params=["gqa", "mha"])
def reference(request, tmp_path_factory):
    """A sharded safetensors Hugging Face directory's conversion."""
    path = tmp_path_factory.mktemp("llm") / "converted_vicuna.pt"
    convert_llm(fixtures.hf_llama_dir(request.param), path, progress=False)
    return request.param, load_state(path)


def test_layout_is_megatron_cores(reference):
    shape, state = reference
    text = SHAPES[shape]["text"]
    layers, heads, groups = text["num_hidden_layers"], text["num_attention_heads"], text["num_key_value_heads"]
    head_dim = text["hidden_size"] // heads
    assert len(state) == 3 + 6 * layers
    hf = fixtures.language_state(fixtures.hf_model(shape))
    for layer in range(layers):
        fused = state[f"decoder.layers.{layer}.self_attention.linear_qkv.weight"]
        per_group = (heads // groups + 2) * head_dim
        for group in range(groups):  # each group: its query heads, then its key head, then its value head
            block = fused[group * per_group:(group + 1) * per_group]
            q, k, v = (hf[f"model.layers.{layer}.self_attn.{x}_proj.weight"] for x in "qkv")
            queries = heads // groups * head_dim
            assert torch.equal(block[:queries], q[group * queries:(group + 1) * queries])
            assert torch.equal(block[queries:queries + head_dim], k[group * head_dim:(group + 1) * head_dim])
            assert torch.equal(block[queries + head_dim:], v[group * head_dim:(group + 1) * head_dim])
        gate, up = (hf[f"model.layers.{layer}.mlp.{x}_proj.weight"] for x in ("gate", "up"))
        assert torch.equal(state[f"decoder.layers.{layer}.mlp.linear_fc1.weight"], torch.cat([gate, up]))
    assert torch.equal(state["output_layer.weight"], hf["lm_head.weight"])
    assert torch.equal(state["embedding.word_embeddings.weight"], hf["model.embed_tokens.weight"])


@pytest.mark.parametrize("source", ["hf-bin", "modellink-tp1", "megatron-lm-tp2", "iteration-file"])
def test_every_source_gives_identical_tensors(reference, tmp_path, source):
    shape, expected = reference
    path = {
        "hf-bin": lambda: fixtures.hf_llama_dir(shape, "bin"),
        "modellink-tp1": lambda: fixtures.legacy_megatron_dir(shape, 1, modellink_names=True),
        "megatron-lm-tp2": lambda: fixtures.legacy_megatron_dir(shape, 2, modellink_names=False),
        "iteration-file": lambda: fixtures.legacy_megatron_dir(shape, 1) / "iter_0000001/mp_rank_00/model_optim_rng.pt",
    }[source]()
    convert_llm(path, tmp_path / "converted_vicuna.pt", progress=False)
    ours = load_state(tmp_path / "converted_vicuna.pt")
    assert list(ours) == list(expected)
    assert all(torch.equal(ours[key], expected[key]) for key in expected)


def test_dtype_and_safetensors_output(reference, tmp_path):
    shape, expected = reference
    summary = convert_llm(fixtures.hf_llama_dir(shape), tmp_path / "converted_vicuna.pt", dtype="bf16",
                          safetensors=True, progress=False)
    assert summary.output == tmp_path / "converted_vicuna.safetensors"
    ours = load_state(summary.output)
    assert all(ours[key].dtype == torch.bfloat16 and torch.equal(ours[key], expected[key].bfloat16())
               for key in expected)


def copied(tmp_path, source):
    target = tmp_path / source.name
    shutil.copytree(source, target)
    return target


def edit_json(path, **changes):
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


def test_config_that_disagrees_with_the_weights_names_key_and_shapes(tmp_path):
    directory = copied(tmp_path, fixtures.hf_llama_dir("gqa"))
    edit_json(directory / "config.json", num_key_value_heads=3)
    with pytest.raises(ConversionError, match=r"model-\d+-of-\d+\.safetensors: 'model\.layers\.0\.self_attn\.k_proj\."
                                              r"weight' has shape \[20, 60\], expected \[30, 60\] for .*config\.json "
                                              r"\(4 layers, hidden 60, ffn 136, 6 heads in 3 groups of 10"):
        convert_llm(directory, tmp_path / "out.pt", progress=False)
    assert not (tmp_path / "out.pt").exists()


def test_unexpected_tensor_is_named_with_its_shard(tmp_path):
    from safetensors.torch import load_file, save_file

    directory = copied(tmp_path, fixtures.hf_llama_dir("gqa"))
    index = json.loads((directory / "model.safetensors.index.json").read_text())
    shard = index["weight_map"]["model.norm.weight"]
    state = load_file(str(directory / shard))
    state["model.layers.0.self_attn.q_proj.bias"] = torch.zeros(60)
    save_file(state, str(directory / shard))
    index["weight_map"]["model.layers.0.self_attn.q_proj.bias"] = shard
    (directory / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ConversionError, match=rf"1 unexpected tensor\(s\) .*'model\.layers\.0\.self_attn\.q_proj\.bias' "
                                              rf"\({shard}\)"):
        convert_llm(directory, tmp_path / "out.pt", progress=False)


@pytest.mark.parametrize("case,message", [
    ("llava", r"config\.json: model_type 'llava' is not a LLaMA model"),
    ("tied", r"tie_word_embeddings is true"),
    ("pipeline", r"a pipeline-parallel checkpoint \(mp_rank_00_000\)"),
    ("no args", r"no Megatron 'args' in the checkpoint"),
    ("missing rank", r"saved with TP=2, PP=1 but 1 rank file\(s\) found"),
])
def test_wrong_inputs_are_explained(tmp_path, case, message):
    if case == "llava":
        path = fixtures.hf_llava_dir("gqa")
    elif case == "tied":
        path = copied(tmp_path, fixtures.hf_llama_dir("gqa"))
        edit_json(path / "config.json", tie_word_embeddings=True)
    else:
        path = copied(tmp_path, fixtures.legacy_megatron_dir("gqa", 2 if case == "missing rank" else 1))
        ranks = path / "iter_0000001"
        if case == "pipeline":
            (ranks / "mp_rank_00").rename(ranks / "mp_rank_00_000")
        elif case == "missing rank":
            shutil.rmtree(ranks / "mp_rank_01")
        else:
            file = ranks / "mp_rank_00" / "model_optim_rng.pt"
            checkpoint = torch.load(file, weights_only=False)
            del checkpoint["args"]
            torch.save(checkpoint, file)
    with pytest.raises(ConversionError, match=message):
        convert_llm(path, tmp_path / "out.pt", progress=False)
    assert not (tmp_path / "out.pt").exists()
