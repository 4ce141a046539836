"""Key/value-cached generation against Hugging Face ``generate`` (CPU, fp32, random tiny models)."""

import contextlib
import importlib

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from model_fixtures import HF_IMAGE_TOKEN, IMAGE, SHAPES, our_config, our_full_state, tiny_hf_llava
from seeds import varied

pytestmark = pytest.mark.numeric

NEW_TOKENS = 12
PAD = 0
NEVER = (HF_IMAGE_TOKEN, PAD)  # what a pipeline suppresses: the image token and pad


def load(shape: str, backend: str = "sdpa"):
    from mm_plugin.models.llava import LlavaModel
    from mm_plugin.parallel import load_full_state_dict

    hf = tiny_hf_llava(shape)
    config = our_config(hf, backend)
    model = LlavaModel(config).eval()
    load_full_state_dict(model, our_full_state(hf, config), vocab_size=config.language.vocab_size)
    return hf, model


@pytest.fixture(scope="module")
def models(megatron_single):
    return {shape: load(shape) for shape in SHAPES}


def requests_for(shape: str, seed: int = 0):
    """Prompts of different lengths: one image, two images with text between, text only, an image mid-text."""
    from mm_plugin.inference.generate import Request

    vocab, size = SHAPES[shape]["text"]["vocab_size"], SHAPES[shape]["vision"]["image_size"]
    generator = torch.Generator().manual_seed(varied(seed))

    def words(n):
        return torch.randint(6, vocab, (n,), generator=generator).tolist()

    def images(n):
        return torch.randn(n, 3, size, size, generator=generator)

    return [
        Request([1, IMAGE] + words(6), images(1), name="one image"),
        Request([1] + words(2) + [IMAGE] + words(4) + [IMAGE] + words(3), images(2), name="two images"),
        Request([1] + words(11), None, name="text only"),
        Request([1] + words(5) + [IMAGE] + words(1), images(1), name="image mid-text"),
    ]


def hugging_face_tokens(hf, request, **settings) -> list[int]:
    """Hugging Face ``generate`` on one request (image placeholders expanded to its image token)."""
    ids = []
    for token in request.input_ids:
        ids += [HF_IMAGE_TOKEN] * hf.config.image_seq_length if token == IMAGE else [token]
    pixels = {} if request.images is None else {"pixel_values": request.images}
    settings = {"max_new_tokens": NEW_TOKENS, "do_sample": False, "suppress_tokens": list(NEVER),
                "pad_token_id": PAD, "eos_token_id": None, **settings}
    with torch.no_grad():
        output = hf.generate(input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                             **pixels, **settings)
    new = output[0, len(ids):].tolist()
    eos = settings["eos_token_id"]
    return new[: new.index(eos)] if eos in new else new


def ours(model, requests, **settings):
    from mm_plugin.inference.generate import generate
    from mm_plugin.inference.sampling import GenerationConfig

    return generate(model, requests, GenerationConfig(**{"max_new_tokens": NEW_TOKENS, **settings}), suppressed=NEVER)


@pytest.mark.compat
@pytest.mark.parametrize("penalty", [1.0, 1.3])
@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_greedy_batch_matches_hugging_face_one_at_a_time(models, shape, penalty):
    hf, model = models[shape]
    requests = requests_for(shape)
    results = ours(model, requests, repetition_penalty=penalty)
    for request, result in zip(requests, results):
        expected = hugging_face_tokens(hf, request, repetition_penalty=penalty)
        assert result.tokens == expected, request.name
        assert result.finish_reason == "length" and result.error is None
    assert len({tuple(r.tokens) for r in results}) == len(results)  # the prompts really differ


@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_a_batch_gives_the_tokens_of_one_prompt_at_a_time(models, shape):
    _, model = models[shape]
    requests = requests_for(shape, seed=1)
    batched = ours(model, requests, repetition_penalty=1.2)
    for request, result in zip(requests, batched):
        assert result.tokens == ours(model, [request], repetition_penalty=1.2)[0].tokens, request.name


