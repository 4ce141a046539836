"""``LlavaPipeline``: images and questions in, answers out.

    >>> from mm_plugin.inference import LlavaPipeline
    >>> pipe = LlavaPipeline.from_config("examples/llava1.5/inference_llava.json")
    >>> pipe("view.jpg", "What is in the picture?")                    # greedy
    >>> pipe(image, "Describe it.", do_sample=True, temperature=0.2)  # a PIL image, sampled
    >>> for piece in pipe.stream("view.jpg", "Describe it."): print(piece, end="", flush=True)
    >>> pipe.answer([Query("Compare <image> and <image>.", ["a.jpg", "b.jpg"]), Query("Hi!")])

Images are read and preprocessed by the data layer (exactly as training saw them), prompts are built by
:mod:`~mm_plugin.inference.prompts`, and generation runs on the key/value cache
(:mod:`~mm_plugin.inference.generate`) in batches. A query that cannot run (an image that is missing or
unreadable, tags that do not match the images, a prompt longer than the context) gets an answer with
``error`` set; the others are answered.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Iterator, Optional, Sequence, Union

import torch

from mm_plugin.data.errors import BadSample
from mm_plugin.data.images import ImageProcessor
from mm_plugin.data.tokenization import load_tokenizer
from mm_plugin.inference.config import (
    InferenceConfig, Query, has_image_processor, image_config, load_inference_config, set_dtype)
from mm_plugin.inference.generate import Request, stream
from mm_plugin.inference.prompts import PromptError, prompt_ids
from mm_plugin.inference.sampling import GenerationConfig


@dataclasses.dataclass
class Answer:
    prompt: str
    images: list[str]
    """The images' names (paths, or ``<PIL image>``)."""
    text: str = ""
    tokens: list[int] = dataclasses.field(default_factory=list)
    finish_reason: Optional[str] = None
    """``eos``, ``length``, ``context`` or ``error``."""
    error: Optional[str] = None

    def add(self, event: "TextEvent") -> None:
        """Take in one streaming event of this answer."""
        self.text += event.text
        if event.token is not None:
            self.tokens.append(event.token)
        if event.finish_reason:
            self.finish_reason, self.error = event.finish_reason, event.error


@dataclasses.dataclass
class TextEvent:
    """Streaming: for answer ``index``, a new ``token`` and the ``text`` it completes, or the end
    (``finish_reason``, ``error``; ``text`` then holds any text still held back)."""

    index: int
    text: str = ""
    token: Optional[int] = None
    finish_reason: Optional[str] = None
    error: Optional[str] = None


