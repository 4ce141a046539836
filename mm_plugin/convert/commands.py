"""The conversions as functions: each plans every output tensor (checking the whole input) before it
writes anything, then streams through :mod:`mm_plugin.convert.pipeline`. The CLI is a thin layer over these."""

from __future__ import annotations

import copy
import hashlib
import json
import os
import time
from pathlib import Path
from typing import Iterator, Mapping, Optional, Union

import torch

from mm_plugin.config.model import LlavaConfig, load_model_config, to_mindspeed_json
from mm_plugin.convert import export, lora_adapters
from mm_plugin.convert.errors import ConversionError
from mm_plugin.convert.inputs import PartSource, clip_source, language_source, projector_source
from mm_plugin.convert.llava_inputs import llava_source
from mm_plugin.config.names import LANGUAGE, TORCH_DTYPES
from mm_plugin.convert.pipeline import (DTYPE_NAMES, Summary, WrittenFile, atomic_directory, copy_file, output_file,
                                        parse_size, rebase, refuse_overwriting_inputs, write_planned, write_sharded)
from mm_plugin.convert.plan import PartPlan, Planned, plan_part
from mm_plugin.models.hf_keys import OUR_PREFIXES
from mm_plugin.models.loading import adopt_checkpoint_lora
from mm_plugin.safe_io import write_text

PathLike = Union[str, os.PathLike]
# MindSpeed-MM's part file names (what its README's model.json ckpt_paths point to).
PART_FILES = {"vision": "converted_clip", "projector": "mlp", "linear_projector": "mlp", "language": "converted_vicuna"}


def torch_dtype(name: Optional[str]) -> Optional[torch.dtype]:
    if name is None:
        return None
    if name not in TORCH_DTYPES:
        raise ConversionError(f"dtype {name!r}: use one of {', '.join(TORCH_DTYPES)}")
    return TORCH_DTYPES[name]


def _plan(source: PartSource, dtype: Optional[str]) -> PartPlan:
    return plan_part(source.part, source.store, source.dims, source_layout=source.layout,
                     expected_from=source.expected_from, dtype=torch_dtype(dtype))


def _one_part(command: str, source: PartSource, output: PathLike, dtype: Optional[str], safetensors: bool,
              progress: bool, started: float) -> Summary:
    output = Path(output)
    if output.is_dir():  # as MindSpeed-MM's converters take a folder: its file names
        output = output / f"{PART_FILES[source.part]}.pt"
    path, fmt = output_file(output, safetensors)
    refuse_overwriting_inputs(path, source.store.files)
    plan = _plan(source, dtype)
    written = write_planned(path, plan.tensors, fmt, progress)
    return Summary(command, path, [source.description], [written], source.notes + plan.notes,
                   time.monotonic() - started)


def convert_clip(input: PathLike, output: PathLike, *, dtype: Optional[str] = None, safetensors: bool = False,
                 progress: bool = True) -> Summary:
    """OpenAI's ``ViT-L-14-336px.pt`` (TorchScript, sha256-checked) or state dict, Megatron's clip_converter
    output (any TP, with or without ``--use-te`` names) or a Hugging Face CLIP directory -> ``converted_clip.pt``
    (the whole tower, ``ln_post`` included when the input has it)."""
    started = time.monotonic()
    return _one_part("clip", clip_source(Path(input)), output, dtype, safetensors, progress, started)


def convert_llm(input: PathLike, output: PathLike, *, dtype: Optional[str] = None, safetensors: bool = False,
                progress: bool = True) -> Summary:
    """A Hugging Face LLaMA/Vicuna directory (sharded or not) or a legacy Megatron-LM/ModelLink checkpoint
    (``model_optim_rng.pt``, its iteration folder or its save directory) -> ``converted_vicuna.pt``."""
    started = time.monotonic()
    return _one_part("llm", language_source(Path(input)), output, dtype, safetensors, progress, started)


def convert_projector(input: PathLike, output: PathLike, *, dtype: Optional[str] = None, safetensors: bool = False,
                      progress: bool = True) -> Summary:
    """LLaVA's ``mm_projector.bin`` (MLP or linear), or a Hugging Face LLaVA's projector -> ``mlp.pt``."""
    started = time.monotonic()
    return _one_part("projector", projector_source(Path(input)), output, dtype, safetensors, progress, started)