def test_end_of_sequence_stops_like_hugging_face(models):
    hf, model = models["gqa"]
    requests = requests_for("gqa", seed=2)
    free_run = ours(model, requests[:1], repetition_penalty=1.3)[0].tokens
    eos = next(t for i, t in enumerate(free_run) if i >= 2 and t not in free_run[:i])  # a token first seen mid-answer
    result = ours(model, requests, repetition_penalty=1.3, eos_token_id=eos)
    expected = hugging_face_tokens(hf, requests[0], repetition_penalty=1.3, eos_token_id=eos)
    assert result[0].tokens == expected == free_run[: free_run.index(eos)]
    assert result[0].finish_reason == "eos" and eos not in result[0].tokens
    # The batch goes on without the rows that ended, and the others are unchanged by it.
    for request, batched in zip(requests, result):
        assert batched.tokens == ours(model, [request], repetition_penalty=1.3, eos_token_id=eos)[0].tokens


def test_rows_that_reach_max_length_leave_the_batch(models):
    _, model = models["gqa"]
    requests = requests_for("gqa", seed=5)
    batched = ours(model, requests, max_new_tokens=None, max_length=30)  # the shortest prompt is 12 tokens
    lengths = [len(r.tokens) for r in batched]
    assert len(set(lengths)) > 1 and all(r.finish_reason == "length" for r in batched)
    for request, result in zip(requests, batched):
        assert result.tokens == ours(model, [request], max_new_tokens=None, max_length=30)[0].tokens


@pytest.mark.compat
def test_the_local_attention_backend_generates_the_same_tokens(megatron_single, models):
    hf, _ = models["mha"]
    _, local = load("mha", backend="local")
    requests = requests_for("mha")
    for request, result in zip(requests, ours(local, requests)):  # left-padded: explicit masks
        assert result.tokens == hugging_face_tokens(hf, request), request.name
    alone = ours(local, requests[:1])[0]  # unpadded: the layer's own causal mask in the prefill
    assert alone.tokens == hugging_face_tokens(hf, requests[0])


@pytest.mark.parametrize("direct, static", [(True, False), (False, False), (True, True)],
                         ids=["direct-layers", "megatron-modules", "static-steps"])
@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_cached_steps_give_the_logits_of_the_whole_sequence(models, shape, direct, static):
    """Teacher forcing: prefill left-padded prompts, feed known tokens, compare with full forwards."""
    from mm_plugin.inference.decoder import IncrementalDecoder

    _, model = models[shape]
    vocab = SHAPES[shape]["text"]["vocab_size"]
    generator = torch.Generator().manual_seed(varied(3))
    rows = [torch.randint(6, vocab, (n,), generator=generator) for n in (11, 7, 9)]
    steps = 5
    prompt = max(len(r) for r in rows) - steps
    padding = torch.tensor([prompt - (len(r) - steps) for r in rows])
    ids = torch.zeros(len(rows), prompt, dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, padding[i]:] = row[:-steps]
    decoder = IncrementalDecoder(model, padding, capacity=prompt + steps, direct=direct, static=static)
    with torch.no_grad():
        logits = [decoder.prefill(model.language_model.embedding(input_ids=ids, position_ids=None))]
        for step in range(steps - 1):
            logits.append(decoder.step(torch.stack([r[len(r) - steps + step] for r in rows])))
        for i, row in enumerate(rows):
            full = model.language_model(input_ids=row[None], position_ids=None, attention_mask=None)[0]
            expected = full[len(row) - steps - 1: len(row) - 1, :vocab]
            got = torch.stack([step_logits[i] for step_logits in logits])
            assert (got - expected).abs().max() <= 1e-5 * expected.abs().max(), f"row {i}"


