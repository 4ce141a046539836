"""The embedded default: a miniature of the real LLaVA-1.5 flow that runs on a CPU in minutes.

``bash examples/llava1.5/pretrain_llava1_5.sh --demo`` calls these steps between its ``mm-data`` and
``torchrun launch/pretrain.py`` commands:

    prepare OUT [--seed N]  synthetic LLaVA-Pretrain-layout data (train, held-out, a text-only copy task) with
                       a sentencepiece tokenizer; a tiny CLIP that has learnt the training pictures, written as
                       OUT/weights/converted_clip.pt (as a user's converted CLIP); model.json files for the two
                       training runs
    export-lm CKPT OUT write the language model the text-only run trained as OUT/weights/converted_vicuna.pt
                       (as a user's converted Vicuna)
    evaluate OUT       the evidence that stage 1 learned from the pictures: held-out caption loss with the
                       right images, with the images shuffled among samples, and of the language model alone;
                       how often held-out captions name the right colour, shape and position (evaluation.json)

``bash examples/llava1.5/finetune_llava1_5.sh --demo`` goes on to stage 2:

    prepare-stage2 OUT synthetic instruction data about the same kind of pictures (questions on colour, shape and
                       position, several rounds, a fifth text-only), train and held-out, with stage 1's tokenizer;
                       OUT/model_stage2.json (language model and projector train)
    evaluate-stage2 OUT exact-match answers to held-out first questions with the right image, another sample's
                       image and no image (evaluation_stage2.json; --checkpoint stage2-lora: the LoRA demo's,
                       evaluation_stage2-lora.json)

Both frozen parts first learn what a real LLaVA's parts bring: the vision tower to see the pictures
(demo_vision.py), the language model language *and in-context copying* from the text-only run (captions
after a hint made of their words). A model trained on bare captions cannot learn to use the image: its
words are independent, so it never learns to read its context, and stage 1 would only mute the image.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Optional, Sequence

import torch

from mm_plugin.config.names import LANGUAGE, PROJECTOR, VISION

logger = logging.getLogger(__name__)

IMAGE_SIZE, PATCH_SIZE = 56, 14
TRAIN_RECORDS, HELDOUT_RECORDS, TEXT_RECORDS = 4000, 256, 6000
INSTRUCT_RECORDS, INSTRUCT_HELDOUT_RECORDS = 4000, 256
SEQ_LENGTH = 64
STAGE2_SEQ_LENGTH = 256
"""Stage 2's packed rows: the vicuna_v1 frame makes a sample 60 to 200 positions long."""


def _vision_config() -> dict:
    return {"model_id": "clip", "num_layers": 3, "select_layer": -2, "hidden_size": 64, "num_attention_heads": 4,
            "ffn_hidden_size": 128, "patch_size": PATCH_SIZE, "image_size": IMAGE_SIZE, "params_dtype": "fp32",
            "freeze": True, "ckpt_path": "weights/converted_clip.pt"}


def model_json(vocab_size: int, *, language_ckpt: Optional[str], train_language: bool,
               train_projector: Optional[bool] = None, max_sequence_length: int = 128) -> dict:
    """A tiny LLaVA in MindSpeed-MM's model.json layout (paths relative to the file); the projector trains
    when the language model does not, unless ``train_projector`` says."""
    if train_projector is None:
        train_projector = not train_language
    return {
        "model_id": "llava",
        LANGUAGE.json_key: {"num_layers": 2, "hidden_size": 64, "num_attention_heads": 4, "num_query_groups": 2,
                            "ffn_hidden_size": 160, "language_vocab_size": vocab_size,
                            "language_max_sequence_length": max_sequence_length, "layernorm_epsilon": 1e-6,
                            "params_dtype": "fp32", "freeze": not train_language, "ckpt_path": language_ckpt},
        "image_encoder": {
            VISION.json_key: _vision_config(),
            PROJECTOR.json_key: {"model_id": "mlp", "input_size": 64, "hidden_size": 64, "ffn_hidden_size": 64,
                                 "params_dtype": "fp32", "freeze": not train_projector, "ckpt_path": None},
        },
        "text_encoder": None, "video_encoder": None,
    }


def _synth(out: Path, kind: str, num: int, seed: int, tokenizer: Optional[Path] = None) -> None:
    from mm_plugin.data.synthetic import synthesize

    synthesize(out, num, kind=kind, seed=seed, image_size=IMAGE_SIZE, patch_size=PATCH_SIZE, tokenizer=tokenizer)
    print(f"wrote {num} {kind} records to {out}")


def write_random_clip(path: Path, seed: int = 0) -> None:
    """A tiny CLIP vision tower with random weights, converted from Hugging Face's layout to a part file."""
    from mm_plugin.training.demo_vision import build_clip, save_clip

    vision = _vision_config()
    save_clip(build_clip(vision, IMAGE_SIZE, PATCH_SIZE, seed), vision, path)


def write_seeing_clip(path: Path, data_json: Path, seed: int) -> None:
    """The tiny CLIP after it has learnt the synthetic pictures of ``data_json`` (see demo_vision.py)."""
    from mm_plugin.training.demo_vision import build_clip, save_clip, teach_to_see

    vision = _vision_config()
    model = build_clip(vision, IMAGE_SIZE, PATCH_SIZE, seed)
    accuracy = teach_to_see(model, vision["select_layer"], data_json, seed)
    save_clip(model, vision, path)
    print(f"the vision tower learnt the training pictures (shapes of its last batch named {100 * accuracy:.0f}%)")


