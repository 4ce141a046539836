"""Dataset, collate and iterators: bad records replaced and counted, shapes fixed, exact resume."""

import itertools
import os
import subprocess
import sys

import pytest
import torch
from data_fixtures import DIRTY_REASONS, dirty_dataset, synthetic

from mm_plugin.data import (
    BAD_REASONS,
    IGNORE_INDEX,
    IMAGE_TOKEN_INDEX,
    TooManyBadSamples,
    bad_counts_by_reason,
    build_data_iterators,
    build_datasets,
    load_data_config,
    load_tokenizer,
)


@pytest.fixture(scope="module")
def dirty():
    config = load_data_config(dirty_dataset() / "data.json")
    tokenizer = load_tokenizer(config.tokenizer_path)
    dataset, _ = build_datasets(config, tokenizer, image_tokens=16, model_max_length=64)
    return config, tokenizer, dataset


def test_every_bad_record_is_replaced_by_the_next_valid_one(dirty):
    _, _, dataset = dirty
    ids = [dataset.index.record(i).get("id") if isinstance(dataset.index.record(i), dict) else None
           for i in range(len(dataset))]
    for position, rid in enumerate(ids):
        sample = dataset[position]
        if rid in DIRTY_REASONS:
            assert [reason for reason, _ in sample["bad"]] == [DIRTY_REASONS[rid]], rid
            assert rid in sample["bad"][0][1] and "dirty.json" in sample["bad"][0][1]
            assert sample["id"] == ids[(position + 1) % len(ids)]  # the next record (valid), wrapping around
        else:
            assert sample["bad"] == [] and sample["id"] == rid
            assert sample["images"].shape == (1, 3, 56, 56)
            assert sample["input_ids"].tolist().count(IMAGE_TOKEN_INDEX) == 1


def _all_batches(config, tokenizer, workers):
    train, _ = build_data_iterators(config, tokenizer, micro_batch_size=3, data_parallel_rank=0,
                                    data_parallel_size=1, consumed_samples=0, seed=0, num_workers=workers,
                                    image_size=56, patch_size=14, model_max_length=64)
    return list(itertools.islice(train, 8))  # one epoch: 24 records


def test_counts_travel_with_batches_and_sum_over_workers(dirty):
    config, tokenizer, _ = dirty
    single, pooled = _all_batches(config, tokenizer, 0), _all_batches(config, tokenizer, 2)
    for one, other in zip(single, pooled):
        assert one["sample_ids"] == other["sample_ids"]
        assert torch.equal(one["bad_counts"], other["bad_counts"])
        assert torch.equal(one["input_ids"], other["input_ids"]) and torch.equal(one["images"], other["images"])
    total = sum(batch["bad_counts"] for batch in pooled)
    expected = {}
    for reason in DIRTY_REASONS.values():
        expected[reason] = expected.get(reason, 0) + 1
    assert bad_counts_by_reason(total) == expected
    for batch in pooled:  # the shape never changes
        assert batch["input_ids"].shape[0] == 3 and batch["labels"].shape == batch["input_ids"].shape
        assert batch["images"].shape == (3, 3, 56, 56) and batch["image_counts"].tolist() == [1, 1, 1]
        assert batch["bad_counts"].shape == (len(BAD_REASONS),)


def test_collated_batch_contract():
    folder = synthetic("instruct", 24)
    config = load_data_config(folder / "data.json")
    tokenizer = load_tokenizer(config.tokenizer_path)
    train, _ = build_data_iterators(config, tokenizer, micro_batch_size=6, data_parallel_rank=0,
                                    data_parallel_size=1, consumed_samples=0, seed=0, num_workers=0,
                                    image_size=56, patch_size=14)
    for batch in itertools.islice(train, 4):
        ids, labels, counts = batch["input_ids"], batch["labels"], batch["image_counts"]
        assert ids.dtype == labels.dtype == counts.dtype == torch.long
        assert batch["images"].shape == (int(counts.sum()), 3, 56, 56) and batch["images"].dtype == torch.float32
        assert ((ids == IMAGE_TOKEN_INDEX).sum(1) == counts).all()
        for row in range(ids.shape[0]):
            length = int((labels[row] != IGNORE_INDEX).nonzero().max()) + 1
            assert (ids[row, length:] == tokenizer.pad_token_id).all() and (labels[row, length:] == IGNORE_INDEX).all()
            trained = labels[row] != IGNORE_INDEX
            assert torch.equal(labels[row][trained], ids[row][trained])
            assert ids[row, 0] == tokenizer.bos_token_id
        assert len(batch["sample_ids"]) == 6