@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_static_decode_steps_choose_the_dynamic_steps_tokens(models, shape):
    """The static step (fixed buffers, what a CUDA graph replays; uncaptured on the CPU) is the same math: a
    left-padded batch whose rows stop at different steps (end of sequence, max_length) gets the same tokens."""
    from mm_plugin.inference.generate import generate
    from mm_plugin.inference.sampling import GenerationConfig

    _, model = models[shape]
    requests = requests_for(shape, seed=6)
    free_run = ours(model, requests[:1])[0].tokens
    eos = free_run[len(free_run) // 2]  # the first request ends at its first one, the others where they meet it
    for settings in ({"max_new_tokens": NEW_TOKENS, "repetition_penalty": 1.2},
                     {"max_new_tokens": None, "max_length": 30, "eos_token_id": eos}):
        config = GenerationConfig(**settings)
        dynamic = generate(model, requests, config, suppressed=NEVER, static=False)
        static = generate(model, requests, config, suppressed=NEVER, static=True)
        assert [(r.tokens, r.finish_reason) for r in static] == [(r.tokens, r.finish_reason) for r in dynamic]
    assert len({len(r.tokens) for r in dynamic}) > 1  # rows did leave the batch at different steps


def test_static_decode_steps_need_the_direct_layers(models):
    from mm_plugin.inference.decoder import IncrementalDecoder

    _, model = models["gqa"]
    with pytest.raises(ValueError, match="static decode step runs the direct layers"):
        IncrementalDecoder(model, torch.zeros(1, dtype=torch.long), capacity=8, direct=False, static=True)
    decoder = IncrementalDecoder(model, torch.zeros(1, dtype=torch.long), capacity=8)
    assert decoder.direct and not decoder.static  # the default on the CPU: the dynamic step


@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_direct_image_features_are_the_megatron_modules_features(models, shape):
    from mm_plugin.inference import direct_layers

    _, model = models[shape]
    size = SHAPES[shape]["vision"]["image_size"]
    images = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(varied(7)))
    assert direct_layers.runs_direct(model.vision_model, model.vision_model.decoder.layers)
    with torch.no_grad():
        expected = model.image_features(images)
        torch.testing.assert_close(direct_layers.image_features(model, images), expected, rtol=1e-5,
                                   atol=1e-5 * expected.abs().max().item())
    model.vision_model.train()
    try:  # training: megatron's modules (dropout, autograd), not the direct layers
        assert not direct_layers.runs_direct(model.vision_model, model.vision_model.decoder.layers)
    finally:
        model.vision_model.eval()


def test_suppressed_ids_are_never_generated(models):
    _, model = models["gqa"]
    requests = requests_for("gqa", seed=4)
    free = ours(model, requests)
    counts = torch.bincount(torch.tensor([t for r in free for t in r.tokens]))
    favourites = counts.argsort(descending=True)[:3].tolist()  # the tokens it likes best
    from mm_plugin.inference.generate import generate
    from mm_plugin.inference.sampling import GenerationConfig

    held_back = generate(model, requests, GenerationConfig(max_new_tokens=NEW_TOKENS, suppress_tokens=favourites[:1]),
                         suppressed=favourites[1:])
    for result in held_back:
        assert len(result.tokens) == NEW_TOKENS and not set(result.tokens) & set(favourites)


def test_bad_requests_get_named_errors_and_the_others_still_answer(models):
    from mm_plugin.inference.generate import Request

    _, model = models["gqa"]
    good = requests_for("gqa")
    size = SHAPES["gqa"]["vision"]["image_size"]
    context = model.llava_config.language.max_sequence_length
    bad = [
        Request(good[0].input_ids, torch.zeros(2, 3, size, size), name="cat.jpg"),  # two images, one <image>
        Request(good[2].input_ids, torch.zeros(1, 3, size + 14, size), name="wrong size"),
        Request([1] + [7] * context, None, name="long prompt"),
    ]
    results = ours(model, [good[0], bad[0], good[1], bad[1], bad[2]])
    assert "'cat.jpg'" in results[1].error and "1 image placeholder(s)" in results[1].error
    assert "wrong size" in results[3].error and "[n, 3, 42, 42]" in results[3].error
    assert "long prompt" in results[4].error and f"context of {context}" in results[4].error
    assert all(r.finish_reason == "error" and not r.tokens for r in (results[1], results[3], results[4]))
    alone = ours(model, [good[0], good[1]])
    assert [results[0].tokens, results[2].tokens] == [a.tokens for a in alone]


