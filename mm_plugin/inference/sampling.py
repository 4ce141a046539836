"""Generation settings and the choice of each next token.

:class:`GenerationConfig` takes MindSpeed-MM's published ``generation_config`` block as it is: the
fields that shape the output are used, the Hugging Face fields that only matter to features not
offered here (beams, constraints, ...) are accepted at their no-op values, and anything else is an
error that names the field.

:class:`TokenSelector` applies, in Hugging Face's order and with its arithmetic: the ids that must
never be generated, the repetition penalty, the minimum length, then for sampling temperature,
top-k and top-p; greedy takes the arg-max.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from typing import Iterable, Optional, Sequence, Union

import torch

logger = logging.getLogger(__name__)


class GenerationConfigError(ValueError):
    """A generation setting that is invalid or not supported, named."""


@dataclasses.dataclass
class GenerationConfig:
    max_new_tokens: Optional[int] = 256
    """Tokens to generate at most per prompt (the context length also bounds it)."""
    max_length: Optional[int] = None
    """Prompt plus new tokens at most (image tokens counted); only used without ``max_new_tokens``."""
    min_new_tokens: int = 0
    """End-of-sequence tokens are not generated before this many new tokens."""
    do_sample: bool = False
    """Sample from the distribution; otherwise greedy. ``temperature == 0`` also means greedy."""
    temperature: float = 1.0
    top_k: int = 0
    """Sample among the ``top_k`` most likely tokens (0: all)."""
    top_p: float = 1.0
    """Sample among the most likely tokens whose probabilities add up to ``top_p`` (1.0: all)."""
    repetition_penalty: float = 1.0
    """Logits of tokens already in the prompt or the answer: divided by it if positive, multiplied if negative."""
    eos_token_id: Union[int, Sequence[int], None] = None
    """Generation of a prompt ends after any of these (default: the tokenizer's end-of-sequence token)."""
    pad_token_id: Optional[int] = None
    """Never generated (besides the tokenizer's pad token)."""
    suppress_tokens: Sequence[int] = ()
    """Further ids never generated."""
    seed: int = 0
    """Seed of the sampling generator (the same on every tensor-parallel rank)."""

    def __post_init__(self):
        if isinstance(self.eos_token_id, int):
            self.eos_token_id = (self.eos_token_id,)
        elif self.eos_token_id is not None:
            self.eos_token_id = tuple(self.eos_token_id)
        self.suppress_tokens = tuple(self.suppress_tokens or ())
        for name in ("max_new_tokens", "max_length"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise GenerationConfigError(f"generation_config.{name} = {value!r}: use a positive integer")
        if self.max_new_tokens is None and self.max_length is None:
            raise GenerationConfigError("generation_config: give max_new_tokens (or max_length)")
        if self.temperature < 0:
            raise GenerationConfigError(f"generation_config.temperature = {self.temperature}: use a value >= 0")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise GenerationConfigError(f"generation_config.top_k = {self.top_k!r}: use an integer >= 0 (0: off)")
        if not 0.0 < self.top_p <= 1.0:
            raise GenerationConfigError(f"generation_config.top_p = {self.top_p}: use a value in (0, 1]")
        if self.repetition_penalty <= 0:
            raise GenerationConfigError(
                f"generation_config.repetition_penalty = {self.repetition_penalty}: use a value > 0 (1.0: off)")

    @property
    def sampling(self) -> bool:
        return self.do_sample and self.temperature > 0

    def new_tokens_for(self, prompt_length: int) -> int:
        """New tokens allowed for a prompt of ``prompt_length`` positions (before the context limit)."""
        if self.max_new_tokens is not None:
            return self.max_new_tokens
        return max(0, self.max_length - prompt_length)

    @classmethod
    def from_dict(cls, raw: dict, source: str = "generation_config") -> "GenerationConfig":
        """MindSpeed-MM's / Hugging Face's ``generation_config`` fields (see the module docstring)."""
        own = {field.name for field in dataclasses.fields(cls)}
        settings, without_effect = {}, []
        for key, value in raw.items():
            if key in own:
                if value is not None:
                    settings[key] = value
            elif key in _INFORMATIONAL:
                logger.info("%s.%s: accepted without effect (%s)", source, key, _INFORMATIONAL[key])
            elif key in _NO_OP_VALUES:
                if value not in _NO_OP_VALUES[key]:
                    raise GenerationConfigError(
                        f"{source}.{key} = {value!r}: not supported; leave it at {_NO_OP_VALUES[key][0]!r}")
            elif key in _hugging_face_fields():
                without_effect.append(key)
            else:
                raise GenerationConfigError(f"{source}.{key}: unknown field (not a Hugging Face GenerationConfig "
                                            "field either); remove it or fix its spelling")
        if without_effect:
            logger.info("%s: Hugging Face GenerationConfig fields without effect here: %s", source,
                        ", ".join(without_effect))
        try:
            return cls(**settings)
        except GenerationConfigError as error:
            raise GenerationConfigError(f"{source}: {error}") from None


_INFORMATIONAL = {
    "bos_token_id": "the tokenizer adds the start token",
    "decoder_start_token_id": "a decoder-only model",
    "use_cache": "the key/value cache is always used",
    "output_attentions": "not returned", "output_hidden_states": "not returned", "output_scores": "not returned",
    "return_dict_in_generate": "results are always per-request records",
    "max_time": "no time limit",
    "transformers_version": "the transformers release that wrote the file",
}

# Hugging Face features not offered here, accepted only at their no-op values (first value: the one to use).
_NO_OP_VALUES = {
    "num_beams": (1, None), "num_beam_groups": (1, None), "num_return_sequences": (1, None),
    "diversity_penalty": (0.0, None), "penalty_alpha": (None,), "guidance_scale": (None, 1.0),
    "constraints": (None,), "force_words_ids": (None,), "bad_words_ids": (None,), "sequence_bias": (None,),
    "begin_suppress_tokens": (None,), "forced_bos_token_id": (None,), "forced_eos_token_id": (None,),
    "forced_decoder_ids": (None,), "prompt_lookup_num_tokens": (None,), "min_length": (0, None),
    "no_repeat_ngram_size": (0, None), "encoder_no_repeat_ngram_size": (0, None),
    "encoder_repetition_penalty": (1.0, None), "typical_p": (1.0, None), "epsilon_cutoff": (0.0, None),
    "eta_cutoff": (0.0, None), "exponential_decay_length_penalty": (None,), "remove_invalid_values": (False, None),
    "renormalize_logits": (False, None), "min_p": (None,), "top_h": (None,), "stop_strings": (None,),
    "dola_layers": (None,), "token_healing": (False, None), "watermarking_config": (None,),
}


@functools.lru_cache(maxsize=None)
def _hugging_face_fields() -> frozenset[str]:
    """Every field of the installed transformers' ``GenerationConfig`` (beam search's ``early_stopping`` and
    ``length_penalty``, caching and assistant settings...): accepted without effect, named in one log line.
    Those that would change the tokens (``num_beams`` > 1, ...) are in ``_NO_OP_VALUES`` and checked."""
    from transformers import GenerationConfig as HuggingFaceGenerationConfig

    return frozenset(HuggingFaceGenerationConfig().to_dict()) - {"transformers_version", "_from_model_config"}


class TokenSelector:
    """Chooses the next token of every row of a batch from its logits."""

    def __init__(self, config: GenerationConfig, vocab_size: int, suppressed: Iterable[int],
                 prompts: Sequence[Sequence[int]], device: torch.device):
        """``prompts``: each row's prompt ids, for the repetition penalty (image placeholders excluded)."""
        self.config = config
        self.never = torch.zeros(vocab_size, dtype=torch.bool, device=device)
        ids = [i for i in {*suppressed, *config.suppress_tokens} if 0 <= i < vocab_size]
        self.never[ids] = True
        self.eos = torch.tensor([i for i in config.eos_token_id or () if 0 <= i < vocab_size],
                                dtype=torch.long, device=device)
        self.seen = None
        if config.repetition_penalty != 1.0:
            self.seen = torch.zeros(len(prompts), vocab_size, dtype=torch.bool, device=device)
            for row, prompt in enumerate(prompts):
                self.seen[row, [i for i in prompt if 0 <= i < vocab_size]] = True
        self.generator = None
        if config.sampling:
            self.generator = torch.Generator(device=device)
            self.generator.manual_seed(config.seed)

    def keep(self, rows: torch.Tensor) -> None:
        """Continue with these rows of the batch only."""
        if self.seen is not None:
            self.seen = self.seen.index_select(0, rows)

    def scores(self, logits: torch.Tensor, new_tokens: int) -> torch.Tensor:
        """Processed logits [b, vocab] after ``new_tokens`` tokens were generated."""
        config = self.config
        logits = logits.masked_fill(self.never, float("-inf"))
        if self.seen is not None:
            penalised = torch.where(logits < 0, logits * config.repetition_penalty, logits / config.repetition_penalty)
            logits = torch.where(self.seen, penalised, logits)
        if new_tokens < config.min_new_tokens and self.eos.numel():
            logits[:, self.eos] = float("-inf")
        if not config.sampling:
            return logits
        if config.temperature != 1.0:
            logits = logits / config.temperature
        if config.top_k:
            kth_best = torch.topk(logits, min(config.top_k, logits.shape[-1])).values[:, -1:]
            logits = logits.masked_fill(logits < kth_best, float("-inf"))
        if config.top_p < 1.0:
            ascending, order = torch.sort(logits, descending=False)
            cumulative = ascending.softmax(dim=-1).cumsum(dim=-1)
            remove = cumulative <= 1 - config.top_p
            remove[:, -1] = False  # the most likely token always stays
            logits = logits.masked_fill(remove.scatter(1, order, remove), float("-inf"))
        return logits

    def __call__(self, logits: torch.Tensor, new_tokens: int) -> torch.Tensor:
        """The next token of every row, [b]."""
        scores = self.scores(logits, new_tokens)
        if self.generator is None:
            tokens = scores.argmax(dim=-1)
        else:
            tokens = torch.multinomial(scores.softmax(dim=-1), 1, generator=self.generator).squeeze(1)
        if self.seen is not None:
            self.seen[torch.arange(tokens.shape[0], device=tokens.device), tokens] = True
        return tokens
