"""Question text -> prompt ids, in the formats LLaVA-1.5 was trained on.

``vicuna_v1``
    LLaVA-1.5's chat format, as its evaluation builds it (``conv_vicuna_v1``, an open assistant turn):
    ``"{system} USER: <image>\\n{question} ASSISTANT:"``. Without ``<image>`` tags the question gets one
    per image in front; with them, they move to the front as in training.
``plain``
    Stage-1 (pre-training) format: the images, then the question as the start of a caption (usually
    empty): the model continues with a caption.
``raw``
    The prompt verbatim; it holds one ``<image>`` per image where the images go.

Tokenization is the data layer's (``tokenizer_image_token``: one BOS, ``-200`` per image), so a
prompt is tokenized exactly as training tokenized it.
"""

from __future__ import annotations

from mm_plugin.data.records import IMAGE_TAG
from mm_plugin.data.tokenization import (
    VICUNA_V1_ROLES, VICUNA_V1_SEP, VICUNA_V1_SYSTEM, TextEncoder, tokenizer_image_token)

TEMPLATES = ("vicuna_v1", "plain", "raw")


class PromptError(ValueError):
    """A prompt whose ``<image>`` tags and images disagree, or an unknown template."""


def build_prompt(template: str, question: str, images: int) -> str:
    """The prompt text for ``question`` with ``images`` images."""
    if template not in TEMPLATES:
        raise PromptError(f"unknown template {template!r}; use one of {', '.join(TEMPLATES)}")
    if not isinstance(question, str):
        raise PromptError(f"the prompt is a {type(question).__name__}, not text")
    try:
        question.encode("utf-8")
    except UnicodeEncodeError as error:  # a lone surrogate: no tokenizer can encode it
        raise PromptError(f"the prompt is not valid Unicode text: {error.reason} at character {error.start} "
                          f"({question[error.start]!r})") from None
    tags = question.count(IMAGE_TAG)
    if template == "raw":
        if tags != images:
            raise PromptError(f"template 'raw': the prompt has {tags} {IMAGE_TAG} tag(s) for {images} image(s)")
        return question
    if tags not in (0, images):
        raise PromptError(f"template {template!r}: the prompt has {tags} {IMAGE_TAG} tag(s) for {images} image(s); "
                          f"give one per image, or none to put them in front")
    question = question.replace(IMAGE_TAG, "").strip() if tags else question
    if template == "plain":
        return IMAGE_TAG * images + question
    user, assistant = VICUNA_V1_ROLES
    turn = (IMAGE_TAG + "\n") * images + question
    return f"{VICUNA_V1_SYSTEM}{VICUNA_V1_SEP}{user}: {turn}{VICUNA_V1_SEP}{assistant}:"


def prompt_ids(tokenizer, template: str, question: str, images: int) -> list[int]:
    """Token ids of the prompt (BOS, ``-200`` per image)."""
    return tokenizer_image_token(build_prompt(template, question, images), TextEncoder(tokenizer))
