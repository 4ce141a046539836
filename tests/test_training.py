"""The training loop is right, not just running: exact resume, parallel equivalence, stage 2, NaN handling,
freezing, and clear errors before any compute."""

import json
import os
import pickle
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from training_fixtures import NaNFrom, argv, build_setup, model_json, save_as_megatron_lm, train

pytestmark = pytest.mark.numeric

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = build_setup(tmp_path_factory.mktemp("training"))
    model_json(root, "stage1.json", train_language=False)
    model_json(root, "stage2.json", train_language=True)
    return root


def close(a, b, rtol=2e-5):
    return torch.allclose(torch.tensor(a, dtype=torch.float64), torch.tensor(b, dtype=torch.float64),
                          rtol=rtol, atol=0)


# --- resume ------------------------------------------------------------------------------------

def test_resume_reproduces_an_uninterrupted_run_exactly(megatron_single, setup, tmp_path):
    straight, _, _ = train(argv(setup, iterations=20))
    # Stopped after 10 of 20 iterations (--exit-interval), so the LR schedule is the 20-iteration one.
    first, _, _ = train(argv(setup, iterations=20, extra=("--save", str(tmp_path / "ckpt"), "--exit-interval", "10")))
    # Resume with another DataLoader worker count: the sample order must not depend on it.
    rest, _, _ = train(argv(setup, iterations=20, extra=("--load", str(tmp_path / "ckpt"), "--num-workers", "1")))
    assert len(straight) == 20 and len(first) == 10 and len(rest) == 10
    assert first + rest == straight  # bit for bit


@pytest.mark.compat  # megatron-core 0.16 and 0.12 name the saved RNG objects differently
def test_resume_with_dropout_restores_the_random_state(megatron_single, setup, tmp_path):
    config = json.loads((setup / "stage2.json").read_text())
    config["text_decoder"].update(hidden_dropout=0.2, attention_dropout=0.2)
    (setup / "dropout.json").write_text(json.dumps(config))
    run = dict(model="dropout.json", data="instruct", iterations=8)
    straight, _, _ = train(argv(setup, **run))
    first, _, _ = train(argv(setup, **run, extra=("--save", str(tmp_path / "ckpt"), "--exit-interval", "4")))
    rest, _, _ = train(argv(setup, **run, extra=("--load", str(tmp_path / "ckpt"))))
    assert first + rest == straight  # bit for bit: the dropout masks after the resume are the same
    # The masks do depend on the random state: a run whose generators were not restored differs.
    fresh, _, _ = train(argv(setup, **run, extra=("--load", str(tmp_path / "ckpt"), "--no-load-rng")))
    assert fresh != rest


def test_a_checkpoint_of_another_shape_is_named(megatron_single, setup, tmp_path):
    from mm_plugin.checkpoint.reading import CheckpointError

    train(argv(setup, iterations=2, extra=("--save", str(tmp_path / "ckpt"))))
    other = json.loads((setup / "stage1.json").read_text())
    other["image_encoder"]["vision_projector"]["ffn_hidden_size"] = 32
    other["image_encoder"]["vision_projector"]["ckpt_path"] = None
    (setup / "narrow.json").write_text(json.dumps(other))
    with pytest.raises(CheckpointError, match=r"vision_projection.encoder.linear_fc1.weight.*\(64, 64\).*\(32, 64\)"):
        train(argv(setup, model="narrow.json", iterations=4, extra=("--load", str(tmp_path / "ckpt"))))


# --- parallel equivalence ----------------------------------------------------------------------

def _losses_on_both_ranks(pool, arguments):
    results = pool.run(train, arguments)
    assert results[0][0] == results[1][0], "every rank must know the iteration's loss"
    return results[0]


@pytest.mark.compat
@pytest.mark.parametrize("layout", [
    ("--tensor-model-parallel-size", "2"),
    ("--pipeline-model-parallel-size", "2"),
    (),  # data-parallel 2: the same global batch split over two ranks
])
def test_parallel_layouts_reproduce_a_single_process(megatron_single, pool, setup, layout):
    single, _, _ = train(argv(setup, model="stage2.json", iterations=5))
    parallel, _, _ = _losses_on_both_ranks(pool, argv(setup, model="stage2.json", iterations=5, extra=layout))
    assert close(parallel, single), (parallel, single)


