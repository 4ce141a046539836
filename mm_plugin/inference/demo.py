"""Inference on what ``bash examples/llava1.5/pretrain_llava1_5.sh --demo`` wrote.

The demo's stage-1 model (its frozen tiny CLIP and language model, the projector from the stage-1
checkpoint) captions held-out synthetic images in the ``plain`` format it was trained on; each query
carries the true caption as its reference.
"""

from __future__ import annotations

import json
from pathlib import Path

from mm_plugin.config.model import load_model_config
from mm_plugin.data.config import load_data_config
from mm_plugin.inference.config import InferenceConfig, InferenceConfigError, Query
from mm_plugin.inference.sampling import GenerationConfig

DEMO_COMMAND = "bash examples/llava1.5/pretrain_llava1_5.sh --demo"


def demo_config(out: Path, queries: int = 8) -> InferenceConfig:
    """The demo's model, tokenizer and preprocessing, and its first ``queries`` held-out images."""
    model_json, checkpoint = out / "model.json", out / "checkpoints" / "stage1"
    heldout = out / "data" / "heldout" / "data.json"
    for needed in (model_json, checkpoint, heldout):
        if not needed.exists():
            raise InferenceConfigError(f"{needed} does not exist: run `{DEMO_COMMAND}` first (it writes {out}; "
                                       "DEMO_DIR=... chooses another folder)")
    model = load_model_config(str(model_json))
    model.projector.ckpt_path = str(checkpoint)
    data = load_data_config(heldout)
    records = json.loads(Path(data.data_path).read_text())[:queries]
    return InferenceConfig(
        model=model, tokenizer=data.tokenizer_path, image=data.image,
        generation=GenerationConfig(max_new_tokens=16),
        template="plain",
        queries=[Query("", [str(Path(data.data_folder) / record["image"])], reference=record["conversations"][-1]["value"])
                 for record in records],
        source=str(out),
    )


def held_out_answers(out: Path, queries: int = 128, batch_size: int = 32) -> dict[str, list[str]]:
    """Greedy captions of the first ``queries`` held-out images, each with its own image and with another's.

    Returns ``references`` (the true captions), ``answers`` and ``answers_images_shuffled`` (each query given
    the image of another, in a fixed permutation), in query order. Needs a torch.distributed world of one.
    """
    import random

    from mm_plugin.inference.pipeline import LlavaPipeline

    config = demo_config(out, queries=queries)
    pipe = LlavaPipeline.from_config(config, batch_size=batch_size)
    shuffled = [query.images for query in config.queries]
    random.Random(0).shuffle(shuffled)
    return {
        "references": [query.reference for query in config.queries],
        "answers": [answer.text for answer in pipe.answer(config.queries)],
        "answers_images_shuffled": [answer.text for answer in pipe.answer([Query("", images) for images in shuffled])],
    }


def attribute_accuracy(answers: list[str], references: list[str]) -> dict[str, float]:
    """How often the first colour, shape and position an answer names are its reference caption's."""
    from mm_plugin.data.synthetic import named_in

    pairs = [(named_in(answer), named_in(reference)) for answer, reference in zip(answers, references)]
    return {attribute: sum(said[attribute] == true[attribute] for said, true in pairs) / len(pairs)
            for attribute in ("colour", "shape", "position")}