def import_llava_hf(input: PathLike, output: PathLike, *, vision: Optional[PathLike] = None,
                    dtype: Optional[str] = None, safetensors: bool = False, progress: bool = True) -> Summary:
    """A ``llava-1.5-7b-hf`` style directory (or the original LLaVA layout, with ``vision`` when its tower is
    not inside) -> a directory with the three part files, a ``model.json`` whose ``ckpt_path``s are relative
    to it, ``tokenizer/`` (tokenizer and processor files, as they were) and ``hf_config.json``."""
    started = time.monotonic()
    source = llava_source(Path(input), Path(vision) if vision else None)
    plans = {part: _plan(part_source, dtype) for part, part_source in source.parts.items()}
    config = copy.deepcopy(source.config)
    suffix, fmt = (".safetensors", "safetensors") if safetensors else (".pt", "pt")
    output = Path(output)
    with atomic_directory(output) as staging:
        written = []
        for part, plan in plans.items():
            name = PART_FILES[part] + suffix
            written.append(write_planned(staging / name, plan.tensors, fmt, progress))
            section = _section(config, part)
            section.ckpt_path = name
            if written[-1].dtypes[0] in TORCH_DTYPES:
                section.params_dtype = written[-1].dtypes[0]
        write_text(staging / "model.json", json.dumps(to_mindspeed_json(config), indent=2) + "\n")
        for file in source.side_files:
            copy_file(file, staging / "tokenizer" / file.name)
        if source.hf_config is not None:
            copy_file(Path(input) / "config.json", staging / "hf_config.json")
        if source.generation_config is not None:
            copy_file(source.generation_config, staging / "generation_config.json")
        written = rebase(written, staging, output)
    notes = [note for plan in plans.values() for note in plan.notes]
    notes += [note for part_source in source.parts.values() for note in part_source.notes]
    if not source.side_files:
        notes.append(f"{input} has no tokenizer or processor files; none were carried over")
    inputs = sorted({part_source.description for part_source in source.parts.values()})
    return Summary("llava-hf", output, inputs, written, notes, time.monotonic() - started)


def _section(config: LlavaConfig, part: str):
    return {"vision": config.vision, "projector": config.projector, "linear_projector": config.projector,
            "language": config.language}[part]


def export_hf(input: PathLike, output: PathLike, *, load: Optional[PathLike] = None,
              trained: Optional[Mapping[str, torch.Tensor]] = None, tokenizer: Optional[PathLike] = None,
              dtype: Optional[str] = None, max_shard_size: str = "5GB", progress: bool = True) -> Summary:
    """Our parts (a directory ``llava-hf`` wrote, or a ``model.json``), optionally overlaid with trained
    weights (``load``: a training checkpoint directory; or ``trained``: full-model tensors by our names) ->
    a directory ``LlavaForConditionalGeneration.from_pretrained`` and ``AutoProcessor.from_pretrained`` load.

    Tokenizer and processor: ``tokenizer`` if given, else the ``tokenizer/`` folder beside the model.json.
    With the ``hf_config.json`` that ``llava-hf`` keeps, config and tokenizer files are carried over as they
    were; without it (e.g. a model trained from Vicuna and CLIP) the config is made from model.json and the
    tokenizer gets LLaVA's ``<image>`` (and a ``<pad>``) token, with embedding rows added for them."""
    started = time.monotonic()
    model_json = _model_json(input)
    config = load_model_config(str(model_json))
    if trained is None and load is not None:
        trained = export.read_trained(Path(load))
        adopt_checkpoint_lora(config, load)  # its scaling, whatever the model.json says
    model = export.ExportedModel.build(config, model_json, trained or {}, str(load) if load else "trained weights")
    tensors = model.plan(torch_dtype(dtype))
    side_files = export.hf_side_files(model, Path(tokenizer) if tokenizer else None)
    if side_files.rows:
        tensors = export.grow_vocabulary(tensors, side_files.rows)
    output = Path(output)
    with atomic_directory(output) as staging:
        written = write_sharded(staging, tensors, parse_size(max_shard_size), progress)
        side_files.write(staging, export.hf_dtype_name(tensors))
        written = rebase(written, staging, output)
    return Summary("export-hf", output, model.inputs, written, model.notes + side_files.notes,
                   time.monotonic() - started)


def _model_json(input: PathLike) -> Path:
    input = Path(input)
    model_json = input / "model.json" if input.is_dir() else input
    if not model_json.is_file():
        raise ConversionError(f"{input}: no model.json (pass a directory `mm-convert llava-hf` wrote, or a model.json)")
    return model_json


def export_peft(input: PathLike, output: PathLike, *, load: Optional[PathLike] = None,
                trained: Optional[Mapping[str, torch.Tensor]] = None, base_model: Optional[str] = None,
                dtype: Optional[str] = None, progress: bool = True) -> Summary:
    """A LoRA run's adapters and projector (``load``: its checkpoint directory; or ``trained``: full-model tensors
    by our names) -> a PEFT adapter folder (``adapter_config.json``, ``adapter_model.safetensors``) for the
    Hugging Face export of the model.json's parts, the un-merged base (``export_hf`` without ``load``):
    ``PeftModel.from_pretrained(base, output)``. ``base_model`` is written as its base_model_name_or_path."""
    started = time.monotonic()
    model_json = _model_json(input)
    config = load_model_config(str(model_json))
    export.check_hf_projector(config, model_json)
    if trained is None:
        if load is None:
            raise ConversionError("a PEFT adapter folder is made of a LoRA run's checkpoint: pass --load")
        trained = export.read_trained(Path(load))
        adopt_checkpoint_lora(config, load)  # its scaling, whatever the model.json says
    trained_from = str(load) if load else "trained weights"
    adapter = lora_adapters.PeftAdapter.build(config, model_json, trained, trained_from, base_model)
    tensors = [Planned(key, tuple(tensor.shape), torch_dtype(dtype) or tensor.dtype,
                       lambda tensor=tensor: tensor.to(torch_dtype(dtype) or tensor.dtype), (Path(trained_from),))
               for key, tensor in adapter.tensors.items()]
    output = Path(output)
    with atomic_directory(output) as staging:
        written = [write_planned(staging / lora_adapters.ADAPTER_WEIGHTS[0], tensors, "safetensors", progress)]
        write_text(staging / lora_adapters.ADAPTER_CONFIG, adapter.config_json())
        written = rebase(written, staging, output)
    return Summary("export-hf --peft", output, [trained_from], written, adapter.notes, time.monotonic() - started)


