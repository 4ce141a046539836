"""LoRA adapters between our checkpoints and PEFT's adapter folders, both ways exact.

Ours sit on the fused layers: one adapter on ``linear_qkv`` (q, k and v) and one on ``linear_fc1`` (gate and
up), ``A`` reading the layer's input, ``B`` writing all of its output rows. PEFT's sit on Hugging Face LLaMA's
projections, one each (``q_proj`` ... ``down_proj``):

* out (``export-hf --peft``): each projection of a fused layer gets the fused ``A`` and its own rows of ``B``:
  ``B A`` restricted to a projection's rows is that projection's update, so nothing changes;
* in (``llava-lora``: original LLaVA's ``finetune_lora.sh`` output, or any PEFT folder for a LLaVA): the
  projections of a fused layer have ``A`` s of their own, so the fused adapter stacks them (``A`` one above the
  other, ``B`` block-diagonal: each projection's rows read only its own ``A``), a rank of (projections x r) with
  alpha grown with it (the same scaling). ``text_decoder.lora`` has one rank for every target, so the adapters
  with fewer projections get zero rows and columns up to it.

The output layer's adapter (``output_layer``) is PEFT's on ``lm_head``, one module both ways (its ``B`` has the
real vocabulary's rows: a checkpoint's padding rows are dropped, as the weight's).
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from pathlib import Path
from typing import Mapping, Optional

import torch

from mm_plugin.config.model import LORA_TARGETS, LlavaConfig, LoraConfig
from mm_plugin.config.names import LANGUAGE, PROJECTOR, is_adapter
from mm_plugin.convert.errors import ConversionError
from mm_plugin.models.hf_keys import (HF_LM_HEAD, KeyRule, PartDims, hf_candidates, part_dims, part_keys,
                                      projector_part)
from mm_plugin.safe_io import load_state

PEFT_PREFIX = "base_model.model."
"""Where PEFT's names put the model it wraps (``PeftModel.base_model.model``)."""
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
"""What PEFT's save_pretrained writes: safetensors since PEFT 0.7, a pickle before (original LLaVA's)."""
NON_LORA_TRAINABLES = "non_lora_trainables.bin"
"""Original LLaVA's file of the other weights a LoRA run trained (the projector)."""
HF_PROJECTOR_MODULE = "multi_modal_projector"
# Where a LoRA adapter folder may hold the language model's layers and the projector, after PEFT_PREFIX:
# transformers 5's LlavaForConditionalGeneration, transformers 4's, original LLaVA's LlavaLlamaForCausalLM.
_LANGUAGE_MODULES = ("model.language_model.", "language_model.model.", "model.")
_PROJECTOR_MODULES = (("model.multi_modal_projector.", "hf"), ("multi_modal_projector.", "hf"),
                      ("model.mm_projector.", "llava"))
_LM_HEAD_BASE = tuple(PEFT_PREFIX + key.replace(".weight", ".base_layer.weight") for key in HF_LM_HEAD)
"""What PEFT saves beside an adapter on ``lm_head`` (``save_embedding_layers``): the base's own weight."""
_ADAPTER_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<matrix>[AB])\.weight$")


def _adapted_rules(num_layers: int) -> list[KeyRule]:
    """The language model's table rows (Hugging Face layout) that an adapter can sit on."""
    return [rule for rule in part_keys("language", num_layers) if rule.ours.split(".")[-2] in LORA_TARGETS]


def _target(rule: KeyRule) -> str:
    return rule.ours.split(".")[-2]


def _projection(source_key: str) -> str:
    """``model.layers.3.self_attn.q_proj.weight`` -> ``q_proj``."""
    return source_key.split(".")[-2]


def _projection_shapes(rule: KeyRule, dims: PartDims) -> list[tuple[int, ...]]:
    """The Hugging Face weight shape of each projection of a row, from the table's split of our shape."""
    fused = torch.empty(rule.shape(dims), device="meta")
    return [tuple(part.shape) for part in rule.from_ours(dims.attention, fused)]


# --- out: a PEFT adapter folder ---------------------------------------------------------------------

