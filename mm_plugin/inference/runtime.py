"""The process side of inference: the distributed world, and a model built with its weights.

Under ``torchrun`` every rank joins the world torchrun describes; a plain ``python``/``mm-infer`` or a
Python session becomes a world of one. Tensor-parallel ranks all run generation (each holds a slice
of every layer) and choose the same tokens.
"""

from __future__ import annotations

from pathlib import Path

from mm_plugin import device
from mm_plugin.config.model import LlavaConfig, ModelConfigError
from mm_plugin.config.names import PARTS
from mm_plugin.parallel.world import join_world, set_model_parallel


def initialize(tensor_parallel_size: int = 1, seed: int = 1234) -> None:
    """Join (or make) the process group and set megatron's groups for ``tensor_parallel_size`` x PP 1."""
    world = join_world()
    if world % tensor_parallel_size:
        raise ValueError(f"tensor parallel size {tensor_parallel_size} does not divide the {world} processes")
    set_model_parallel(tensor_parallel_size, 1, seed)


def build_model(config: LlavaConfig):
    """A :class:`LlavaModel` for this rank with every part's ``ckpt_path`` loaded, on the device, in eval mode.

    Parameters are not randomly initialised first (every part is loaded), which for a 7B model saves
    minutes on the CPU.
    """
    from mm_plugin.models.llava import LlavaModel
    from mm_plugin.models.loading import adopt_checkpoint_lora, load_parts
    from mm_plugin.models.lora import merge_adapters

    missing = [names.json_key for names in PARTS for part in (getattr(config, names.field),)
               if not part.ckpt_path and not (part is config.projector and part.projector_type == "identity")]
    if missing:
        raise ModelConfigError(f"{config.source}: {', '.join(missing)} need(s) ckpt_path for inference: a part "
                               "file from `mm-convert`, or a training checkpoint directory")
    if config.language.lora is None and Path(config.language.ckpt_path).is_dir():  # a LoRA run's checkpoint?
        adopt_checkpoint_lora(config, config.language.ckpt_path)
    model = LlavaModel(config, extra={"perform_initialization": False})
    load_parts(model, config)
    merge_adapters(model)  # a LoRA checkpoint's adapters, unmerged: generation computes as the merged export does
    return model.to(device.current()).eval()
