"""LlavaPipeline, the inference JSON and the CLI, on a tiny llava-hf style directory (CPU, fp32)."""

import copy
import functools
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from convert_fixtures import hf_llava_dir
from seeds import varied

pytestmark = pytest.mark.numeric

REPO = Path(__file__).resolve().parents[1]
SHAPE = "gqa"
NEW_TOKENS = 10
PUBLISHED_EXTRAS = {  # MindSpeed-MM's inference_llava.json fields besides the model sections
    "pipeline_class": "LlavaPipeline", "dtype": "fp32", "device": "npu",
    "tokenizer": {"hub_backend": "hf", "autotokenizer_name": "AutoTokenizer", "from_pretrained": "tokenizer"},
    "image_processer_path": "tokenizer",
}


@pytest.fixture(scope="module")
def converted(megatron_single, tmp_path_factory):
    """The tiny HF LLaVA converted on first use into a cache folder."""
    from mm_plugin.inference.pipeline import LlavaPipeline

    cache = tmp_path_factory.mktemp("cache")
    pipe = LlavaPipeline.from_pretrained(hf_llava_dir(SHAPE), cache_dir=cache, image_aspect_ratio="crop")
    return pipe, next((cache / "converted").iterdir())


@pytest.fixture(scope="module")
def pipe(converted):
    return converted[0]


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """Three photos of different sizes and aspect ratios, as files."""
    folder = tmp_path_factory.mktemp("images")
    paths = []
    for index, size in enumerate([(64, 48), (40, 90), (120, 120)]):
        pixels = np.random.default_rng(varied(index)).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
        paths.append(folder / f"photo{index}.png")
        Image.fromarray(pixels).save(paths[-1])
    return paths


@functools.lru_cache(maxsize=None)
def hugging_face_model():
    from transformers import LlavaForConditionalGeneration

    return LlavaForConditionalGeneration.from_pretrained(hf_llava_dir(SHAPE)).eval()


def hugging_face_answer(pipe, template, prompt, image_paths, **settings):
    """Hugging Face's model and image processor, from the same directory, and its ``generate``, on our
    prompt ids (image placeholders expanded to its image token)."""
    from transformers import AutoProcessor

    from mm_plugin.inference.prompts import prompt_ids

    hf = hugging_face_model()
    ids = []
    for token in prompt_ids(pipe.tokenizer, template, prompt, len(image_paths)):
        ids += [hf.config.image_token_id] * hf.config.image_seq_length if token == -200 else [token]
    pixels = {}
    if image_paths:
        processor = AutoProcessor.from_pretrained(hf_llava_dir(SHAPE)).image_processor
        rgb = [Image.open(path).convert("RGB") for path in image_paths]
        pixels["pixel_values"] = processor(rgb, return_tensors="pt")["pixel_values"]
    settings = {"max_new_tokens": NEW_TOKENS, "do_sample": False, "eos_token_id": pipe.tokenizer.eos_token_id,
                "pad_token_id": 0, **settings}
    with torch.no_grad():
        output = hf.generate(input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                             **pixels, **settings)
    tokens = output[0, len(ids):].tolist()
    if settings["eos_token_id"] in tokens:
        tokens = tokens[: tokens.index(settings["eos_token_id"])]
    return tokens


def test_answers_equal_hugging_face(pipe, images):
    from mm_plugin.inference.config import Query

    queries = [Query("What is in the picture?", [images[0]]),
               Query("Compare <image> with <image>, please.", [images[1], Image.open(images[2])]),
               Query("Tell me a story.")]
    templates = ["vicuna_v1", "raw", "vicuna_v1"]
    for query, template in zip(queries, templates):
        answer = pipe.answer([query], template, max_new_tokens=NEW_TOKENS)[0]
        paths = [images[1], images[2]] if len(query.images) == 2 else query.images
        expected = hugging_face_answer(pipe, template, query.prompt, paths, suppress_tokens=pipe.never_generated)
        assert answer.tokens == expected and answer.error is None
        assert answer.text == pipe.tokenizer.decode(expected, skip_special_tokens=True)
    assert pipe(images[0], "What is in the picture?", max_new_tokens=NEW_TOKENS) == \
        pipe(str(images[0]), "What is in the picture?", max_new_tokens=NEW_TOKENS)


