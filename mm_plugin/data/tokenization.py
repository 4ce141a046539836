"""Text to token ids and labels, exactly as original LLaVA does it.

* :func:`tokenizer_image_token` is LLaVA's function of the same name: split the prompt on ``<image>``,
  tokenize each chunk on its own, one BOS in front, ``IMAGE_TOKEN_INDEX`` (-200) between chunks.
* Templates turn a :class:`~mm_plugin.data.records.Record` into ``(input_ids, labels)``:

  ``plain`` (stage 1, LLaVA's ``preprocess_plain``)
      BOS, ``<image>``, caption, ``"\\n"``; the human text is dropped; BOS and the image are out of the loss.
  ``vicuna_v1`` (stage 2, LLaVA's ``preprocess_v1``)
      ``"{system} USER: {q} ASSISTANT: {a}</s>USER: ..."``; only the assistant answers and their ``</s>``
      are in the loss. The labels come from LLaVA's per-round length arithmetic, including its
      ``legacy`` branch; when that arithmetic does not add up to the tokenized length (LLaVA prints
      "tokenization mismatch" and trains the sample with no loss), the sample is bad instead.
  ``lm`` (text-only LM pre-training for the demo)
      BOS, human text (context, out of the loss), gpt text + ``"\\n"`` (in the loss). No images.

About ``legacy``: Vicuna-7B-v1.5 ships ``"legacy": false`` and LLaVA-1.5 trains with it, so that is
what :func:`load_tokenizer` keeps and what ``mm-data synth`` writes. With ``legacy=False`` the text
right after ``</s>`` gets no leading ``▁``; LLaVA then subtracts one token from every round after the
first. That correction holds for LLaMA's vocabulary (``"▁USER"`` is two tokens, ``"USER"`` one), and
the synthetic tokenizer keeps the same property; any tokenizer for which it does not hold is caught
by the mismatch check, never trained wrongly.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Optional, Protocol

from ..config.names import IGNORE_INDEX, IMAGE_TOKEN_INDEX
from .errors import BadSample, DataError
from .records import HUMAN, IMAGE_TAG, Record, Turn


VICUNA_V1_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
"""LLaVA's training ``conv_vicuna_v1`` system prompt."""
VICUNA_V1_ROLES = ("USER", "ASSISTANT")
VICUNA_V1_SEP, VICUNA_V1_SEP2 = " ", "</s>"


def load_tokenizer(path: str | os.PathLike):
    """Load a Hugging Face tokenizer directory (Vicuna's, or ``mm-data synth``'s ``tokenizer/``).

    Nothing is downloaded. As LLaVA does, a tokenizer without a pad token pads with its unk token.
    """
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise DataError(
            f"tokenizer directory {path!r} does not exist; point tokenizer_config.from_pretrained at a local "
            "Hugging Face tokenizer folder (e.g. a downloaded vicuna-7b-v1.5, or DIR/tokenizer from `mm-data synth`)"
        )
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # DataLoader workers fork after first use
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError, ImportError) as error:
        raise DataError(f"{path}: cannot load a tokenizer from this folder ({error})") from error
    if tokenizer.pad_token_id is None and tokenizer.unk_token_id is not None:
        tokenizer.pad_token = tokenizer.unk_token
    return tokenizer