@dataclasses.dataclass
class PeftAdapter:
    """A LoRA checkpoint's trained tensors as PEFT's ``adapter_model.safetensors`` and ``adapter_config.json``,
    for ``PeftModel.from_pretrained(LlavaForConditionalGeneration, folder)`` in transformers 5."""

    tensors: dict[str, torch.Tensor]
    config: dict
    notes: list[str]

    @classmethod
    def build(cls, config: LlavaConfig, model_json: Path, trained: Mapping[str, torch.Tensor], trained_from: str,
              base_model: Optional[str]) -> "PeftAdapter":
        lora = config.language.lora
        if not any(is_adapter(key) for key in trained):
            raise ConversionError(f"{trained_from} holds no LoRA adapters: a PEFT folder carries adapters; export "
                                  "it without --peft (a full model)")
        if lora is None:
            raise ConversionError(f"{trained_from} holds LoRA adapters but {model_json} has no text_decoder.lora: "
                                  "pass the model.json the run was trained with (rank, alpha and dropout are needed)")
        dims = part_dims(config, "language")
        language, projector = LANGUAGE.module_prefix, PROJECTOR.module_prefix
        tensors, used, targeted = {}, set(), []
        for rule in _adapted_rules(dims.num_layers):
            adapter = language + rule.ours.removesuffix("weight")
            if adapter + "lora_A.weight" not in trained:
                continue
            lora_A, lora_B = trained[adapter + "lora_A.weight"], trained[adapter + "lora_B.weight"]
            used |= {adapter + "lora_A.weight", adapter + "lora_B.weight"}
            for source, rows in zip(rule.source, rule.from_ours(dims.attention, lora_B)):
                module = PEFT_PREFIX + hf_candidates("language", source)[0].removesuffix(".weight")
                tensors[f"{module}.lora_A.weight"], tensors[f"{module}.lora_B.weight"] = lora_A, rows
                if _projection(source) not in targeted:
                    targeted.append(_projection(source))
        for rule in part_keys("projector", 0):
            if projector + rule.ours in trained:
                (source,) = rule.source
                tensors[PEFT_PREFIX + hf_candidates("projector", source)[0]] = trained[projector + rule.ours]
                used.add(projector + rule.ours)
        rest = sorted(set(trained) - used)
        if rest:
            raise ConversionError(f"{trained_from} also trained {', '.join(rest[:3])}{'...' if len(rest) > 3 else ''}, "
                                  "which a PEFT adapter folder does not carry (only the adapters and the projector); "
                                  "export the merged model instead (without --peft)")
        modules_to_save = [HF_PROJECTOR_MODULE] if any(key.startswith(projector) for key in used) else None
        adapter_config = {
            "peft_type": "LORA", "task_type": None, "base_model_name_or_path": base_model,
            "r": lora.rank, "lora_alpha": lora.alpha, "lora_dropout": lora.dropout,
            # A pattern, not a list of names: the CLIP tower has q_proj, k_proj and v_proj too.
            "target_modules": _target_pattern(targeted),
            "modules_to_save": modules_to_save, "bias": "none", "fan_in_fan_out": False, "use_rslora": False,
            "use_dora": False, "init_lora_weights": True, "inference_mode": True, "rank_pattern": {},
            "alpha_pattern": {},
        }
        notes = [f"PEFT adapters on {', '.join(targeted)} (q/k/v and gate/up split from the fused adapters, "
                 "exactly: each gets the shared A and its rows of B)"]
        if modules_to_save:
            notes.append("the trained projector is saved whole (modules_to_save: multi_modal_projector)")
        if base_model is None:
            notes.append("base_model_name_or_path is empty: load the base yourself (the export of the same "
                         "model.json without --load) and PeftModel.from_pretrained(base, this folder); or pass "
                         "--base-model")
        return cls(tensors, adapter_config, notes)

    def config_json(self) -> str:
        return json.dumps(self.config, indent=2, sort_keys=True) + "\n"


def _target_pattern(targeted: list[str]) -> str:
    """PEFT's ``target_modules`` for these projections: a pattern, not a list of names, since the CLIP tower has
    q_proj, k_proj and v_proj too; ``lm_head`` is the top-level module of that name."""
    layers = [name for name in targeted if name != "lm_head"]
    patterns = [rf".*language_model\..*\.({'|'.join(layers)})"] if layers else []
    return "|".join(patterns + (["lm_head"] if "lm_head" in targeted else []))


# --- in: original LLaVA's LoRA output (or a PEFT folder for a LLaVA) --------------------------------

@dataclasses.dataclass
class ImportedAdapters:
    """Our LoRA configuration and the trained tensors (our full-model names) of a PEFT adapter folder."""

    lora: LoraConfig
    tensors: dict[str, torch.Tensor]
    inputs: list[Path]
    notes: list[str]

    @property
    def has_projector(self) -> bool:
        return any(key.startswith(PROJECTOR.module_prefix) for key in self.tensors)


