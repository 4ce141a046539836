"""Where each tensor of a tensor- and pipeline-parallel megatron-core module sits in the full state dict.

The full state dict is the one a TP=1, PP=1 model has. On this rank a tensor is either whole (norms,
row-parallel biases) or a slice along its tensor-parallel dimension, read from megatron's own parameter
attributes (``tensor_model_parallel``, ``partition_dim``, ``partition_stride``), falling back to the
layer type where megatron skipped them (``perform_initialization=False`` leaves weights unmarked).
Three layouts need more than a contiguous slice:

* ``linear_fc1`` of a gated MLP is ``[gate; up]``: each rank holds its slice of each half (stride 2;
  megatron-core 0.12 marks it stride 1, so it is decided from the MLP's config instead);
* vocabulary tables (the word embeddings, the output layer) are padded so that every rank holds the
  same number of rows: rows past the full table's end are padding;
* ``linear_qkv`` is grouped per query group (each group's q heads, then its k and v), so a contiguous
  slice is whole query groups — no special case, as long as the full dict uses that grouping.

Pipeline stages hold some of the layers: a transformer layer's global ``layer_number`` (1-based) maps
its local key ``...layers.i`` to the full key ``...layers.<layer_number - 1>``, in any block of the
module tree (the language model's decoder, a vision tower).
"""

from __future__ import annotations

import dataclasses
from typing import Iterable, Optional, Union

import torch

ModelChunks = Union[torch.nn.Module, Iterable[torch.nn.Module]]


@dataclasses.dataclass(frozen=True)
class Placement:
    """One tensor of this rank's module and where it sits in the full state dict."""

    full_key: str  # the key in the full (TP=1, PP=1) state dict
    tensor: torch.Tensor  # the module's parameter or buffer (copied into in place)
    dim: Optional[int]  # tensor-parallel partition dimension; None: every TP rank holds all of it
    stride: int = 1  # blocks along `dim`, each split over the TP ranks ([gate; up]: 2)
    vocab: bool = False  # a vocabulary table: the full tensor may have fewer rows (padding)

    def full_shape(self, tp_size: int) -> tuple[int, ...]:
        """The full tensor's shape for this module at this TP size (a vocabulary table's padded rows included)."""
        shape = list(self.tensor.shape)
        if self.dim is not None:
            shape[self.dim] *= tp_size
        return tuple(shape)

    def pieces(self, tp_size: int, tp_rank: int, full_length: int) -> list[tuple[slice, slice]]:
        """``(local range, full range)`` pairs along ``dim`` for this rank; local rows in no pair are padding."""
        block = self.tensor.shape[self.dim] // self.stride
        pairs = []
        for index in range(self.stride):
            start = (index * tp_size + tp_rank) * block
            stop = min(start + block, full_length)
            if stop > start:
                pairs.append((slice(index * block, index * block + stop - start), slice(start, stop)))
        return pairs


def unwrap(module: torch.nn.Module) -> torch.nn.Module:
    """The model inside megatron's DDP / Float16Module wrappers."""
    from megatron.core.distributed import DistributedDataParallel
    from megatron.core.transformer.module import Float16Module

    while isinstance(module, (DistributedDataParallel, Float16Module)):
        module = module.module
    return module


def from_every_rank(value) -> list:
    """``value`` from every rank, in rank order (just this one's without torch.distributed). Collective."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return [value]
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, value)
    return gathered


def tensor_parallel_group() -> tuple[int, int, Optional[object]]:
    """``(size, rank, group)`` of this rank's tensor-parallel group; ``(1, 0, None)`` without model parallelism."""
    from megatron.core import parallel_state

    if not parallel_state.model_parallel_is_initialized():
        return 1, 0, None
    return (parallel_state.get_tensor_model_parallel_world_size(),
            parallel_state.get_tensor_model_parallel_rank(),
            parallel_state.get_tensor_model_parallel_group())


