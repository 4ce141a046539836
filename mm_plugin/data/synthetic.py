"""A synthetic LLaVA data set whose captions can be learned from the pictures.

Each image holds one shape (circle, square, triangle, diamond, cross, star) of one colour at one of five
positions on a plain grey background; its caption says exactly that: "a red circle at the top left".
Image sizes and aspect ratios vary, so resizing and cropping are exercised; shapes always lie inside the
central square, the part the centre crop keeps, so every caption stays true for the model's input.

Three kinds, in exactly the layouts of the real data sets:

* ``pretrain``: LLaVA-Pretrain (``DIR/pretrain.json``, images under ``DIR/images/00000/...jpg``), one
  human prompt with ``<image>`` and the caption; template ``llava-plain``.
* ``instruct``: LLaVA-Instruct-style multi-turn questions about colour, shape and position, plus
  text-only conversations (no ``image`` key); template ``vicuna_v1``.
* ``instruct-mix``: the layout of ``llava_v1_5_mix665k.json`` (``DIR/instruct-mix.json``): its ten sources in
  the shares the LLaVA-1.5 paper gives (``MIX_SOURCES``), images under the released sub-folders
  (``coco/train2017/000000033471.jpg``, ``gqa/images/…``, ``ocr_vqa/images/…``, ``textvqa/train_images/…``,
  ``vg/VG_100K/…``, ``vg/VG_100K_2/…``, relative to ``DIR/images``), COCO images and ids shared by several
  sources, text-only ShareGPT conversations, one to ten rounds, one-word VQA answers next to long
  conversational ones, the image tag before or after the first question; template ``vicuna_v1``.
* ``text``: the copy task for LM pre-training (template ``lm``): the human turn is the caption's content
  words, shuffled and repeated to about the length of an image's token span, the answer is the caption.
  A small LM trained on it learns to copy from its context, which is what stage 1 then needs.

Every kind writes ``DIR/tokenizer/`` (sentencepiece BPE, LLaMA-style: unk 0, bos 1, eos 2, pad = unk,
byte fallback, ``legacy: false``) and ``DIR/data.json`` in MindSpeed-MM's layout. The tokenizer is
trained on a fixed corpus covering all kinds, so it is the same file for every kind, seed and size.
Everything is deterministic from ``seed``.
"""

from __future__ import annotations

import dataclasses
import io
import json
import math
import multiprocessing
import os
import re
import shutil
import tempfile
import zlib
from pathlib import Path
from typing import Any, Optional

import numpy as np
from PIL import Image, ImageDraw
from tqdm import tqdm

from ..safe_io import atomic_path, write_text
from .config import data_config_json
from .records import IMAGE_TAG
from .tokenization import VICUNA_V1_ROLES, VICUNA_V1_SYSTEM

COLOURS = {
    "red": (220, 30, 30),
    "green": (30, 160, 40),
    "blue": (30, 70, 220),
    "yellow": (240, 220, 20),
    "purple": (140, 40, 170),
    "orange": (245, 140, 20),
    "white": (250, 250, 250),
    "black": (15, 15, 15),
}
SHAPES = ("circle", "square", "triangle", "diamond", "cross", "star")
POSITIONS = {  # centre of the shape, as fractions of the central square
    "top left": (0.25, 0.25),
    "top right": (0.75, 0.25),
    "bottom left": (0.25, 0.75),
    "bottom right": (0.75, 0.75),
    "center": (0.5, 0.5),
}
PRETRAIN_PROMPTS = (
    "<image>\nDescribe the image briefly.",
    "Give a short description of the picture.\n<image>",
    "<image>\nWhat is in the picture?",
    "Write a terse caption for the image.\n<image>",
)
KINDS = ("pretrain", "instruct", "instruct-mix", "text")
TEMPLATE_OF_KIND = {"pretrain": "llava-plain", "instruct": "vicuna_v1", "instruct-mix": "vicuna_v1", "text": "lm"}
IMAGES_PER_FOLDER = 1000
TOKENIZER_VOCAB_SIZE = 768


@dataclasses.dataclass(frozen=True)
class Scene:
    colour: str
    shape: str
    position: str

    @property
    def caption(self) -> str:
        article = "an" if self.colour[0] in "aeiou" else "a"
        return f"{article} {self.colour} {self.shape} at the {self.position}"

    @property
    def words(self) -> list[str]:
        """The caption's content words (the copy task's hint)."""
        return [self.colour, self.shape, *self.position.split()]

    @property
    def labels(self) -> tuple[int, int, int]:
        """Class indices of colour, shape and position (in ``COLOURS``, ``SHAPES``, ``POSITIONS`` order)."""
        return list(COLOURS).index(self.colour), SHAPES.index(self.shape), list(POSITIONS).index(self.position)


