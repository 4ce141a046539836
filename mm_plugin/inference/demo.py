"""Inference on what the demos wrote: ``pretrain_llava1_5.sh --demo`` and ``finetune_llava1_5.sh --demo``.

The stage-1 model (its frozen tiny CLIP and language model, the projector from the stage-1 checkpoint)
captions held-out synthetic images in the ``plain`` format it was trained on; the stage-2 model (language
model and projector from the stage-2 checkpoint) answers held-out first questions in the ``vicuna_v1``
template. Each query carries the true caption or answer as its reference.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

from mm_plugin.checkpoint.reading import trained_model_config
from mm_plugin.config.model import load_model_config
from mm_plugin.data.config import load_data_config
from mm_plugin.inference.config import InferenceConfig, InferenceConfigError, Query
from mm_plugin.inference.sampling import GenerationConfig

DEMO_COMMANDS = {1: "bash examples/llava1.5/pretrain_llava1_5.sh --demo",
                 2: "bash examples/llava1.5/finetune_llava1_5.sh --demo"}


def latest_stage(out: Path) -> int:
    """2 when the stage-2 demo has run in ``out``, else 1."""
    return 2 if (out / "checkpoints" / "stage2").is_dir() else 1


def demo_config(out: Path, queries: int = 8, stage: Optional[int] = None,
                checkpoint_name: Optional[str] = None) -> InferenceConfig:
    """A demo model (``stage``: default the latest trained; ``checkpoint_name``: its folder under
    ``OUT/checkpoints``, default ``stage1`` or ``stage2``), its tokenizer and preprocessing, and its first
    ``queries`` held-out images (stage 1: to caption; stage 2: with their first question)."""
    stage = stage or latest_stage(out)
    checkpoint = out / "checkpoints" / (checkpoint_name or f"stage{stage}")
    model_json = out / ("model.json" if stage == 1 else "model_stage2.json")
    heldout = out / "data" / ("heldout" if stage == 1 else "instruct_heldout") / "data.json"
    for needed in (model_json, checkpoint, heldout):
        if not needed.exists():
            raise InferenceConfigError(f"{needed} does not exist: run `{DEMO_COMMANDS[stage]}` first (it writes "
                                       f"{out}; DEMO_DIR=... chooses another folder)")
    model = load_model_config(str(model_json))
    if stage == 2:  # as trained (a LoRA run's adapters come with flags): the configuration saved with it
        model = trained_model_config(checkpoint)
        model.language.ckpt_path = str(checkpoint)
    model.projector.ckpt_path = str(checkpoint)
    data = load_data_config(heldout)
    records = [record for record in json.loads(Path(data.data_path).read_text()) if "image" in record][:queries]
    if stage == 1:
        listed = [Query("", [str(Path(data.data_folder) / record["image"])],
                        reference=record["conversations"][-1]["value"]) for record in records]
    else:
        listed = [Query(record["conversations"][0]["value"], [str(Path(data.data_folder) / record["image"])],
                        reference=record["conversations"][1]["value"]) for record in records]
    return InferenceConfig(
        model=model, tokenizer=data.tokenizer_path, image=data.image,
        generation=GenerationConfig(max_new_tokens=16 if stage == 1 else 24),
        template="plain" if stage == 1 else "vicuna_v1",
        queries=listed,
        source=str(out),
    )


def held_out_answers(out: Path, queries: int = 128, batch_size: int = 32) -> dict[str, list[str]]:
    """Greedy captions of the first ``queries`` held-out images, each with its own image and with another's.

    Returns ``references`` (the true captions), ``answers`` and ``answers_images_shuffled`` (each query given
    the image of another, in a fixed permutation), in query order. Needs a torch.distributed world of one.
    """
    import random

    from mm_plugin.inference.pipeline import LlavaPipeline

    config = demo_config(out, queries=queries, stage=1)
    pipe = LlavaPipeline.from_config(config, batch_size=batch_size)
    shuffled = [query.images for query in config.queries]
    random.Random(0).shuffle(shuffled)
    return {
        "references": [query.reference for query in config.queries],
        "answers": [answer.text for answer in pipe.answer(config.queries)],
        "answers_images_shuffled": [answer.text for answer in pipe.answer([Query("", images) for images in shuffled])],
    }


def held_out_chat(out: Path, queries: int = 128, batch_size: int = 32,
                  checkpoint_name: str = "stage2") -> dict[str, list[str]]:
    """The stage-2 model's (``OUT/checkpoints/CHECKPOINT_NAME``) greedy answers to the first question of
    ``queries`` held-out records: with the record's image, with another record's (a fixed permutation) and with
    none (the tag removed). Returns those three lists and the ``references``, in query order. Needs a
    torch.distributed world of one."""
    import random

    from mm_plugin.data.records import IMAGE_TAG
    from mm_plugin.inference.pipeline import LlavaPipeline

    config = demo_config(out, queries=queries, stage=2, checkpoint_name=checkpoint_name)
    pipe = LlavaPipeline.from_config(config, batch_size=batch_size)
    shuffled = [query.images for query in config.queries]
    random.Random(0).shuffle(shuffled)

    def answers(listed: list[Query]) -> list[str]:
        return [answer.text.strip() for answer in pipe.answer(listed)]

    return {
        "references": [query.reference for query in config.queries],
        "answers": answers(config.queries),
        "answers_images_shuffled": answers([Query(query.prompt, images)
                                            for query, images in zip(config.queries, shuffled)]),
        "answers_without_image": answers([Query(query.prompt.replace(IMAGE_TAG, "").strip(), [])
                                          for query in config.queries]),
    }


def attribute_accuracy(answers: list[str], references: list[str]) -> dict[str, float]:
    """How often the first colour, shape and position an answer names are its reference caption's."""
    from mm_plugin.data.synthetic import named_in

    pairs = [(named_in(answer), named_in(reference)) for answer, reference in zip(answers, references)]
    return {attribute: sum(said[attribute] == true[attribute] for said, true in pairs) / len(pairs)
            for attribute in ("colour", "shape", "position")}
