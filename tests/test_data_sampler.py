"""Distributed sampling: deterministic from (seed, epoch), disjoint over ranks, exact on resume."""

import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mm_plugin.data.errors import DataError
from mm_plugin.data.sampler import TrainingSampler


def batches(sampler, count):
    return list(itertools.islice(iter(sampler), count))


def sampler(num=103, mbs=4, rank=0, dp=2, **kwargs):
    return TrainingSampler(num, micro_batch_size=mbs, data_parallel_rank=rank, data_parallel_size=dp, **kwargs)


def test_ranks_split_each_epoch_without_overlap():
    per_rank = [batches(sampler(rank=r, dp=3, mbs=2), 17) for r in range(3)]  # 102 of 103 samples: one epoch
    seen = [index for rank in per_rank for batch in rank for index in batch]
    assert len(seen) == len(set(seen)) == 102
    assert all(len(batch) == 2 for rank in per_rank for batch in rank)


def test_order_depends_on_seed_and_epoch_only():
    assert batches(sampler(seed=5), 30) == batches(sampler(seed=5), 30)
    assert batches(sampler(seed=5), 12) != batches(sampler(seed=6), 12)
    first = sampler(seed=5)
    assert not np.array_equal(first.epoch_order(0), first.epoch_order(1))
    assert sorted(first.epoch_order(0).tolist()) != list(range(103))  # shuffled, 3 dropped
    assert batches(sampler(shuffle=False), 2) == [[0, 1, 2, 3], [8, 9, 10, 11]]


@settings(max_examples=40, deadline=None)
@given(steps=st.integers(0, 60), dp=st.integers(1, 4), mbs=st.integers(1, 5),
       grouped=st.sampled_from([None, "length", "modality"]))
def test_resume_from_consumed_samples_is_exact(steps, dp, mbs, grouped):
    num = 97
    rng = np.random.default_rng(0)
    grouping = {} if grouped is None else {"lengths": rng.integers(1, 500, num)}
    if grouped == "modality":
        grouping["with_images"] = rng.random(num) < 0.8
    for rank in range(dp):
        full = batches(sampler(num, mbs, rank, dp, seed=3, **grouping), steps + 5)
        resumed = batches(sampler(num, mbs, rank, dp, seed=3, consumed_samples=steps * mbs * dp, **grouping), 5)
        assert resumed == full[steps:]


def test_keep_last_fills_the_final_global_batch_from_the_start():
    order = sampler(num=10, mbs=4, dp=1, shuffle=False, drop_last=False).epoch_order(0)
    assert order.tolist() == list(range(10)) + [0, 1]


def test_length_grouping_keeps_the_epoch_and_reduces_padding():
    rng = np.random.default_rng(1)
    lengths = rng.integers(1, 1000, 512)
    plain = sampler(512, 4, 0, 2, seed=9)
    grouped = sampler(512, 4, 0, 2, seed=9, lengths=lengths)
    assert sorted(plain.epoch_order(0).tolist()) == sorted(grouped.epoch_order(0).tolist())

    def padding(order):
        steps = lengths[order].reshape(-1, 4)
        return (steps.max(1, keepdims=True) - steps).sum()

    assert padding(grouped.epoch_order(0)) < padding(plain.epoch_order(0)) / 4


@pytest.mark.parametrize("seed", range(5))
def test_modality_grouping_separates_image_and_text_batches_and_groups_lengths(seed):
    """As original LLaVA's group_by_modality_length: every global micro-batch is all-image or all-text but
    at most one per epoch, lengths are grouped within each modality, and the epoch is the same samples."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, 1000, 1000)
    with_images = rng.random(1000) < 0.9  # about the 665k mix's share of image samples
    plain = sampler(1000, 4, 0, 2, seed=seed)
    grouped = sampler(1000, 4, 0, 2, seed=seed, lengths=lengths, with_images=with_images)
    for epoch in range(3):
        order = grouped.epoch_order(epoch)
        assert sorted(order.tolist()) == sorted(plain.epoch_order(epoch).tolist())
        kinds = with_images[order].reshape(-1, 8)
        assert (kinds.all(1) | ~kinds.any(1)).sum() >= len(kinds) - 1
        steps = lengths[order].reshape(-1, 8)
        spread = (steps.max(1) - steps.min(1)).mean()
        random_steps = lengths[plain.epoch_order(epoch)].reshape(-1, 8)
        assert spread < (random_steps.max(1) - random_steps.min(1)).mean() / 4
    assert not np.array_equal(grouped.epoch_order(0), grouped.epoch_order(1))


def test_bad_arguments():
    with pytest.raises(DataError, match="multiple"):
        sampler(consumed_samples=5)
    with pytest.raises(DataError, match="fewer than one global"):
        sampler(num=7, mbs=4, dp=2)
    with pytest.raises(ValueError):
        sampler(rank=2, dp=2)
