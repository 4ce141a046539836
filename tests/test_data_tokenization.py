"""Templates and tokenizer_image_token against ids built independently with sentencepiece."""

import pytest
from data_fixtures import sentencepiece_processors, tokenizer_dir

from mm_plugin.data.errors import BadSample, DataError
from mm_plugin.data.records import parse_record
from mm_plugin.data.tokenization import (
    IGNORE_INDEX,
    IMAGE_TOKEN_INDEX,
    VICUNA_V1_SYSTEM,
    Encoded,
    TextEncoder,
    fit_to_length,
    get_template,
    load_tokenizer,
    tokenizer_image_token,
)

BOS, EOS = 1, 2


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(tokenizer_dir())


@pytest.fixture(scope="module")
def encoder(tokenizer):
    return TextEncoder(tokenizer)


@pytest.fixture(scope="module")
def sp():
    return sentencepiece_processors()


def record(turns, image=None, rid="r"):
    raw = {"id": rid, "conversations": [{"from": role, "value": text} for role, text in turns]}
    if image is not None:
        raw["image"] = image
    return parse_record(raw, 0)


def test_tokenizer_is_llama_style_and_not_legacy(tokenizer):
    assert (tokenizer.unk_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id) == (0, 1, 2)
    assert tokenizer.pad_token_id == tokenizer.unk_token_id == 0
    assert tokenizer.legacy is False