def named_in(text: str) -> dict[str, Optional[str]]:
    """The first colour, shape and position that ``text`` names (``None`` where it names none)."""
    named = {}
    for attribute, vocabulary in (("colour", COLOURS), ("shape", SHAPES), ("position", POSITIONS)):
        found = [(match.start(), word) for word in vocabulary for match in re.finditer(rf"\b{word}\b", text)]
        named[attribute] = min(found)[1] if found else None
    return named


def parse_caption(caption: str) -> Scene:
    """The scene a synthetic caption describes; ``ValueError`` when it names no colour, shape or position."""
    named = named_in(caption)
    if None in named.values():
        raise ValueError(f"not a synthetic caption: {caption!r}")
    return Scene(**named)


def _scene(rng: np.random.Generator) -> Scene:
    return Scene(str(rng.choice(list(COLOURS))), str(rng.choice(SHAPES)), str(rng.choice(list(POSITIONS))))


def _shape_points(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    if shape == "triangle":
        return [(cx, cy - r), (cx + r * 0.95, cy + r * 0.8), (cx - r * 0.95, cy + r * 0.8)]
    if shape == "diamond":
        return [(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)]
    if shape == "star":
        return [(cx + (r if k % 2 == 0 else r * 0.45) * math.sin(k * math.pi / 5),
                 cy - (r if k % 2 == 0 else r * 0.45) * math.cos(k * math.pi / 5)) for k in range(10)]
    raise ValueError(shape)


def draw_scene(scene: Scene, rng: np.random.Generator, image_size: int) -> Image.Image:
    """A picture of ``scene``: size and aspect vary around ``image_size``, the shape inside the central square."""
    short = int(rng.integers(max(8, int(image_size * 0.75)), int(image_size * 1.5) + 1))
    long = int(short * rng.uniform(1.0, 1.8))
    width, height = (long, short) if rng.random() < 0.5 else (short, long)
    grey = int(rng.integers(95, 165))
    image = Image.new("RGB", (width, height), (grey, grey, grey))
    draw = ImageDraw.Draw(image)
    fx, fy = POSITIONS[scene.position]
    jitter = rng.uniform(-0.04, 0.04, size=2)
    cx = (width - short) / 2 + (fx + jitter[0]) * short
    cy = (height - short) / 2 + (fy + jitter[1]) * short
    r = short * 0.17
    colour = COLOURS[scene.colour]
    if scene.shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=colour)
    elif scene.shape == "square":
        draw.rectangle([cx - r * 0.85, cy - r * 0.85, cx + r * 0.85, cy + r * 0.85], fill=colour)
    elif scene.shape == "cross":
        arm = r * 0.33
        draw.rectangle([cx - r, cy - arm, cx + r, cy + arm], fill=colour)
        draw.rectangle([cx - arm, cy - r, cx + arm, cy + r], fill=colour)
    else:
        draw.polygon(_shape_points(scene.shape, cx, cy, r), fill=colour)
    return image


# -- conversations ---------------------------------------------------------------------------------------

def _questions(scene: Scene) -> list[tuple[str, str]]:
    return [
        ("What colour is the shape?", f"The shape is {scene.colour}."),
        ("What shape do you see?", f"I see a {scene.shape}."),
        (f"Where is the {scene.shape}?", f"The {scene.shape} is at the {scene.position}."),
        ("Describe the image.", f"{scene.caption}."),
    ]


def _turns(pairs: list[tuple[str, str]]) -> list[dict[str, str]]:
    turns = []
    for question, answer in pairs:
        turns += [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]
    return turns


def _pretrain_record(index: int, scene: Scene, rng: np.random.Generator) -> dict[str, Any]:
    prompt = PRETRAIN_PROMPTS[int(rng.integers(len(PRETRAIN_PROMPTS)))]
    return {"id": f"{index:09d}", "image": _image_name(index),
            "conversations": _turns([(prompt, scene.caption)])}


def _instruct_record(index: int, scene: Scene, rng: np.random.Generator) -> dict[str, Any]:
    if rng.random() < 0.2:  # text-only: a copy request, answerable without a picture
        pairs = [(f"Repeat after me: {scene.caption}", scene.caption)]
        if rng.random() < 0.5:
            pairs.append((f"Now say only the colour: {scene.caption}", scene.colour))
        return {"id": f"{index:09d}", "conversations": _turns(pairs)}
    questions = _questions(scene)
    chosen = rng.permutation(len(questions))[: int(rng.integers(1, len(questions) + 1))]
    pairs = [questions[k] for k in chosen]
    first, answer = pairs[0]
    pairs[0] = (f"<image>\n{first}" if rng.random() < 0.7 else f"{first}\n<image>", answer)
    return {"id": f"{index:09d}", "image": _image_name(index), "conversations": _turns(pairs)}