def test_resume_reproduces_the_same_batches_with_replacements(dirty):
    config, tokenizer, _ = dirty

    def run(consumed, count):
        train, _ = build_data_iterators(config, tokenizer, micro_batch_size=2, data_parallel_rank=1,
                                        data_parallel_size=2, consumed_samples=consumed, seed=7, num_workers=0,
                                        image_size=56, patch_size=14, model_max_length=64)
        return [(batch["sample_ids"], batch["bad_counts"].tolist()) for batch in itertools.islice(train, count)]

    full = run(0, 14)  # crosses into the second epoch
    assert run(4 * 8, 6) == full[8:]
    assert any(sum(counts) for _, counts in full)


def test_bad_fraction_limit_stops_with_a_clear_message(dirty):
    config, tokenizer, _ = dirty
    config = load_data_config(dirty_dataset() / "data.json")
    config.max_bad_fraction = 0.1
    train, _ = build_data_iterators(config, tokenizer, micro_batch_size=4, data_parallel_rank=0,
                                    data_parallel_size=1, consumed_samples=0, seed=0, num_workers=0,
                                    image_size=56, patch_size=14, model_max_length=64)
    with pytest.raises(TooManyBadSamples) as caught:
        list(itertools.islice(train, 100))
    message = str(caught.value)
    assert "max_bad_fraction=10.00%" in message and "missing_image" in message and "mm-data check" in message


def test_a_run_of_bad_records_counts_each_once_as_the_check_does(tmp_path):
    """One missing image folder makes a contiguous block of bad records: each is one bad record per epoch,
    in the training limit as in ``mm-data check``, not once for every sample that passes over it."""
    import json
    import shutil

    from mm_plugin.data.check import check_dataset

    folder = tmp_path / "blocked"
    shutil.copytree(synthetic("pretrain", 40), folder)
    records = json.loads((folder / "pretrain.json").read_text())
    for record in records[10:16]:
        record["image"] = "missing/" + record["image"]
    (folder / "pretrain.json").write_text(json.dumps(records))
    config = load_data_config(folder / "data.json")
    config.max_bad_fraction = 0.2  # 6 of 40 = 15%: within the limit
    tokenizer = load_tokenizer(config.tokenizer_path)
    dataset, _ = build_datasets(config, tokenizer, image_tokens=16, model_max_length=64)
    report = check_dataset(dataset, max_bad_fraction=config.max_bad_fraction, progress=False)
    assert report["bad"] == 6 and report["fit_to_train"]
    train, _ = build_data_iterators(config, tokenizer, micro_batch_size=4, data_parallel_rank=0,
                                    data_parallel_size=1, consumed_samples=0, seed=0, num_workers=0,
                                    image_size=56, patch_size=14, model_max_length=64)
    epoch = list(itertools.islice(train, 10))  # 40 samples, every position once
    assert bad_counts_by_reason(sum(batch["bad_counts"] for batch in epoch)) == {"missing_image": 6}


def test_odd_text_in_image_paths_is_a_counted_bad_record(tmp_path):
    """A NUL byte or a lone surrogate in a path made os.stat raise out of the check and the workers."""
    import json
    import shutil

    from mm_plugin.data.check import check_dataset

    folder = tmp_path / "odd"
    shutil.copytree(synthetic("pretrain", 8), folder)
    records = json.loads((folder / "pretrain.json").read_text())
    records[2]["image"] = "00000/a\x00b.jpg"
    records[5]["image"] = "00000/\ud800.jpg"
    (folder / "pretrain.json").write_text(json.dumps(records))
    config = load_data_config(folder / "data.json")
    dataset, _ = build_datasets(config, load_tokenizer(config.tokenizer_path), image_tokens=16, model_max_length=64)
    report = check_dataset(dataset, max_bad_fraction=0.5, progress=False)
    assert report["bad_by_reason"]["unsafe_image_path"]["count"] == 2
    assert [reason for reason, _ in dataset[2]["bad"]] == ["unsafe_image_path"]
    assert "NUL byte" in dataset[2]["bad"][0][1] and "not a valid file name" in dataset[5]["bad"][0][1]