def test_length_limits(models):
    _, model = models["mha"]
    request = requests_for("mha")[2]  # text only, 12 tokens
    context = model.llava_config.language.max_sequence_length
    assert ours(model, [request], max_new_tokens=None, max_length=15)[0].tokens.__len__() == 3
    near_the_end = type(request)([1] + [7] * (context - 5), None)
    result = ours(model, [near_the_end], max_new_tokens=50)[0]
    assert len(result.tokens) == 4 and result.finish_reason == "context"


def test_min_new_tokens_holds_back_end_of_sequence(models):
    _, model = models["gqa"]
    request = requests_for("gqa", seed=2)[0]
    free_run = ours(model, [request], repetition_penalty=1.3)[0].tokens
    eos = free_run[2] if free_run[2] not in free_run[:2] else free_run[0]
    early = ours(model, [request], repetition_penalty=1.3, eos_token_id=eos)[0]
    held = ours(model, [request], repetition_penalty=1.3, eos_token_id=eos, min_new_tokens=len(early.tokens) + 2)[0]
    assert len(held.tokens) >= len(early.tokens) + 2 and held.tokens[: len(early.tokens)] == early.tokens


def test_stream_yields_each_token_before_the_next_step_runs(models):
    from mm_plugin.inference.generate import stream
    from mm_plugin.inference.sampling import GenerationConfig

    _, model = models["gqa"]
    forwards = []
    hook = model.language_model.embedding.register_forward_hook(lambda *args: forwards.append(1))
    try:
        events = stream(model, requests_for("gqa")[:2], GenerationConfig(max_new_tokens=3))
        first = [next(events), next(events)]  # the first token of both prompts
        assert [e.index for e in first] == [0, 1] and all(e.token is not None for e in first)
        assert len(forwards) == 1  # only the prompt has run so far
        rest = list(events)
    finally:
        hook.remove()
    assert len(forwards) == 3  # prompt + 2 steps: the third token needs no step after it
    assert [(e.index, e.finish_reason) for e in rest if e.token is None] == [(0, "length"), (1, "length")]


def test_cpu_generation_runs_on_packed_weights_and_plain_linears_give_the_same_tokens(models, monkeypatch):
    from mm_plugin.inference import cpu_linear

    hf, model = models["gqa"]
    requests = requests_for("gqa", seed=6)
    monkeypatch.delenv("MM_PLUGIN_CPU_LINEAR", raising=False)
    monkeypatch.setattr(cpu_linear, "MIN_WEIGHT_ELEMENTS", 0)  # pack even a tiny model's weights
    monkeypatch.setattr(cpu_linear, "MIN_MULTIPLY_ADDS", 0)
    packed = [r.tokens for r in ours(model, requests)]
    layer = model.language_model.decoder.layers[0]
    weights = (layer.self_attention.linear_qkv.weight, layer.mlp.linear_fc2.weight, model.language_model.output_layer.weight,
               model.vision_model.decoder.layers[0].mlp.linear_fc1.weight, model.vision_projection.encoder.linear_fc2.weight)
    assert all(weight in cpu_linear._PACKED for weight in weights)
    monkeypatch.setenv("MM_PLUGIN_CPU_LINEAR", "torch")
    assert [r.tokens for r in ours(model, requests)] == packed
    assert packed[0] == hugging_face_tokens(hf, requests[0])


