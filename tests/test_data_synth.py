"""mm-data synth: LLaVA layouts, a loadable LLaMA-style tokenizer, learnable captions, determinism."""

import hashlib
import json

import numpy as np
import pytest
from data_fixtures import synthetic
from PIL import Image

from mm_plugin.data import build_datasets, load_data_config, load_tokenizer
from mm_plugin.data.cli import main
from mm_plugin.data.synthetic import COLOURS, POSITIONS, SHAPES, named_in


def digest(folder):
    files = sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.endswith((".mmidx", ".lock")))
    return {str(p.relative_to(folder)): hashlib.sha1(p.read_bytes()).hexdigest() for p in files}


def test_pretrain_layout_is_llava_pretrain():
    folder = synthetic("pretrain", 64)
    records = json.loads((folder / "pretrain.json").read_text())
    assert len(records) == 64
    for record in records:
        assert set(record) == {"id", "image", "conversations"}
        assert record["image"].startswith("00000/") and record["image"].endswith(".jpg")
        human, gpt = record["conversations"]
        assert human["from"] == "human" and "<image>" in human["value"] and gpt["from"] == "gpt"
        assert (folder / "images" / record["image"]).is_file()
    config = load_data_config(folder / "data.json")
    assert config.template == "plain" and config.image.crop_height == 56


def test_tokenizer_loads_both_ways_with_llama_ids():
    from transformers import AutoTokenizer, LlamaTokenizer

    folder = synthetic("pretrain", 64) / "tokenizer"
    for tokenizer in (AutoTokenizer.from_pretrained(str(folder)),
                      LlamaTokenizer.from_pretrained(str(folder), add_bos_token=True, legacy=False)):
        assert (tokenizer.unk_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id) == (0, 1, 2)
        assert tokenizer("a red circle").input_ids[0] == 1
        assert tokenizer.unk_token_id not in tokenizer("a red circle at the top left").input_ids
    assert load_tokenizer(folder).pad_token_id == 0


def test_same_tokenizer_for_every_kind_and_seed():
    files = [synthetic(kind, 8, seed=seed) / "tokenizer/tokenizer.model"
             for kind, seed in (("pretrain", 0), ("instruct", 3), ("text", 5))]
    assert len({f.read_bytes() for f in files}) == 1


def test_deterministic_from_the_seed(tmp_path):
    assert main(["synth", "--out", str(tmp_path / "a"), "--num", "40", "--image-size", "56", "--seed", "4"]) == 0
    assert main(["synth", "--out", str(tmp_path / "b"), "--num", "40", "--image-size", "56", "--seed", "4",
                 "--tokenizer", str(tmp_path / "a/tokenizer"), "--workers", "1"]) == 0
    assert digest(tmp_path / "a") == digest(tmp_path / "b")
    main(["synth", "--out", str(tmp_path / "c"), "--num", "40", "--image-size", "56", "--seed", "5"])
    assert (tmp_path / "a/pretrain.json").read_text() != (tmp_path / "c/pretrain.json").read_text()


def _read_scene(path):
    """Colour, position and rough shape of the one shape in the picture, from the pixels alone."""
    image = np.asarray(Image.open(path).convert("RGB")).astype(int)
    height, width = image.shape[:2]
    short = min(width, height)
    top, left = (height - short) // 2, (width - short) // 2
    square = image[top:top + short, left:left + short]
    background = np.median(square.reshape(-1, 3), axis=0)
    mask = np.abs(square - background).sum(-1) > 60
    colour = min(COLOURS, key=lambda name: np.abs(np.median(square[mask], axis=0) - COLOURS[name]).sum())
    ys, xs = np.nonzero(mask)
    centre = (xs.mean() / short, ys.mean() / short)
    position = min(POSITIONS, key=lambda name: np.hypot(*(np.subtract(POSITIONS[name], centre))))
    return colour, position, mask.sum() / (short * short)


def test_captions_are_true_of_the_pictures():
    folder = synthetic("pretrain", 64)
    for record in json.loads((folder / "pretrain.json").read_text()):
        caption = record["conversations"][1]["value"]
        colour, position, area = _read_scene(folder / "images" / record["image"])
        assert caption.endswith(f"{colour} {caption.split()[2]} at the {position}"), (caption, colour, position)
        assert caption.split()[2] in SHAPES and 0.02 < area < 0.2
    sizes = {Image.open(p).size for p in (folder / "images/00000").iterdir()}
    assert len({w / h > 1 for w, h in sizes}) == 2 and len(sizes) > 30  # portrait and landscape, many sizes


