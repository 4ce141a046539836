"""The ``mm-convert`` command line: summaries, one-paragraph errors with exit status 2, ``export-hf --load``."""

import pytest
import torch

import convert_fixtures as fixtures
from mm_plugin.convert.cli import main
from mm_plugin.convert.sources import open_hf_directory


def run(capsys, *argv):
    status = main([*map(str, argv), "--no-progress"])
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def test_each_command_writes_and_summarises(tmp_path, capsys):
    commands = [
        ("clip", fixtures.openai_torchscript_file(), tmp_path / "converted_clip.pt"),
        ("llm", fixtures.legacy_megatron_dir("mha"), tmp_path / "converted_vicuna.pt"),
        ("projector", fixtures.mm_projector_file("mha"), tmp_path / "mlp.pt"),
        ("llava-hf", fixtures.hf_llava_dir("mha"), tmp_path / "llava-mm"),
        ("export-hf", tmp_path / "llava-mm", tmp_path / "llava-hf"),
    ]
    for command, source, output in commands:
        status, out, err = run(capsys, command, "--input", source, "--output", output)
        assert status == 0, err
        assert out.startswith(f"mm-convert {command}: wrote {output} (") and "read   " in out
        assert output.exists()
    assert (tmp_path / "llava-hf" / "config.json").is_file()


@pytest.mark.parametrize("argv,message", [
    (["clip", "--input", "LLAMA"], r"mm-convert clip: error: .*config\.json: model_type 'llama' is not a CLIP model"),
    (["llm", "--input", "MISSING"], r"mm-convert llm: error: .*does-not-exist: no such file"),
    (["export-hf", "--input", "LLAMA"], r"mm-convert export-hf: error: .*no model\.json"),
])
def test_bad_input_is_one_paragraph_and_status_2(tmp_path, capsys, argv, message):
    import re

    sources = {"LLAMA": fixtures.hf_llama_dir("gqa"), "MISSING": tmp_path / "does-not-exist"}
    argv = [str(sources.get(arg, arg)) for arg in argv] + ["--output", str(tmp_path / "out")]
    capsys.readouterr()  # building the fixture prints transformers' progress
    status, out, err = run(capsys, *argv)
    assert status == 2 and out == ""
    assert re.search(message, err) and "Traceback" not in err and err.count("\n") == 1
    assert not (tmp_path / "out").exists()


def test_malicious_pickle_is_refused_by_the_cli(tmp_path, capsys):
    import os

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'pwned'}",))

    torch.save({"model.mm_projector.0.weight": torch.zeros(1), "x": Payload()}, tmp_path / "mm_projector.bin")
    status, _, err = run(capsys, "projector", "--input", tmp_path / "mm_projector.bin", "--output", tmp_path / "mlp.pt")
    assert status == 2 and "refused to load" in err and "posix.system" in err
    assert not (tmp_path / "pwned").exists() and not (tmp_path / "mlp.pt").exists()


@pytest.mark.parametrize("saved_by", ["mm_plugin", "megatron-lm"])
def test_export_with_load_lays_a_training_checkpoint_over_the_parts(megatron_single, tmp_path, capsys, saved_by):
    """Stage 1 trains the projector only; our loop's checkpoint holds only that, the rest comes from the parts.
    Megatron-LM's pretrain() saves every weight, and the model configuration among its arguments."""
    from mm_plugin.config.model import load_model_config, to_mindspeed_json
    from mm_plugin.training.checkpointing import save_checkpoint
    from training_fixtures import save_as_megatron_lm

    base = tmp_path / "llava-mm"
    assert run(capsys, "llava-hf", "--input", fixtures.hf_llava_dir("gqa"), "--output", base)[0] == 0
    model = fixtures.load_converted(base / "model.json")
    with torch.no_grad():
        model.vision_projection.encoder.linear_fc1.weight.add_(1.0)
    config = to_mindspeed_json(load_model_config(str(base / "model.json")))
    if saved_by == "mm_plugin":
        save_checkpoint(tmp_path / "checkpoints", 7, model, None, None, consumed_samples=0, model_config=config,
                        trainable_only=True, save_optimizer=False, save_rng=False)
    else:
        save_as_megatron_lm(tmp_path / "checkpoints", 7, model, config)
        save_as_megatron_lm(tmp_path / "unknown-model", 7, model, None)
        status, _, err = run(capsys, "export-hf", "--input", base, "--load", tmp_path / "unknown-model",
                             "--output", tmp_path / "unknown")
        assert status == 2 and "unknown-model" in err and "holds no mm_plugin model configuration" in err

    status, out, err = run(capsys, "export-hf", "--input", base, "--load", tmp_path / "checkpoints",
                           "--output", tmp_path / "llava-hf")
    assert status == 0, err
    written = open_hf_directory(tmp_path / "llava-hf")
    expected = fixtures.hub_state(fixtures.hf_model("gqa"))
    expected["multi_modal_projector.linear_1.weight"] = expected["multi_modal_projector.linear_1.weight"] + 1.0
    assert all(torch.equal(written.read(key), tensor) for key, tensor in expected.items())
    assert str(tmp_path / "checkpoints") in out

    (tmp_path / "not-a-checkpoint").mkdir()
    status, _, err = run(capsys, "export-hf", "--input", base, "--load", tmp_path / "not-a-checkpoint",
                         "--output", tmp_path / "again")
    assert status == 2 and "mm-convert export-hf: error: " in err and "not-a-checkpoint" in err
    assert not (tmp_path / "again").exists()
