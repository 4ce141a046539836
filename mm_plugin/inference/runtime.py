"""The process side of inference: the distributed world, and a model built with its weights.

Under ``torchrun`` every rank joins the world torchrun describes; a plain ``python``/``mm-infer`` or a
Python session becomes a world of one. Tensor-parallel ranks all run generation (each holds a slice
of every layer) and choose the same tokens.
"""

from __future__ import annotations


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
    from mm_plugin.models.loading import load_parts

    missing = [names.json_key for names in PARTS for part in (getattr(config, names.field),)
               if not part.ckpt_path and not (part is config.projector and part.projector_type == "identity")]
    if missing:
        raise ModelConfigError(f"{config.source}: {', '.join(missing)} need(s) ckpt_path for inference: a part "
                               "file from `mm-convert`, or a training checkpoint directory")
    model = LlavaModel(config, extra={"perform_initialization": False})
    load_parts(model, config)
    return model.to(device.current()).eval()
