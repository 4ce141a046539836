"""Inference for LLaVA-1.5: key/value-cached generation, a pipeline from images and text, the CLI.

    from mm_plugin.inference import LlavaPipeline
    pipe = LlavaPipeline.from_pretrained("llava-1.5-7b-hf")     # or .from_config("inference_llava.json")
    print(pipe("view.jpg", "What is in the picture?"))

Layers, each usable on its own: :mod:`.generate` (token ids and image tensors in, token ids out, on a
:class:`~mm_plugin.models.llava.LlavaModel`), :mod:`.pipeline` (images and text), :mod:`.cli` (``mm-infer``).
See docs/inference.md.
"""

from mm_plugin.inference.config import InferenceConfig, Query, load_inference_config
from mm_plugin.inference.generate import Event, Request, Result, generate, stream
from mm_plugin.inference.pipeline import Answer, LlavaPipeline, TextEvent
from mm_plugin.inference.sampling import GenerationConfig

__all__ = ["Answer", "Event", "GenerationConfig", "InferenceConfig", "LlavaPipeline", "Query", "Request", "Result",
           "TextEvent", "generate", "load_inference_config", "stream"]