class LlavaPipeline:
    def __init__(self, model, tokenizer, image_processor: ImageProcessor,
                 generation: Optional[GenerationConfig] = None, template: str = "vicuna_v1", batch_size: int = 8,
                 static_decode: Optional[bool] = None):
        """``static_decode``: decode steps on fixed buffers, replayed as a CUDA graph (default: on CUDA; see
        :mod:`~mm_plugin.inference.static_step`)."""
        if len(tokenizer) > model.vocab_size:
            raise ValueError(f"the tokenizer has {len(tokenizer)} tokens but the model's vocabulary only "
                             f"{model.vocab_size}: they are not from the same model")
        self.model, self.tokenizer, self.image_processor = model, tokenizer, image_processor
        self.generation = generation or GenerationConfig()
        self.template, self.batch_size, self.static_decode = template, batch_size, static_decode
        self.never_generated = never_generated_ids(tokenizer, model.vocab_size)

    # --- construction ----------------------------------------------------------------------------

    @classmethod
    def from_config(cls, config: Union[str, os.PathLike, InferenceConfig], *, tensor_parallel: int = 1,
                    dtype: Optional[str] = None, batch_size: int = 8) -> "LlavaPipeline":
        """From MindSpeed-MM's ``inference_llava.json`` (see :mod:`~mm_plugin.inference.config`)."""
        from mm_plugin.inference.runtime import build_model, initialize

        if not isinstance(config, InferenceConfig):
            config = load_inference_config(config)
        if dtype:
            set_dtype(config.model, dtype)
        initialize(tensor_parallel)
        return cls(build_model(config.model), load_tokenizer(config.tokenizer), ImageProcessor(config.image),
                   config.generation, config.template, batch_size)

    @classmethod
    def from_pretrained(cls, directory: Union[str, os.PathLike], *, dtype: Optional[str] = None,
                        image_aspect_ratio: str = "pad", template: str = "vicuna_v1", tensor_parallel: int = 1,
                        batch_size: int = 8, cache_dir: Optional[Union[str, os.PathLike]] = None) -> "LlavaPipeline":
        """From a Hugging Face ``llava-1.5-7b-hf`` style directory. It is converted on first use, tensor
        by tensor, into ``cache_dir`` (default ``$MM_PLUGIN_CACHE`` or ``~/.cache/mm_plugin``; see
        ``mm_plugin.convert.converted_llava``) and loaded from there afterwards."""
        import torch.distributed

        from mm_plugin.config.model import load_model_config
        from mm_plugin.convert import converted_llava
        from mm_plugin.inference.runtime import initialize

        initialize(tensor_parallel)
        if torch.distributed.get_rank() == 0:  # one rank converts, the others then find it cached
            converted_llava(directory, cache_dir=cache_dir, dtype=dtype)
        torch.distributed.barrier()
        model_json = converted_llava(directory, cache_dir=cache_dir, dtype=dtype)
        folder = model_json.parent
        model = load_model_config(str(model_json))
        generation_file = folder / "generation_config.json"
        eos = json.loads(generation_file.read_text()).get("eos_token_id") if generation_file.is_file() else None
        processor = folder / "tokenizer" if has_image_processor(folder / "tokenizer") else None
        config = InferenceConfig(
            model=model, tokenizer=str(folder / "tokenizer"),
            image=image_config(processor and str(processor), image_aspect_ratio, model, str(directory)),
            generation=GenerationConfig(eos_token_id=eos), template=template, source=str(directory))
        return cls.from_config(config, tensor_parallel=tensor_parallel, batch_size=batch_size)

    # --- answering ---------------------------------------------------------------------------------

    def __call__(self, image, prompt: str, template: Optional[str] = None, **generation) -> str:
        """The answer to ``prompt`` about ``image`` (a path, a PIL image, a list of them, or None).
        Greedy unless ``do_sample=True``; other keywords are :class:`GenerationConfig` fields."""
        answer = self.answer([Query(prompt, _as_list(image))], template, **generation)[0]
        if answer.error:
            raise ValueError(answer.error)
        return answer.text

    def stream(self, image, prompt: str, template: Optional[str] = None, **generation) -> Iterator[str]:
        """The answer's text piece by piece, as the tokens are generated."""
        for event in self.stream_answers([Query(prompt, _as_list(image))], template, **generation):
            if event.error:
                raise ValueError(event.error)
            if event.text:
                yield event.text

    def answer(self, queries: Sequence[Query], template: Optional[str] = None, **generation) -> list[Answer]:
        """One :class:`Answer` per query, in order."""
        answers = [Answer(q.prompt, [_image_name(image) for image in q.images]) for q in queries]
        for event in self.stream_answers(queries, template, **generation):
            answers[event.index].add(event)
        return answers

    def stream_answers(self, queries: Sequence[Query], template: Optional[str] = None,
                       **generation) -> Iterator[TextEvent]:
        """:class:`TextEvent` s for all queries, ``batch_size`` at a time, as tokens are generated."""
        template = template or self.template
        config = dataclasses.replace(self.generation, **generation)
        if config.eos_token_id is None:
            config = dataclasses.replace(config, eos_token_id=self.tokenizer.eos_token_id)
        if template == "plain":  # a stage-1 caption ends with a newline
            config = dataclasses.replace(config, eos_token_id=(*config.eos_token_id, *newline_ids(self.tokenizer)))
        for start in range(0, len(queries), self.batch_size):
            chunk = range(start, min(start + self.batch_size, len(queries)))
            requests, runnable = [], []
            for index in chunk:
                try:
                    requests.append(self._request(queries[index], template, index))
                    runnable.append(index)
                except (BadSample, PromptError) as error:
                    yield TextEvent(index, finish_reason="error", error=f"query {index}: {error}")
            decoders = {index: _TextDecoder(self.tokenizer) for index in runnable}
            for event in stream(self.model, requests, config, self.never_generated, self.static_decode):
                index = runnable[event.index]
                if event.token is not None:
                    yield TextEvent(index, decoders[index].push(event.token), token=event.token)
                else:
                    yield TextEvent(index, decoders[index].flush(), finish_reason=event.finish_reason,
                                    error=event.error)

    def _request(self, query: Query, template: str, index: int) -> Request:
        ids = prompt_ids(self.tokenizer, template, query.prompt, len(query.images))
        images = [self._image(image) for image in query.images]
        name = f"query {index} ({', '.join(map(_image_name, query.images))})" if images else f"query {index}"
        return Request(ids, torch.stack(images) if images else None, name=name)

    def _image(self, image) -> torch.Tensor:
        if isinstance(image, (str, os.PathLike)):
            return self.image_processor.load(os.fspath(image))
        if hasattr(image, "convert"):  # a PIL image
            return self.image_processor.preprocess(image.convert("RGB"))
        raise BadSample("not_an_image", f"{type(image).__name__} is neither an image path nor a PIL image")


def never_generated_ids(tokenizer, vocab_size: int) -> list[int]:
    """The image token, the pad token, and vocabulary rows beyond the tokenizer (no text maps to them)."""
    ids = set(range(len(tokenizer), vocab_size))
    image = tokenizer.get_vocab().get("<image>")
    if image is not None:
        ids.add(image)
    if tokenizer.pad_token_id is not None and tokenizer.pad_token_id != tokenizer.eos_token_id:
        ids.add(tokenizer.pad_token_id)
    return sorted(ids)


def newline_ids(tokenizer) -> list[int]:
    """Tokens that are a line break on their own, at the start of a text and after a word (sentencepiece
    has two: with and without its word-start marker)."""
    def encode(text):
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    candidates = {*encode("\n"), *encode("a\n")[len(encode("a")):]}
    return sorted(token for token in candidates if tokenizer.decode([token]) == "\n")


class _TextDecoder:
    """Token by token to text: the text each token completes. A character whose UTF-8 bytes are split
    over tokens waits for its last byte; text that a later token would change waits for the end."""

    def __init__(self, tokenizer):
        self.tokenizer, self.tokens, self.text = tokenizer, [], ""

    def push(self, token: int) -> str:
        self.tokens.append(token)
        return self._advance(final=False)

    def flush(self) -> str:
        return self._advance(final=True)

    def _advance(self, final: bool) -> str:
        text = self.tokenizer.decode(self.tokens, skip_special_tokens=True)
        if not text.startswith(self.text) or (text.endswith("\ufffd") and not final):
            return ""
        new, self.text = text[len(self.text):], text
        return new


def _as_list(image) -> list:
    if image is None:
        return []
    return list(image) if isinstance(image, (list, tuple)) else [image]


def _image_name(image) -> str:
    return os.fspath(image) if isinstance(image, (str, os.PathLike)) else "<PIL image>"