def test_a_tensor_parallel_checkpoint_resumes_at_tp1(megatron_single, pool, setup, tmp_path):
    saved = str(tmp_path / "tp2")
    tp2, _, _ = _losses_on_both_ranks(pool, argv(setup, model="stage2.json", iterations=5, extra=(
        "--tensor-model-parallel-size", "2", "--save", saved, "--save-interval", "4")))
    tp1, _, _ = train(argv(setup, model="stage2.json", iterations=5, extra=("--load", str(Path(saved) / "iter_0000004"))))
    assert len(tp1) == 1 and close(tp1, tp2[4:])


# --- stages and freezing -----------------------------------------------------------------------

def test_stage1_changes_only_the_projector(megatron_single, setup):
    from mm_plugin.safe_io import load_state

    _, _, weights = train(argv(setup, iterations=3))
    projector = load_state(setup / "weights" / "projector.pt")
    clip = load_state(setup / "weights" / "clip.pt")
    llm = load_state(setup / "weights" / "llm.pt")
    assert not torch.equal(weights["vision_projection.encoder.linear_fc1.weight"], projector["encoder.linear_fc1.weight"])
    assert torch.equal(weights["vision_model.decoder.layers.0.mlp.linear_fc1.weight"],
                       clip["decoder.layers.0.mlp.linear_fc1.weight"])
    assert torch.equal(weights["language_model.decoder.layers.1.self_attention.linear_qkv.weight"],
                       llm["decoder.layers.1.self_attention.linear_qkv.weight"])


def test_stage2_continues_from_stage1_and_learns(megatron_single, setup, tmp_path):
    from mm_plugin.safe_io import load_state

    stage1 = str(tmp_path / "stage1")
    train(argv(setup, iterations=4, extra=("--save", stage1)))
    losses, _, weights = train(argv(setup, model="stage2.json", data="instruct", iterations=30, extra=(
        "--load", stage1, "--finetune", "--save", str(tmp_path / "stage2"), "--lr", "3e-3")))
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < 0.8 * first, losses
    clip = load_state(setup / "weights" / "clip.pt")
    for key, value in clip.items():
        name = "vision_model." + key
        if name in weights:
            assert torch.equal(weights[name], value), name  # the frozen vision tower is untouched
    llm = load_state(setup / "weights" / "llm.pt")
    assert not torch.equal(weights["language_model.decoder.layers.0.mlp.linear_fc2.weight"],
                           llm["decoder.layers.0.mlp.linear_fc2.weight"])


def test_megatron_lms_pretrain_is_given_the_model_configuration_to_save(megatron_single, setup, monkeypatch):
    """Megatron-LM keeps its arguments in every checkpoint: launch/pretrain.py adds model.json's configuration to
    them, so its checkpoints say which model they hold (read by the test below and by mm-convert export-hf)."""
    import importlib.machinery
    import types

    from mm_plugin.config.model import load_model_config, to_mindspeed_json
    from mm_plugin.training import cli

    called = {}
    stock = types.ModuleType("megatron.training")
    stock.__spec__ = importlib.machinery.ModuleSpec("megatron.training", None)
    stock.get_args, stock.pretrain = None, lambda *arguments, **keywords: called.update(keywords)
    monkeypatch.setitem(sys.modules, "megatron.training", stock)
    cli.run(argv(setup, iterations=2))
    saved = called["args_defaults"]["mm_model_config"]
    assert saved == to_mindspeed_json(load_model_config(str(setup / "stage1.json")))
    assert json.loads(json.dumps(saved)) == saved  # plain data: torch.load reads it back with weights_only