@pytest.mark.compat
@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_the_cpu_only_prompt_paths_give_hugging_faces_tokens(models, shape, monkeypatch):
    from mm_plugin.inference import cpu_linear, direct_layers

    hf, model = models[shape]
    requests = requests_for(shape, seed=7)
    monkeypatch.setattr(direct_layers, "CPU_QUERY_CHUNK", 3)  # the tiny prompts span many chunks and a partial one
    monkeypatch.setattr(direct_layers, "CPU_SPLIT_GATE_ROWS", 1)  # gate and up as two products, steps too
    monkeypatch.delenv("MM_PLUGIN_CPU_LINEAR", raising=False)
    monkeypatch.setattr(cpu_linear, "MIN_WEIGHT_ELEMENTS", 0)  # the halves of fc1 packed as views
    monkeypatch.setattr(cpu_linear, "MIN_MULTIPLY_ADDS", 0)
    expected = [hugging_face_tokens(hf, request) for request in requests]
    # Padded (the mask's rows go chunk by chunk) and a single prompt (no mask: causal chunks of their own).
    assert [result.tokens for result in ours(model, requests)] == expected
    assert ours(model, requests[:1])[0].tokens == expected[0]


@pytest.mark.parametrize("groups", [4, 2])
@pytest.mark.parametrize("padded", [False, True])
def test_causal_attention_in_query_chunks_is_the_whole_causal_attention(groups, padded, monkeypatch):
    from mm_plugin.inference import direct_layers

    generator = torch.Generator().manual_seed(varied(0))
    batch, heads, length, cached, dim = 2, 4, 11, 5, 8  # 11 new positions after 5 cached ones
    query = torch.randn(batch, heads, length, dim, generator=generator)
    key, value = (torch.randn(batch, groups, cached + length, dim, generator=generator) for _ in range(2))
    attend = torch.ones(length, cached + length, dtype=torch.bool).tril(cached).expand(batch, 1, -1, -1).clone()
    if padded:
        attend[0, :, :, :3] = False  # row 0's first three keys are padding
    expected = torch.nn.functional.scaled_dot_product_attention(
        query, key, value, attn_mask=attend, enable_gqa=heads != groups).permute(2, 0, 1, 3).flatten(2)
    monkeypatch.setattr(direct_layers, "CPU_QUERY_CHUNK", 4)
    chunked = direct_layers.sdpa(query, key, value, attend if padded else None, causal=True)
    torch.testing.assert_close(chunked, expected, rtol=1e-6, atol=1e-6)


