"""``mm-convert projector``: LLaVA's mm_projector.bin (MLP or linear) and Hugging Face's projector -> mlp.pt."""

import pytest
import torch

import convert_fixtures as fixtures
from mm_plugin.convert import ConversionError, convert_projector
from mm_plugin.safe_io import load_state


def test_mm_projector_bin_becomes_megatron_projector_keys(tmp_path):
    convert_projector(fixtures.mm_projector_file("gqa"), tmp_path / "mlp.pt", progress=False)
    ours = load_state(tmp_path / "mlp.pt")
    hf = fixtures.projector_state("gqa")
    assert set(ours) == {"encoder.linear_fc1.weight", "encoder.linear_fc1.bias", "encoder.linear_fc2.weight",
                         "encoder.linear_fc2.bias"}
    for number in (1, 2):
        for kind in ("weight", "bias"):
            assert torch.equal(ours[f"encoder.linear_fc{number}.{kind}"], hf[f"linear_{number}.{kind}"])


def test_hugging_face_llava_directory_gives_the_same_file(tmp_path):
    convert_projector(fixtures.mm_projector_file("mha"), tmp_path / "a.pt", progress=False)
    summary = convert_projector(fixtures.hf_llava_dir("mha"), tmp_path / "b.pt", progress=False)
    assert (tmp_path / "a.pt").read_bytes() == (tmp_path / "b.pt").read_bytes()
    assert any("are not the projector" in note for note in summary.notes)


def test_linear_projector(tmp_path):
    weight, bias = torch.randn(60, 48), torch.randn(60)
    torch.save({"model.mm_projector.weight": weight, "model.mm_projector.bias": bias}, tmp_path / "mm_projector.bin")
    convert_projector(tmp_path / "mm_projector.bin", tmp_path / "linear.pt", progress=False)
    ours = load_state(tmp_path / "linear.pt")
    assert set(ours) == {"encoder.weight", "encoder.bias"}
    assert torch.equal(ours["encoder.weight"], weight) and torch.equal(ours["encoder.bias"], bias)


@pytest.mark.parametrize("case,message", [
    ("three layers", r"1 unexpected tensor\(s\) for a two-layer MLP projector .*'model\.mm_projector\.4\.weight'"),
    ("short bias", r"'model\.mm_projector\.0\.bias' has shape \[59\], expected \[60\]"),
    ("no projector", r"no projector tensors"),
])
def test_bad_projectors_are_explained(tmp_path, case, message):
    state = torch.load(fixtures.mm_projector_file("gqa"), weights_only=True)
    if case == "three layers":  # mlp3x_gelu: not LLaVA-1.5's projector
        state["model.mm_projector.4.weight"] = torch.zeros(60, 60)
    elif case == "short bias":
        state["model.mm_projector.0.bias"] = state["model.mm_projector.0.bias"][:59].clone()
    else:
        state = {"model.embed_tokens.weight": torch.zeros(4, 4)}
    torch.save(state, tmp_path / "mm_projector.bin")
    with pytest.raises(ConversionError, match=message):
        convert_projector(tmp_path / "mm_projector.bin", tmp_path / "mlp.pt", progress=False)
    assert not (tmp_path / "mlp.pt").exists()


def test_an_output_folder_gets_mindspeed_mms_file_name(tmp_path):
    summary = convert_projector(fixtures.mm_projector_file("gqa"), tmp_path, safetensors=True, progress=False)
    assert summary.output == tmp_path / "mlp.safetensors" and set(load_state(summary.output)) == {
        "encoder.linear_fc1.weight", "encoder.linear_fc1.bias", "encoder.linear_fc2.weight", "encoder.linear_fc2.bias"}
