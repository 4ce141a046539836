"""The embedded default learns from the pictures (issue: a demo that learns)."""

import json

import pytest
import torch


def test_stage1_learns_from_the_images(megatron_single, demo_run):
    from mm_plugin.training.demo_evaluation import demo_losses

    losses = demo_losses(demo_run)
    # bench/demo_seeds.py's worst run of 10 (5 seeds x 1 and 2 threads, BENCHMARKS.md): the language model
    # alone at least 48x the loss with the images, shuffled images at least 24x. Far less still means the
    # pictures are read...
    assert losses["with_images"] <= 0.3 * losses["language_model_alone"], losses
    # ...and it is the right image that helps: another sample's image is far worse.
    assert losses["images_shuffled"] >= 3 * losses["with_images"], losses


def test_the_printed_loss_falls_and_is_logged(demo_run):
    records = [json.loads(line) for line in
               (demo_run / "checkpoints" / "stage1" / "tensorboard" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if "loss" in r]
    assert len(losses) >= 5 and losses[-1] < 0.5 * losses[0], losses
    assert all(r["samples_per_s"] > 0 and r["tokens_per_s"] > 0 and r["tflops_per_device"] > 0 for r in records)
    log = (demo_run / "demo.log").read_text()
    assert "lm loss:" in log and "held-out caption loss" in log
    assert "WARNING" not in log and "Transformer Engine" not in log  # nothing the user cannot act on


def test_stage1_saved_only_the_projector(megatron_single, demo_run):
    from mm_plugin.safe_io import load_state
    from mm_plugin.models.loading import read_model_tensors

    trained = read_model_tensors(demo_run / "checkpoints" / "stage1")
    assert trained and all(name.startswith("vision_projection.") for name in trained)
    # The language model the text-only run trained is what stage 1 was given (as a user's converted Vicuna).
    lm_run = read_model_tensors(demo_run / "checkpoints" / "lm")
    part = load_state(demo_run / "weights" / "converted_vicuna.pt")
    for key, value in part.items():
        assert torch.equal(lm_run["language_model." + key], value), key


@pytest.mark.parametrize("run, checkpoint", [("demo_stage2_run", "stage2"), ("demo_stage2_lora_run", "stage2-lora")],
                         ids=["full", "lora"])
def test_stage2_answers_questions_from_the_images(request, run, checkpoint):
    """The full run, and LoRA (on the decoder's linears and the output layer, docs/finetune.md) alike."""
    out = request.getfixturevalue(run)
    report = json.loads((out / f"evaluation_{checkpoint}.json").read_text())
    matched = report["exact_match"]
    # Exact-match answers to held-out first questions (colour, shape, position, description): with the right
    # image the model must read it; with another sample's, or none, it can only guess.
    assert matched["right_image"] >= 0.75, matched
    assert matched["another_image"] <= 0.4 and matched["no_image"] <= 0.4, matched
    log = (out / f"demo_{checkpoint}.log").read_text()
    assert "sequence packing: the loss is normalised per trained token" in log and "exact match" in log


def test_stage2_trained_the_language_model_and_projector_from_stage1(megatron_single, demo_stage2_run):
    from mm_plugin.safe_io import load_state
    from mm_plugin.models.loading import read_model_tensors

    stage1 = read_model_tensors(demo_stage2_run / "checkpoints" / "stage1")
    stage2 = read_model_tensors(demo_stage2_run / "checkpoints" / "stage2")
    assert {name.split(".")[0] for name in stage2} == {"vision_projection", "language_model"}
    part = load_state(demo_stage2_run / "weights" / "converted_vicuna.pt")
    for name, value in stage1.items():  # it started from stage 1's projector and moved on
        assert not torch.equal(stage2[name], value), name
    assert any(not torch.equal(stage2["language_model." + key], value) for key, value in part.items())
