"""Low-rank adapters (LoRA) on megatron-core's tensor-parallel linears.

A target layer ``W`` computes ``W x + (alpha / rank) B A dropout(x)``; ``W`` stays frozen, ``A`` starts random and
``B`` at zero, so training starts from the base model exactly. The adapters are split over tensor-parallel
ranks the way their layer is, with megatron-core's own parallel linears, so that every rank's gradients are
those of the unsplit layer and TP=2 computes what TP=1 does:

* on a column-parallel layer (fused QKV, gate+up), whose input every rank holds whole: ``A`` is an ordinary
  linear, the same on every rank; ``B`` is column-parallel like ``W`` (its input's gradient is summed over the
  ranks, so ``A``'s gradient is the full one everywhere);
* on a row-parallel layer (attention output, down), whose input is split: ``A`` is row-parallel like ``W``
  (its output summed over the ranks), ``B`` an ordinary linear, the same on every rank.

The output layer (PEFT's ``lm_head``) is column-parallel over the (padded) vocabulary; megatron-core's GPTModel
builds it itself, not from a spec, so :func:`adapt_output_layer` gives the built layer its adapter afterwards.

In checkpoints the split adapter is saved like its layer (``B`` of gate+up through megatron-core's SwiGLU
factory, as the weight), so a checkpoint reshards across TP; ``A`` is initialised from a seed of its layer's
name and number, not from the rank, so every layout starts alike.
"""

from __future__ import annotations

import math
import zlib

import torch
from megatron.core import parallel_state
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.mlp import apply_swiglu_sharded_factory

from mm_plugin.config.model import LoraConfig, ModelConfigError

ADAPTER_SEED = 0x10AA
"""Base seed of the adapters' ``A`` matrices (with each layer's number and name)."""


def _zero(weight: torch.Tensor) -> None:
    torch.nn.init.zeros_(weight)


class LoraColumnParallelLinear(ColumnParallelLinear):
    """A column-parallel linear with an adapter; ``glu``: the layer is gate+up (``linear_fc1``)."""

    def __init__(self, input_size: int, output_size: int, *, config, init_method, lora: LoraConfig, glu: bool = False,
                 **kwargs):
        super().__init__(input_size, output_size, config=config, init_method=init_method, **kwargs)
        self.add_adapter(lora, glu)

    def add_adapter(self, lora: LoraConfig, glu: bool = False) -> None:
        """The adapter's parts, on this (built) layer."""
        self.glu, self.lora_scaling = glu, lora.scaling
        self.lora_dropout = torch.nn.Dropout(lora.dropout)
        self.lora_A = torch.nn.Linear(self.input_size, lora.rank, bias=False, dtype=self.config.params_dtype)
        self.lora_B = ColumnParallelLinear(lora.rank, self.output_size, config=self.config, init_method=_zero,
                                           bias=False, gather_output=self.gather_output, skip_bias_add=True)

    def forward(self, input_, *args, **kwargs):
        output, bias = super().forward(input_, *args, **kwargs)
        # B reads A's output, laid out as the layer's input: gathered over the sequence when the layer's input is
        # (GPTModel's inference turns it off on its output layer), and gathered over the ranks when the layer's
        # output is (the output layer's runtime_gather_output).
        self.lora_B.sequence_parallel = self.sequence_parallel
        update, _ = self.lora_B(self.lora_A(self.lora_dropout(input_)),
                                runtime_gather_output=kwargs.get("runtime_gather_output"))
        return output + self.lora_scaling * update, bias

    def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):
        state = super().sharded_state_dict(prefix, sharded_offsets, metadata)  # lora_A: replicated
        state.update(self.lora_B.sharded_state_dict(f"{prefix}lora_B.", sharded_offsets, metadata))
        if self.glu:
            key = f"{prefix}lora_B.weight"
            state[key] = apply_swiglu_sharded_factory(state[key], sharded_offsets)
        return state