def test_image_pad_and_vocabulary_padding_ids_are_never_generated(pipe, images):
    tokenizer = pipe.tokenizer
    image, pad = tokenizer.convert_tokens_to_ids("<image>"), tokenizer.pad_token_id
    rows_without_token = set(range(len(tokenizer), pipe.model.vocab_size))
    assert {image, pad} | rows_without_token == set(pipe.never_generated) and rows_without_token
    free = [hugging_face_answer(pipe, "vicuna_v1", f"Question {i}?", [path], max_new_tokens=20)
            for i, path in enumerate(images)]
    assert set(sum(free, [])) & set(pipe.never_generated)  # unsuppressed, the model does produce them
    for i, path in enumerate(images):
        assert not set(pipe.answer([_query(f"Question {i}?", [path])], max_new_tokens=20)[0].tokens) \
            & set(pipe.never_generated)


def _query(prompt, images=()):
    from mm_plugin.inference.config import Query

    return Query(prompt, list(images))


def test_a_batch_answers_as_one_query_at_a_time_and_names_bad_inputs(pipe, images, tmp_path):
    (tmp_path / "notes.jpg").write_text("not an image")
    context = pipe.model.llava_config.language.max_sequence_length
    queries = [
        _query("What is it?", [images[0]]),
        _query("What is it?", [tmp_path / "missing.jpg"]),
        _query("Compare <image> and <image>.", [images[1]]),
        _query("What colour?", [images[2]]),
        _query("What is it?", [tmp_path / "notes.jpg"]),
        _query("word " * context, [images[1]]),
        _query("And this?", [images[1], images[2]]),
        _query("What is it?", [str(tmp_path / "nul\x00.jpg")]),
        _query("What is \ud800 it?", [images[0]]),  # a lone surrogate (e.g. from a broken JSON escape)
    ]
    answers = pipe.answer(queries, max_new_tokens=NEW_TOKENS)
    errors = {i: a.error for i, a in enumerate(answers) if a.error}
    assert set(errors) == {1, 2, 4, 5, 7, 8}
    assert "missing.jpg" in errors[1] and "no such file" in errors[1]
    assert "2 <image> tag(s) for 1 image(s)" in errors[2]
    assert "notes.jpg" in errors[4] and "not an image" in errors[4]
    assert "query 5" in errors[5] and f"context of {context}" in errors[5]
    assert "query 7" in errors[7] and "contains a NUL byte" in errors[7]
    assert "query 8" in errors[8] and "not valid Unicode text" in errors[8]
    for index in (0, 3, 6):
        alone = pipe.answer([queries[index]], max_new_tokens=NEW_TOKENS)[0]
        assert answers[index].tokens == alone.tokens and len(alone.tokens) > 0
    with pytest.raises(ValueError, match="missing.jpg"):
        pipe(tmp_path / "missing.jpg", "What is it?")


def test_streamed_pieces_make_up_the_answer(pipe, images):
    pieces = list(pipe.stream(images[0], "Describe it.", max_new_tokens=NEW_TOKENS))
    assert len(pieces) > 1 and "".join(pieces) == pipe(images[0], "Describe it.", max_new_tokens=NEW_TOKENS)


def test_prompt_formats():
    from mm_plugin.data.tokenization import VICUNA_V1_SYSTEM
    from mm_plugin.inference.prompts import PromptError, build_prompt

    assert build_prompt("vicuna_v1", "What is this?", 1) == f"{VICUNA_V1_SYSTEM} USER: <image>\nWhat is this? ASSISTANT:"
    assert build_prompt("vicuna_v1", "Is <image> like <image>?", 2) == \
        f"{VICUNA_V1_SYSTEM} USER: <image>\n<image>\nIs  like ? ASSISTANT:"
    assert build_prompt("vicuna_v1", "Hello", 0) == f"{VICUNA_V1_SYSTEM} USER: Hello ASSISTANT:"
    assert build_prompt("plain", "", 1) == "<image>"
    assert build_prompt("raw", "<image> then text", 1) == "<image> then text"
    with pytest.raises(PromptError, match="'raw': the prompt has 0 <image> tag"):
        build_prompt("raw", "no tag", 1)
    with pytest.raises(PromptError, match="unknown template 'chatml'"):
        build_prompt("chatml", "x", 0)


def published_style_json(folder, **changes) -> dict:
    """The converted model.json plus MindSpeed-MM's inference-only fields, in the converted folder."""
    raw = json.loads((folder / "model.json").read_text())
    raw["text_decoder"]["is_encoder_decoder"] = False
    published = json.loads((REPO / "examples/llava1.5/inference_llava.json").read_text())
    raw.update(copy.deepcopy(PUBLISHED_EXTRAS), generation_config=published["generation_config"])
    raw.update(changes)
    return raw


