"""Putting weights into a built LlavaModel: part files, Hugging Face state dicts, training checkpoints.

A converted vision part file holds the whole CLIP tower (every layer and ``ln_post``) so it converts
back to Hugging Face unchanged; the model builds only up to its feature layer, so the rest is
dropped here — after checking that the file and the config agree on the tower.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Mapping

import torch
from megatron.core import parallel_state

from mm_plugin.checkpoint.reading import (CheckpointError, common_state, load_model_weights, reading_checkpoint,
                                          saved_model_config, trained_model_config)
from mm_plugin.config.model import LlavaConfig, ModelConfigError
from mm_plugin.config.names import LANGUAGE, PARTS, VOCABULARY_TABLES, is_adapter
from mm_plugin.models.llava import LlavaModel
from mm_plugin.parallel import load_full_state_dict
from mm_plugin.parallel.sources import TensorSource

logger = logging.getLogger(__name__)

_VISION_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.")


def vision_layers_in(state: Mapping[str, torch.Tensor]) -> int:
    """Transformer layers a vision part state holds."""
    indices = {int(match.group(1)) for key in state if (match := _VISION_LAYER.match(key))}
    return max(indices) + 1 if indices else 0


def select_built_vision_layers(state: Mapping[str, torch.Tensor], config: LlavaConfig,
                               source: str) -> dict[str, torch.Tensor]:
    """The vision part's tensors the model builds: layers up to the feature layer, no ``ln_post``.

    ``select_layer`` counts from the end of the tower in the file, so with it set the file must hold
    exactly ``num_layers`` layers; MindSpeed-MM's convention (no ``select_layer``) builds
    ``num_layers`` layers and ignores any after them.
    """
    vision = config.vision
    held = vision_layers_in(state)
    built = vision.num_layers_built
    if vision.select_layer is not None and held != vision.num_layers:
        raise ModelConfigError(
            f"{source} holds a {held}-layer vision tower but {config.source} says num_layers "
            f"{vision.num_layers} with select_layer {vision.select_layer}. State it one way: "
            f"num_layers {held} with select_layer {vision.select_layer} (LLaVA's), or num_layers {built} "
            "without select_layer (MindSpeed-MM's: the layers built)"
        )
    if held < built:
        raise ModelConfigError(f"{source} holds {held} vision layers; {config.source} builds {built}")
    kept = {}
    for key, tensor in state.items():
        match = _VISION_LAYER.match(key)
        if key.startswith("ln_post.") or (match and int(match.group(1)) >= built):
            continue
        kept[key] = tensor
    if held > built:
        logger.info("%s: vision layers %d..%d and ln_post are not built (the feature is layer %d's output)",
                    source, built, held - 1, built)
    return kept


# --- part files and training checkpoints -> a built (possibly TP/PP-sharded) model --------------

def _parts(config: LlavaConfig):
    """((model.json name, module prefix), its config) of each part."""
    return (((part.json_key, part.module_prefix), getattr(config, part.field)) for part in PARTS)


def check_part_paths(config: LlavaConfig, hint: str = "") -> None:
    """Every ``ckpt_path`` names an existing file or checkpoint directory: checked before any compute."""
    for (part_name, _), part in _parts(config):
        if part.ckpt_path and not Path(part.ckpt_path).exists():
            raise ModelConfigError(
                f"{config.source}: {part_name}.ckpt_path {part.ckpt_path!r} does not exist. Convert the weights "
                f"with `mm-convert` (see docs/convert.md) and point ckpt_path at the result{hint}"
            )


class _Subset(TensorSource):
    """A source that shows only some of its keys (the vision layers the model builds)."""

    def __init__(self, source: TensorSource, keys: set[str]):
        self._source, self._keys, self.name = source, keys, source.name

    def keys(self) -> list[str]:
        return [key for key in self._source.keys() if key in self._keys]

    def shape(self, key: str) -> tuple[int, ...]:
        return self._source.shape(key)

    def read(self, key: str, index) -> torch.Tensor:
        return self._source.read(key, index)


def load_parts(model, config: LlavaConfig, text_only: bool = False) -> None:
    """Load each part's ``ckpt_path`` into the model, sliced for this rank. Collective on every rank.

    A part file is a full (TP=1) state dict of that part; a directory is a training checkpoint, read
    through dist_checkpointing (resharded to this run's layout). Parts without ``ckpt_path`` keep their
    initialisation (a warning for frozen ones: they will never learn; not for the vision tower and projector
    of a ``text_only`` run, which never uses them).
    """
    from mm_plugin.parallel.sources import open_source

    check_part_paths(config)
    for (part_name, prefix), part in _parts(config):
        if part is config.projector and config.projector.projector_type == "identity":
            continue
        if not part.ckpt_path:
            if part.freeze and not (text_only and part is not config.language):
                logger.warning("%s: frozen but has no ckpt_path: it keeps random weights", part_name)
            continue
        path = Path(part.ckpt_path)
        if path.is_dir():
            load_part_from_checkpoint(model, path, prefix)
            continue
        source = open_source(path)
        if part is config.vision:
            built = select_built_vision_layers(dict.fromkeys(source.keys()), config, str(path))
            source = _Subset(source, set(built))
        vocab = config.language.vocab_size if part is config.language else None
        load_full_state_dict(model, source, prefix=prefix, vocab_size=vocab, allow_missing=is_adapter)
        logger.info("%s: loaded %s", part_name, path)


def adopt_checkpoint_lora(config: LlavaConfig, checkpoint: str | Path) -> None:
    """``config`` builds the language model with the LoRA adapters a checkpoint was trained with, when it has any:
    their rank and scaling are the checkpoint's (its text_decoder.lora), whatever a model.json says or lacks."""
    lora = trained_model_config(checkpoint).language.lora
    if lora is not None:
        config.language.lora, config.language.freeze = lora, False
        logger.info("%s: LoRA adapters (text_decoder.lora %s) of %s", config.source, lora, checkpoint)


def load_part_from_checkpoint(model, directory: Path, prefix: str) -> None:
    """The ``prefix`` part of a training checkpoint (``--save`` dir or ``iter_N``) into the model.

    A LoRA run's checkpoint holds the language model's adapters, not its frozen weights: those then come from
    the part file the run was built from (the ``text_decoder.ckpt_path`` saved in the checkpoint), so that a
    model.json can point at the checkpoint alone, as for any other trained part."""
    adapters = any(is_adapter(name) for name, _ in model.named_parameters() if name.startswith(prefix))
    needed = {name for name, _ in model.named_parameters() if name.startswith(prefix) and not is_adapter(name)}
    with reading_checkpoint(directory) as (checkpoint, _):
        if prefix != LANGUAGE.module_prefix or not adapters:
            load_model_weights(checkpoint, model, prefix=prefix, required=needed)
        elif needed - set(load_model_weights(checkpoint, model, prefix=prefix)):
            base = saved_model_config(checkpoint, common_state(checkpoint))[LANGUAGE.json_key].get("ckpt_path")
            if not base or not Path(base).is_file():
                raise CheckpointError(f"{checkpoint} holds the language model's LoRA adapters, not its weights, and "
                                      f"the base part file it was trained from ({base}) is not there; restore it, "
                                      "or export the merged model with mm-convert export-hf --load")
            load_full_state_dict(model, base, prefix=prefix, vocab_size=model.llava_config.language.vocab_size,
                                 allow_missing=is_adapter)
            logger.info("%s: frozen weights from %s, the part file %s was trained from", prefix.rstrip("."),
                        base, checkpoint)
    logger.info("%s: loaded from training checkpoint %s", prefix.rstrip("."), checkpoint)


def read_model_tensors(path: str | Path) -> dict[str, torch.Tensor]:
    """Full (TP=1) tensors of a checkpoint's model weights, by our full-model parameter names.

    Builds the model the checkpoint was saved from (its config is inside) in this process at TP=PP=1,
    loads what the checkpoint holds and returns just those tensors. Needs a torch.distributed world
    (one process is enough); used by ``mm-convert export-hf --load`` and the demo.
    """
    if parallel_state.get_tensor_model_parallel_world_size() != 1 or \
            parallel_state.get_pipeline_model_parallel_world_size() != 1:
        raise CheckpointError("read_model_tensors runs at tensor- and pipeline-parallel size 1")
    config = trained_model_config(path)
    with reading_checkpoint(path) as (directory, _):
        model = LlavaModel(config, extra={"perform_initialization": False})
        names = set(load_model_weights(directory, model))
    tensors = {name: tensor.detach() for name, tensor in model.state_dict().items() if name in names}
    for name in (LANGUAGE.module_prefix + table for table in VOCABULARY_TABLES):
        if name in tensors:  # drop the vocabulary padding rows, as in a part file
            tensors[name] = tensors[name][: config.language.vocab_size]
    return tensors
