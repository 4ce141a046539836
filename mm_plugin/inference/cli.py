"""``mm-infer`` / ``launch/inference.py``: answer questions about images, printing answers as they are generated.

    mm-infer --mm-model examples/llava1.5/inference_llava.json
    mm-infer --hf-dir llava-1.5-7b-hf --image view.jpg --prompt "What is in the picture?"
    mm-infer --demo                       # after `bash examples/llava1.5/pretrain_llava1_5.sh --demo`
                                          # (or finetune_llava1_5.sh --demo: the stage-2 model, vicuna_v1)
    torchrun --nproc-per-node 2 launch/inference.py --mm-model inference_llava.json --tensor-model-parallel-size 2

Queries come from the JSON's ``image_path``/``prompts``, or from ``--image``/``--prompt`` (each repeatable,
paired as in the JSON; ``--image a.jpg,b.jpg`` gives one prompt two images). Answers print in order,
each streamed token by token while a batch is generated. The exit status is 1 when a query failed (its
error is printed; the others are answered). MindSpeed-MM's ``inference_llava1_5.sh`` arguments are
accepted: those that apply here are used, the others are checked or ignored as listed in ``--help``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
from pathlib import Path
from typing import Optional, Sequence

from mm_plugin.data.errors import DataError
from mm_plugin.inference.config import Query, load_inference_config, queries
from mm_plugin.inference.demo import demo_config
from mm_plugin.inference.prompts import TEMPLATES
from mm_plugin.safe_io import UnsafeFileError, WeightFileError
from mm_plugin.checkpoint.reading import CheckpointError

DEMO_DIR = "demo_out"
"""Where ``bash examples/llava1.5/pretrain_llava1_5.sh --demo`` writes (its ``DEMO_DIR``)."""

# MindSpeed-MM's inference_llava1_5.sh passes Megatron arguments that the JSON already settles here.
_IGNORED_WITH_VALUE = ("--global-batch-size", "--seq-length", "--tokenizer-type", "--vocab-size",
                       "--position-embedding-type", "--normalization", "--distributed-backend", "--num-layers",
                       "--hidden-size", "--num-attention-heads", "--max-position-embeddings", "--attention-dropout",
                       "--hidden-dropout", "--lr", "--train-iters", "--lr-decay-style", "--weight-decay",
                       "--lr-warmup-fraction", "--clip-grad", "--adam-beta1", "--adam-beta2", "--log-interval",
                       "--save-interval", "--eval-interval", "--eval-iters")
_IGNORED_FLAGS = ("--no-masked-softmax-fusion", "--no-gradient-accumulation-fusion", "--no-load-optim",
                  "--no-load-rng", "--no-save-optim", "--no-save-rng")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mm-infer", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_argument_group("model (one of)")
    source.add_argument("--mm-model", "--config", dest="config", help="inference JSON (MindSpeed-MM's inference_llava.json)")
    source.add_argument("--hf-dir", help="a Hugging Face llava-1.5-7b-hf style directory (converted on first use)")
    source.add_argument("--demo", nargs="?", const=DEMO_DIR, metavar="DIR",
                        help=f"the demos' output (default {DEMO_DIR}): held-out synthetic images, captioned by the "
                             "stage-1 model or questioned (vicuna_v1) by the stage-2 model")
    source.add_argument("--demo-stage", type=int, choices=(1, 2), default=None,
                        help="which demo model --demo uses (default: stage 2 when finetune_llava1_5.sh --demo has run)")
    query = parser.add_argument_group("queries (default: the JSON's image_path and prompts)")
    query.add_argument("--image", action="append", help="image path(s) of one query, comma-separated; repeatable")
    query.add_argument("--prompt", action="append", help="a question; repeatable")
    query.add_argument("--template", choices=TEMPLATES, help="prompt format (default: the JSON's, else vicuna_v1)")
    generation = parser.add_argument_group("generation (default: the JSON's generation_config; greedy)")
    generation.add_argument("--max-new-tokens", type=int)
    generation.add_argument("--do-sample", action="store_true", default=None)
    generation.add_argument("--temperature", type=float)
    generation.add_argument("--top-k", type=int)
    generation.add_argument("--top-p", type=float)
    generation.add_argument("--repetition-penalty", type=float)
    generation.add_argument("--seed", type=int)
    run = parser.add_argument_group("run")
    run.add_argument("--tensor-model-parallel-size", type=int, default=1)
    run.add_argument("--pipeline-model-parallel-size", type=int, default=1, help="must be 1")
    run.add_argument("--context-parallel-size", type=int, default=1, help="must be 1")
    run.add_argument("--batch-size", "--micro-batch-size", dest="batch_size", type=int, default=8,
                     help="queries generated together")
    run.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), help="overrides the JSON's dtype")
    run.add_argument("--fp16", action="store_const", const="fp16", dest="dtype")
    run.add_argument("--bf16", action="store_const", const="bf16", dest="dtype")
    run.add_argument("--img-h", type=int, help="checked against the model's image size")
    run.add_argument("--img-w", type=int, help="checked against the model's image size")
    run.add_argument("--patch-dim", type=int, help="checked against the model's patch size")
    run.add_argument("--dynamic-decode", action="store_true",
                     help="decode without static steps (on CUDA they are the default: fixed buffers replayed as a "
                          "CUDA graph, the same tokens with fewer launches)")
    run.add_argument("--output-json", type=Path, help="also write the answers here")
    ignored = parser.add_argument_group(
        "accepted from MindSpeed-MM's script and ignored (the JSON decides)",
        " ".join(_IGNORED_WITH_VALUE + _IGNORED_FLAGS))
    for name in _IGNORED_WITH_VALUE:
        ignored.add_argument(name, help=argparse.SUPPRESS)
    for name in _IGNORED_FLAGS:
        ignored.add_argument(name, action="store_true", help=argparse.SUPPRESS)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    try:
        pipe, work, template = _setup(args)
    except (ValueError, OSError, DataError, WeightFileError, UnsafeFileError, CheckpointError) as error:  # configuration, paths, weights
        print(f"mm-infer: {error}", file=sys.stderr)
        return 2
    import torch.distributed

    printing = torch.distributed.get_rank() == 0
    printer = _OrderedPrinter(work, sys.stdout if printing else None)
    for event in pipe.stream_answers(work, template, **_generation_overrides(args)):
        printer.event(event)
    answers = printer.answers
    if args.output_json and printing:
        args.output_json.write_text(json.dumps([dataclasses.asdict(a) for a in answers], indent=2) + "\n")
    return 1 if any(a.error for a in answers) else 0


def _setup(args):
    from mm_plugin.inference.pipeline import LlavaPipeline

    if (args.pipeline_model_parallel_size, args.context_parallel_size) != (1, 1):
        raise ValueError("inference runs with pipeline and context parallel size 1 (use tensor parallelism)")
    sources = [name for name in ("config", "hf_dir", "demo") if getattr(args, name)]
    if len(sources) != 1:
        raise ValueError("give exactly one of --mm-model, --hf-dir, --demo")
    run = dict(tensor_parallel=args.tensor_model_parallel_size, dtype=args.dtype, batch_size=args.batch_size)
    if args.hf_dir:
        pipe, work = LlavaPipeline.from_pretrained(args.hf_dir, **run), []
    else:
        config = load_inference_config(args.config) if args.config else demo_config(Path(args.demo),
                                                                                    stage=args.demo_stage)
        pipe, work = LlavaPipeline.from_config(config, **run), config.queries
    if args.prompt:
        images = [entry.split(",") for entry in args.image] if args.image else None
        work = queries(images, args.prompt, str, "command line")
    elif args.image:
        raise ValueError("--image needs --prompt (use --prompt '' for the plain template)")
    if not work:
        raise ValueError("nothing to answer: give --prompt (and --image), or prompts in the JSON")
    _check_image_geometry(args, pipe.model.llava_config)
    if args.dynamic_decode:
        pipe.static_decode = False
    return pipe, work, args.template


def _check_image_geometry(args, config) -> None:
    vision = config.vision
    for name, given, expected in (("--img-h", args.img_h, vision.image_size), ("--img-w", args.img_w, vision.image_size),
                                  ("--patch-dim", args.patch_dim, vision.patch_size)):
        if given is not None and given != expected:
            raise ValueError(f"{name} {given}, but the model's vision tower takes {expected}")


def _generation_overrides(args) -> dict:
    fields = ("max_new_tokens", "do_sample", "temperature", "top_k", "top_p", "repetition_penalty", "seed")
    return {name: getattr(args, name) for name in fields if getattr(args, name) is not None}


ECHOED_PROMPT_CHARACTERS = 300


def _echoed(prompt: str) -> str:
    """The prompt as the console repeats it: a long one (a pasted document, a runaway script) is cut short,
    so the answer stays on screen; ``--output-json`` keeps it whole."""
    if len(prompt) <= ECHOED_PROMPT_CHARACTERS:
        return prompt
    return f"{prompt[:ECHOED_PROMPT_CHARACTERS]}... [{len(prompt) - ECHOED_PROMPT_CHARACTERS} more characters]"


class _OrderedPrinter:
    """Prints answers in query order while a batch generates them together: the first unfinished answer
    streams live, the others are held until it is their turn."""

    def __init__(self, work: Sequence[Query], stream):
        from mm_plugin.inference.pipeline import Answer

        self.work, self.stream = work, stream
        self.answers = [Answer(q.prompt, [str(image) for image in q.images]) for q in work]
        self.current, self.started = 0, False

    def event(self, event) -> None:
        self.answers[event.index].add(event)
        if event.index == self.current:
            self._show_current(event.text)
            while self.current < len(self.answers) and self.answers[self.current].finish_reason:
                self._end_current()

    def _show_current(self, text: str) -> None:
        if not self.started:
            self._write(self._header(self.current))
            self.started = True
        self._write(text)

    def _end_current(self) -> None:
        answer = self.answers[self.current]
        if not self.started:
            self._write(self._header(self.current) + answer.text)
        reference = self.work[self.current].reference
        self._write(f"\n  [error] {answer.error}\n" if answer.error else "\n")
        if reference is not None:
            self._write(f"   (reference: {reference})\n")
        self.current, self.started = self.current + 1, False
        if self.current < len(self.answers) and self.answers[self.current].text:
            self._show_current(self.answers[self.current].text)

    def _header(self, index: int) -> str:
        answer = self.answers[index]
        images = f" {', '.join(answer.images)}" if answer.images else ""
        question = f"Q: {_echoed(answer.prompt)}\n" if answer.prompt else ""  # none with the plain template: a caption
        return f"[{index + 1}/{len(self.answers)}]{images}\n{question}A: "

    def _write(self, text: str) -> None:
        if self.stream is not None:
            self.stream.write(text)
            self.stream.flush()


if __name__ == "__main__":
    sys.exit(main())