def read_adapter_folder(folder: Path, config: LlavaConfig) -> ImportedAdapters:
    """A folder with ``adapter_config.json``, ``adapter_model.bin`` (or ``.safetensors``) and, from original
    LLaVA, ``non_lora_trainables.bin``, checked against ``config`` (the base model) -> our adapters."""
    settings_file = folder / ADAPTER_CONFIG
    if not settings_file.is_file():
        raise ConversionError(f"{folder}: no {ADAPTER_CONFIG}; pass the folder LLaVA's finetune_lora.sh (or PEFT's "
                              "save_pretrained) wrote")
    try:
        settings = json.loads(settings_file.read_text())
    except (OSError, ValueError) as error:
        raise ConversionError(f"{settings_file}: not readable JSON ({error})") from error
    rank, scaling = _check_settings(settings, settings_file)
    weights_file = next((folder / name for name in ADAPTER_WEIGHTS if (folder / name).is_file()), None)
    if weights_file is None:
        raise ConversionError(f"{folder}: no {' or '.join(ADAPTER_WEIGHTS)} beside {ADAPTER_CONFIG}")
    inputs = [settings_file, weights_file]
    extra_file = folder / NON_LORA_TRAINABLES
    if extra_file.is_file():
        inputs.append(extra_file)
    adapters, projector, base_copies = {}, {}, []
    for path in inputs[1:]:
        for key, tensor in load_state(path).items():
            if key in _LM_HEAD_BASE:
                base_copies.append(key)
            else:
                _sort(key, tensor, path, adapters, projector)
    dims = part_dims(config, "language")
    tensors, lora, notes = _fused(adapters, weights_file, dims, rank, scaling, settings.get("lora_dropout", 0.0))
    if base_copies:
        notes.append(f"{', '.join(base_copies)} (the base's own lm_head, which PEFT saves beside an lm_head adapter) "
                     f"is not read: the output layer's weight stays the base's ({config.language.ckpt_path})")
    tensors.update(_projector(projector, config))
    if not projector:
        notes.append(f"{folder} holds no projector: the base's ({config.projector.ckpt_path}) stays, frozen")
    return ImportedAdapters(lora, tensors, inputs, notes)


def _check_settings(settings: dict, path: Path) -> tuple[int, float]:
    """(r, scaling) of a PEFT LoRA configuration whose adapters ours can hold exactly."""
    if settings.get("peft_type") != "LORA":
        raise ConversionError(f"{path}: peft_type {settings.get('peft_type')!r}; only LoRA adapters (LORA) are read")
    unsupported = [(name, settings[name]) for name in ("rank_pattern", "alpha_pattern", "layers_to_transform")
                   if settings.get(name)]
    unsupported += [(name, settings[name]) for name in ("use_dora", "fan_in_fan_out") if settings.get(name)]
    if settings.get("bias", "none") != "none":
        unsupported.append(("bias", settings["bias"]))
    if unsupported:
        name, value = unsupported[0]
        raise ConversionError(f"{path}: {name} = {value!r}; the adapters here have one rank and alpha for every layer, "
                              "no DoRA and no trained biases: merge this adapter into its model with PEFT "
                              "(merge_and_unload) and convert the merged model instead")
    rank, alpha = settings.get("r"), settings.get("lora_alpha")
    if not isinstance(rank, int) or rank < 1 or not isinstance(alpha, (int, float)) or alpha <= 0:
        raise ConversionError(f"{path}: r = {rank!r}, lora_alpha = {alpha!r}; expected a positive whole r and alpha")
    return rank, alpha / (math.sqrt(rank) if settings.get("use_rslora") else rank)


def _sort(key: str, tensor: torch.Tensor, path: Path, adapters: dict, projector: dict) -> None:
    """One tensor of an adapter folder, by its PEFT name: an adapter (``model.layers.N...`` : A or B) or a
    projector weight (``(layout, key)``); anything else is refused."""
    name = key.removeprefix(PEFT_PREFIX)
    match = _ADAPTER_KEY.match(name)
    if match:
        module = match.group("module")
        prefix = next((prefix for prefix in _LANGUAGE_MODULES if module.startswith(prefix + "layers.")), None)
        if prefix is not None:
            adapters[("model." + module[len(prefix):] + ".weight", match.group("matrix"))] = (tensor, key, path)
            return
        if module + ".weight" in HF_LM_HEAD:
            adapters[(HF_LM_HEAD[0], match.group("matrix"))] = (tensor, key, path)
            return
    else:
        for prefix, layout in _PROJECTOR_MODULES:
            if name.startswith(prefix):
                projector[(layout, name[len(prefix):])] = (tensor, key, path)
                return
    raise ConversionError(f"{path}: {key!r} is neither a LoRA adapter of the language model's layers or lm_head "
                          f"nor a projector weight (expected names such as {PEFT_PREFIX}model.layers.0.self_attn."
                          f"q_proj.lora_A.weight or {PEFT_PREFIX}model.mm_projector.0.weight); only such a LLaVA LoRA "
                          "run is read")