@pytest.mark.compat  # megatron-core 0.12 reads common.pt its own way
def test_a_checkpoint_of_megatron_lms_pretrain_starts_a_finetune_but_is_not_resumed(megatron_single, setup, tmp_path):
    """Its weights are ours (same layout, same keys); its optimizer, schedule and data position are Megatron-LM's
    bookkeeping, so resuming it is left to Megatron-LM, with a message saying so."""
    from convert_fixtures import load_converted
    from mm_plugin.config.model import load_model_config, to_mindspeed_json
    from mm_plugin.checkpoint.reading import CheckpointError

    model = load_converted(setup / "stage1.json")
    frozen = "language_model.decoder.layers.0.mlp.linear_fc2.weight"  # frozen in stage 1: it keeps what is loaded
    with torch.no_grad():
        model.get_parameter(frozen).add_(1.0)
    config = to_mindspeed_json(load_model_config(str(setup / "stage1.json")))
    save_as_megatron_lm(tmp_path / "megatron-lm", 80, model, config)
    with pytest.raises(CheckpointError, match=r"iter_0000080 was saved by Megatron-LM's pretrain\(\): resume it there"):
        train(argv(setup, iterations=2, extra=("--load", str(tmp_path / "megatron-lm"))))
    _, _, weights = train(argv(setup, iterations=2, extra=("--load", str(tmp_path / "megatron-lm"), "--finetune")))
    assert torch.equal(weights[frozen], model.get_parameter(frozen))


# --- numerical faults --------------------------------------------------------------------------

def test_a_nan_step_is_skipped_without_touching_weights(megatron_single, setup):
    """A NaN loss in iteration 3 (micro-batch 5 of 2 per iteration): the step is skipped and counted,
    and the weights after it are those after iteration 2."""
    clean, _, weights_after_2 = train(argv(setup, iterations=2))
    losses, skipped, weights = train(argv(setup, iterations=3, extra=("--max-skipped-iterations", "5")),
                                     forward_step_wrapper=NaNFrom(first=5))
    assert skipped == 1 and losses[:2] == clean and losses[2] != losses[2]
    for name, value in weights_after_2.items():
        assert torch.equal(weights[name], value), name


def test_too_many_nan_steps_stop_with_the_last_good_checkpoint(megatron_single, setup, tmp_path):
    from mm_plugin.checkpoint.reading import latest_iteration
    from mm_plugin.models.loading import read_model_tensors
    from mm_plugin.training.loop import TrainingStopped

    save = tmp_path / "ckpt"
    with pytest.raises(TrainingStopped, match="3 iterations in a row.*iter_0000002"):
        train(argv(setup, iterations=10, extra=("--save", str(save), "--save-interval", "2",
                                                "--max-skipped-iterations", "3")),
              forward_step_wrapper=NaNFrom(first=5))
    assert latest_iteration(save) == 2
    tensors = read_model_tensors(save)
    assert all(torch.isfinite(t).all() for t in tensors.values())


# --- checkpoints that cannot run code, damaged checkpoints ---------------------------------------

class _CreatesFile:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture(scope="module")
def saved(megatron_single, setup, tmp_path_factory):
    """A stage-1 checkpoint (2 iterations); each test damages its own copy (``_copy``)."""
    save = tmp_path_factory.mktemp("saved") / "ckpt"
    train(argv(setup, iterations=2, extra=("--save", str(save))))
    return save


def _copy(saved, tmp_path) -> tuple[Path, Path]:
    import shutil

    shutil.copytree(saved, tmp_path / "ckpt")
    return tmp_path / "ckpt", tmp_path / "ckpt" / "iter_0000002"


def _read_with(entry: str, setup, save: Path) -> None:
    """Read ``save`` as each entry point does: --load (resume), --load --finetune, export-hf / the demo, and
    inference with a part's ``ckpt_path`` naming the checkpoint."""
    from mm_plugin.config.model import load_model_config
    from mm_plugin.models.llava import LlavaModel
    from mm_plugin.models.loading import load_part_from_checkpoint
    from mm_plugin.models.loading import read_model_tensors

    if entry == "export":
        read_model_tensors(save)
    elif entry == "inference":
        load_part_from_checkpoint(LlavaModel(load_model_config(str(setup / "stage1.json"))), save, "vision_projection.")
    else:
        extra = ("--load", str(save)) + (("--finetune",) if entry == "finetune" else ())
        train(argv(setup, iterations=3, extra=extra))


