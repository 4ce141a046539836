"""Generation on a :class:`~mm_plugin.models.llava.LlavaModel`: token ids and image tensors in, token ids out.

A request is a prompt in the data layer's layout (one ``-200`` placeholder per image) with its
preprocessed images. Each request is checked on its own first (placeholders vs images, image size,
room in the context); one that fails gets an error naming it, and the others still run. The valid
ones run as one left-padded batch: the vision tower and the prompt once, then one decoder step per
token on the key/value cache (see :mod:`~mm_plugin.inference.decoder`).

:func:`stream` yields an :class:`Event` per generated token as it is chosen; :func:`generate`
collects them into one :class:`Result` per request.
"""

from __future__ import annotations

import dataclasses
from typing import Iterable, Iterator, Optional, Sequence

import torch

from mm_plugin.config.names import IMAGE_TOKEN_INDEX
from mm_plugin.inference.decoder import IncrementalDecoder
from mm_plugin.inference.direct_layers import image_features
from mm_plugin.inference.sampling import GenerationConfig, TokenSelector
from mm_plugin.models.image_tokens import ImageTokenError


class RequestError(ValueError):
    """A request that cannot run (placeholders vs images, image size, no room in the context), named."""


@dataclasses.dataclass
class Request:
    input_ids: Sequence[int]
    """Prompt ids with one ``-200`` per image, BOS included."""
    images: Optional[torch.Tensor] = None
    """[n_images, 3, H, W] preprocessed images, in the order of the placeholders."""
    name: str = ""
    """Names the request in errors (an image path, a prompt's index)."""


@dataclasses.dataclass
class Event:
    """One step of one request: a new ``token``, or the end (``finish_reason``, and ``error`` if it failed)."""

    index: int
    token: Optional[int] = None
    finish_reason: Optional[str] = None
    """``eos`` (an end-of-sequence token was chosen; it is not emitted), ``length`` (max_new_tokens or
    max_length reached), ``context`` (the model's context is full) or ``error``."""
    error: Optional[str] = None


@dataclasses.dataclass
class Result:
    tokens: list[int] = dataclasses.field(default_factory=list)
    finish_reason: Optional[str] = None
    error: Optional[str] = None


@dataclasses.dataclass
class _Prepared:
    index: int
    input_ids: torch.Tensor  # [length], images expanded (their positions hold 0)
    image_mask: torch.Tensor  # [length] bool
    images: Optional[torch.Tensor]
    text_ids: list[int]
    new_tokens: int
    limit_reason: str


def stream(model, requests: Sequence[Request], config: GenerationConfig,
           suppressed: Iterable[int] = (), static: Optional[bool] = None) -> Iterator[Event]:
    """Generate for all ``requests`` as one batch, yielding events as tokens are chosen.

    ``suppressed``: ids never generated (image token, pad, vocabulary rows no token maps to), on top
    of ``config.pad_token_id`` and ``config.suppress_tokens``. A request that ends leaves the batch, so
    the steps after it cost only the requests still generating (except with static decode steps,
    ``static``: see :class:`~mm_plugin.inference.decoder.IncrementalDecoder`; default on CUDA).
    """
    if not (model.pre_process and model.post_process):
        raise NotImplementedError("generation needs the whole model on one pipeline stage (pipeline parallel 1)")
    prepared = []
    for index, request in enumerate(requests):
        try:
            prepared.append(_prepare(model, index, request, config))
        except RequestError as error:
            yield Event(index, finish_reason="error", error=str(error))
    if not prepared:
        return

    device = model.language_model.embedding.word_embeddings.weight.device
    input_ids, image_mask, padding = _left_padded(prepared)
    images = [p.images for p in prepared if p.images is not None and p.images.shape[0]]
    longest = max(p.new_tokens for p in prepared)
    decoder = IncrementalDecoder(model, padding, capacity=input_ids.shape[1] + longest, static=static)
    never = {*suppressed} | ({config.pad_token_id} if config.pad_token_id is not None else set())
    selector = TokenSelector(config, model.vocab_size, never, [p.text_ids for p in prepared], device)
    # Host-to-device copies and counts first: from pageable memory a copy waits for the work queued before
    # it, and so does counting a mask on the device; after the vision tower either would idle the GPU.
    image_positions = int(image_mask.sum())
    input_ids, image_mask = input_ids.to(device), image_mask.to(device)
    with torch.no_grad():
        features = image_features(model, torch.cat(images).to(device)) if images else None
        embeddings = model.language_model.embedding(
            input_ids=input_ids, position_ids=None, image_features=features,
            image_mask=image_mask if features is not None else None, image_positions=image_positions)
        logits = decoder.prefill(embeddings)

    eos = set(config.eos_token_id or ())
    generating = prepared  # the batch's rows, in order
    for new_tokens in range(longest):
        tokens = selector(logits, new_tokens).tolist()
        kept = []
        for row, (p, token) in enumerate(zip(generating, tokens)):
            if token in eos:
                yield Event(p.index, finish_reason="eos")
                continue
            yield Event(p.index, token=token)
            if new_tokens + 1 == p.new_tokens:
                yield Event(p.index, finish_reason=p.limit_reason)
            else:
                kept.append(row)
        if not kept:
            return
        if len(kept) < len(generating):
            generating, tokens = [generating[row] for row in kept], [tokens[row] for row in kept]
            rows = torch.tensor(kept, device=device)
            decoder.keep(rows)
            selector.keep(rows)
        logits = decoder.step(torch.tensor(tokens, device=device))