def test_a_cpu_mlp_over_row_chunks_or_with_gate_and_up_apart_is_the_mlp(models, monkeypatch):
    from mm_plugin.inference import direct_layers

    _, model = models["gqa"]
    mlp = model.language_model.decoder.layers[0].mlp
    x = torch.randn(550, 2, mlp.config.hidden_size, generator=torch.Generator().manual_seed(varied(0)))
    with torch.no_grad():
        whole = direct_layers.mlp_forward(mlp, x)  # 1100 rows: gate and up as two products
        monkeypatch.setattr(direct_layers, "CPU_INTERMEDIATE_BYTES", 0)  # chunks of 512 rows: 512, 512 and 76
        chunked = direct_layers.mlp_forward(mlp, x)
        monkeypatch.setattr(direct_layers, "CPU_SPLIT_GATE_ROWS", 1 << 62)  # gate and up as one product
        fused = direct_layers.mlp_forward(mlp, x)
        expected, _ = mlp(x)  # megatron's module
    assert chunked.shape == x.shape
    torch.testing.assert_close(chunked, whole, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(fused, whole, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(chunked, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(7, 3, 60), (5, 36)])
def test_the_cpu_rms_norm_gives_torchs_bits_and_leaves_its_input(dtype, shape):
    from mm_plugin.inference.direct_layers import norm

    generator = torch.Generator().manual_seed(varied(0))
    x = (torch.randn(*shape, generator=generator) * 3).to(dtype)
    before = x.clone()
    for module in (torch.nn.RMSNorm(shape[-1], eps=1e-5), torch.nn.LayerNorm(shape[-1])):  # LayerNorm: the module runs
        module = module.to(dtype)
        with torch.no_grad():
            module.weight.normal_(generator=generator)
            assert torch.equal(norm(module, x), module(x)), type(module).__name__
    assert torch.equal(x, before)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rotation_is_llama_rope_to_the_bit_for_queries_and_keys_together(dtype):
    from mm_plugin.inference.kv_cache import KVCache

    generator = torch.Generator().manual_seed(varied(0))
    length, batch, groups, per_group, dim = 5, 2, 3, 2, 8
    angles = torch.rand(length, batch, 1, dim, generator=generator) * 40  # positions up to ~40 radians
    qkv = torch.randn(length, batch, groups, per_group + 2, dim, generator=generator).to(dtype)
    cache = KVCache(num_layers=1, batch=batch, groups=groups, capacity=length, head_dim=dim, dtype=dtype,
                    device=torch.device("cpu"))
    with cache.forward(angles):
        together = cache.rotate(qkv[:, :, :, :per_group + 1])
        key_alone = cache.rotate(qkv[:, :, :, per_group])  # [s, b, groups, dim], as megatron's modules hand it
    cos, sin = angles.cos().to(dtype)[:, :, :, None], angles.sin().to(dtype)[:, :, :, None]
    x = qkv[:, :, :, :per_group + 1]
    first, second = x.chunk(2, dim=-1)
    expected = x * cos + torch.cat((-second, first), dim=-1) * sin  # LLaMA's rotate_half form
    assert torch.equal(together, expected)
    assert torch.equal(key_alone, expected[:, :, :, per_group])


# Operations that make the host wait for a GPU: a value read back, or an output whose size depends on values.
_WAITS_FOR_THE_DEVICE = {"_local_scalar_dense", "nonzero", "masked_select", "equal", "is_nonzero", "_is_all_true",
                         "_is_any_true", "unique", "_unique", "_unique2", "unique_dim", "unique_consecutive"}


class _HostWaits(TorchDispatchMode):
    """Records the operations that would make the host wait for a GPU, run inside :meth:`device`."""

    def __init__(self):
        super().__init__()
        self.on_device, self.waits = 0, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func._schema.name.split("::")[-1]
        indices = args[1] if name in ("index", "index_put", "index_put_") else ()
        boolean_index = any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in indices or ())
        if self.on_device and (name in _WAITS_FOR_THE_DEVICE or boolean_index
                               or (name == "repeat_interleave" and (kwargs or {}).get("output_size") is None)):
            self.waits.append(str(func))
        return func(*args, **(kwargs or {}))

    @contextlib.contextmanager
    def device(self):
        self.on_device += 1
        try:
            yield
        finally:
            self.on_device -= 1

    def device_work(self, function):
        def run(*args, **kwargs):
            with self.device():
                return function(*args, **kwargs)

        return run


def test_the_prompt_and_each_step_run_without_the_host_waiting_for_the_device(models, monkeypatch):
    # On a GPU the host queues a forward's kernels while the first ones run; anything in a forward that
    # reads a value back stops it until the device catches up (Hugging Face's LLaVA does it after the
    # vision tower). Ours reads back once per token, the chosen tokens, between forwards.
    from mm_plugin.inference.decoder import IncrementalDecoder

    generation = importlib.import_module("mm_plugin.inference.generate")  # the package's `generate` is the function
    _, model = models["gqa"]
    with _HostWaits() as detector:
        with detector.device():
            torch.ones(2).sum().item()
        assert detector.waits == ["aten._local_scalar_dense.default"]  # the detector sees a read-back
        detector.waits.clear()
        monkeypatch.setattr(generation, "image_features", detector.device_work(generation.image_features))
        monkeypatch.setattr(IncrementalDecoder, "prefill", detector.device_work(IncrementalDecoder.prefill))
        monkeypatch.setattr(IncrementalDecoder, "step", detector.device_work(IncrementalDecoder.step))
        embedding = model.language_model.embedding
        monkeypatch.setattr(embedding, "forward", detector.device_work(embedding.forward))
        requests = requests_for("gqa", seed=3)
        batch = ours(model, requests)  # left-padded, with its padding mask
        single = ours(model, requests[:1])  # causal attention without a mask
    assert all(len(r.tokens) == NEW_TOKENS for r in batch + single)
    assert detector.waits == []