@pytest.mark.compat  # megatron-core 0.12 unpickles common.pt itself, unrestricted
@pytest.mark.parametrize("entry", ["resume", "finetune", "export", "inference"])
@pytest.mark.parametrize("planted_in", [".metadata", "common.pt"])
def test_a_payload_planted_in_a_checkpoint_is_refused_never_run(megatron_single, setup, saved, tmp_path,
                                                               entry, planted_in):
    """torch.distributed.checkpoint unpickles ``.metadata`` unrestricted, megatron-core 0.12 ``common.pt``.
    The attacker rewrites the manifest too, so the checksums pass and the pickle itself must be refused."""
    from mm_plugin.checkpoint.reading import CheckpointError
    from mm_plugin.checkpoint.manifest import write_manifest

    marker = tmp_path / "created-by-the-pickle"
    save, directory = _copy(saved, tmp_path)
    if planted_in == ".metadata":
        (directory / ".metadata").write_bytes(pickle.dumps({"planner_data": _CreatesFile(marker)}))
    else:
        torch.save({"args": _CreatesFile(marker)}, directory / "common.pt")
    write_manifest(directory)
    with pytest.raises(CheckpointError, match=rf"{re.escape(planted_in)}.*refused to load: .*system"):
        _read_with(entry, setup, save)
    assert not marker.exists()


def _damage(path: Path, how: str) -> None:
    if how == "deleted":
        path.unlink()
    elif how == "emptied":
        path.write_bytes(b"")
    elif how == "truncated":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    else:  # flipped: a few bytes in the middle, same size
        data = bytearray(path.read_bytes())
        middle = len(data) // 2
        data[middle:middle + 4] = bytes(255 - b for b in data[middle:middle + 4])
        path.write_bytes(bytes(data))


@pytest.mark.parametrize("entry", ["resume", "export"])
@pytest.mark.parametrize("file, how", [("__0_0.distcp", "flipped"), ("__0_1.distcp", "flipped"),
                                       ("common.pt", "flipped"), ("__0_0.distcp", "truncated"),
                                       ("__0_0.distcp", "deleted"), (".metadata", "emptied")])
def test_damaged_bytes_stop_the_load_naming_the_file_and_the_last_good_checkpoint(
        megatron_single, setup, tmp_path, entry, file, how):
    """Flipped bytes in a weight or optimizer shard used to load silently (and train on)."""
    from mm_plugin.checkpoint.reading import CheckpointError

    save = tmp_path / "ckpt"
    train(argv(setup, iterations=4, extra=("--save", str(save), "--save-interval", "2")))
    _damage(save / "iter_0000004" / file, how)
    expected = {"flipped": "damaged: its CRC-32 differs", "truncated": "bytes, \\d+ when it was saved",
                "deleted": "missing", "emptied": "0 bytes"}[how]
    with pytest.raises(CheckpointError, match=re.escape(str(save / "iter_0000004" / file)) + ".*" + expected
                       + ".*" + re.escape(f"--load {save / 'iter_0000002'}")):
        _read_with(entry, setup, save)
    (save / "iter_0000002" / "manifest.json").unlink()  # an older checkpoint that cannot be verified is not offered
    with pytest.raises(CheckpointError, match="no older checkpoint beside it verifies"):
        _read_with(entry, setup, save)


@pytest.mark.parametrize("damage", ["truncated shard", "empty shard", "deleted shard", "deleted .metadata",
                                    "truncated .metadata", "truncated common.pt", "garbage metadata.json"])