def _left_padded(prepared: Sequence["_Prepared"]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Token ids [b, s] and image mask [b, s] with every prompt ending at the last column; padding [b]."""
    length = max(p.input_ids.shape[0] for p in prepared)
    padding = torch.tensor([length - p.input_ids.shape[0] for p in prepared])
    input_ids = torch.zeros(len(prepared), length, dtype=torch.long)
    image_mask = torch.zeros(len(prepared), length, dtype=torch.bool)
    for row, p in enumerate(prepared):
        input_ids[row, padding[row]:] = p.input_ids
        image_mask[row, padding[row]:] = p.image_mask
    return input_ids, image_mask, padding


def generate(model, requests: Sequence[Request], config: GenerationConfig,
             suppressed: Iterable[int] = (), static: Optional[bool] = None) -> list[Result]:
    """One :class:`Result` per request, in order (``error`` set for the requests that could not run)."""
    results = [Result() for _ in requests]
    for event in stream(model, requests, config, suppressed, static):
        result = results[event.index]
        if event.token is not None:
            result.tokens.append(event.token)
        else:
            result.finish_reason, result.error = event.finish_reason, event.error
    return results


def _prepare(model, index: int, request: Request, config: GenerationConfig) -> _Prepared:
    """Check one request and expand its images; :class:`RequestError` names what is wrong."""
    name = request.name or f"request {index}"
    ids = torch.as_tensor(list(request.input_ids), dtype=torch.long)
    if ids.ndim != 1 or ids.numel() == 0:
        raise RequestError(f"{name}: the prompt has no tokens")
    images = request.images
    count = 0 if images is None else images.shape[0]
    if images is not None:
        size = model.llava_config.vision.image_size
        if images.ndim != 4 or tuple(images.shape[1:]) != (3, size, size):
            raise RequestError(f"{name}: images of shape {tuple(images.shape)}; the vision tower takes "
                                  f"[n, 3, {size}, {size}]")
    try:
        tokens = model.expand(ids[None], None, torch.tensor([count]), sample_ids=[name])
    except ImageTokenError as error:
        raise RequestError(str(error)) from None
    length = tokens.input_ids.shape[1]
    context = model.llava_config.language.max_sequence_length
    if length >= context:
        raise RequestError(f"{name}: the prompt needs {length} positions ({model.tokens_per_image} per image) "
                              f"and leaves no room in the model's context of {context}")
    new_tokens, limit_reason = config.new_tokens_for(length), "length"
    if new_tokens < 1:
        raise RequestError(f"{name}: the prompt needs {length} positions, max_length is {config.max_length}")
    if length + new_tokens > context:
        new_tokens, limit_reason = context - length, "context"
    return _Prepared(index, tokens.input_ids[0], tokens.image_mask[0], images,
                     [i for i in request.input_ids if i != IMAGE_TOKEN_INDEX], new_tokens, limit_reason)
