"""Tensor parallel 2 generates the tokens of tensor parallel 1 (2 gloo ranks on the CPU)."""

import pytest
import torch

from model_fixtures import HF_IMAGE_TOKEN, IMAGE, SHAPES, our_config, our_full_state, tiny_hf_llava
from seeds import varied

pytestmark = pytest.mark.numeric

SHAPE = "gqa"  # every head count divides by 2; the vocabulary (202) gets padding rows

def _generate_on_rank(tensor_parallel: int, settings: dict, static: bool = False):
    from megatron.core import parallel_state

    from mm_plugin.inference.generate import Request, generate
    from mm_plugin.inference.sampling import GenerationConfig
    from mm_plugin.models.llava import LlavaModel
    from mm_plugin.parallel import load_full_state_dict
    from process_pool import parallel

    parallel(tensor_parallel, 1)
    hf = tiny_hf_llava(SHAPE)
    config = our_config(hf)
    model = LlavaModel(config).eval()
    load_full_state_dict(model, our_full_state(hf, config), vocab_size=config.language.vocab_size)
    generator = torch.Generator().manual_seed(varied(5))
    words = lambda n: torch.randint(6, config.language.vocab_size, (n,), generator=generator).tolist()  # noqa: E731
    size = SHAPES[SHAPE]["vision"]["image_size"]
    images = torch.randn(3, 3, size, size, generator=generator)
    requests = [Request([1, IMAGE] + words(5), images[:1]), Request([1] + words(9)),
                Request([1] + words(2) + [IMAGE] + words(1) + [IMAGE] + words(3), images[1:])]
    results = generate(model, requests, GenerationConfig(max_new_tokens=10, **settings), suppressed=[HF_IMAGE_TOKEN],
                       static=static)
    return parallel_state.get_tensor_model_parallel_world_size(), [r.tokens for r in results]


@pytest.mark.compat
@pytest.mark.parametrize("settings", [{}, {"repetition_penalty": 1.3}, {"do_sample": True, "top_k": 8, "seed": 3}],
                         ids=["greedy", "penalty", "sampling"])
def test_tensor_parallel_2_generates_the_tokens_of_1(pool, settings):
    single = pool.run(_generate_on_rank, 1, settings)
    split = pool.run(_generate_on_rank, 2, settings)
    assert [size for size, _ in split] == [2, 2] and [size for size, _ in single] == [1, 1]
    assert split[0][1] == split[1][1]  # both ranks chose the same tokens
    # Sampling too: the same seeded draws on probabilities that agree to rounding.
    assert split[0][1] == single[0][1]


def test_static_decode_steps_under_tensor_parallel_2_give_the_tokens_of_1(pool):
    """The static step's vocabulary gather and row-parallel all-reduce, as a CUDA graph would replay them."""
    single = pool.run(_generate_on_rank, 1, {}, False)
    split = pool.run(_generate_on_rank, 2, {}, True)
    assert split[0][1] == split[1][1] == single[0][1]