def test_an_incomplete_checkpoint_without_a_manifest_is_named_not_a_worker_traceback(
        megatron_single, setup, saved, tmp_path, damage):
    """Checkpoints saved without a manifest (Megatron-LM's pretrain(), older versions) are still checked."""
    from mm_plugin.checkpoint.reading import CheckpointError

    save, directory = _copy(saved, tmp_path)
    (directory / "manifest.json").unlink()
    shard = directory / "__0_0.distcp"
    named = {"truncated shard": (shard, r"truncated: \d+ bytes"), "empty shard": (shard, r"truncated: 0 bytes"),
             "deleted shard": (shard, "missing"), "deleted .metadata": (directory / ".metadata", "missing"),
             "truncated .metadata": (directory / ".metadata", "truncated or damaged"),
             "truncated common.pt": (directory / "common.pt", "not a readable PyTorch weight file"),
             "garbage metadata.json": (directory / "metadata.json", "missing or damaged")}
    path, reason = named[damage]
    _damage(path, damage.split()[0].replace("empty", "emptied").replace("garbage", "flipped"))
    with pytest.raises(CheckpointError, match=re.escape(str(path)) + ".*" + reason):
        _read_with("resume", setup, save)


def test_cli_a_planted_checkpoint_is_one_error_line(setup, saved, tmp_path):
    marker = tmp_path / "created-by-the-pickle"
    save, directory = _copy(saved, tmp_path)
    (directory / ".metadata").write_bytes(pickle.dumps(_CreatesFile(marker)))
    (directory / "manifest.json").unlink()
    result = _cli(*argv(setup, iterations=3, extra=("--load", str(save))))
    assert result.returncode != 0 and not marker.exists()
    assert "Traceback" not in result.stderr
    assert re.search(r"^mm-pretrain: error: .*\.metadata: refused to load", result.stderr, flags=re.MULTILINE)


# --- bad input, before any compute ---------------------------------------------------------------

