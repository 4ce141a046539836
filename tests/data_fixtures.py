"""Shared, built-once data for the tests/test_data_* modules (all in one temporary folder per session).

Synthetic data sets and tokenizers are built on first use and cached for the session; the dirty data set
holds one record for each bad-sample reason between valid ones.
"""

from __future__ import annotations

import atexit
import functools
import io
import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

_ROOT = Path(tempfile.mkdtemp(prefix="mm_data_tests."))
atexit.register(shutil.rmtree, _ROOT, True)


@functools.lru_cache(maxsize=None)
def synthetic(kind: str = "pretrain", num: int = 64, image_size: int = 56, seed: int = 0) -> Path:
    """``mm-data synth`` output folder for these arguments (its data.json is ``folder / 'data.json'``)."""
    from mm_plugin.data.synthetic import synthesize

    folder = _ROOT / f"synth-{kind}-{num}-{image_size}-{seed}"
    synthesize(folder, num, kind=kind, seed=seed, image_size=image_size, workers=1)
    return folder


def tokenizer_dir() -> Path:
    return synthetic("text", 4) / "tokenizer"


def sentencepiece_processors():
    """``(with_dummy_prefix, without)`` sentencepiece processors of the test tokenizer, built from its file only."""
    import sentencepiece
    from sentencepiece import sentencepiece_model_pb2

    path = tokenizer_dir() / "tokenizer.model"
    with_prefix = sentencepiece.SentencePieceProcessor(model_file=str(path))
    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(path.read_bytes())
    proto.normalizer_spec.add_dummy_prefix = False
    without_prefix = sentencepiece.SentencePieceProcessor(model_proto=proto.SerializeToString())
    return with_prefix, without_prefix


def save_image(path: Path, size=(64, 48), mode="RGB", fmt="JPEG", seed=0, **save_args) -> Path:
    """A small image with structure (gradients + noise), so resizing has something to do."""
    rng = np.random.default_rng(seed)
    width, height = size
    y, x = np.mgrid[0:height, 0:width]
    rgb = np.stack([x * 255 / max(width - 1, 1), y * 255 / max(height - 1, 1), (x + y) % 256], -1)
    rgb = np.clip(rgb + rng.normal(0, 25, rgb.shape), 0, 255).astype(np.uint8)
    image = Image.fromarray(rgb)
    if mode == "I;16":
        image = Image.fromarray((rgb[..., 0].astype(np.uint16) * 40))
    elif mode == "RGBA":
        alpha = (rng.random((height, width)) * 255).astype(np.uint8)
        image = Image.fromarray(np.dstack([rgb, alpha]), "RGBA")
    elif mode == "P":
        image = image.quantize(16)
        image.info["transparency"] = 3
    elif mode != "RGB":
        image = image.convert(mode)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, format=fmt, **save_args)
    return path


def write_json(path: Path, records) -> Path:
    path.write_text(json.dumps(records, indent=1), encoding="utf-8")
    return path


def pretrain_record(rid: str, image, caption="a red circle at the top left", prompt="<image>\nDescribe the image."):
    record = {"id": rid, "conversations": [{"from": "human", "value": prompt}, {"from": "gpt", "value": caption}]}
    if image is not None:
        record["image"] = image
    return record


DIRTY_REASONS = {
    # record id -> the reason it must be replaced for (template plain, model_max_length 64, 16 tokens/image)
    "bad-malformed": "malformed_record",
    "bad-absolute": "unsafe_image_path",
    "bad-escape": "unsafe_image_path",
    "bad-symlink": "unsafe_image_path",
    "bad-missing": "missing_image",
    "bad-empty": "empty_image_file",
    "bad-text": "not_an_image",
    "bad-truncated": "corrupt_image",
    "bad-bomb": "decompression_bomb",
    "bad-no-tag": "image_token_mismatch",
    "bad-no-image": "image_token_mismatch",
    "bad-caption": "empty_caption",
}