def test_load_tokenizer_names_missing_folder(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_tokenizer(tmp_path / "nope")


def test_tokenizer_image_token_matches_sentencepiece_chunks(encoder, sp):
    with_prefix, _ = sp
    prompt = "a picture <image>\nof a red circle<image> and more"
    chunks = prompt.split("<image>")
    expected = [BOS] + with_prefix.encode(chunks[0]) + [IMAGE_TOKEN_INDEX] + with_prefix.encode(chunks[1]) \
        + [IMAGE_TOKEN_INDEX] + with_prefix.encode(chunks[2])
    assert tokenizer_image_token(prompt, encoder) == expected
    assert tokenizer_image_token("<image>", encoder) == [BOS, IMAGE_TOKEN_INDEX]


@pytest.mark.parametrize("prompt", ["<image>\nDescribe the image briefly.", "Give a short description.\n<image>"])
def test_plain_drops_the_prompt_and_trains_caption_and_newline(encoder, sp, prompt):
    with_prefix, _ = sp
    caption = "a blue star at the center"
    encoded = get_template("llava-plain").encode(record([("human", prompt), ("gpt", caption)], "x.jpg"), encoder)
    caption_ids = with_prefix.encode(caption + "\n")
    assert encoded.input_ids == [BOS, IMAGE_TOKEN_INDEX] + caption_ids
    assert encoded.labels == [IGNORE_INDEX, IGNORE_INDEX] + caption_ids


def _expected_vicuna(sp, turns, with_image, legacy=False):
    """ids and labels of a vicuna_v1 conversation, built by hand from the conversation text.

    Each <image>-chunk gets sentencepiece's dummy prefix; text right after '</s>' gets it only with a
    legacy tokenizer. Labels: the answer tokens (what follows 'ASSISTANT:' in its segment) and its </s>.
    """
    with_prefix, without_prefix = sp
    ids, labels = [BOS], [IGNORE_INDEX]
    text = VICUNA_V1_SYSTEM + " "
    segments = []  # (text, prefixed, answer) pieces between special tokens
    for number, (question, answer) in enumerate(turns):
        head = f"USER: {question} ASSISTANT:"
        segments.append((text + head if number == 0 else head, number == 0, " " + answer))
        text = ""
    for number, (head, prefixed, answer) in enumerate(segments):
        if with_image and number == 0:
            before, after = head.split("<image>")
            ids += with_prefix.encode(before) + [IMAGE_TOKEN_INDEX]
            labels += [IGNORE_INDEX] * (len(with_prefix.encode(before)) + 1)
            head, prefixed = after, True
        encode = with_prefix.encode if prefixed or legacy else without_prefix.encode
        head_ids, all_ids = encode(head), encode(head + answer)
        assert all_ids[: len(head_ids)] == head_ids
        ids += all_ids + [EOS]
        labels += [IGNORE_INDEX] * len(head_ids) + all_ids[len(head_ids):] + [EOS]
    return ids, labels


def test_vicuna_v1_multi_turn_with_image_matches_hand_built(encoder, sp):
    turns = [("<image>\nWhat colour is the shape?", "The shape is red."),
             ("Where is the circle?", "The circle is at the top left."),
             ("Describe the image.", "a red circle at the top left.")]
    raw_turns = [(role, text) for question, answer in turns for role, text in (("human", question), ("gpt", answer))]
    encoded = get_template("vicuna_v1").encode(record(raw_turns, "x.jpg"), encoder)
    ids, labels = _expected_vicuna(sp, turns, with_image=True)
    assert encoded.input_ids == ids
    assert encoded.labels == labels
    assert encoded.input_ids.count(IMAGE_TOKEN_INDEX) == 1


def test_vicuna_v1_moves_the_image_tag_to_the_front_as_llava(encoder, sp):
    raw = [("human", "What colour is the shape?\n<image>"), ("gpt", "The shape is red.")]
    encoded = get_template("vicuna_v1").encode(record(raw, "x.jpg"), encoder)
    ids, labels = _expected_vicuna(sp, [("<image>\nWhat colour is the shape?", "The shape is red.")], True)
    assert (encoded.input_ids, encoded.labels) == (ids, labels)


def test_vicuna_v1_text_only(encoder, sp):
    turns = [("Repeat after me: a green cross at the center", "a green cross at the center"),
             ("Now say only the colour: a green cross at the center", "green")]
    raw = [(role, text) for question, answer in turns for role, text in (("human", question), ("gpt", answer))]
    encoded = get_template("vicuna_v1").encode(record(raw), encoder)
    assert (encoded.input_ids, encoded.labels) == _expected_vicuna(sp, turns, with_image=False)


def test_vicuna_v1_legacy_tokenizer_also_adds_up(sp):
    from transformers import LlamaTokenizer

    legacy = TextEncoder(LlamaTokenizer.from_pretrained(str(tokenizer_dir()), add_bos_token=True, legacy=True))
    assert legacy.legacy is True
    turns = [("<image>\nWhat shape do you see?", "I see a star."), ("Where is the star?", "The star is at the center.")]
    raw = [(role, text) for question, answer in turns for role, text in (("human", question), ("gpt", answer))]
    encoded = get_template("vicuna_v1").encode(record(raw, "x.jpg"), legacy)
    assert (encoded.input_ids, encoded.labels) == _expected_vicuna(sp, turns, with_image=True, legacy=True)


def test_vicuna_v1_mismatch_is_a_bad_sample_not_silent(encoder, tokenizer):
    # A human turn that contains the assistant separator breaks LLaVA's round split.
    raw = [("human", "Say ' ASSISTANT: ' please"), ("gpt", "ok"), ("human", "again"), ("gpt", "ok")]
    with pytest.raises(BadSample) as caught:
        get_template("vicuna_v1").encode(record(raw), encoder)
    assert caught.value.reason == "tokenization_mismatch"

    class WrongLegacy(TextEncoder):  # the -1 correction applied to a legacy tokenizer does not add up
        def __init__(self):
            from transformers import LlamaTokenizer

            super().__init__(LlamaTokenizer.from_pretrained(str(tokenizer_dir()), add_bos_token=True, legacy=True))
            self.legacy = False

    raw = [("human", "hi"), ("gpt", "ok"), ("human", "again"), ("gpt", "ok")]
    with pytest.raises(BadSample, match="legacy=False") as caught:
        get_template("vicuna_v1").encode(record(raw), WrongLegacy())
    assert caught.value.reason == "tokenization_mismatch"


def test_lm_template_trains_only_the_target(encoder, sp):
    with_prefix, _ = sp
    encoded = get_template("lm").encode(record([("human", "red circle top left"), ("gpt", "a red circle")]), encoder)
    context, target = [BOS] + with_prefix.encode("red circle top left"), with_prefix.encode("a red circle\n")
    assert encoded.input_ids == context + target
    assert encoded.labels == [IGNORE_INDEX] * len(context) + target


@pytest.mark.parametrize("template,turns,image,reason", [
    ("plain", [("human", "Describe."), ("gpt", "a cat")], "x.jpg", "image_token_mismatch"),
    ("plain", [("human", "<image>"), ("gpt", "a cat")], None, "image_token_mismatch"),
    ("plain", [("human", "<image>"), ("gpt", "a"), ("human", "b"), ("gpt", "c")], "x.jpg", "malformed_record"),
    ("vicuna_v1", [("human", "<image><image> two"), ("gpt", "a cat")], "x.jpg", "image_token_mismatch"),
    ("lm", [("human", "<image> hint"), ("gpt", "a cat")], "x.jpg", "image_token_mismatch"),
])
def test_template_checks(template, turns, image, reason):
    with pytest.raises(BadSample) as caught:
        get_template(template).check(record(turns, image))
    assert caught.value.reason == reason


@pytest.mark.parametrize("raw,reason", [
    ([1, 2], "malformed_record"),
    ({"conversations": []}, "malformed_record"),
    ({"conversations": [{"from": "robot", "value": "x"}]}, "malformed_record"),
    ({"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": ""}]}, "empty_caption"),
    ({"conversations": [{"from": "human", "value": "q"}]}, "malformed_record"),
    ({"image": 7, "conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}, "malformed_record"),
])
def test_malformed_records(raw, reason):
    with pytest.raises(BadSample) as caught:
        parse_record(raw, 3)
    assert caught.value.reason == reason


def test_first_turn_from_gpt_is_dropped_as_llava():
    parsed = parse_record({"conversations": [{"from": "gpt", "value": "hello"}, {"from": "human", "value": "q"},
                                             {"from": "gpt", "value": "a"}]}, 0)
    assert [turn.role for turn in parsed.turns] == ["human", "gpt"]


def test_fit_to_length_truncates_text_and_rejects_images_that_do_not_fit():
    rec = record([("human", "<image>"), ("gpt", "a b c d e")], "x.jpg")
    encoded = Encoded([BOS, IMAGE_TOKEN_INDEX, 10, 11, 12, 13], [IGNORE_INDEX, IGNORE_INDEX, 10, 11, 12, 13])
    same, truncated = fit_to_length(encoded, rec, image_tokens=16, model_max_length=21)
    assert not truncated and same.input_ids == encoded.input_ids  # 6 - 1 + 16 = 21 fits exactly
    cut, truncated = fit_to_length(encoded, rec, image_tokens=16, model_max_length=19)
    assert truncated and cut.input_ids == [BOS, IMAGE_TOKEN_INDEX, 10, 11]
    assert len(cut.input_ids) - 1 + 16 == 19 and cut.labels == [IGNORE_INDEX, IGNORE_INDEX, 10, 11]
    with pytest.raises(BadSample, match="exceed") as caught:
        fit_to_length(encoded, rec, image_tokens=16, model_max_length=15)
    assert caught.value.reason == "too_long"
    with pytest.raises(BadSample, match="no trained token") as caught:
        fit_to_length(encoded, rec, image_tokens=16, model_max_length=17)
    late = Encoded([BOS, 10, 11, 12, IMAGE_TOKEN_INDEX, 13], [IGNORE_INDEX, 10, 11, 12, IGNORE_INDEX, 13])
    with pytest.raises(BadSample, match="beyond") as caught:
        fit_to_length(late, rec, image_tokens=16, model_max_length=18)
    assert caught.value.reason == "too_long"