def test_instruct_has_multi_turn_and_text_only_and_tokenizes_cleanly():
    folder = synthetic("instruct", 64)
    records = json.loads((folder / "instruct.json").read_text())
    assert any("image" not in r for r in records) and any(len(r["conversations"]) > 2 for r in records)
    config = load_data_config(folder / "data.json")
    assert config.template == "vicuna_v1"
    dataset, _ = build_datasets(config, load_tokenizer(config.tokenizer_path), image_tokens=16, model_max_length=400)
    for position in range(len(dataset)):
        dataset.load(position)  # raises on any mismatch or bad record


def test_text_kind_is_a_copy_task_spanning_an_image():
    folder = synthetic("text", 32, image_size=56)
    tokenizer = load_tokenizer(folder / "tokenizer")
    config = load_data_config(folder / "data.json")
    assert config.template == "lm"
    for record in json.loads((folder / "text.json").read_text()):
        hint, caption = (turn["value"] for turn in record["conversations"])
        assert "image" not in record
        assert set(hint.split()) == set(caption.split()) - {"a", "an", "at", "the"}
        assert 16 - 3 <= len(tokenizer(hint, add_special_tokens=False).input_ids) <= 16


def test_instruct_mix_has_the_665k_mixs_layout_and_composition():
    from mm_plugin.data.synthetic import MIX_SOURCES

    folder = synthetic("instruct-mix", 2000)
    records = json.loads((folder / "instruct-mix.json").read_text())
    assert len(records) == 2000
    text_only = [r for r in records if "image" not in r]
    total = sum(source.thousands for source in MIX_SOURCES.values())
    assert abs(len(text_only) / len(records) - MIX_SOURCES["sharegpt"].thousands / total) < 0.02
    folders = {r["image"].rsplit("/", 1)[0] for r in records if "image" in r}
    assert folders == {"coco/train2017", "gqa/images", "ocr_vqa/images", "textvqa/train_images", "vg/VG_100K",
                       "vg/VG_100K_2"}
    coco = [r for r in records if r.get("image", "").startswith("coco/")]
    assert abs(len(coco) / len(records) - 0.55) < 0.04  # LLaVA, VQAv2, OKVQA, A-OKVQA, RefCOCO: 364 of 664
    assert all(r["id"] == r["image"][-16:-4] for r in coco)  # COCO ids, repeated across sources
    assert len({r["id"] for r in coco}) < len(coco) / 2
    firsts = [r["conversations"][0]["value"] for r in records if "image" in r]
    assert all(v.count("<image>") == 1 and (v.startswith("<image>\n") or v.endswith("\n<image>")) for v in firsts)
    assert any(v.startswith("<image>") for v in firsts) and any(v.endswith("<image>") for v in firsts)
    rounds = [len(r["conversations"]) // 2 for r in records]
    assert min(rounds) == 1 and max(rounds) == 10
    answers = [len(turn["value"].split()) for r in records for turn in r["conversations"] if turn["from"] == "gpt"]
    assert sum(a == 1 for a in answers) > len(answers) / 3 and max(answers) > 15  # one-word VQA and long answers
    for record in records:
        roles = [turn["from"] for turn in record["conversations"]]
        assert roles == ["human", "gpt"] * (len(roles) // 2)
        if "image" in record:
            assert (folder / "images" / record["image"]).is_file()
    # the same path is the same picture, whichever record names it: every answer about it names one colour
    colours = {}
    for r in coco:
        for turn in r["conversations"]:
            colour = named_in(turn["value"])["colour"] if turn["from"] == "gpt" else None
            if colour:
                colours.setdefault(r["image"], set()).add(colour)
    assert all(len(named) == 1 for named in colours.values())
    assert sum(1 for r in coco if r["image"] in colours) > len(colours)  # pictures were shared


@pytest.mark.parametrize("kind", ["pretrain", "instruct", "instruct-mix"])
def test_check_passes_on_synthetic_sets(kind, tmp_path):
    folder = synthetic(kind, 64)
    assert main(["check", "--config", str(folder / "data.json"), "--workers", "1", "--quiet",
                 "--report", str(tmp_path / "r.json")]) == 0
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["bad"] == 0 and report["fit_to_train"] and report["caption_tokens"]["min"] > 0