@dataclasses.dataclass(frozen=True)
class MixSource:
    thousands: int
    """Records of this source in llava_v1_5_mix665k (LLaVA-1.5 paper, Table 7)."""
    folder: Optional[str]
    """Image sub-folder as released (None: text-only)."""
    max_rounds: int
    """Question-answer rounds per record: 1 to this."""
    answers: str
    """``word`` (VQA: "Answer the question using a single word or phrase."), ``sentence`` or ``long``."""


MIX_SOURCES = {
    "llava_instruct": MixSource(158, "coco/train2017", 6, "long"),
    "sharegpt": MixSource(40, None, 5, "long"),
    "vqav2": MixSource(83, "coco/train2017", 10, "word"),
    "gqa": MixSource(72, "gqa/images", 10, "word"),
    "okvqa": MixSource(9, "coco/train2017", 1, "word"),
    "ocrvqa": MixSource(80, "ocr_vqa/images", 8, "word"),
    "aokvqa": MixSource(66, "coco/train2017", 1, "sentence"),
    "textcaps": MixSource(22, "textvqa/train_images", 1, "sentence"),
    "refcoco": MixSource(48, "coco/train2017", 8, "sentence"),
    "vg": MixSource(86, "vg/VG_100K", 8, "sentence"),
}
SHORT_ANSWER_PROMPT = "Answer the question using a single word or phrase."
COCO_RECORDS_PER_IMAGE = 3
"""COCO pictures serve several sources (LLaVA-Instruct, VQAv2, OKVQA, A-OKVQA, RefCOCO): ids repeat."""


def _mix_image(source: MixSource, rng: np.random.Generator, coco_images: int) -> tuple[str, str]:
    """(image path as released, record id) for a record of ``source``."""
    if source.folder == "coco/train2017":
        number = int(rng.integers(coco_images))
        return f"{source.folder}/{number:012d}.jpg", f"{number:012d}"
    if source.folder == "textvqa/train_images":
        name = "".join(rng.choice(list("0123456789abcdef"), 16))
        return f"{source.folder}/{name}.jpg", name
    number = int(rng.integers(10**6, 10**7))
    folder = source.folder
    if folder == "vg/VG_100K" and rng.random() < 0.4:
        folder = "vg/VG_100K_2"
    return f"{folder}/{number}.jpg", str(number)


def _mix_answer(scene: Scene, question: int, style: str, rng: np.random.Generator) -> str:
    word = (scene.colour, scene.shape, scene.position)[question % 3]
    if style == "word":
        return word
    if style == "sentence":
        return _questions(scene)[question % 4][1]
    sentences = [answer for _, answer in _questions(scene)]  # the tokenizer's corpus: no byte-level pieces
    return " ".join(sentences[k] for k in sorted(rng.permutation(len(sentences))[: int(rng.integers(2, 5))]))


def _mix_record(index: int, seed: int, coco_images: int) -> tuple[dict[str, Any], Optional[int]]:
    """One record of the instruct mix and the number that draws its picture (None: text-only)."""
    rng = np.random.default_rng([seed, index])
    names = list(MIX_SOURCES)
    shares = np.array([MIX_SOURCES[name].thousands for name in names], dtype=np.float64)
    source = MIX_SOURCES[names[int(rng.choice(len(names), p=shares / shares.sum()))]]
    rounds = int(rng.integers(1, source.max_rounds + 1))
    if source.folder is None:  # ShareGPT: text-only, long answers, ids like "i6IyJda_0"
        scenes = [_scene(rng) for _ in range(rounds)]
        pairs = [(f"Repeat after me: {scene.caption}", _mix_answer(scene, 0, "long", rng)) for scene in scenes]
        rid = "".join(rng.choice(list("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"), 7))
        return {"id": f"{rid}_{int(rng.integers(4))}", "conversations": _turns(pairs)}, None
    path, rid = _mix_image(source, rng, coco_images)
    picture = zlib.crc32(path.encode())  # the same path is the same picture, whichever record names it
    scene = _scene(np.random.default_rng([seed, picture]))
    questions = [question for question, _ in _questions(scene)]
    pairs = []
    for round_index in range(rounds):
        asked = int(rng.integers(len(questions)))
        question = questions[asked]
        if source.answers == "word":
            question = f"{question}\n{SHORT_ANSWER_PROMPT}"
        pairs.append((question, _mix_answer(scene, asked, source.answers, rng)))
    first, answer = pairs[0]
    pairs[0] = (f"<image>\n{first}" if rng.random() < 0.6 else f"{first}\n<image>", answer)
    return {"id": rid, "image": path, "conversations": _turns(pairs)}, picture