def test_the_first_published_inference_layout_loads(converted):
    """inference_llava.json of 2024-09-30: the vision geometry in image_encoder, gelu in the vision tower, six
    more generation fields; the same configuration as today's layout."""
    from mm_plugin.inference.config import load_inference_config

    _, folder = converted
    today = folder / "today.json"
    today.write_text(json.dumps(published_style_json(folder)))
    raw = published_style_json(folder)
    vision = raw["image_encoder"]["vision_encoder"]
    for key in ("add_class_token", "class_token_len", "patch_size", "image_size"):
        if key in vision:
            raw["image_encoder"][key] = vision.pop(key)
    vision["activation_func"] = "gelu"
    raw["generation_config"].update(early_stopping=False, length_penalty=1.0, transformers_version="4.44.0")
    first = folder / "first.json"
    first.write_text(json.dumps(raw))
    old, new = load_inference_config(first), load_inference_config(today)
    assert old.model.vision == new.model.vision and old.generation == new.generation


def test_the_published_fields_drive_the_pipeline(pipe, converted, images):
    """Model sections, tokenizer, processor and MindSpeed-MM's generation_config (sampling at 0.2)."""
    from mm_plugin.inference.pipeline import LlavaPipeline

    _, folder = converted
    path = folder / "inference.json"
    raw = published_style_json(folder, image_path=[str(p) for p in images], prompts="Hi?", image_aspect_ratio="crop")
    raw["generation_config"]["do_sample"] = True  # as MindSpeed-MM published it (the example here is greedy)
    path.write_text(json.dumps(raw))
    from_json = LlavaPipeline.from_config(path)
    config = from_json.generation
    assert config.do_sample and config.temperature == 0.2 and config.top_k == 50 and config.max_new_tokens == 512
    sampled = from_json.answer([_query("Hi?", [images[0]])], max_new_tokens=NEW_TOKENS)[0]
    same_settings = pipe.answer([_query("Hi?", [images[0]])], max_new_tokens=NEW_TOKENS, do_sample=True,
                                temperature=0.2, top_k=50, top_p=1.0, eos_token_id=2, pad_token_id=0)[0]
    assert sampled.tokens == same_settings.tokens


def test_a_training_checkpoint_directory_as_ckpt_path(pipe, converted, images, tmp_path):
    """The projector from a dist_checkpointing --save directory, as after stage 1."""
    from mm_plugin.inference.pipeline import LlavaPipeline
    from mm_plugin.training.checkpointing import save_checkpoint

    _, folder = converted
    model = pipe.model

    def answer() -> list[int]:
        return pipe.answer([_query("What is it?", [images[0]])], max_new_tokens=NEW_TOKENS, pad_token_id=0)[0].tokens

    untrained = answer()
    original = [p.detach().clone() for p in model.vision_projection.parameters()]
    try:
        generator = torch.Generator().manual_seed(varied(0))
        for _ in range(8):  # "training" that changes what the model answers (a random tiny model may ignore
            with torch.no_grad():  # one draw of the projector: its answer is then the untrained one)
                for parameter in model.vision_projection.parameters():
                    parameter.copy_(torch.randn(parameter.shape, generator=generator) * 3)
            trained = answer()
            if trained != untrained:
                break
        trained_weights = [p.detach().clone() for p in model.vision_projection.parameters()]
        save_checkpoint(tmp_path / "stage1", 7, model, None, None, consumed_samples=0, model_config={},
                        trainable_only=False, save_optimizer=False, save_rng=False)
    finally:
        with torch.no_grad():
            for parameter, value in zip(model.vision_projection.parameters(), original):
                parameter.copy_(value)
    assert answer() == untrained
    raw = published_style_json(folder, image_aspect_ratio="crop")
    raw["image_encoder"]["vision_projector"]["ckpt_path"] = str(tmp_path / "stage1")
    path = folder / "from_checkpoint.json"
    path.write_text(json.dumps(raw))
    loaded = LlavaPipeline.from_config(path)
    assert all(torch.equal(p, q) for p, q in zip(loaded.model.vision_projection.parameters(), trained_weights))
    assert loaded.answer([_query("What is it?", [images[0]])], max_new_tokens=NEW_TOKENS, do_sample=False)[0].tokens \
        == trained != untrained


