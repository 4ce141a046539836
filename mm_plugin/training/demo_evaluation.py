"""Did the demo's stage 1 learn from the pictures? Three held-out caption losses answer it.

* ``with_images``: the stage-1 model on held-out records, each with its own image;
* ``images_shuffled``: the same records, each given another record's image;
* ``language_model_alone``: the language model on the same captions without any image.

Learning from pictures means ``with_images`` well below both others: the model reads the image, and
what it reads is specific to that image. Then the model captions held-out images (greedy, as ``mm-infer``
does), and the colour, shape and position its captions name are compared with the truth, with the right
image and with another sample's.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from mm_plugin import device
from mm_plugin.config.names import IMAGE_TOKEN_INDEX, PROJECTOR

BATCH = 64


def _model(out: Path):
    from mm_plugin.config.model import load_model_config
    from mm_plugin.models.llava import LlavaModel
    from mm_plugin.models.loading import load_part_from_checkpoint, load_parts

    config = load_model_config(str(out / "model.json"))
    model = LlavaModel(config)
    load_parts(model, config)
    load_part_from_checkpoint(model, out / "checkpoints" / "stage1", PROJECTOR.module_prefix)
    return model.to(device.current()).eval()  # megatron builds its norms on the CPU


def _held_out(out: Path, model):
    from mm_plugin.data.collate import Collator
    from mm_plugin.data.config import load_data_config
    from mm_plugin.data.loader import build_datasets
    from mm_plugin.data.tokenization import load_tokenizer

    config = load_data_config(out / "data" / "heldout" / "data.json")
    tokenizer = load_tokenizer(config.tokenizer_path)
    dataset, _ = build_datasets(config, tokenizer, image_tokens=model.tokens_per_image, model_max_length=128)
    collate = Collator(tokenizer.pad_token_id)
    samples = [dataset[index] for index in range(len(dataset))]
    return [collate(samples[start:start + BATCH]) for start in range(0, len(samples), BATCH)], tokenizer.pad_token_id


def _mean_loss(model, batches, pad_token_id: int, transform) -> float:
    total, count = 0.0, 0.0
    with torch.no_grad():
        for batch in batches:
            input_ids, labels, images, counts = (t.to(device.current()) for t in transform(batch))
            loss, mask = model(input_ids, labels, images, counts, pad_token_id=pad_token_id)
            total += float((loss * mask).sum())
            count += float(mask.sum())
    return total / count


def _as_is(batch):
    return batch["input_ids"], batch["labels"], batch["images"], batch["image_counts"]


def _shuffled(batch):
    """Every sample gets the next sample's image (one image each in the pretraining layout)."""
    return batch["input_ids"], batch["labels"], batch["images"].roll(1, dims=0), batch["image_counts"]


def _without_images(batch):
    keep = batch["input_ids"] != IMAGE_TOKEN_INDEX
    width = int(keep.sum(dim=1).max())
    input_ids = torch.stack([row[mask][:width] for row, mask in zip(batch["input_ids"], keep)])
    labels = torch.stack([row[mask][:width] for row, mask in zip(batch["labels"], keep)])
    return input_ids, labels, batch["images"][:0], torch.zeros_like(batch["image_counts"])


def demo_losses(out: str | Path) -> dict[str, float]:
    """The three held-out caption losses (needs a torch.distributed world of one; see demo.py)."""
    from mm_plugin.parallel.world import join_world, set_model_parallel

    out = Path(out)
    join_world()
    set_model_parallel(1, 1)
    model = _model(out)
    batches, pad = _held_out(out, model)
    return {name: _mean_loss(model, batches, pad, transform) for name, transform in
            (("with_images", _as_is), ("images_shuffled", _shuffled), ("language_model_alone", _without_images))}


CHANCE = {"colour": 1 / 8, "shape": 1 / 6, "position": 1 / 5}


def evaluate(out: str | Path) -> dict:
    """Held-out losses and attribute accuracies, printed and written to ``OUT/evaluation.json``."""
    from mm_plugin.inference.demo import attribute_accuracy, held_out_answers
    from mm_plugin.safe_io import write_text

    out = Path(out)
    losses = demo_losses(out)
    held_out = held_out_answers(out)
    named = {"right_image": attribute_accuracy(held_out["answers"], held_out["references"]),
             "another_image": attribute_accuracy(held_out["answers_images_shuffled"], held_out["references"])}
    print("held-out caption loss (per token):")
    for name, value in losses.items():
        print(f"  {name:<22} {value:.4f}")
    alone = losses["language_model_alone"]
    print(f"  the images cut the language model's loss by {100 * (1 - losses['with_images'] / alone):.0f}%; "
          f"shuffled images give {losses['images_shuffled']:.4f}")
    print(f"held-out images captioned ({len(held_out['answers'])}): how often the caption names what is in the image")
    print(f"  {'':<24}{'right image':>12}{'another image':>15}")
    for attribute, chance in CHANCE.items():
        print(f"  {f'{attribute} (chance {100 * chance:.0f}%)':<24}{100 * named['right_image'][attribute]:>11.0f}%"
              f"{100 * named['another_image'][attribute]:>14.0f}%")
    report = {"losses": losses, "named": named, "examples": list(zip(held_out["references"], held_out["answers"]))[:8]}
    write_text(out / "evaluation.json", json.dumps(report, indent=2) + "\n")
    return report


def exact_match(answers: list[str], references: list[str]) -> float:
    """Share of answers that are their reference, word for word (surrounding space ignored)."""
    return sum(answer.strip() == reference.strip() for answer, reference in zip(answers, references)) / len(answers)


def evaluate_stage2(out: str | Path, checkpoint_name: str = "stage2") -> dict:
    """Did stage 2 (``OUT/checkpoints/CHECKPOINT_NAME``: ``stage2``, or the LoRA demo's ``stage2-lora``) learn to
    answer from the picture? Exact-match answers to held-out first questions with the right image, another
    sample's and none; printed and written to ``OUT/evaluation_CHECKPOINT_NAME.json``."""
    from mm_plugin.inference.demo import held_out_chat
    from mm_plugin.parallel.world import join_world, set_model_parallel
    from mm_plugin.safe_io import write_text

    out = Path(out)
    join_world()
    set_model_parallel(1, 1)
    chat = held_out_chat(out, checkpoint_name=checkpoint_name)
    references = chat["references"]
    conditions = {"right_image": chat["answers"], "another_image": chat["answers_images_shuffled"],
                  "no_image": chat["answers_without_image"]}
    matched = {name: exact_match(answers, references) for name, answers in conditions.items()}
    print(f"held-out first questions answered ({len(references)}), vicuna_v1 template, greedy:")
    for name, share in matched.items():
        print(f"  {name.replace('_', ' '):<14} exact match {100 * share:5.1f}%")
    report = {"exact_match": matched,
              "examples": [{"reference": reference, **{name: answers[k] for name, answers in conditions.items()}}
                           for k, reference in enumerate(references[:8])]}
    write_text(out / f"evaluation_{checkpoint_name}.json", json.dumps(report, indent=2) + "\n")
    return report