def _text_record(index: int, scene: Scene, rng: np.random.Generator, hint_tokens: int,
                 word_tokens: dict[str, int]) -> dict[str, Any]:
    hint: list[str] = []
    used = 0
    while True:
        words = [scene.words[k] for k in rng.permutation(len(scene.words))]
        for word in words:
            if used + word_tokens[word] > hint_tokens:
                return {"id": f"{index:09d}", "conversations": _turns([(" ".join(hint), scene.caption)])}
            hint.append(word)
            used += word_tokens[word]


def _image_name(index: int) -> str:
    return f"{index // IMAGES_PER_FOLDER:05d}/{index:09d}.jpg"


# -- tokenizer ---------------------------------------------------------------------------------------------

def _tokenizer_corpus() -> list[str]:
    """Every text the three kinds can produce (over all scenes), plus the vicuna_v1 frame."""
    lines = [prompt.replace(IMAGE_TAG, "") for prompt in PRETRAIN_PROMPTS]  # the tag is never tokenized
    for colour in COLOURS:
        for shape in SHAPES:
            for position in POSITIONS:
                scene = Scene(colour, shape, position)
                lines.append(scene.caption)
                lines.append(" ".join(scene.words))
                lines.append(f"Repeat after me: {scene.caption} Now say only the colour: {scene.caption}")
                for question, answer in _questions(scene):
                    lines.append(f"{VICUNA_V1_SYSTEM} {VICUNA_V1_ROLES[0]}: {question} {VICUNA_V1_ROLES[1]}: {answer}</s>")
    return lines


def train_tokenizer(directory: Path, model_max_length: int) -> None:
    """Train the sentencepiece BPE model on the fixed corpus and save a Hugging Face tokenizer folder."""
    import sentencepiece
    from sentencepiece import sentencepiece_model_pb2

    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(_tokenizer_corpus()), model_writer=model, vocab_size=TOKENIZER_VOCAB_SIZE,
        model_type="bpe", unk_id=0, bos_id=1, eos_id=2, pad_id=-1, byte_fallback=True, split_digits=True,
        character_coverage=1.0, add_dummy_prefix=True, remove_extra_whitespaces=False,
        normalization_rule_name="identity", allow_whitespace_only_pieces=True, num_threads=1, minloglevel=2,
    )
    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(model.getvalue())
    # LLaMA's vocabulary tokenizes "USER" after "</s>" one token shorter than " USER", which is what
    # original LLaVA's legacy=False round arithmetic assumes; no "▁U..." piece gives this vocabulary the
    # same property (see tokenization.py).
    kept = [piece for piece in proto.pieces if not piece.piece.startswith("\u2581U")]
    del proto.pieces[:]
    proto.pieces.extend(kept)

    directory.mkdir(parents=True, exist_ok=True)
    with atomic_path(directory / "tokenizer.model") as temporary:
        temporary.write_bytes(proto.SerializeToString())
    special = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<unk>"}
    config = {
        "tokenizer_class": "LlamaTokenizer", "add_bos_token": True, "add_eos_token": False, "legacy": False,
        "model_max_length": model_max_length, "padding_side": "right", "clean_up_tokenization_spaces": False,
        "sp_model_kwargs": {}, **special,
    }
    write_text(directory / "tokenizer_config.json", json.dumps(config, indent=2) + "\n")
    write_text(directory / "special_tokens_map.json", json.dumps(special, indent=2) + "\n")


def _word_tokens(tokenizer_dir: Path) -> dict[str, int]:
    import sentencepiece

    processor = sentencepiece.SentencePieceProcessor(model_file=str(tokenizer_dir / "tokenizer.model"))
    words = {word for colour in COLOURS for shape in SHAPES for position in POSITIONS
             for word in Scene(colour, shape, position).words}
    return {word: len(processor.encode(word)) for word in words}


# -- writing -----------------------------------------------------------------------------------------------

def _draw_and_save(job: tuple[str, int, int, int, str]) -> None:
    folder, seed, index, image_size, name = job
    rng = np.random.default_rng([seed, index])
    scene = _scene(rng)
    image = draw_scene(scene, np.random.default_rng([seed, index, 1]), image_size)
    image.save(os.path.join(folder, name), format="JPEG", quality=95)


