"""mm-convert: from the files users download to the files model.json's ckpt_path points to, and back.

    mm-convert clip      --input ViT-L-14-336px.pt   --output converted_clip.pt
    mm-convert llm       --input vicuna-7b-v1.5/     --output converted_vicuna.pt
    mm-convert projector --input mm_projector.bin    --output mlp.pt
    mm-convert llava-hf  --input llava-1.5-7b-hf/    --output llava-1.5-7b-mm/
    mm-convert export-hf --input llava-1.5-7b-mm/ [--load CHECKPOINT_DIR] --output llava-hf-out/
    mm-convert export-hf --input model.json --load LORA_CHECKPOINT_DIR --peft --output llava-lora-peft/
    mm-convert llava-lora --input llava-v1.5-7b-lora/ --model model.json --output lora-checkpoint/

Bad input ends with one paragraph naming the file, the key and what was expected, and exit status 2;
nothing is left under the output name.
"""

from __future__ import annotations

import argparse
import sys
import traceback
from typing import Optional, Sequence

from mm_plugin.config.model import ModelConfigError
from mm_plugin.convert import commands
from mm_plugin.convert.errors import ConversionError
from mm_plugin.config.names import TORCH_DTYPES
from mm_plugin.safe_io import UnsafeFileError, WeightFileError

INPUT_ERRORS = (ConversionError, ModelConfigError, WeightFileError, UnsafeFileError, OSError)


# What each command takes, as downloaded (the --help text).
DESCRIPTIONS = {
    "clip": """\
CLIP ViT vision tower -> converted_clip.pt
The whole tower is written, ln_post included when the input has it. --input is any of:
  ViT-L-14-336px.pt         OpenAI's download, a TorchScript archive: its tensors are read, its code never
                            run; the published file's sha256 is checked
  a .pt state dict          OpenAI layout (visual.*), as clip.load(..., jit=False).state_dict() gives
  Megatron output           clip_converter.py's state_dict_tp_N.pt folder (any TP, with or without
                            --use-te names), a converted_clip.pt, or an iter_*/mp_rank_*/model_optim_rng.pt
  clip-vit-large-patch14-336/  a Hugging Face CLIP directory (model.safetensors or pytorch_model.bin)""",
    "llm": """\
LLaMA / Vicuna -> converted_vicuna.pt
megatron-core's names, QKV rows grouped per query group, linear_fc1 = [gate; up]. --input is any of:
  vicuna-7b-v1.5/           a Hugging Face directory: config.json plus model.safetensors, pytorch_model.bin, or
                            their shards with the index JSON
  a Megatron save folder    legacy Megatron-LM / ModelLink checkpoint (language_model.encoder... names), as
                            ModelLink's convert_ckpt.py --saver megatron writes it: the folder with
                            latest_checkpointed_iteration.txt, an iter_* folder, or a model_optim_rng.pt""",
    "projector": """\
LLaVA projector -> mlp.pt
encoder.linear_fc1/2.* (encoder.* for a linear projector). --input is any of:
  mm_projector.bin          the original LLaVA's (model.mm_projector.0/2.*; linear: model.mm_projector.*)
  llava-1.5-7b-hf/          a Hugging Face LLaVA directory (its multi_modal_projector)""",
    "llava-hf": """\
Hugging Face LLaVA -> part files, model.json and tokenizer
A folder with converted_clip.pt, mlp.pt, converted_vicuna.pt, model.json (ckpt_paths relative to it),
tokenizer/ (tokenizer and processor files, as they were) and hf_config.json. --input is any of:
  llava-1.5-7b-hf/          the hub's layout (vision_tower.vision_model.*) or transformers 5's own
  llava-v1.5-7b/            the original LLaVA layout (model.mm_projector.*): the vision tower is inside
                            (model.vision_tower.*) or given with --vision (e.g. clip-vit-large-patch14-336/)""",
    "export-hf": """\
our model (+ trained weights) -> Hugging Face LLaVA directory
LlavaForConditionalGeneration.from_pretrained and AutoProcessor.from_pretrained load the output (sharded
safetensors with its index). --input is a folder `llava-hf` wrote (tokenizer and config carried over,
tensors bit-identical), or any model.json with its parts (then --tokenizer names the tokenizer, e.g.
vicuna-7b-v1.5/; LLaVA's <image> token is added to it). --load lays the weights of a training checkpoint
over the parts'. A LoRA checkpoint's adapters are merged into the weights, or, with --peft, written as a
PEFT adapter folder (adapter_config.json, adapter_model.safetensors: the fused q/k/v and gate/up adapters
split exactly into q_proj, k_proj, v_proj, gate_proj, up_proj; the trained projector as modules_to_save) for
the export of the same --input without --load, the un-merged base:
  PeftModel.from_pretrained(LlavaForConditionalGeneration.from_pretrained(BASE), OUTPUT)""",
    "llava-lora": """\
original LLaVA's LoRA output -> a checkpoint directory as our LoRA runs save it
--input is the folder LLaVA's finetune_lora.sh wrote (e.g. llava-v1.5-7b-lora/): adapter_config.json,
adapter_model.bin (or .safetensors) with PEFT's names (base_model.model.model.layers.N.self_attn.q_proj.
lora_A.weight ...) and non_lora_trainables.bin (the projector: ...model.mm_projector.0/2.*); a PEFT folder
for Hugging Face's LLaVA (multi_modal_projector as modules_to_save, e.g. export-hf --peft's) is read too.
--model is the base's model.json: text_decoder.ckpt_path the part file the adapters were trained on
(mm-convert llm of vicuna-7b-v1.5), the vision tower's and projector's shapes. The q, k, v (and gate, up)
adapters are fused exactly into ours: rank 3 r (alpha 3 alpha, the same scaling), the others padded to it.
The output loads as a LoRA run's checkpoint: --load / --finetune, a ckpt_path, export-hf --load.""",
}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mm-convert", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="Each command's --help lists the inputs it accepts. Guide: docs/convert.md")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error")
    commands_parser = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, dtype: bool = True) -> argparse.ArgumentParser:
        sub = commands_parser.add_parser(name, help=DESCRIPTIONS[name].split("\n")[0], description=DESCRIPTIONS[name],
                                         formatter_class=argparse.RawDescriptionHelpFormatter)
        sub.add_argument("--input", required=True, help="what to convert (see above)")
        sub.add_argument("--output", required=True, help="where to write it")
        if dtype:  # a checkpoint keeps the dtypes its model.json gives
            sub.add_argument("--dtype", choices=list(TORCH_DTYPES),
                             help="convert every tensor to this dtype (default: keep)")
        sub.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")
        return sub

    for name in ("clip", "llm", "projector", "llava-hf"):
        sub = command(name)
        sub.add_argument("--safetensors", action="store_true", help="write .safetensors instead of .pt")
    commands_parser.choices["llava-hf"].add_argument(
        "--vision", help="the CLIP of an original LLaVA checkpoint without its tower (any `clip` input)")
    sub = command("export-hf")
    sub.add_argument("--load", help="training checkpoint directory whose weights replace the parts' own")
    sub.add_argument("--tokenizer", help="tokenizer directory (default: the tokenizer/ folder beside model.json)")
    sub.add_argument("--max-shard-size", default="5GB", help="largest safetensors shard (default 5GB)")
    sub.add_argument("--peft", action="store_true",
                     help="write --load's LoRA adapters (and projector) as a PEFT adapter folder instead of merging")
    sub.add_argument("--base-model", help="with --peft: the base_model_name_or_path to record (the folder or hub id "
                                          "of the base's export, the same --input without --load)")
    sub = command("llava-lora", dtype=False)
    sub.add_argument("--model", required=True, help="the base model's model.json (or a folder `llava-hf` wrote)")
    return parser