def _fused(adapters: dict, path: Path, dims: PartDims, rank: int, scaling: float,
           dropout: float) -> tuple[dict[str, torch.Tensor], LoraConfig, list[str]]:
    """Our fused adapters (full-model names) of the per-projection ones, and their configuration."""
    rules = _adapted_rules(dims.num_layers)
    present = {target: [] for target in LORA_TARGETS}  # the projections of each target the file adapts, in order
    for rule in rules:
        for source in rule.source:
            if (source, "A") in adapters and _projection(source) not in present[_target(rule)]:
                present[_target(rule)].append(_projection(source))
    width = max((len(projections) for projections in present.values()), default=0)
    if not width:
        raise ConversionError(f"{path}: no LoRA adapters of the language model's layers")
    fused_rank = rank * width
    tensors, used = {}, set()
    for rule in rules:
        projections = present[_target(rule)]
        if not projections:
            continue
        shapes = _projection_shapes(rule, dims)
        lora_A = torch.zeros(fused_rank, shapes[0][1])
        blocks = []
        for source, shape in zip(rule.source, shapes):
            block = torch.zeros(shape[0], fused_rank)
            if _projection(source) in projections:
                slot = projections.index(_projection(source))
                a, b = (_matrix(adapters, source, matrix, path, expected) for matrix, expected in
                        (("A", (rank, shape[1])), ("B", (shape[0], rank))))
                lora_A[slot * rank:(slot + 1) * rank] = a
                block[:, slot * rank:(slot + 1) * rank] = b
                used |= {(source, "A"), (source, "B")}
            blocks.append(block)
        adapter = LANGUAGE.module_prefix + rule.ours.removesuffix("weight")
        tensors[adapter + "lora_A.weight"] = lora_A
        tensors[adapter + "lora_B.weight"] = rule.to_ours(dims.attention, *blocks)
    rest = sorted(set(adapters) - used)
    if rest:
        source, matrix = rest[0]
        raise ConversionError(f"{adapters[rest[0]][2]}: {adapters[rest[0]][1]!r}: no such adapted layer in a "
                              f"{dims.num_layers}-layer language model with these projections (its lora_"
                              f"{'B' if matrix == 'A' else 'A'} is missing, or the model.json describes another model)")
    targets = tuple(target for target in LORA_TARGETS if present.get(target))
    lora = LoraConfig(rank=fused_rank, alpha=scaling * fused_rank, dropout=dropout, targets=targets)
    notes = [f"adapters on {', '.join(p for target in targets for p in present[target])} (rank {rank}) fused into "
             f"ours on {', '.join(targets)}: text_decoder.lora rank {fused_rank}, alpha {lora.alpha:g} (the same "
             f"scaling, {scaling:g}), exact"]
    return tensors, lora, notes


def _matrix(adapters: dict, source: str, matrix: str, path: Path, expected: tuple[int, int]) -> torch.Tensor:
    found = adapters.get((source, matrix))
    if found is None:
        raise ConversionError(f"{path}: no {PEFT_PREFIX}{source.removesuffix('.weight')}.lora_{matrix}.weight, though "
                              f"the file adapts {_projection(source)} elsewhere; every layer needs the same adapters "
                              "(is the file complete?)")
    tensor, key, where = found
    if tuple(tensor.shape) != expected:
        rank_axis = 0 if matrix == "A" else 1
        wrong = [axis for axis in range(len(expected)) if tensor.dim() != 2 or tensor.shape[axis] != expected[axis]]
        reason = ("its rank differs from r in " + ADAPTER_CONFIG + " (ranks that differ between q/k/v, projections "
                  "or layers are not read: one rank for every adapter)") if wrong == [rank_axis] else \
            "the model.json describes another model"
        raise ConversionError(f"{where}: {key!r} has shape {tuple(tensor.shape)}, expected {expected}: {reason}")
    return tensor.float()


def _projector(projector: dict, config: LlavaConfig) -> dict[str, torch.Tensor]:
    """Our projector tensors (full-model names) of the folder's, which must be the whole projector."""
    if not projector:
        return {}
    (layout, _), (_, first_key, path) = next(iter(projector.items()))
    part = projector_part(config)
    if part != "projector" and not (part == "linear_projector" and layout == "llava"):
        raise ConversionError(f"{path}: holds projector weights ({first_key!r}), but the model.json's projector is "
                              f"{config.projector.projector_type!r}")
    dims = part_dims(config, part)
    tensors = {}
    for rule in part_keys(part, 0, layout):
        (source,) = rule.source
        if (layout, source) not in projector:
            raise ConversionError(f"{path}: no {source!r} of the projector ({layout} names), though it holds "
                                  f"{first_key!r}")
        tensor, key, where = projector.pop((layout, source))
        if tuple(tensor.shape) != rule.shape(dims):
            raise ConversionError(f"{where}: {key!r} has shape {tuple(tensor.shape)}; the model.json's projector "
                                  f"needs {rule.shape(dims)}")
        tensors[PROJECTOR.module_prefix + rule.ours] = tensor
    if projector:
        _, key, where = next(iter(projector.values()))
        raise ConversionError(f"{where}: {key!r} is not a weight of the model.json's projector")
    return tensors