class TextEncoder:
    """The tokenizer calls the templates need: chunk encoding without special tokens, plus BOS."""

    def __init__(self, tokenizer: Any):
        self.tokenizer = tokenizer
        self.bos_id: Optional[int] = tokenizer.bos_token_id
        # Tokenizers without the attribute (not LLaMA-style) behave like legacy ones after special tokens.
        self.legacy = bool(getattr(tokenizer, "legacy", True))
        # sentencepiece (and the slow LlamaTokenizer LLaVA used) always prepends its "▁" dummy prefix, so
        # " a" becomes "▁▁a"; the tokenizers-backed LlamaTokenizer of transformers 5 skips the prefix when
        # the text already starts with a space. Such text gets one more space, which restores LLaVA's ids.
        backend = getattr(tokenizer, "backend_tokenizer", None)
        pre_tokenizer = getattr(backend, "pre_tokenizer", None)
        self._restore_dummy_prefix = (type(pre_tokenizer).__name__ == "Metaspace"
                                      and getattr(pre_tokenizer, "prepend_scheme", "never") != "never")

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` alone, no BOS/EOS, as sentencepiece would give them."""
        if not text:
            return []
        if self._restore_dummy_prefix and text[0] == " ":
            text = " " + text
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def with_bos(self, ids: list[int]) -> list[int]:
        return ([self.bos_id] if self.bos_id is not None else []) + ids


def tokenizer_image_token(prompt: str, encoder: TextEncoder) -> list[int]:
    """LLaVA's ``tokenizer_image_token``: one BOS, each ``<image>``-separated chunk tokenized alone, -200 between."""
    ids: list[int] = []
    for position, chunk in enumerate(prompt.split(IMAGE_TAG)):
        if position:
            ids.append(IMAGE_TOKEN_INDEX)
        ids.extend(encoder.encode(chunk))
    return encoder.with_bos(ids)


@dataclasses.dataclass
class Encoded:
    input_ids: list[int]
    labels: list[int]
    """Same length as ``input_ids``: the token where trained, ``IGNORE_INDEX`` elsewhere."""


class Template(Protocol):
    name: str

    def check(self, record: Record) -> None:
        """Raise ``BadSample`` when the record does not suit this template (needs no tokenizer)."""

    def encode(self, record: Record, encoder: TextEncoder) -> Encoded:
        """Token ids and labels of a record that passed :meth:`check`."""


def _require_image_tags(record: Record) -> None:
    tags = record.image_tag_count()
    if tags != len(record.images):
        raise BadSample("image_token_mismatch", f"record {record.id}: {len(record.images)} image(s) but {tags} "
                        f"'{IMAGE_TAG}' tag(s) in the text")


def normalise_image_tags(turns: tuple[Turn, ...]) -> list[Turn]:
    """LLaVA's ``preprocess_multimodal``: a turn's ``<image>`` tags move to its start, each followed by a newline."""
    normalised = []
    for turn in turns:
        tags = turn.text.count(IMAGE_TAG)
        text = turn.text
        if tags:
            text = (IMAGE_TAG + "\n") * tags + text.replace(IMAGE_TAG, "").strip()
            text = text.strip()
        normalised.append(Turn(turn.role, text))
    return normalised


class PlainTemplate:
    name = "plain"

    def check(self, record: Record) -> None:
        if len(record.images) != 1:
            raise BadSample("image_token_mismatch",
                            f"record {record.id}: template 'plain' takes exactly one image, got {len(record.images)}")
        if len(record.turns) != 2:
            raise BadSample("malformed_record",
                            f"record {record.id}: template 'plain' takes one human and one gpt turn, got "
                            f"{len(record.turns)} turns")
        _require_image_tags(record)
        if IMAGE_TAG not in record.turns[0].text:
            raise BadSample("image_token_mismatch", f"record {record.id}: '{IMAGE_TAG}' must be in the human turn")

    def encode(self, record: Record, encoder: TextEncoder) -> Encoded:
        caption = record.turns[1].text
        input_ids = tokenizer_image_token(IMAGE_TAG + caption + "\n", encoder)
        prompt_length = len(tokenizer_image_token(IMAGE_TAG, encoder))
        labels = [IGNORE_INDEX] * prompt_length + input_ids[prompt_length:]
        return Encoded(input_ids, labels)


class VicunaV1Template:
    name = "vicuna_v1"

    def check(self, record: Record) -> None:
        _require_image_tags(record)

    @staticmethod
    def prompt(turns: list[Turn]) -> str:
        """LLaVA's ``conv_vicuna_v1.get_prompt()`` (separator style TWO)."""
        text = VICUNA_V1_SYSTEM + VICUNA_V1_SEP
        for position, turn in enumerate(turns):
            role = VICUNA_V1_ROLES[0] if turn.role == HUMAN else VICUNA_V1_ROLES[1]
            text += role + ": " + turn.text + (VICUNA_V1_SEP if position % 2 == 0 else VICUNA_V1_SEP2)
        return text

    def encode(self, record: Record, encoder: TextEncoder) -> Encoded:
        conversation = self.prompt(normalise_image_tags(record.turns))
        input_ids = tokenizer_image_token(conversation, encoder)
        labels = list(input_ids)

        # LLaVA's preprocess_v1 masking, step for step: each round "USER: q ASSISTANT: a" is tokenized on
        # its own; its length with BOS stands for its length in the conversation plus its "</s>".
        separator = VICUNA_V1_SEP + VICUNA_V1_ROLES[1] + ": "
        cursor = 1
        labels[:cursor] = [IGNORE_INDEX] * cursor
        for position, round_text in enumerate(conversation.split(VICUNA_V1_SEP2)):
            if round_text == "":
                break
            parts = round_text.split(separator)
            if len(parts) != 2:
                break
            instruction = parts[0] + separator
            round_length = len(tokenizer_image_token(round_text, encoder))
            instruction_length = len(tokenizer_image_token(instruction, encoder)) - 2
            if position != 0 and not encoder.legacy:
                round_length -= 1
                instruction_length -= 1
            end = min(cursor + instruction_length, len(labels))
            labels[cursor:end] = [IGNORE_INDEX] * max(0, end - cursor)
            cursor += round_length
        labels[cursor:] = [IGNORE_INDEX] * max(0, len(labels) - cursor)
        if cursor != len(input_ids):
            raise BadSample(
                "tokenization_mismatch",
                f"record {record.id}: per-round lengths add up to {cursor} tokens, the conversation has "
                f"{len(input_ids)} (tokenizer legacy={encoder.legacy})",
            )
        return Encoded(input_ids, labels[: len(input_ids)])


class LMTemplate:
    name = "lm"

    def check(self, record: Record) -> None:
        if record.images or record.image_tag_count():
            raise BadSample("image_token_mismatch", f"record {record.id}: template 'lm' takes no images")
        if len(record.turns) != 2:
            raise BadSample("malformed_record", f"record {record.id}: template 'lm' takes one human (context) and "
                            f"one gpt (target) turn, got {len(record.turns)} turns")

    def encode(self, record: Record, encoder: TextEncoder) -> Encoded:
        context = encoder.with_bos(encoder.encode(record.turns[0].text))
        target = encoder.encode(record.turns[1].text + "\n")
        return Encoded(context + target, [IGNORE_INDEX] * len(context) + target)


TEMPLATES: dict[str, Template] = {t.name: t for t in (PlainTemplate(), VicunaV1Template(), LMTemplate())}


def get_template(name: str) -> Template:
    from .config import TEMPLATE_ALIASES

    if name not in TEMPLATE_ALIASES:
        raise DataError(f"unknown template {name!r}; use one of {sorted(TEMPLATE_ALIASES)}")
    return TEMPLATES[TEMPLATE_ALIASES[name]]


def fit_to_length(encoded: Encoded, record: Record, image_tokens: int, model_max_length: int) -> tuple[Encoded, bool]:
    """Truncate the text so the sample, each image expanded to ``image_tokens`` positions, fits.

    Returns the (possibly shorter) sample and whether it was truncated. A sample whose images do not fit,
    or that has no trained token left, is bad (``too_long``).
    """
    images = len(record.images)
    if images * image_tokens > model_max_length:
        raise BadSample("too_long", f"record {record.id}: {images} image(s) x {image_tokens} tokens exceed "
                        f"model_max_length={model_max_length}")
    budget = model_max_length - images * (image_tokens - 1)
    if len(encoded.input_ids) <= budget:
        return encoded, False
    input_ids, labels = encoded.input_ids[:budget], encoded.labels[:budget]
    if input_ids.count(IMAGE_TOKEN_INDEX) != images:
        raise BadSample("too_long", f"record {record.id}: an image falls beyond model_max_length={model_max_length} "
                        "after truncation")
    if all(label == IGNORE_INDEX for label in labels):
        raise BadSample("too_long", f"record {record.id}: no trained token left within "
                        f"model_max_length={model_max_length}")
    return Encoded(input_ids, labels), True