def _run(args: argparse.Namespace) -> commands.Summary:
    if args.command == "llava-lora":
        return commands.import_llava_lora(args.input, args.output, model=args.model, progress=args.progress)
    common = dict(dtype=args.dtype, progress=args.progress)
    if args.command == "clip":
        return commands.convert_clip(args.input, args.output, safetensors=args.safetensors, **common)
    if args.command == "llm":
        return commands.convert_llm(args.input, args.output, safetensors=args.safetensors, **common)
    if args.command == "projector":
        return commands.convert_projector(args.input, args.output, safetensors=args.safetensors, **common)
    if args.command == "llava-hf":
        return commands.import_llava_hf(args.input, args.output, vision=args.vision, safetensors=args.safetensors,
                                        **common)
    if args.peft:
        return commands.export_peft(args.input, args.output, load=args.load, base_model=args.base_model, **common)
    return commands.export_hf(args.input, args.output, load=args.load, tokenizer=args.tokenizer,
                              max_shard_size=args.max_shard_size, **common)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = _parser().parse_args(argv)
    try:
        summary = _run(args)
    except INPUT_ERRORS as error:
        return _fail(args, f"error: {error}", 2)
    except KeyboardInterrupt:
        return _fail(args, "interrupted; nothing was written under the output name", 130)
    except Exception as error:  # a bug: still one paragraph, the traceback on request
        return _fail(args, f"internal error ({type(error).__name__}: {error}); nothing was written under the output "
                           "name. Rerun with --debug for the traceback and report it.", 1)
    print(summary.render())
    return 0


def _fail(args: argparse.Namespace, message: str, status: int) -> int:
    if args.debug:
        traceback.print_exc()
    print(f"mm-convert {args.command}: {message}", file=sys.stderr)
    return status


if __name__ == "__main__":
    sys.exit(main())
