"""Token choice: the same processed logits as Hugging Face's processors; sampling seeded and sound."""

import json
from pathlib import Path

import pytest
import torch

from mm_plugin.inference.sampling import GenerationConfig, GenerationConfigError, TokenSelector
from seeds import varied

pytestmark = pytest.mark.numeric

VOCAB = 50
REPO = Path(__file__).resolve().parents[1]


def hugging_face_scores(logits, history, settings):
    from transformers.generation.logits_process import (
        LogitsProcessorList, RepetitionPenaltyLogitsProcessor, SuppressTokensLogitsProcessor,
        TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper)

    processors = LogitsProcessorList([SuppressTokensLogitsProcessor(settings["never"])])
    if settings["repetition_penalty"] != 1.0:
        processors.append(RepetitionPenaltyLogitsProcessor(settings["repetition_penalty"]))
    processors.append(TemperatureLogitsWarper(settings["temperature"]))
    if settings["top_k"]:
        processors.append(TopKLogitsWarper(settings["top_k"]))
    if settings["top_p"] < 1.0:
        processors.append(TopPLogitsWarper(settings["top_p"]))
    return processors(history, logits.clone())


@pytest.mark.parametrize("settings", [
    dict(temperature=0.7, top_k=0, top_p=1.0, repetition_penalty=1.0),
    dict(temperature=1.0, top_k=5, top_p=1.0, repetition_penalty=1.0),
    dict(temperature=1.3, top_k=0, top_p=0.8, repetition_penalty=1.0),
    dict(temperature=0.5, top_k=10, top_p=0.9, repetition_penalty=1.4),
    dict(temperature=1.0, top_k=0, top_p=1.0, repetition_penalty=0.8),
])
def test_processed_scores_equal_hugging_face(settings):
    generator = torch.Generator().manual_seed(varied(0))
    logits = torch.randn(4, VOCAB, generator=generator) * 3
    prompts = [torch.randint(0, VOCAB, (n,), generator=generator).tolist() for n in (3, 7, 1, 12)]
    never = [4, 9]
    config = GenerationConfig(do_sample=True, **settings)
    selector = TokenSelector(config, VOCAB, never, prompts, torch.device("cpu"))
    width = max(map(len, prompts))
    # Hugging Face's repetition penalty reads the history; pad each row with a token it already holds.
    history = torch.tensor([p + [p[0]] * (width - len(p)) for p in prompts])
    expected = hugging_face_scores(logits, history, {**settings, "never": never})
    got = selector.scores(logits, new_tokens=0)
    assert torch.equal(got.isinf(), expected.isinf())
    assert torch.allclose(got[~got.isinf()], expected[~expected.isinf()], rtol=1e-6, atol=0)
    assert got.isinf().any()  # something was filtered


def test_greedy_is_the_arg_max_of_the_processed_scores():
    logits = torch.randn(3, VOCAB, generator=torch.Generator().manual_seed(varied(1)))
    selector = TokenSelector(GenerationConfig(repetition_penalty=2.0), VOCAB, [int(logits[0].argmax())],
                             [[int(logits[1].argmax())], [], []], torch.device("cpu"))
    expected = selector.scores(logits, 0).argmax(dim=-1)
    tokens = selector(logits, new_tokens=0)
    assert torch.equal(tokens, expected)
    assert tokens[0] != logits[0].argmax()  # suppressed
    assert tokens[2] == logits[2].argmax()


def test_sampling_is_seeded_and_follows_the_distribution():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0] + [-30.0] * (VOCAB - 4)]).repeat(4000, 1)

    def draw(seed):
        config = GenerationConfig(do_sample=True, seed=varied(seed))
        return TokenSelector(config, VOCAB, [], [[]] * 4000, torch.device("cpu"))(logits, 0)

    first, again, other = draw(0), draw(0), draw(1)
    assert torch.equal(first, again) and not torch.equal(first, other)
    frequencies = torch.bincount(first, minlength=VOCAB)[:4].float() / first.numel()
    assert torch.allclose(frequencies, logits[0, :4].softmax(-1), atol=0.03)


