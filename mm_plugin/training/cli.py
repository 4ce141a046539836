"""``mm-pretrain`` / ``torchrun launch/pretrain.py``: LLaVA-1.5 pretraining.

Uses Megatron-LM's stock ``megatron.training.pretrain`` when a Megatron-LM checkout is importable (as
on Ascend, next to MindSpeed), otherwise this package's loop with the same signature. Configuration
mistakes stop the run before any compute with one clear message (exit code 2).
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import os
import sys
from pathlib import Path
from typing import Optional, Sequence

from mm_plugin.console import quiet_third_party_warnings

logger = logging.getLogger("mm_plugin.pretrain")

DEMO_HINT = ("; to try the whole pipeline without downloaded weights or data, run "
             "`bash examples/llava1.5/pretrain_llava1_5.sh --demo`")


def configure_logging() -> None:
    rank = int(os.environ.get("RANK", 0))
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format=f"[%(asctime)s rank {rank}] %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    quiet_third_party_warnings()
    # megatron-core logs its whole DDP/optimizer configuration and bucket layout at INFO.
    logging.getLogger("megatron").setLevel(logging.WARNING)


def check_inputs(args: argparse.Namespace, model_config, data_config) -> None:
    """Everything that can be checked without a model: files exist, sizes agree."""
    from mm_plugin.config.model import ModelConfigError
    from mm_plugin.data.errors import DataError
    from mm_plugin.models.loading import check_part_paths
    from mm_plugin.training.arguments import ARCHITECTURE_FLAGS

    check_part_paths(model_config, hint=DEMO_HINT)
    for what, path in (("data_path", data_config.data_path), ("data_folder", data_config.data_folder),
                       ("tokenizer_config.from_pretrained", data_config.tokenizer_path)):
        if not path or not Path(path).exists():
            raise DataError(f"{args.mm_data}: {what} {path!r} does not exist{DEMO_HINT}")
    language = model_config.language
    for flag, field in ARCHITECTURE_FLAGS.items():
        given = getattr(args, flag[2:].replace("-", "_"))
        defined = getattr(language, field, None)
        if defined is None:  # dropouts live among the TransformerConfig fields (default 0)
            defined = language.transformer_overrides.get(field, 0.0)
        if given is not None and given != defined:
            raise ModelConfigError(f"{flag} {given:g} but {args.mm_model} gives text_decoder {field} {defined:g}; "
                                   "model.json defines the model: drop the flag or make them agree")
    if args.seq_length > model_config.language.max_sequence_length:
        raise ModelConfigError(f"--seq-length {args.seq_length} exceeds {args.mm_model}'s "
                               f"max_sequence_length {model_config.language.max_sequence_length}")


def run(argv: Optional[Sequence[str]] = None):
    import mm_plugin  # noqa: F401  (patches)
    from mm_plugin.config.model import load_model_config
    from mm_plugin.data.config import load_data_config
    from mm_plugin.training.arguments import parse_args
    from mm_plugin.training.providers import bind

    megatron_lm = importlib.util.find_spec("megatron.training") is not None
    args = parse_args(argv, allow_unknown=megatron_lm)
    model_config = load_model_config(args.mm_model)
    data_config = load_data_config(args.mm_data)
    check_inputs(args, model_config, data_config)
    providers = bind(args, model_config, data_config)
    from megatron.core.enums import ModelType

    if megatron_lm:
        return _run_megatron_lm(args, model_config, data_config, providers, ModelType.encoder_or_decoder)
    from mm_plugin.training.loop import pretrain

    return pretrain(providers.datasets_provider, providers.model_provider, ModelType.encoder_or_decoder,
                    providers.forward_step, args=args, stats=providers.stats, settings=providers.settings)


def _run_megatron_lm(args, model_config, data_config, providers, model_type):
    """Megatron-LM's own pretrain(), given our three functions and our flags as its extra arguments."""
    from megatron.training import get_args, pretrain

    from mm_plugin.config.model import to_mindspeed_json
    from mm_plugin.data.errors import DataError
    from mm_plugin.training.arguments import ArgumentError, build_parser

    if providers.settings.sequence_packing:
        raise ArgumentError("sequence packing runs in mm_plugin's own loop: a packed step has as many micro-batches "
                            "as its rows need, and Megatron-LM's pretrain() takes a fixed number; take Megatron-LM "
                            "off PYTHONPATH, or turn packing off")
    ours = build_parser()
    has_validation = data_config.has_validation

    def add_our_flags(parser):
        known = {option for action in parser._actions for option in action.option_strings}
        group = parser.add_argument_group("mm_plugin")
        for action in ours._actions:
            if action.option_strings and not set(action.option_strings) & known:
                group._add_action(action)
        if not has_validation:  # Megatron-LM validates every --eval-interval unless --eval-iters is 0
            parser.set_defaults(eval_iters=0)
        return parser

    def datasets(num_samples):
        if not has_validation and get_args().eval_iters > 0:
            raise DataError(f"--eval-iters {get_args().eval_iters}, but {args.mm_data} names no validation "
                            "data: set valid_data_path or valid_fraction, or drop --eval-iters")
        return providers.datasets_provider(num_samples, consumed_samples=get_args().consumed_train_samples)

    language = model_config.language
    # Megatron-LM wants a tokenizer of its own, a save interval with --save and an eval interval: the data's
    # tokenizer is data.json's, so it gets a stand-in of the model's vocabulary; without --save-interval it
    # saves at the end of training only, and without --eval-interval it validates there only. Its checkpoints
    # keep its arguments: mm_model_config among them makes them readable without the model.json at hand.
    defaults = dict(dataloader_type="external", num_layers=language.num_layers, hidden_size=language.hidden_size,
                    num_attention_heads=language.num_attention_heads, max_position_embeddings=language.max_sequence_length,
                    tokenizer_type="NullTokenizer", vocab_size=language.vocab_size, save_interval=sys.maxsize,
                    eval_interval=sys.maxsize, mm_model_config=to_mindspeed_json(model_config))
    logger.info("Megatron-LM found: running its pretrain() with mm_plugin's providers")
    return pretrain(datasets, providers.model_provider, model_type, providers.forward_step,
                    extra_args_provider=add_our_flags, args_defaults=defaults)


def main(argv: Optional[Sequence[str]] = None) -> int:
    configure_logging()
    from mm_plugin.config.model import ModelConfigError
    from mm_plugin.data.errors import DataError
    from mm_plugin.parallel import FullStateDictError
    from mm_plugin.safe_io import UnsafeFileError, WeightFileError
    from mm_plugin.training.arguments import ArgumentError
    from mm_plugin.checkpoint.reading import CheckpointError
    from mm_plugin.training.loop import TrainingStopped

    try:
        run(argv)
    except (ModelConfigError, DataError, ArgumentError, CheckpointError, FullStateDictError, UnsafeFileError,
            WeightFileError, TrainingStopped) as error:
        if int(os.environ.get("RANK", 0)) == 0:
            print(f"mm-pretrain: error: {error}", file=sys.stderr, flush=True)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