def test_validation_split_is_held_out_and_fixed():
    folder = synthetic("pretrain", 64)
    config = load_data_config(folder / "data.json")
    config.valid_fraction = 0.25
    tokenizer = load_tokenizer(config.tokenizer_path)
    train, valid = build_datasets(config, tokenizer, image_tokens=16, model_max_length=128)
    assert len(valid) == 16 and len(train) == 48
    assert not set(train.positions.tolist()) & set(valid.positions.tolist())
    again, held = build_datasets(config, tokenizer, image_tokens=16, model_max_length=128)
    assert held.positions.tolist() == valid.positions.tolist()


def test_image_size_must_match_the_data_config():
    folder = synthetic("pretrain", 64)
    config = load_data_config(folder / "data.json")
    from mm_plugin.data import DataError

    with pytest.raises(DataError, match="crops images to 56x56"):
        build_data_iterators(config, None, micro_batch_size=2, data_parallel_rank=0, data_parallel_size=1,
                             consumed_samples=0, seed=0, num_workers=0, image_size=336, patch_size=14)


def test_workers_do_not_import_megatron():
    folder = synthetic("pretrain", 64)
    code = f"""
import itertools, sys
import torch
from mm_plugin.data import build_data_iterators, load_data_config, load_tokenizer
config = load_data_config({str(folder / 'data.json')!r})
train, _ = build_data_iterators(config, load_tokenizer(config.tokenizer_path), micro_batch_size=2,
    data_parallel_rank=0, data_parallel_size=1, consumed_samples=0, seed=0, num_workers=1,
    image_size=56, patch_size=14)
next(train)
print(sorted(m for m in sys.modules if m.startswith("megatron")))
"""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.getcwd()] + sys.path))
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "[]"


def test_stage2_bad_conversations_are_handled_as_llava_or_counted(tmp_path):
    """The instruction mix's kinds of bad input, in the vicuna_v1 template: each is handled as original LLaVA
    handles it or replaced and counted with a reason; none crashes, none yields a sample without a trained
    token."""
    import json
    import shutil

    folder = tmp_path / "stage2"
    shutil.copytree(synthetic("instruct", 16), folder)
    records = json.loads((folder / "instruct.json").read_text())
    image = next(r["image"] for r in records if "image" in r)
    turns = [{"from": "human", "value": "<image>\nWhat colour is the shape?"},
             {"from": "gpt", "value": "The shape is red."}]
    cases = {
        "more tags than images": ({"image": image, "conversations": [
            {"from": "human", "value": "<image>\n<image>\nWhat colour?"}, turns[1]]}, "image_token_mismatch"),
        "turns that do not alternate": ({"image": image, "conversations": [turns[0], turns[0], turns[1]]},
                                        "malformed_record"),
        "first turn from gpt": ({"image": image, "conversations": [turns[1], *turns]}, None),  # LLaVA drops it
        "empty turn": ({"image": image, "conversations": [turns[0], {"from": "gpt", "value": "  "}]},
                       "empty_caption"),
        "longer than the context": ({"image": image, "conversations": [
            {"from": "human", "value": "<image>\n" + "Describe the image. " * 200}, turns[1]]}, "too_long"),
        "a path leaving its folder": ({"image": "../" + image, "conversations": turns}, "unsafe_image_path"),
    }
    bad = [dict(record, id=name) for name, (record, _) in cases.items()]
    (folder / "instruct.json").write_text(json.dumps(bad + records))
    config = load_data_config(folder / "data.json")
    dataset, _ = build_datasets(config, load_tokenizer(config.tokenizer_path), image_tokens=16, model_max_length=200)
    for position, (name, (_, reason)) in enumerate(cases.items()):
        sample = dataset[position]
        assert [found for found, _ in sample["bad"]] == ([reason] if reason else []), name
        assert name in sample["bad"][0][1] if reason else sample["id"] == name
        assert (sample["labels"] != IGNORE_INDEX).any(), name
    dropped = dataset[2]
    assert (dropped["input_ids"] == IMAGE_TOKEN_INDEX).sum() == 1  # the stray gpt turn is gone, the rest trains