class LoraRowParallelLinear(RowParallelLinear):
    """A row-parallel linear with an adapter."""

    def __init__(self, input_size: int, output_size: int, *, config, init_method, lora: LoraConfig, **kwargs):
        super().__init__(input_size, output_size, config=config, init_method=init_method, **kwargs)
        self.lora_scaling = lora.scaling
        self.lora_dropout = torch.nn.Dropout(lora.dropout)
        self.lora_A = RowParallelLinear(input_size, lora.rank, config=config, init_method=_zero, bias=False,
                                        input_is_parallel=True, skip_bias_add=True)
        self.lora_B = torch.nn.Linear(lora.rank, output_size, bias=False, dtype=config.params_dtype)
        _zero(self.lora_B.weight)

    def forward(self, input_, *args, **kwargs):
        output, bias = super().forward(input_, *args, **kwargs)
        hidden, _ = self.lora_A(self.lora_dropout(input_))
        return output + self.lora_scaling * self.lora_B(hidden), bias

    def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):
        state = super().sharded_state_dict(prefix, sharded_offsets, metadata)  # lora_B: replicated
        state.update(self.lora_A.sharded_state_dict(f"{prefix}lora_A.", sharded_offsets, metadata))
        return state


OUTPUT_LAYER = "output_layer"
"""The output layer's name, as a LoRA target (``LoraConfig.targets``) and in GPTModel."""


def adapt_output_layer(language_model: torch.nn.Module, lora: LoraConfig) -> None:
    """Give a built GPTModel's output layer (a plain ``ColumnParallelLinear``) an adapter in place: it becomes a
    :class:`LoraColumnParallelLinear`, its weight untouched."""
    if language_model.share_embeddings_and_output_weights:
        raise ModelConfigError("text_decoder.lora targets output_layer, but the output layer shares its weight with "
                               "the embedding (tied), which would train the embedding's adapter too; leave "
                               "output_layer out of the targets")
    layer = language_model.output_layer
    layer.__class__ = LoraColumnParallelLinear
    layer.add_adapter(lora)


def initialise_adapters(language_model: torch.nn.Module) -> None:
    """Every adapter's ``A`` drawn as PEFT draws it (Kaiming-uniform, a = sqrt(5)) for the whole matrix from a
    seed of the layer's global number (0: the output layer) and the adapter's name, then this rank's part of it
    kept."""
    rank = parallel_state.get_tensor_model_parallel_rank()
    adapted = [(layer.layer_number, name, module) for layer in language_model.decoder.layers
               for name, module in layer.named_modules()]
    adapted.append((0, OUTPUT_LAYER, getattr(language_model, OUTPUT_LAYER, None)))
    for layer_number, name, module in adapted:
        if not isinstance(module, (LoraColumnParallelLinear, LoraRowParallelLinear)):
            continue
        seed = ADAPTER_SEED + 1000 * layer_number + zlib.crc32(name.encode())
        generator = torch.Generator().manual_seed(seed)
        weight = module.lora_A.weight
        split = isinstance(module, LoraRowParallelLinear)
        full = torch.empty(weight.shape[0], weight.shape[1] * (
            parallel_state.get_tensor_model_parallel_world_size() if split else 1))
        bound = 1 / math.sqrt(full.shape[1])  # kaiming_uniform_(a=sqrt(5)) on a [rank, in] matrix
        full.uniform_(-bound, bound, generator=generator)
        part = full[:, rank * weight.shape[1]:(rank + 1) * weight.shape[1]] if split else full
        with torch.no_grad():
            weight.copy_(part)


def merged_weight(weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float) -> torch.Tensor:
    """A target's weight with its adapter folded in, ``W + scaling B A`` (full, TP=1 tensors), computed in fp32
    and returned in ``W``'s dtype: what an export writes, so that the exported model computes what the adapted
    one does."""
    return (weight.float() + scaling * (lora_B.float() @ lora_A.float())).to(weight.dtype)


def merge_adapters(model: torch.nn.Module) -> None:
    """Fold every adapter into its layer's weight (:func:`merged_weight`, what an export writes) and zero its ``B``,
    so that the layer computes the same without it: for inference, which never trains them, and whose fast
    route (``inference.direct_layers``) multiplies by the layers' weights alone. Each tensor-parallel rank folds
    its own part: a column-parallel layer's rows of ``B`` with the whole ``A``, a row-parallel layer's columns of
    ``A`` with the whole ``B``."""
    for module in model.modules():
        if isinstance(module, (LoraColumnParallelLinear, LoraRowParallelLinear)):
            with torch.no_grad():
                module.weight.copy_(merged_weight(module.weight, module.lora_A.weight, module.lora_B.weight,
                                                  module.lora_scaling))
                _zero(module.lora_B.weight)