@dataclasses.dataclass
class _Structure:
    """What the module tree says about its state-dict keys (keys are full module paths + tensor name)."""

    layer_paths: dict = dataclasses.field(default_factory=dict)  # "decoder.layers.0." -> "decoder.layers.2."
    layer_dims: dict = dataclasses.field(default_factory=dict)  # key -> partition dim by layer type
    vocab_keys: set = dataclasses.field(default_factory=set)
    gated_keys: set = dataclasses.field(default_factory=set)
    tied_keys: dict = dataclasses.field(default_factory=dict)  # output layer on a later stage -> embedding


def _structure(model: torch.nn.Module) -> _Structure:
    from megatron.core.models.common.language_module.language_module import LanguageModule
    from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding
    from megatron.core.transformer.mlp import MLP
    from megatron.core.transformer.transformer_layer import BaseTransformerLayer

    found = _Structure()
    for name, module in model.named_modules():
        path = f"{name}." if name else ""
        parent, _, index = name.rpartition(".")
        if isinstance(module, BaseTransformerLayer) and index.isdigit():
            found.layer_paths[path] = f"{parent}.{module.layer_number - 1}."
        if isinstance(module, (ColumnParallelLinear, VocabParallelEmbedding)):
            found.layer_dims.update({f"{path}weight": 0, f"{path}bias": 0})
        elif isinstance(module, RowParallelLinear):
            found.layer_dims[f"{path}weight"] = 1
        if isinstance(module, VocabParallelEmbedding):
            found.vocab_keys.add(f"{path}weight")
        if isinstance(module, LanguageModule) and getattr(module, "post_process", False):
            found.vocab_keys.add(f"{path}output_layer.weight")
            if hasattr(module.output_layer, "lora_B"):  # its adapter's B has a row per token too (models.lora)
                found.vocab_keys.add(f"{path}output_layer.lora_B.weight")
            if module.share_embeddings_and_output_weights and not module.pre_process:
                found.tied_keys[f"{path}output_layer.weight"] = f"{path}embedding.word_embeddings.weight"
        if isinstance(module, MLP) and module.config.gated_linear_unit:
            found.gated_keys.update({f"{path}linear_fc1.weight", f"{path}linear_fc1.bias"})
    return found


def _full_key(key: str, structure: _Structure) -> str:
    key = structure.tied_keys.get(key, key)
    parts = key.split(".")
    for end in range(len(parts) - 1, 0, -1):  # the innermost transformer layer containing the key
        path = ".".join(parts[:end]) + "."
        if path in structure.layer_paths:
            return structure.layer_paths[path] + key[len(path):]
    return key


def _partition(key: str, tensor: torch.Tensor, structure: _Structure) -> tuple[Optional[int], int]:
    if getattr(tensor, "allreduce", True) is False:
        raise NotImplementedError(f"{key}: expert-parallel (MoE) weights are not supported by the full-state-dict "
                                  "loader")
    if hasattr(tensor, "tensor_model_parallel"):
        dim = tensor.partition_dim if tensor.tensor_model_parallel else None
        stride = getattr(tensor, "partition_stride", 1)
    else:
        dim, stride = structure.layer_dims.get(key), 1
    if key in structure.gated_keys:
        stride = 2
    return dim, stride


def placements(model: ModelChunks, prefix: str = "") -> list[Placement]:
    """Every tensor of ``model`` (a module, or this rank's list of virtual-pipeline chunks) whose key starts
    with ``prefix``, placed in the full state dict (whose keys lack the prefix)."""
    chunks = [model] if isinstance(model, torch.nn.Module) else list(model)
    found = []
    for chunk in chunks:
        chunk = unwrap(chunk)
        structure = _structure(chunk)
        renamed_prefix = _full_key(prefix, structure)  # a prefix inside a layer is renamed with it
        for key, tensor in chunk.state_dict(keep_vars=True).items():
            if not isinstance(tensor, torch.Tensor) or not key.startswith(prefix):
                continue  # `_extra_state` entries hold no weights
            dim, stride = _partition(key, tensor, structure)
            found.append(Placement(full_key=_full_key(key, structure)[len(renamed_prefix):], tensor=tensor,
                                   dim=dim, stride=stride, vocab=key in structure.vocab_keys))
    return found