def test_top_k_one_and_temperature_zero_are_greedy():
    logits = torch.randn(5, VOCAB, generator=torch.Generator().manual_seed(varied(2)))
    greedy = logits.argmax(dim=-1)
    for config in (GenerationConfig(do_sample=True, top_k=1), GenerationConfig(do_sample=True, temperature=0.0)):
        assert torch.equal(TokenSelector(config, VOCAB, [], [[]] * 5, torch.device("cpu"))(logits, 0), greedy)


def test_min_new_tokens_masks_every_end_token_until_reached():
    logits = torch.zeros(1, VOCAB)
    logits[0, 3], logits[0, 7] = 10.0, 9.0
    selector = TokenSelector(GenerationConfig(eos_token_id=[3, 7], min_new_tokens=2), VOCAB, [], [[]],
                             torch.device("cpu"))
    assert selector(logits, new_tokens=1).item() not in (3, 7)
    assert selector(logits, new_tokens=2).item() == 3


def test_published_generation_config_loads():
    """MindSpeed-MM's inference_llava.json generation_config block, all 45 fields."""
    raw = json.loads((REPO / "examples/llava1.5/inference_llava.json").read_text())["generation_config"]
    config = GenerationConfig.from_dict(raw)
    assert config.eos_token_id == (raw["eos_token_id"],) and config.do_sample == raw["do_sample"]
    assert (config.temperature, config.top_k, config.top_p) == (raw["temperature"], raw["top_k"], raw["top_p"])


def test_the_first_published_generation_configs_load():
    """inference_llava.json up to 2024-11 held six more generation fields (transformers_version and beam/
    assistant settings without effect here)."""
    raw = json.loads((REPO / "examples/llava1.5/inference_llava.json").read_text())["generation_config"]
    raw.update(early_stopping=False, length_penalty=1.0, low_memory=None, num_assistant_tokens=5,
               num_assistant_tokens_schedule="heuristic", transformers_version="4.44.0")
    assert GenerationConfig.from_dict(raw) == GenerationConfig.from_dict(
        json.loads((REPO / "examples/llava1.5/inference_llava.json").read_text())["generation_config"])


def test_every_hugging_face_generation_field_is_accepted(caplog):
    """Older MindSpeed-MM files carry fields such as early_stopping or length_penalty (beam search only): each
    field of transformers' GenerationConfig is accepted at its default, those without effect named in one line."""
    import logging

    from transformers import GenerationConfig as HuggingFaceGenerationConfig

    every = {key: value for key, value in HuggingFaceGenerationConfig().to_dict().items()
             if key not in ("transformers_version", "_from_model_config")}
    with caplog.at_level(logging.INFO, logger="mm_plugin.inference.sampling"):
        GenerationConfig.from_dict({**every, "max_new_tokens": 8})
        GenerationConfig.from_dict({"max_new_tokens": 8, "early_stopping": True, "length_penalty": 2.0})
    lines = [r.getMessage() for r in caplog.records if "GenerationConfig fields without effect" in r.getMessage()]
    assert len(lines) == 2 and "early_stopping" in lines[0] and "cache_implementation" in lines[0]
    assert lines[1].endswith("early_stopping, length_penalty")


@pytest.mark.parametrize("field, value, message", [
    ("num_beams", 4, "generation_config.num_beams = 4: not supported; leave it at 1"),
    ("top_kk", 5, "generation_config.top_kk: unknown field"),
    ("min_p", 0.1, "generation_config.min_p = 0.1: not supported; leave it at None"),  # would change the tokens
    ("top_p", 1.5, r"top_p = 1.5: use a value in \(0, 1\]"),
    ("max_new_tokens", 0, "max_new_tokens = 0: use a positive integer"),
])
def test_bad_generation_fields_are_named(field, value, message):
    with pytest.raises(GenerationConfigError, match=message):
        GenerationConfig.from_dict({"max_new_tokens": 8, field: value})