def _write_images(out: Path, seed: int, pictures: dict[str, int], image_size: int, workers: int) -> None:
    """Draw every image into a hidden folder, then swap it in as ``out/images`` in one rename.

    ``pictures``: image path (relative to ``out/images``) -> the number its scene is drawn from.
    Thousands of small files are not fsync'ed one by one (that would take longer than drawing them); the
    folder only gets its final name once every image in it is complete.
    """
    staging = Path(tempfile.mkdtemp(prefix=".images.", suffix=".partial", dir=out))
    try:
        for folder in sorted({os.path.dirname(name) for name in pictures}):
            (staging / folder).mkdir(parents=True, exist_ok=True)
        jobs = [(str(staging), seed, picture, image_size, name) for name, picture in pictures.items()]
        progress = dict(total=len(jobs), desc="images", unit="img", leave=False, disable=len(jobs) < 500)
        if workers > 1 and len(jobs) >= 200:
            with multiprocessing.get_context("fork").Pool(workers) as pool:
                for _ in tqdm(pool.imap_unordered(_draw_and_save, jobs, chunksize=64), **progress):
                    pass
        else:
            for job in tqdm(jobs, **progress):
                _draw_and_save(job)
        final = out / "images"
        if final.exists():
            retired = Path(tempfile.mkdtemp(prefix=".images.", suffix=".old", dir=out))
            os.replace(final, retired / "images")
            os.replace(staging, final)
            shutil.rmtree(retired)
        else:
            os.replace(staging, final)
    finally:
        if staging.exists():
            shutil.rmtree(staging)


def _coco_share() -> float:
    total = sum(source.thousands for source in MIX_SOURCES.values())
    return sum(source.thousands for source in MIX_SOURCES.values() if source.folder == "coco/train2017") / total


def synthesize(
    out: str | os.PathLike,
    num: int,
    *,
    kind: str = "pretrain",
    seed: int = 0,
    image_size: int = 336,
    patch_size: int = 14,
    tokenizer: Optional[str | os.PathLike] = None,
    workers: Optional[int] = None,
) -> Path:
    """Write a synthetic data set of ``num`` records to ``out``; returns the path of its ``data.json``.

    ``tokenizer`` copies an existing tokenizer folder instead of training one (the trained one is the
    same for every call anyway). ``image_size`` is the model's input size; the text kind's hints span
    ``(image_size // patch_size)**2`` tokens, as an image does.
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if num < 1:
        raise ValueError("num must be at least 1")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    image_tokens = (image_size // patch_size) ** 2
    model_max_length = image_tokens + (512 if kind == "instruct-mix" else 256)  # multi-round: longer

    tokenizer_dir = out / "tokenizer"
    if tokenizer is not None:
        source = Path(tokenizer)
        if source.resolve() != tokenizer_dir.resolve():
            tokenizer_dir.mkdir(parents=True, exist_ok=True)
            for name in ("tokenizer.model", "tokenizer_config.json", "special_tokens_map.json"):
                with atomic_path(tokenizer_dir / name) as temporary:
                    shutil.copyfile(source / name, temporary)
    else:
        train_tokenizer(tokenizer_dir, model_max_length)

    word_tokens = _word_tokens(tokenizer_dir) if kind == "text" else {}
    records, pictures = [], {}
    coco_images = max(1, round(num * _coco_share() / COCO_RECORDS_PER_IMAGE))
    for index in range(num):
        if kind == "instruct-mix":
            record, picture = _mix_record(index, seed, coco_images)
            records.append(record)
            if picture is not None:
                pictures[record["image"]] = picture
            continue
        rng = np.random.default_rng([seed, index])
        scene = _scene(rng)
        if kind == "pretrain":
            records.append(_pretrain_record(index, scene, rng))
        elif kind == "instruct":
            records.append(_instruct_record(index, scene, rng))
        else:
            records.append(_text_record(index, scene, rng, image_tokens, word_tokens))
        if "image" in records[-1]:
            pictures[records[-1]["image"]] = index
    if pictures:
        _write_images(out, seed, pictures, image_size, workers or min(os.cpu_count() or 1, 8))

    data_name = f"{kind}.json"
    write_text(out / data_name, json.dumps(records, indent=1) + "\n")
    config = data_config_json(
        data_path=data_name, data_folder="images" if kind != "text" else ".", tokenizer_path="tokenizer",
        template=TEMPLATE_OF_KIND[kind], image_size=image_size, model_max_length=model_max_length,
    )
    return write_text(out / "data.json", json.dumps(config, indent=4) + "\n")
