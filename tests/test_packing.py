"""Sequence packing changes no number: a packed global batch has the losses and gradients of the unpacked
one (per-token loss, fp32), on one process and under TP=2, PP=2 and DP=2, with multi-image, text-only and
row-filling samples; packed runs resume exactly. Also the pieces: row packing, rank balance, step sampler,
segment expansion."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from training_fixtures import argv, build_setup, model_json, train

SEQ_LENGTH_KEY = "--seq-length"
IMAGE_TOKENS = 16  # training_fixtures: 56-pixel images, 14-pixel patches


# --- the pieces ----------------------------------------------------------------------------------

def test_rows_hold_every_sample_once_and_never_overflow():
    from mm_plugin.data.packing import pack_rows

    rng = np.random.default_rng(0)
    for _ in range(200):
        seq_length = int(rng.integers(8, 64))
        lengths = rng.integers(1, seq_length + 1, size=int(rng.integers(1, 40))).tolist()
        rows = pack_rows(lengths, seq_length)
        assert sorted(p for row in rows for p in row) == list(range(len(lengths)))
        assert all(sum(lengths[p] for p in row) <= seq_length for row in rows)
        assert all(row == sorted(row) for row in rows)
        # first-fit decreasing never needs more than 11/9 of the optimum + 1 rows; the optimum >= total/seq
        assert len(rows) <= 11 / 9 * -(-sum(lengths) // seq_length) + 1
    assert pack_rows([5, 3, 2, 5], 5) == [[0], [1, 2], [3]]  # a sample of exactly seq_length fills its row


def test_ranks_get_about_the_same_number_of_positions():
    from mm_plugin.data.errors import DataError
    from mm_plugin.data.packing import balance_over_ranks

    rng = np.random.default_rng(1)
    for _ in range(100):
        lengths = rng.integers(1, 500, size=int(rng.integers(4, 64)))
        ranks = int(rng.integers(1, 5))
        shares = balance_over_ranks(lengths, ranks)
        assert sorted(p for share in shares for p in share) == list(range(len(lengths)))
        loads = [int(lengths[share].sum()) for share in shares]
        assert all(share for share in shares)
        assert max(loads) - min(loads) <= lengths.max()
    with pytest.raises(DataError, match="at least one sample per data-parallel rank"):
        balance_over_ranks(np.array([3]), 2)


@pytest.mark.parametrize("group", [False, True])
def test_a_packed_step_holds_exactly_the_unpacked_steps_samples_and_resumes(group):
    from mm_plugin.data.sampler import PackedStepSampler, TrainingSampler

    lengths = np.random.default_rng(2).integers(1, 300, size=103)
    common = dict(micro_batch_size=2, data_parallel_size=2, seed=7, lengths=lengths if group else None)
    unpacked = [iter(TrainingSampler(103, data_parallel_rank=rank, **common)) for rank in (0, 1)]
    packed = [iter(PackedStepSampler(103, data_parallel_rank=rank, num_microbatches=3, estimated_lengths=lengths,
                                     **common)) for rank in (0, 1)]
    steps = []
    for _ in range(40):  # several epochs: steps run across epoch ends as the unpacked micro-batches do
        expected = sorted(p for _ in range(3) for rank in (0, 1) for p in next(unpacked[rank]))
        shares = [next(packed[rank]) for rank in (0, 1)]
        assert sorted(shares[0] + shares[1]) == expected
        steps.append(shares)
    resumed = iter(PackedStepSampler(103, data_parallel_rank=1, num_microbatches=3, estimated_lengths=lengths,
                                     consumed_samples=12 * 17, **common))
    assert [next(resumed) for _ in range(23)] == [shares[1] for shares in steps[17:]]


def test_expanded_segments_restart_positions_and_stop_targets_at_sample_ends():
    from mm_plugin.models.image_tokens import expand_image_tokens
    from mm_plugin.models.packed_rows import sample_attention_mask, sample_positions

    ids = torch.tensor([[5, -200, 6, 7, 8, -200, 9, 0]])
    labels = torch.tensor([[-100, -100, 6, 7, -100, -100, 9, -100]])
    segments = torch.tensor([[0, 0, 0, 0, 1, 1, 1, -1]])
    tokens = expand_image_tokens(ids, labels, torch.tensor([2]), 3, 13, 0, None, segments)
    assert tokens.segments.tolist() == [[0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, -1, -1]]
    assert sample_positions(tokens.segments).tolist() == [[0, 1, 2, 3, 4, 5, 0, 1, 2, 3, 4, 0, 1]]
    # sample 0's last token (7) does not learn to predict sample 1's first (8); images' last positions do predict
    assert tokens.targets.tolist() == [[0, 0, 0, 6, 7, 0, 0, 0, 0, 9, 0, 0, 0]]
    assert tokens.loss_mask.tolist() == [[0, 0, 0, 1, 1, 0, 0, 0, 0, 1, 0, 0, 0]]
    mask = sample_attention_mask(tokens.segments)[0, 0]
    assert not mask[7, 6] and mask[7, 5] and mask[5, 6] and not mask[5, 0]


# --- the numbers --------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """The instruct set rewritten to hold two-image, text-only and multi-turn records, and a sequence length
    that the longest sample fills exactly."""
    root = build_setup(tmp_path_factory.mktemp("packing"))
    config = json.loads((root / "instruct" / "data.json").read_text())
    basic = config["dataset_param"]["basic_parameters"]
    records = json.loads(Path(root / "instruct" / basic["data_path"]).read_text())
    others = [record["image"] for record in records if "image" in record]
    for index, record in enumerate(records):
        first = record["conversations"][0]
        if "image" not in record:
            continue
        if index % 4 == 1:  # text-only
            del record["image"]
            first["value"] = first["value"].replace("<image>", "").strip()
        elif index % 4 == 2:  # two images
            record["image"] = [record["image"], others[(index + 5) % len(others)]]
            first["value"] = "<image>\n" + first["value"]
    (root / "instruct" / "mixed.json").write_text(json.dumps(records))
    basic["data_path"] = "mixed.json"
    (root / "instruct" / "mixed-data.json").write_text(json.dumps(config))
    raw = json.loads(model_json(root, "stage2.json", train_language=True).read_text())
    raw["text_decoder"]["language_max_sequence_length"] = 512
    (root / "long.json").write_text(json.dumps(raw))
    (root / "long-local.json").write_text(json.dumps({**raw, "attention_backend": "local"}))
    (root / "seq_length.txt").write_text(str(max(_expanded_lengths(root))))
    return root


def _expanded_lengths(root: Path) -> list[int]:
    from mm_plugin.data.config import load_data_config
    from mm_plugin.data.loader import build_datasets
    from mm_plugin.data.packing import expanded_length
    from mm_plugin.data.tokenization import load_tokenizer

    config = load_data_config(root / "instruct" / "mixed-data.json")
    dataset, _ = build_datasets(config, load_tokenizer(config.tokenizer_path), image_tokens=IMAGE_TOKENS,
                                model_max_length=500)
    return [expanded_length(dataset[i], IMAGE_TOKENS) for i in range(len(dataset))]


def _argv(root: Path, extra=(), model="long.json") -> list[str]:
    arguments = argv(root, model=model, data="instruct", iterations=2, global_batch=8, extra=(
        "--calculate-per-token-loss", "--optimizer", "sgd", "--clip-grad", "0", *extra))
    arguments[arguments.index("--mm-data") + 1] = str(root / "instruct" / "mixed-data.json")
    arguments[arguments.index(SEQ_LENGTH_KEY) + 1] = str(_seq_length(root))
    return arguments


def _seq_length(root: Path) -> int:
    return int((root / "seq_length.txt").read_text())


def train_with_gradients(arguments: list[str]):
    """Losses and this rank's gradients of the last iteration (megatron's finalised ``main_grad``)."""
    gradients = {}

    def keep(result_model):
        for name, parameter in result_model.named_parameters():
            if getattr(parameter, "main_grad", None) is not None:
                gradients[name] = parameter.main_grad.detach().clone()

    losses, _, _ = train(arguments, after=keep)
    return losses, gradients


def packed_against_unpacked(arguments: list[str]) -> tuple[float, float, int]:
    """(largest relative loss difference, largest relative gradient difference, gradients compared)."""
    plain_losses, plain = train_with_gradients(arguments)
    packed_losses, packed = train_with_gradients(arguments + ["--sequence-packing"])
    loss_error = max(abs(a - b) / abs(a) for a, b in zip(plain_losses, packed_losses))
    assert plain.keys() == packed.keys() and plain
    grad_error = max(float((plain[name] - packed[name]).norm() / plain[name].norm().clamp(min=1e-30))
                     for name in plain)
    return loss_error, grad_error, len(plain)


def test_packed_rows_fill_exactly_and_mix_every_kind(megatron_single, setup):
    """The data the equivalence tests see: rows of several samples, a row filled exactly, samples with two
    images and with none."""
    from mm_plugin.data.config import load_data_config
    from mm_plugin.data.loader import PackedSteps, build_data_iterators
    from mm_plugin.data.tokenization import load_tokenizer

    config = load_data_config(setup / "instruct" / "mixed-data.json")
    tokenizer = load_tokenizer(config.tokenizer_path)
    seq_length = _seq_length(setup)
    packed, _ = build_data_iterators(config, tokenizer, micro_batch_size=2, data_parallel_rank=0,
                                     data_parallel_size=1, consumed_samples=0, seed=1234, num_workers=0,
                                     image_size=56, patch_size=14, model_max_length=seq_length,
                                     packed_steps=PackedSteps(num_microbatches=4, fixed_rows=False))
    seen = {"several samples": False, "exactly full": False, "two images": False, "text only": False}
    for _ in range(6):
        for micro_batch in next(packed):
            segments = micro_batch["segments"]
            images = micro_batch["input_ids"] == -200
            for row in range(segments.shape[0]):
                expanded = int((segments[row] >= 0).sum() + (IMAGE_TOKENS - 1) * images[row].sum())
                assert expanded <= seq_length
                seen["exactly full"] |= expanded == seq_length
                seen["several samples"] |= int(segments[row].max()) > 0
                for sample in range(int(segments[row].max()) + 1):
                    count = int(images[row][segments[row] == sample].sum())
                    seen["two images"] |= count == 2
                    seen["text only"] |= count == 0
    assert all(seen.values()), seen


@pytest.mark.numeric
@pytest.mark.parametrize("model", ["long.json", "long-local.json"], ids=["sdpa-per-sample", "local-dense-mask"])
def test_packing_changes_no_loss_and_no_gradient(megatron_single, setup, model):
    """SDPA attends sample by sample; megatron's DotProductAttention (MindSpeed's on NPU) gets the dense mask."""
    loss_error, grad_error, compared = packed_against_unpacked(_argv(setup, model=model))
    assert loss_error <= 1e-5 and grad_error <= 1e-5, (loss_error, grad_error)
    assert compared > 10


@pytest.mark.numeric
@pytest.mark.compat
@pytest.mark.parametrize("layout", [("--tensor-model-parallel-size", "2"), ("--pipeline-model-parallel-size", "2"),
                                    ()], ids=["tp2", "pp2", "dp2"])
def test_packing_changes_no_loss_and_no_gradient_in_parallel(megatron_single, pool, setup, layout):
    for loss_error, grad_error, compared in pool.run(packed_against_unpacked, _argv(setup, layout)):
        assert loss_error <= 1e-5 and grad_error <= 1e-5, (layout, loss_error, grad_error)
        assert compared > 5


@pytest.mark.numeric
def test_a_packed_run_resumes_exactly(megatron_single, setup, tmp_path):
    packed = _argv(setup, ("--sequence-packing",))
    packed[packed.index("--train-iters") + 1] = "6"
    packed[packed.index("--optimizer") + 1] = "adam"
    straight, _, _ = train(packed)
    first, _, _ = train(packed + ["--save", str(tmp_path / "ckpt"), "--exit-interval", "3"])
    rest, _, _ = train(packed + ["--load", str(tmp_path / "ckpt")])
    assert first + rest == straight  # bit for bit


def test_rotary_positions_restart_at_every_sample(megatron_single, setup):
    """RoPE is shift-invariant in exact arithmetic, so the equivalence tests cannot see the positions; the
    angles each packed row gets are checked here: those of its samples' own positions."""
    from mm_plugin.models.packed_rows import sample_positions
    from mm_plugin.parallel.placement import unwrap

    seen = []

    def capture(forward_step):
        def wrapped(data_iterator, model):
            rotary = unwrap(model).language_model.rotary_pos_emb
            if not rotary._forward_hooks:
                rotary.register_forward_hook(lambda module, args, output: seen.append(
                    (output, module.positions, super(type(module), module).forward(*args))))
            return forward_step(data_iterator, model)
        return wrapped

    packed = _argv(setup, ("--sequence-packing",))
    train(packed, forward_step_wrapper=capture)
    assert seen
    restarted = 0
    for angles, positions, shared in seen:
        assert angles.shape == (positions.shape[1], positions.shape[0], 1, shared.shape[-1])
        assert torch.equal(angles, shared[:, 0, 0][positions.t()].unsqueeze(2))
        restarted += int((positions[:, 1:] < positions[:, :-1]).sum())
    assert restarted > 0  # some row holds a second sample, starting again at position 0