def prepare(out: Path, seed: int = 0) -> None:
    """Data, tokenizer, the vision tower's part file and both model.json files; ``seed`` varies all of them."""
    from mm_plugin.data.tokenization import load_tokenizer
    from mm_plugin.safe_io import write_text

    _synth(out / "data" / "train", "pretrain", TRAIN_RECORDS, seed=3 * seed)
    tokenizer = out / "data" / "train" / "tokenizer"
    _synth(out / "data" / "heldout", "pretrain", HELDOUT_RECORDS, seed=3 * seed + 1, tokenizer=tokenizer)
    _synth(out / "data" / "text", "text", TEXT_RECORDS, seed=3 * seed + 2, tokenizer=tokenizer)
    vocab = len(load_tokenizer(tokenizer))
    write_seeing_clip(out / "weights" / "converted_clip.pt", out / "data" / "train" / "data.json", seed)
    write_text(out / "model_lm.json",
               json.dumps(model_json(vocab, language_ckpt=None, train_language=True), indent=2) + "\n")
    write_text(out / "model.json", json.dumps(
        model_json(vocab, language_ckpt="weights/converted_vicuna.pt", train_language=False), indent=2) + "\n")
    print(f"demo inputs ready in {out}: data/{{train,heldout,text}}, weights/converted_clip.pt, "
          f"model_lm.json, model.json (vocabulary {vocab})")


def prepare_stage2(out: Path, seed: int = 0) -> None:
    """Instruction data (train and held-out) with stage 1's tokenizer, and OUT/model_stage2.json."""
    from mm_plugin.data.tokenization import load_tokenizer
    from mm_plugin.safe_io import write_text

    tokenizer = out / "data" / "train" / "tokenizer"
    if not (out / "checkpoints" / "stage1").is_dir() or not tokenizer.is_dir():
        raise SystemExit(f"{out} holds no stage-1 demo: run `bash examples/llava1.5/pretrain_llava1_5.sh --demo` first")
    _synth(out / "data" / "instruct", "instruct", INSTRUCT_RECORDS, seed=1000 + 2 * seed, tokenizer=tokenizer)
    _synth(out / "data" / "instruct_heldout", "instruct", INSTRUCT_HELDOUT_RECORDS, seed=1001 + 2 * seed,
           tokenizer=tokenizer)
    vocab = len(load_tokenizer(tokenizer))
    write_text(out / "model_stage2.json", json.dumps(
        model_json(vocab, language_ckpt="weights/converted_vicuna.pt", train_language=True, train_projector=True,
                   max_sequence_length=STAGE2_SEQ_LENGTH), indent=2) + "\n")
    print(f"stage-2 inputs ready in {out}: data/{{instruct,instruct_heldout}}, model_stage2.json")


def export_language_model(checkpoint: Path, output: Path) -> None:
    """The trained decoder of a training checkpoint as a TP=1 part file (what `mm-convert llm` writes)."""
    from mm_plugin.parallel.world import join_world, set_model_parallel
    from mm_plugin.safe_io import save_state
    from mm_plugin.models.loading import read_model_tensors

    join_world()
    set_model_parallel(1, 1)
    tensors = read_model_tensors(checkpoint)
    prefix = LANGUAGE.module_prefix
    part = {key[len(prefix):]: tensor for key, tensor in tensors.items() if key.startswith(prefix)}
    if not part:
        raise SystemExit(f"{checkpoint}: holds no language-model weights")
    save_state(part, output)
    print(f"wrote {output}: {len(part)} tensors of the text-only run's language model")


def main(argv: Optional[Sequence[str]] = None) -> int:
    from mm_plugin.console import quiet_third_party_warnings

    quiet_third_party_warnings()  # before megatron-core is imported

    parser = argparse.ArgumentParser(prog="python -m mm_plugin.training.demo")
    commands = parser.add_subparsers(dest="command", required=True)
    prepare_parser = commands.add_parser("prepare")
    prepare_parser.add_argument("out", type=Path)
    prepare_parser.add_argument("--seed", type=int, default=0, help="varies the data sets and the vision tower")
    export = commands.add_parser("export-lm")
    export.add_argument("checkpoint", type=Path)
    export.add_argument("output", type=Path)
    commands.add_parser("evaluate").add_argument("out", type=Path)
    stage2 = commands.add_parser("prepare-stage2")
    stage2.add_argument("out", type=Path)
    stage2.add_argument("--seed", type=int, default=0, help="varies the instruction data")
    evaluate_stage2_parser = commands.add_parser("evaluate-stage2")
    evaluate_stage2_parser.add_argument("out", type=Path)
    evaluate_stage2_parser.add_argument("--checkpoint", default="stage2",
                                        help="the stage-2 checkpoint's folder under OUT/checkpoints")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    if args.command == "prepare":
        prepare(args.out, args.seed)
    elif args.command == "export-lm":
        export_language_model(args.checkpoint, args.output)
    elif args.command == "prepare-stage2":
        prepare_stage2(args.out, args.seed)
    elif args.command == "evaluate":
        from mm_plugin.training.demo_evaluation import evaluate

        evaluate(args.out)
    else:
        from mm_plugin.training.demo_evaluation import evaluate_stage2

        evaluate_stage2(args.out, args.checkpoint)
    return 0


if __name__ == "__main__":
    sys.exit(main())