class _RecordingGraph:
    """Stands in for ``torch.cuda.CUDAGraph`` on the CPU: "capture" runs the step's Python (recording the
    function), "replay" runs the recording again, so the static step's bookkeeping around a graph is tested."""

    captures = 0

    def __init__(self):
        self.recorded = None

    def replay(self):
        self.recorded()


def _fake_cuda_graphs(monkeypatch, fail: bool = False):
    from mm_plugin.inference import static_step

    @contextlib.contextmanager
    def graph(recording):
        if fail:
            raise RuntimeError("operation not permitted when stream is capturing")
        _RecordingGraph.captures += 1
        step = static_step_under_capture[-1]
        recording.recorded = lambda: setattr(step, "logits", step._compute())
        yield

    static_step_under_capture = []
    original_capture = static_step.StaticDecodeStep._capture

    def capture(self):
        static_step_under_capture.append(self)
        original_capture(self)

    stream = type("Stream", (), {"wait_stream": lambda self, other: None})
    monkeypatch.setattr(static_step.torch.cuda, "Stream", lambda: stream(), raising=False)
    monkeypatch.setattr(static_step.torch.cuda, "current_stream", lambda: stream(), raising=False)
    monkeypatch.setattr(static_step.torch.cuda, "stream", lambda s: contextlib.nullcontext(), raising=False)
    monkeypatch.setattr(static_step.torch.cuda, "CUDAGraph", _RecordingGraph, raising=False)
    monkeypatch.setattr(static_step.torch.cuda, "graph", graph, raising=False)
    monkeypatch.setattr(static_step.StaticDecodeStep, "_capture", capture)


@pytest.mark.parametrize("fail", [False, True], ids=["captured", "capture-fails"])
def test_a_captured_decode_step_is_recorded_once_and_replayed(models, monkeypatch, caplog, fail):
    """The graph bookkeeping on the CPU, with a stand-in for CUDA graphs: one capture per generation, every later
    step a replay, logits handed out as copies; a failed capture warns and runs the steps uncaptured. Either way
    the tokens are the dynamic step's."""
    from mm_plugin.inference.decoder import IncrementalDecoder
    from mm_plugin.inference.generate import generate
    from mm_plugin.inference.sampling import GenerationConfig

    _, model = models["gqa"]
    requests = requests_for("gqa", seed=7)
    config = GenerationConfig(max_new_tokens=NEW_TOKENS)
    expected = [r.tokens for r in generate(model, requests, config, suppressed=NEVER, static=False)]
    _fake_cuda_graphs(monkeypatch, fail)
    monkeypatch.setattr(IncrementalDecoder, "prefill", _prefill_with_capture(IncrementalDecoder.prefill))
    _RecordingGraph.captures = 0
    with caplog.at_level("WARNING", logger="mm_plugin.inference.static_step"):
        got = [r.tokens for r in generate(model, requests, config, suppressed=NEVER, static=True)]
    assert got == expected
    assert _RecordingGraph.captures == (0 if fail else 1)
    assert ("capture failed" in caplog.text) == fail


def _prefill_with_capture(prefill):
    """The decoder's prefill, its static step then set to capture as it would on CUDA."""

    def run(self, embeddings):
        logits = prefill(self, embeddings)
        self._static_step.capture = True
        return logits

    return run