@functools.lru_cache(maxsize=None)
def dirty_dataset() -> Path:
    """A plain-template data set: valid records ``ok-N`` with one record per bad reason in between.

    Its ``data.json`` caps images at 100x100 pixels, so ``bad-bomb`` (120x120) is a decompression bomb.
    The unusual but valid modes (CMYK, 16-bit, palette with transparency, RGBA, EXIF-rotated) are among
    the valid records.
    """
    folder = _ROOT / "dirty"
    images = folder / "images"
    outside = folder / "outside"
    save_image(outside / "secret.jpg")
    valid_images = {
        "ok-rgb": save_image(images / "00000/rgb.jpg", (70, 50)),
        "ok-cmyk": save_image(images / "00000/cmyk.jpg", (50, 70), mode="CMYK"),
        "ok-16bit": save_image(images / "00000/grey16.png", (60, 60), mode="I;16", fmt="PNG"),
        "ok-palette": save_image(images / "00000/palette.png", (64, 40), mode="P", fmt="PNG"),
        "ok-rgba": save_image(images / "00000/rgba.png", (40, 64), mode="RGBA", fmt="PNG"),
        "ok-exif": _exif_rotated(images / "00000/exif.jpg"),
        "ok-grey": save_image(images / "00000/grey.jpg", (80, 60), mode="L"),
    }
    (images / "00000/empty.jpg").write_bytes(b"")
    (images / "00000/notes.jpg").write_text("this is not an image\n")
    whole = save_image(images / "00000/whole.jpg", (90, 90)).read_bytes()
    (images / "00000/truncated.jpg").write_bytes(whole[: len(whole) // 2])
    save_image(images / "00000/huge.jpg", (120, 120))
    os.symlink(outside / "secret.jpg", images / "00000/link.jpg")

    bad = {
        "bad-malformed": {"id": "bad-malformed", "image": "00000/rgb.jpg", "conversations": "not a list"},
        "bad-absolute": pretrain_record("bad-absolute", str(outside / "secret.jpg")),
        "bad-escape": pretrain_record("bad-escape", "../outside/secret.jpg"),
        "bad-symlink": pretrain_record("bad-symlink", "00000/link.jpg"),
        "bad-missing": pretrain_record("bad-missing", "00000/nowhere.jpg"),
        "bad-empty": pretrain_record("bad-empty", "00000/empty.jpg"),
        "bad-text": pretrain_record("bad-text", "00000/notes.jpg"),
        "bad-truncated": pretrain_record("bad-truncated", "00000/truncated.jpg"),
        "bad-bomb": pretrain_record("bad-bomb", "00000/huge.jpg"),
        "bad-no-tag": pretrain_record("bad-no-tag", "00000/rgb.jpg", prompt="Describe the image."),
        "bad-no-image": pretrain_record("bad-no-image", None),
        "bad-caption": pretrain_record("bad-caption", "00000/rgb.jpg", caption="   "),
    }
    records = []
    valid = list(valid_images.items())
    for position, (rid, record) in enumerate(bad.items()):
        name, path = valid[position % len(valid)]
        records.append(pretrain_record(f"ok-{position}-{name[3:]}", str(path.relative_to(images))))
        records.append(record)
    write_json(folder / "dirty.json", records)

    from mm_plugin.data.config import data_config_json

    config = data_config_json(data_path="dirty.json", data_folder="images", tokenizer_path=str(tokenizer_dir()),
                              template="plain", image_size=56, model_max_length=64)
    config["dataset_param"]["preprocess_parameters"]["train_pipeline"]["max_image_pixels"] = 100 * 100
    config["dataset_param"]["max_bad_fraction"] = 1.0
    (folder / "data.json").write_text(json.dumps(config, indent=2))
    return folder


def _exif_rotated(path: Path) -> Path:
    """A JPEG whose EXIF orientation says 'rotate 90 degrees' (tag 274 = 6)."""
    save_image(path, (72, 40))
    image = Image.open(path)
    exif = image.getexif()
    exif[274] = 6
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", exif=exif.tobytes(), quality=95)
    path.write_bytes(buffer.getvalue())
    return path
