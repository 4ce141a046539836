"""``mm-data``: synthesize a data set, check one, prebuild its index, or show what a sample trains on.

    mm-data synth --out DIR --num N [--kind pretrain|instruct|instruct-mix|text] [--seed S] [--image-size PX]
    mm-data check --data-path JSON --data-folder DIR [--workers N] [--tokenizer DIR] [--template plain]
    mm-data check --config data.json [--workers N]
    mm-data index --data-path JSON [--cache-dir DIR]
    mm-data show  --config data.json [--first K] [--model-max-length L] [--image-tokens N]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

from .errors import DataError


def _synth(args: argparse.Namespace) -> int:
    from .synthetic import synthesize

    started = time.perf_counter()
    config = synthesize(args.out, args.num, kind=args.kind, seed=args.seed, image_size=args.image_size,
                        patch_size=args.patch_size, tokenizer=args.tokenizer, workers=args.workers)
    print(f"wrote {args.num} {args.kind} records to {args.out} in {time.perf_counter() - started:.1f}s; "
          f"data config: {config}")
    return 0


def _dataset_from_args(args: argparse.Namespace):
    from .config import DataConfig, ImagePreprocessConfig, load_data_config
    from .dataset import LlavaDataset
    from .images import ImageProcessor
    from .index import RecordIndex
    from .tokenization import get_template, load_tokenizer

    if args.config:
        config = load_data_config(args.config)
    else:
        if not (args.data_path and args.data_folder):
            raise DataError("give --config data.json, or --data-path and --data-folder")
        config = DataConfig(data_path=args.data_path, data_folder=args.data_folder, template=args.template or "plain",
                            image=ImagePreprocessConfig())
    data_path = args.data_path or config.data_path
    data_folder = args.data_folder or config.data_folder
    template = args.template or config.template
    tokenizer_path = args.tokenizer or config.tokenizer_path
    tokenizer = load_tokenizer(tokenizer_path) if tokenizer_path else None
    model_max_length = args.model_max_length or config.model_max_length or 2048
    crop = config.image.crop_height
    image_tokens = args.image_tokens or (crop // args.patch_size) ** 2
    dataset = LlavaDataset(RecordIndex.open(data_path, config.index_cache_dir), data_folder, get_template(template),
                           ImageProcessor(config.image), tokenizer=tokenizer, image_tokens=image_tokens,
                           model_max_length=model_max_length)
    return dataset, config


def _check(args: argparse.Namespace) -> int:
    from ..safe_io import write_text
    from .check import check_dataset, format_report

    dataset, config = _dataset_from_args(args)
    max_bad = args.max_bad_fraction if args.max_bad_fraction is not None else config.max_bad_fraction
    report = check_dataset(dataset, workers=args.workers, max_bad_fraction=max_bad, progress=not args.quiet)
    print(format_report(report))
    target = Path(args.report) if args.report else Path.cwd() / f"{dataset.index.source.stem}.check.json"
    write_text(target, json.dumps(report, indent=2) + "\n")
    print(f"report: {target}")
    return 0 if report["fit_to_train"] else 1


def _index(args: argparse.Namespace) -> int:
    from .index import RecordIndex

    started = time.perf_counter()
    index = RecordIndex.open(args.data_path, args.cache_dir)
    print(f"{len(index)} records ({index.layout}); index {index.index_path} ready in "
          f"{time.perf_counter() - started:.1f}s")
    return 0


def _show(args: argparse.Namespace) -> int:
    from .tokenization import IGNORE_INDEX, IMAGE_TOKEN_INDEX

    dataset, _ = _dataset_from_args(args)
    if dataset.encoder is None:
        raise DataError("show needs a tokenizer: --tokenizer DIR or tokenizer_config.from_pretrained in data.json")
    tokenizer = dataset.encoder.tokenizer
    for position in range(min(args.first, len(dataset))):
        sample = dataset[position]
        for reason, message in sample["bad"]:
            print(f"(replaced) {message}")
        pieces = []
        for token, label in zip(sample["input_ids"].tolist(), sample["labels"].tolist()):
            text = "<IMAGE>" if token == IMAGE_TOKEN_INDEX else tokenizer.convert_ids_to_tokens(token)
            text = text.replace("\n", "\\n")
            pieces.append(text if label == IGNORE_INDEX else f"[{text}]")
        print(f"--- {sample['id']}: {len(sample['input_ids'])} tokens, images {tuple(sample['images'].shape)}; "
              "[trained]")
        print(" ".join(pieces))
    return 0


def _parser() -> argparse.ArgumentParser:
    from .synthetic import KINDS

    parser = argparse.ArgumentParser(prog="mm-data", description="LLaVA data sets: synthesize, check, index, show.")
    commands = parser.add_subparsers(dest="command", required=True)

    synth = commands.add_parser("synth", help="write a learnable synthetic data set in LLaVA's layout")
    synth.add_argument("--out", required=True, help="output folder")
    synth.add_argument("--num", type=int, required=True, help="number of records")
    synth.add_argument("--kind", choices=KINDS, default="pretrain",
                       help="instruct-mix: the layout of llava_v1_5_mix665k.json (sub-folders, text-only records)")
    synth.add_argument("--seed", type=int, default=0)
    synth.add_argument("--image-size", type=int, default=336, help="the vision model's input size (crop size)")
    synth.add_argument("--patch-size", type=int, default=14, help="its patch size (sets the text kind's hint length)")
    synth.add_argument("--tokenizer", help="reuse this tokenizer folder instead of training one")
    synth.add_argument("--workers", type=int, help="processes drawing images (default: up to 8 CPUs)")
    synth.set_defaults(run=_synth)

    def dataset_options(command: argparse.ArgumentParser) -> None:
        command.add_argument("--config", help="a data.json (MindSpeed-MM layout); the options below override it")
        command.add_argument("--data-path", help="the LLaVA JSON file")
        command.add_argument("--data-folder", help="folder the image paths are relative to")
        command.add_argument("--tokenizer", help="Hugging Face tokenizer folder (for token statistics)")
        command.add_argument("--template", choices=("plain", "llava-plain", "vicuna_v1", "lm"),
                             help="default: the config's, else plain")
        command.add_argument("--model-max-length", type=int, help="default: the config's, else 2048")
        command.add_argument("--image-tokens", type=int, help="decoder positions per image (default (crop/patch)^2)")
        command.add_argument("--patch-size", type=int, default=14)

    check = commands.add_parser("check", help="scan a data set and report whether it is fit to train")
    dataset_options(check)
    check.add_argument("--workers", type=int, default=None, help="processes (default: all CPUs, up to 16)")
    check.add_argument("--report", help="JSON report path (default ./<data file stem>.check.json)")
    check.add_argument("--max-bad-fraction", type=float, help="default: the config's, else 0.01")
    check.add_argument("--quiet", action="store_true", help="no progress bar")
    check.set_defaults(run=_check)

    index = commands.add_parser("index", help="build the shared record index ahead of training")
    index.add_argument("--data-path", required=True)
    index.add_argument("--cache-dir", help="default: beside the JSON, or the user cache if that is read-only")
    index.set_defaults(run=_index)

    show = commands.add_parser("show", help="print samples as tokens, [trained] ones in brackets")
    dataset_options(show)
    show.add_argument("--first", type=int, default=3, help="how many samples")
    show.set_defaults(run=_show)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = _parser().parse_args(argv)
    if getattr(args, "workers", 0) is None and args.command == "check":
        from .check import default_workers

        args.workers = default_workers()
    try:
        return args.run(args)
    except DataError as error:
        print(f"mm-data {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