def import_llava_lora(input: PathLike, output: PathLike, *, model: PathLike, progress: bool = True) -> Summary:
    """Original LLaVA's LoRA output (``finetune_lora.sh``: ``adapter_config.json``, ``adapter_model.bin``,
    ``non_lora_trainables.bin``), or a PEFT adapter folder for a LLaVA, on the base model ``model`` (a
    model.json whose text_decoder.ckpt_path is the part file the adapters were trained on) -> a checkpoint
    directory as our LoRA runs save it: ``--load`` it, name it as a ``ckpt_path``, or ``export-hf --load`` it."""
    started = time.monotonic()
    model_json = _model_json(model)
    config = load_model_config(str(model_json))
    base = config.language.ckpt_path
    if not base or not Path(base).is_file():
        raise ConversionError(f"{model_json}: text_decoder.ckpt_path {base!r} is not a part file; the adapters need "
                              "the language model they were trained on (e.g. `mm-convert llm --input vicuna-7b-v1.5/`)")
    output = Path(output)
    if output.exists() and (not output.is_dir() or any(output.iterdir())):
        raise ConversionError(f"{output}: already exists and is not an empty directory; choose a new output directory")
    imported = lora_adapters.read_adapter_folder(Path(input), config)
    config.language.lora, config.language.freeze = imported.lora, False
    if not imported.has_projector:
        config.projector.freeze = True
    config.validate()
    directory = export.write_trained(config, model_json, imported.tensors, output)
    tensors = imported.tensors.values()
    written = [WrittenFile(directory, "dist_checkpointing", len(tensors), sum(t.nbytes for t in tensors),
                           sorted({DTYPE_NAMES.get(t.dtype, str(t.dtype)) for t in tensors}))]
    lora = json.dumps(to_mindspeed_json(config)[LANGUAGE.json_key]["lora"])
    notes = imported.notes + [f"base weights: {base} (saved in the checkpoint's configuration, as a LoRA run saves "
                              f"them); its text_decoder.lora: {lora}"]
    return Summary("llava-lora", output, [str(path) for path in imported.inputs], written, notes,
                   time.monotonic() - started)


# --- on-the-fly use -------------------------------------------------------------------------------

def read_llava_hf(input: PathLike, dtype: Optional[str] = None,
                  vision: Optional[PathLike] = None) -> tuple[LlavaConfig, Iterator[tuple[str, torch.Tensor]]]:
    """A Hugging Face (or original) LLaVA directory as our config and a stream of our full-model tensors
    (``vision_model.*``, ``vision_projection.*``, ``language_model.*``; the whole vision tower), one at a
    time, checked as the converter checks them — to load a model without writing part files."""
    source = llava_source(Path(input), Path(vision) if vision else None)
    plans = {part: _plan(part_source, dtype) for part, part_source in source.parts.items()}

    def tensors() -> Iterator[tuple[str, torch.Tensor]]:
        for part, plan in plans.items():
            for planned in plan.tensors:
                yield OUR_PREFIXES[part] + planned.key, planned.make()

    return source.config, tensors()


def converted_llava(input: PathLike, cache_dir: Optional[PathLike] = None, dtype: Optional[str] = None,
                    progress: bool = False) -> Path:
    """The ``model.json`` of ``input`` (a Hugging Face LLaVA directory) converted once into ``cache_dir``
    (default ``$MM_PLUGIN_CACHE`` or ``~/.cache/mm_plugin``), keyed by the input's config, weight index and
    file sizes; later calls (and other ranks) reuse it."""
    input = Path(input).resolve()
    cache = Path(cache_dir or os.environ.get("MM_PLUGIN_CACHE") or Path.home() / ".cache" / "mm_plugin") / "converted"
    target = cache / f"{input.name}-{_fingerprint(input, dtype)}"
    if not (target / "model.json").is_file():
        try:
            import_llava_hf(input, target, dtype=dtype, progress=progress)
        except (ConversionError, OSError):  # the output folder exists: another process may have finished it
            if not (target / "model.json").is_file():
                raise
    return target / "model.json"


def _fingerprint(directory: Path, dtype: Optional[str]) -> str:
    digest = hashlib.sha256(str(dtype).encode())
    for file in sorted(directory.iterdir()):
        if file.is_file():
            digest.update(f"{file.name}:{file.stat().st_size}".encode())
            if file.suffix == ".json":
                digest.update(file.read_bytes())
    return digest.hexdigest()[:16]