def _cli(*arguments, env_extra=None):
    env = dict(os.environ, PYTHONPATH=str(REPO), **(env_extra or {}))
    return subprocess.run([sys.executable, str(REPO / "launch" / "pretrain.py"), *arguments], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("flag, value, reason", [
    ("--seq-length", "0", "must be at least 1, got 0"), ("--micro-batch-size", "0", "must be at least 1, got 0"),
    ("--train-iters", "-1", "must be at least 1, got -1"), ("--lr", "nan", "must be at least 0 and finite, got nan"),
    ("--lr", "-1e-3", "must be at least 0 and finite, got -1e-3"), ("--num-workers", "-1", "must be at least 0, got -1"),
    ("--adam-beta2", "1", "must be at least 0 and below 1, got 1"),
    ("--lr-warmup-fraction", "1.5", "must be at least 0 and at most 1, got 1.5"),
    ("--global-batch-size", "four", "expected a whole number, got 'four'"),
])
def test_a_value_out_of_range_names_its_flag(setup, capsys, flag, value, reason):
    from mm_plugin.training.arguments import parse_args

    arguments = [argument for argument in argv(setup) if argument != flag]
    if flag in argv(setup):  # drop the fixture's value too
        del arguments[argv(setup).index(flag)]
    with pytest.raises(SystemExit) as stopped:
        parse_args(arguments + [f"{flag}={value}"])
    assert stopped.value.code == 2
    assert f"argument {flag}: {reason}" in capsys.readouterr().err


@pytest.mark.parametrize("extra, message", [
    (("--lr-warmup-iters", "6"), r"warm-up \(6 iterations.*shorter than its decay \(6 iterations"),
    (("--lr-warmup-fraction", "1.0"), r"warm-up \(6 iterations"),
    (("--min-lr", "1"), "--min-lr 1 is above --lr 0.002"),
])
def test_a_schedule_megatron_would_assert_on_is_named(megatron_single, setup, extra, message):
    from mm_plugin.training.arguments import ArgumentError

    with pytest.raises(ArgumentError, match=message):
        train(argv(setup, iterations=6, extra=extra))


def test_cli_a_value_out_of_range_is_one_error_line(setup):
    result = _cli(*argv(setup), "--micro-batch-size=0")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "error: argument --micro-batch-size: must be at least 1, got 0" in result.stderr


def test_a_padding_id_outside_the_vocabulary_is_refused(megatron_single, setup, tmp_path):
    from mm_plugin.data.errors import DataError

    config = json.loads((setup / "pretrain" / "data.json").read_text())
    config["dataloader_param"]["collate_param"]["pad_token_id"] = 10**6
    path = setup / "pretrain" / "far_pad.json"
    path.write_text(json.dumps(config))
    arguments = argv(setup)
    arguments[arguments.index("--mm-data") + 1] = str(path)
    with pytest.raises(DataError, match=rf"far_pad.json: the padding id 1000000 .* not a token of the model's \d+-row"):
        train(arguments)


def test_cli_global_batch_not_divisible(setup):
    result = _cli(*argv(setup, micro_batch=3, global_batch=4))
    assert result.returncode == 2
    assert "--global-batch-size 4 is not divisible by --micro-batch-size 3" in result.stderr


def test_cli_missing_part_file_mentions_the_demo(setup, tmp_path):
    raw = json.loads((setup / "stage1.json").read_text())
    raw["text_decoder"]["ckpt_path"] = "/your_llava_weights_path/converted_vicuna.pt"
    (setup / "placeholder.json").write_text(json.dumps(raw))
    result = _cli(*argv(setup, model="placeholder.json"))
    assert result.returncode == 2
    assert "text_decoder.ckpt_path '/your_llava_weights_path/converted_vicuna.pt' does not exist" in result.stderr
    assert "--demo" in result.stderr and "Traceback" not in result.stderr


def test_mm_plot_writes_a_png(tmp_path):
    from mm_plugin.training.plot import main

    (tmp_path / "metrics.jsonl").write_text(
        "\n".join(json.dumps({"iteration": i, "loss": 3.0 / i}) for i in range(1, 6))
        + "\n" + json.dumps({"iteration": 5, "valid_loss": 0.9}) + "\n")
    assert main([str(tmp_path)]) == 0
    assert (tmp_path / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert main([str(tmp_path / "missing")]) == 2


# --- options ---------------------------------------------------------------------------------------

def test_activation_recompute_changes_no_number(megatron_single, setup):
    plain, _, _ = train(argv(setup, model="stage2.json", iterations=3))
    recomputed, _, _ = train(argv(setup, model="stage2.json", iterations=3, extra=(
        "--recompute-granularity", "full", "--recompute-method", "uniform", "--recompute-num-layers", "1")))
    assert recomputed == plain


@pytest.mark.parametrize("precision", ["--bf16", "--fp16"])
def test_half_precision_tracks_fp32(megatron_single, setup, precision):
    fp32, _, _ = train(argv(setup, model="stage2.json", iterations=4))
    half, skipped, weights = train(argv(setup, model="stage2.json", iterations=4, extra=(precision,)))
    assert skipped == 0 and close(half, fp32, rtol=1e-3), (half, fp32)
    assert weights["language_model.decoder.layers.0.mlp.linear_fc1.weight"].dtype == (
        torch.bfloat16 if precision == "--bf16" else torch.float16)


def test_distributed_optimizer_matches_a_single_process(megatron_single, pool, setup):
    single, _, _ = train(argv(setup, model="stage2.json", iterations=4))
    sharded, _, _ = _losses_on_both_ranks(pool, argv(setup, model="stage2.json", iterations=4,
                                                     extra=("--use-distributed-optimizer",)))
    assert close(sharded, single), (sharded, single)


# Every flag MindSpeed-MM's published pretrain_llava1_5.sh passes (its 2.3.0 and 1.0.RC3 versions), as
# our own model.json would: the run must get past argument parsing to the first configuration check.
PUBLISHED_FLAGS = [
    "--tensor-model-parallel-size", "1", "--pipeline-model-parallel-size", "1", "--context-parallel-size", "1",
    "--micro-batch-size", "2", "--global-batch-size", "4", "--seq-length", "96", "--tokenizer-type",
    "NullTokenizer", "--position-embedding-type", "rope", "--no-masked-softmax-fusion", "--lr", "0.001",
    "--train-iters", "10", "--lr-decay-style", "cosine", "--weight-decay", "0.0", "--lr-warmup-fraction", "0.03",
    "--clip-grad", "0.0", "--adam-beta1", "0.9", "--adam-beta2", "0.999", "--no-gradient-accumulation-fusion",
    "--bf16", "--use-flash-attn", "--use-fused-rotary-pos-emb", "--no-load-optim", "--no-load-rng",
    "--no-save-optim", "--no-save-rng", "--num-workers", "0", "--mm-tool", "tools.json", "--log-interval", "1",
    "--save-interval", "5000", "--eval-interval", "5000", "--eval-iters", "5000", "--ckpt-format", "torch",
    "--distributed-backend", "nccl", "--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4",
    "--attention-dropout", "0.0", "--hidden-dropout", "0.0",
]


def test_cli_accepts_every_published_mindspeed_flag(setup, tmp_path):
    raw = json.loads((setup / "stage1.json").read_text())
    raw["text_decoder"]["ckpt_path"] = "/missing/converted_vicuna.pt"
    (setup / "missing_llm.json").write_text(json.dumps(raw))
    vocab = (setup / "vocab.txt").read_text()
    result = _cli(*PUBLISHED_FLAGS, "--vocab-size", vocab, "--max-position-embeddings", "128",
                  "--mm-model", str(setup / "missing_llm.json"), "--mm-data", str(setup / "pretrain" / "data.json"),
                  "--save", str(tmp_path / "save"))
    assert result.returncode == 2 and "converted_vicuna.pt' does not exist" in result.stderr, result.stderr
    for ignored in ("--use-flash-attn", "--tokenizer-type", "--ckpt-format", "--distributed-backend", "--mm-tool"):
        assert f"{ignored}: accepted without effect here" in result.stderr


def test_cli_architecture_flags_must_agree_with_model_json(setup):
    result = _cli(*argv(setup), "--num-layers", "32")
    assert result.returncode == 2
    assert "--num-layers 32 but " in result.stderr and "text_decoder num_layers 2" in result.stderr


def test_replaced_records_are_counted_in_the_log(megatron_single, setup, tmp_path):
    import shutil

    dirty = tmp_path / "dirty"
    shutil.copytree(setup / "pretrain", dirty)
    records = json.loads((dirty / "pretrain.json").read_text())
    for record in records[::3]:  # a third of the images are gone
        (dirty / "images" / record["image"]).unlink()
    log = tmp_path / "tb"
    train(argv(setup, iterations=3, extra=("--mm-data", str(dirty / "data.json"), "--log-interval", "1",
                                            "--tensorboard-dir", str(log))))
    lines = [json.loads(line) for line in (log / "metrics.jsonl").read_text().splitlines()]
    replaced = [line["bad_samples"] for line in lines]
    assert len(lines) == 3 and all(set(counts) <= {"missing_image"} for counts in replaced)
    assert sum(counts.get("missing_image", 0) for counts in replaced) > 0


def test_validation_and_the_model_provider_change_neither_the_flags_nor_the_model_config(megatron_single, setup):
    """What validation decides is a RunSettings of its own; the parsed flags and the shared model config stay as
    given (the provider builds this run's dtype and adapters into a copy)."""
    import copy

    from mm_plugin.config.model import load_model_config
    from mm_plugin.data.config import load_data_config
    from mm_plugin.training.arguments import parse_args
    from mm_plugin.training.providers import bind

    args = parse_args(argv(setup, model="stage2.json", extra=("--train-samples", "10", "--bf16", "--lora-rank", "4")))
    args.train_iters = None
    flags = copy.deepcopy(vars(args))
    model_config = load_model_config(args.mm_model)
    shared = copy.deepcopy(model_config)
    providers = bind(args, model_config, load_data_config(args.mm_data))
    model = providers.model_provider()
    assert vars(args) == flags and model_config == shared
    assert providers.settings.train_iters == 3 and providers.settings.global_batch_size == 4
    assert providers.settings.num_microbatches == 2 and not providers.settings.sequence_packing
    assert model.llava_config.language.params_dtype == "bf16" and model.llava_config.language.lora.rank == 4