def test_missing_paths_are_listed_together(converted, tmp_path):
    from mm_plugin.inference.config import InferenceConfigError, load_inference_config

    _, folder = converted
    raw = published_style_json(folder)
    raw["text_decoder"]["ckpt_path"] = "nowhere/vicuna.pt"
    raw["tokenizer"]["from_pretrained"] = "nowhere/tokenizer"
    path = folder / "broken.json"
    path.write_text(json.dumps(raw))
    with pytest.raises(InferenceConfigError, match="text_decoder.ckpt_path .*nowhere/vicuna.pt; tokenizer.from_pretrained"
                                                   " .*nowhere/tokenizer\\. `mm-convert llava-hf"):
        load_inference_config(path)


def test_image_and_prompt_pairing():
    from mm_plugin.inference.config import InferenceConfigError, queries

    def pairs(images, prompts):
        return [(q.prompt, q.images) for q in queries(images, prompts, str, "test")]

    assert pairs("a.jpg", ["x", "y"]) == [("x", ["a.jpg"]), ("y", ["a.jpg"])]
    assert pairs(["a.jpg", "b.jpg"], "x") == [("x", ["a.jpg"]), ("x", ["b.jpg"])]
    assert pairs([["a.jpg", "b.jpg"], None], ["x", "y"]) == [("x", ["a.jpg", "b.jpg"]), ("y", [])]
    assert pairs(None, "x") == [("x", [])]
    with pytest.raises(InferenceConfigError, match="3 image_path entries for 2 prompts"):
        pairs(["a", "b", "c"], ["x", "y"])


def test_cli_refuses_a_malicious_weight_file_in_one_line(tmp_path, capsys):
    import os
    import shutil

    from mm_plugin.inference.cli import main

    source = hf_llava_dir("gqa")
    folder = tmp_path / "llava-hf"
    folder.mkdir()
    for file in source.iterdir():
        if not file.name.endswith((".safetensors", ".index.json")):
            shutil.copy(file, folder / file.name)

    class CreatesFile:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'created-by-the-pickle'}",))

    torch.save({"lm_head.weight": torch.zeros(2), "payload": CreatesFile()}, folder / "pytorch_model.bin")
    assert main(["--hf-dir", str(folder), "--prompt", "Hello"]) == 2
    err = capsys.readouterr().err
    assert "pytorch_model.bin: refused to load" in err and "Traceback" not in err
    assert not (tmp_path / "created-by-the-pickle").exists()


def test_cli_streams_answers_in_order_and_reports_failures(pipe, converted, images, tmp_path, capsys):
    from mm_plugin.inference.cli import main

    _, folder = converted
    path = folder / "cli.json"
    raw = published_style_json(folder, image_aspect_ratio="crop")
    raw["generation_config"].update(do_sample=False, max_new_tokens=NEW_TOKENS)
    path.write_text(json.dumps(raw))
    published_script = ["--micro-batch-size", "2", "--seq-length", "2048", "--tokenizer-type", "NullTokenizer",
                        "--no-masked-softmax-fusion", "--img-h", "42", "--img-w", "42", "--patch-dim", "14"]
    argv = ["--mm-model", str(path), *published_script, "--output-json", str(tmp_path / "answers.json"),
            "--image", str(images[0]), "--prompt", "What is it?",
            "--image", str(tmp_path / "gone.png"), "--prompt", "And this?",
            "--image", f"{images[1]},{images[2]}", "--prompt", "Compare them.",
            "--image", str(images[0]), "--prompt", "Why? " * 4000]  # longer than the context
    assert main(argv) == 1  # two queries failed
    out = capsys.readouterr().out
    written = json.loads((tmp_path / "answers.json").read_text())
    assert [a["error"] is None for a in written] == [True, False, True, False]
    for number, answer in enumerate(written[:3], start=1):
        assert f"[{number}/4]" in out and f"Q: {answer['prompt']}\nA: {answer['text']}" in out
    assert out.index("[1/4]") < out.index("[2/4]") < out.index("[3/4]") < out.index("[4/4]")
    assert "gone.png" in written[1]["error"] and "context" in written[3]["error"]
    # the console repeats a long prompt cut short; the JSON keeps it whole
    assert written[3]["prompt"] == "Why? " * 4000 and "Why? " * 4000 not in out
    assert f"Q: {('Why? ' * 60)[:300]}... [19700 more characters]\nA: " in out
    expected = pipe.answer([_query("Compare them.", [images[1], images[2]])], max_new_tokens=NEW_TOKENS,
                           pad_token_id=0)[0]  # the JSON's pad token (never generated)
    assert written[2]["tokens"] == expected.tokens
    assert main(["--mm-model", str(path), "--img-h", "336", "--prompt", "x"]) == 2
    assert "--img-h 336, but the model's vision tower takes 42" in capsys.readouterr().err
