"""One LLaVA record, checked for shape: ``{"id", "image", "conversations": [{"from", "value"}, ...]}``.

This is the structure shared by LLaVA-Pretrain (``blip_laion_cc_sbu_558k.json``) and LLaVA-Instruct
(``llava_v1_5_mix665k.json``); a record without ``image`` is a text-only conversation. Whether a record
suits a template (one image for ``plain``, none for ``lm``) is the template's business.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from .errors import BadSample

IMAGE_TAG = "<image>"
"""The placeholder for one image in the conversation text."""

HUMAN, GPT = "human", "gpt"
_ROLES = {"human": HUMAN, "user": HUMAN, "gpt": GPT, "assistant": GPT}
"""``from`` values accepted; ShareGPT-style ``user``/``assistant`` are read as ``human``/``gpt``."""


@dataclasses.dataclass(frozen=True)
class Turn:
    role: str
    """``human`` or ``gpt``."""
    text: str


@dataclasses.dataclass(frozen=True)
class Record:
    id: str
    """The record's ``id`` (or ``#<index>`` when it has none), for messages."""
    images: tuple[str, ...]
    """Image paths relative to ``data_folder``, in the order of the ``<image>`` tags."""
    turns: tuple[Turn, ...]

    def image_tag_count(self) -> int:
        return sum(turn.text.count(IMAGE_TAG) for turn in self.turns)


def record_id(raw: Any, index: int) -> str:
    """The id used in messages: the record's own ``id`` if it has one, else its position."""
    if isinstance(raw, dict) and isinstance(raw.get("id"), (str, int)):
        return str(raw["id"])
    return f"#{index}"


def parse_record(raw: Any, index: int) -> Record:
    """Check the record's shape and return it typed; raise ``BadSample('malformed_record')`` otherwise."""
    rid = record_id(raw, index)
    if not isinstance(raw, dict):
        raise BadSample("malformed_record", f"record {rid} is a {type(raw).__name__}, not an object")

    image = raw.get("image")
    if image is None:
        images: tuple[str, ...] = ()
    elif isinstance(image, str):
        images = (image,)
    elif isinstance(image, list) and all(isinstance(item, str) for item in image):
        images = tuple(image)
    else:
        raise BadSample("malformed_record", f"record {rid}: 'image' must be a path or a list of paths")
    if any(not path.strip() for path in images):
        raise BadSample("missing_image", f"record {rid}: empty image path")

    conversations = raw.get("conversations")
    if not isinstance(conversations, list) or not conversations:
        raise BadSample("malformed_record", f"record {rid}: 'conversations' must be a non-empty list")
    turns = []
    for position, turn in enumerate(conversations):
        if not isinstance(turn, dict) or not isinstance(turn.get("value"), str):
            raise BadSample("malformed_record", f"record {rid}: turn {position} needs a string 'value'")
        role = _ROLES.get(turn.get("from"))
        if role is None:
            raise BadSample(
                "malformed_record", f"record {rid}: turn {position} has 'from'={turn.get('from')!r}, "
                "expected 'human' or 'gpt'")
        turns.append(Turn(role, turn["value"]))

    # Original LLaVA drops a conversation's first turn when it is not from the human.
    if turns[0].role != HUMAN:
        turns = turns[1:]
    for position, turn in enumerate(turns):
        expected = HUMAN if position % 2 == 0 else GPT
        if turn.role != expected:
            raise BadSample("malformed_record", f"record {rid}: turns must alternate human/gpt (turn {position} "
                            f"is {turn.role})")
    if not turns or turns[-1].role != GPT:
        raise BadSample("malformed_record", f"record {rid}: the conversation must end with a 'gpt' turn")
    for turn in turns:
        if turn.role == HUMAN and not turn.text.strip():
            raise BadSample("malformed_record", f"record {rid}: empty human turn")
        if turn.role == GPT and not turn.text.strip():
            raise BadSample("empty_caption", f"record {rid}: empty gpt turn")
    return Record(rid, images, tuple(turns))
