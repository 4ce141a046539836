"""Full <-> sharded state dicts on the 2-process pool: TP=2 and PP=2 against TP=1, PP=1.

Functions named ``_on_rank_*`` run on both ranks (``pool.run``); the tests compare what they return.
"""

import os

import pytest
import torch

from tiny_megatron import PADDED_VOCAB, VOCAB, batches, clip_block, gpt, gpt_config, random_full_state_dict, \
    run_schedule

pytestmark = pytest.mark.numeric

SEED = 1234


def _rank():
    return torch.distributed.get_rank()


def _write(full, directory, kind):
    """The full dict as the source kind under test: a mapping, or a file rank 0 writes."""
    from mm_plugin.safe_io import save_state

    if kind == "mapping":
        return full
    path = os.path.join(directory, f"full.{kind}")
    if _rank() == 0:
        save_state(full, path)
    torch.distributed.barrier()
    return path


def _parallel(tp, pp):
    from process_pool import parallel

    parallel(tp, pp, seed=SEED + 1)  # initial values differ from the full dict's


def _sharded_gpt(tp, pp, **overrides):
    _parallel(tp, pp)
    return gpt(gpt_config(**overrides))


def _snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}


# --- full -> sharded -> full ---------------------------------------------------------------------

def _on_rank_round_trip(directory, tp, pp, kind, dst):
    from mm_plugin.parallel import gather_full_state_dict, load_full_state_dict

    full = random_full_state_dict(SEED)
    source = _write(full, directory, kind)
    model = _sharded_gpt(tp, pp)
    result = load_full_state_dict(model, source, vocab_size=VOCAB)
    gathered = gather_full_state_dict(model, vocab_size=VOCAB, dst=dst)
    return {"full": full, "gathered": gathered, "loaded": result.loaded, "local": _snapshot(model)}


@pytest.mark.compat
@pytest.mark.parametrize("tp, pp, kind, dst", [
    (2, 1, "mapping", 0), (2, 1, "safetensors", None), (1, 2, "pt", 0), (1, 2, "safetensors", 1),
])
def test_full_to_sharded_to_gathered_is_bit_identical(pool, tmp_path, tp, pp, kind, dst):
    ranks = pool.run(_on_rank_round_trip, str(tmp_path), tp, pp, kind, dst)
    receivers = range(2) if dst is None else [dst]
    for rank in receivers:
        full, gathered = ranks[rank]["full"], ranks[rank]["gathered"]
        assert sorted(gathered) == sorted(full)
        unequal = [k for k in full if gathered[k].dtype != full[k].dtype or not torch.equal(gathered[k], full[k])]
        assert unequal == []
    for rank in set(range(2)) - set(receivers):
        assert ranks[rank]["gathered"] is None
    if pp == 2:  # each stage loaded its own layers only: 0, 1 on the first, 2, 3 on the second
        first, second = (set(k.split(".")[2] for k in r["loaded"] if ".layers." in k) for r in ranks)
        assert (first, second) == ({"0", "1"}, {"2", "3"})


def test_tensor_parallel_shards_follow_megatron_layout(pool, tmp_path):
    """Each TP rank's slices, checked by hand: grouped q/k/v, [gate; up], row-parallel, padded vocabulary."""
    ranks = pool.run(_on_rank_round_trip, str(tmp_path), 2, 1, "mapping", 0)
    full = ranks[0]["full"]
    head_dim, heads_per_group = 12, 2
    group_rows = (heads_per_group + 2) * head_dim  # a group's q heads, then its k and v
    for rank, local in enumerate(r["local"] for r in ranks):
        layer = "decoder.layers.1."
        qkv = full[layer + "self_attention.linear_qkv.weight"]
        assert torch.equal(local[layer + "self_attention.linear_qkv.weight"],
                           qkv[rank * group_rows:(rank + 1) * group_rows])
        gate, up = full[layer + "mlp.linear_fc1.weight"].chunk(2)
        half = gate.shape[0] // 2
        assert torch.equal(local[layer + "mlp.linear_fc1.weight"],
                           torch.cat([gate[rank * half:(rank + 1) * half], up[rank * half:(rank + 1) * half]]))
        fc2 = full[layer + "mlp.linear_fc2.weight"]
        assert torch.equal(local[layer + "mlp.linear_fc2.weight"], fc2.chunk(2, dim=1)[rank])
        assert torch.equal(local[layer + "input_layernorm.weight"], full[layer + "input_layernorm.weight"])
        rows = PADDED_VOCAB // 2
        for table in ("embedding.word_embeddings.weight", "output_layer.weight"):
            shard = local[table]
            real = full[table][rank * rows:(rank + 1) * rows]
            assert torch.equal(shard[:len(real)], real)
            assert torch.count_nonzero(shard[len(real):]) == 0 and len(shard) - len(real) == rank * 3


# --- TP=2 and PP=2 compute what TP=1, PP=1 computes ----------------------------------------------

def _on_rank_loss_and_gradients(tp, pp):
    from mm_plugin.parallel import gather_full_state_dict, load_full_state_dict

    full = random_full_state_dict(SEED)
    model = _sharded_gpt(tp, pp)
    load_full_state_dict(model, full, vocab_size=VOCAB)
    losses = run_schedule(model, batches(SEED))
    gradients = gather_full_state_dict(model, vocab_size=VOCAB, select=lambda parameter: parameter.grad)
    return {"losses": losses, "gradients": gradients}


def _assert_same_training_step(reference, parallel_run, last_stage):
    assert len(reference[0]["losses"]) == 2
    torch.testing.assert_close(parallel_run[last_stage]["losses"], reference[0]["losses"], rtol=1e-5, atol=0)
    expected, found = reference[0]["gradients"], parallel_run[0]["gradients"]
    assert sorted(found) == sorted(expected) and expected
    for key in expected:
        torch.testing.assert_close(found[key], expected[key], rtol=1e-4, atol=1e-6, msg=key)


@pytest.mark.compat
def test_tensor_parallel_2_gives_the_loss_and_gradients_of_tp_1(pool):
    reference = pool.run(_on_rank_loss_and_gradients, 1, 1)
    _assert_same_training_step(reference, pool.run(_on_rank_loss_and_gradients, 2, 1), last_stage=0)


@pytest.mark.compat
def test_pipeline_parallel_2_gives_the_loss_and_gradients_of_pp_1(pool):
    reference = pool.run(_on_rank_loss_and_gradients, 1, 1)
    parallel_run = pool.run(_on_rank_loss_and_gradients, 1, 2)
    assert parallel_run[0]["losses"] == []  # the first stage computes no loss
    _assert_same_training_step(reference, parallel_run, last_stage=1)


# --- any transformer block in the tree: a vision tower on the first stage -------------------------

class _VisionLanguage(torch.nn.Module):
    """A vision tower (first stage only, never split) and a pipelined language model."""

    def __init__(self, first_stage):
        super().__init__()
        self.language_model = gpt()
        if first_stage:
            self.vision_model = clip_block()


def _on_rank_vision_tower(directory):
    from megatron.core import parallel_state

    from mm_plugin.parallel import gather_full_state_dict, load_full_state_dict

    language = random_full_state_dict(SEED)
    vision = {k: v + 1 for k, v in _snapshot(clip_block()).items()}
    full = {**{f"language_model.{k}": v for k, v in language.items()},
            **{f"vision_model.{k}": v for k, v in vision.items()}}
    _parallel(1, 2)
    model = _VisionLanguage(parallel_state.is_pipeline_first_stage())
    load_full_state_dict(model, _write(full, directory, "safetensors"), vocab_size=VOCAB)
    return {"full": full, "gathered": gather_full_state_dict(model, vocab_size=VOCAB)}


@pytest.mark.compat
def test_vision_tower_on_the_first_stage_round_trips(pool, tmp_path):
    first, _ = pool.run(_on_rank_vision_tower, str(tmp_path))
    assert any(k.startswith("vision_model.layers.1.") for k in first["full"])
    assert sorted(first["gathered"]) == sorted(first["full"])
    assert all(torch.equal(first["gathered"][k], v) for k, v in first["full"].items())


# --- bad input: every rank raises, no rank changes a weight ---------------------------------------

def _on_rank_bad_load(edit, **options):
    from mm_plugin.parallel import FullStateDictError, load_full_state_dict

    full = random_full_state_dict(SEED)
    edit(full)
    model = _sharded_gpt(1, 2)
    before = _snapshot(model)
    try:
        load_full_state_dict(model, full, **options)
        message = None
    except FullStateDictError as error:
        message = str(error)
    after = _snapshot(model)
    return {"message": message, "unchanged": all(torch.equal(before[k], after[k]) for k in before)}


def _wrong_shape_on_the_second_stage(full):
    full["decoder.layers.3.mlp.linear_fc1.weight"] = torch.zeros(128, 48)


def _missing_and_unexpected(full):
    del full["decoder.layers.0.self_attention.linear_proj.weight"]
    full["decoder.layers.9.mlp.linear_fc1.weight"] = torch.zeros(1)


def _wrong_vocabulary(full):
    full["output_layer.weight"] = torch.zeros(PADDED_VOCAB + 2, 48)


@pytest.mark.compat
def test_a_shape_mismatch_on_one_stage_stops_every_rank_before_any_copy(pool):
    ranks = pool.run(_on_rank_bad_load, _wrong_shape_on_the_second_stage)
    for rank in ranks:
        assert rank["unchanged"]
        assert ("rank 1: decoder.layers.3.mlp.linear_fc1.weight: the model (tensor parallel size 1) needs shape "
                "[176, 48], the given state dict has [128, 48]") in rank["message"]
        assert "no rank changed any weight" in rank["message"]


def test_missing_and_unexpected_keys_are_named(pool):
    ranks = pool.run(_on_rank_bad_load, _missing_and_unexpected)
    for rank in ranks:
        assert rank["unchanged"]
        assert "rank 0: decoder.layers.0.self_attention.linear_proj.weight: missing from the given state dict" \
               in rank["message"]
        assert "decoder.layers.9.mlp.linear_fc1.weight: in the given state dict but no parameter of the model uses it" \
               in rank["message"]


def test_vocabulary_rows_beyond_the_padded_table_are_refused(pool):
    for rank in pool.run(_on_rank_bad_load, _wrong_vocabulary):
        assert "rank 1: output_layer.weight: the model (tensor parallel size 1) needs shape [<=104, 48], the " \
               "given state dict has [106, 48]" in rank["message"]
        assert rank["unchanged"]


def _keep_only_output_layer(full):
    for key in [k for k in full if k != "output_layer.weight"]:
        del full[key]


def test_allow_missing_loads_what_is_there(pool):
    ranks = pool.run(_on_rank_partial, _keep_only_output_layer)
    assert ranks[1]["loaded"] == ["output_layer.weight"] and ranks[0]["loaded"] == []
    assert ranks[1]["changed"] == ["output_layer.weight"] and ranks[0]["changed"] == []
    assert "decoder.layers.0.self_attention.linear_qkv.weight" in ranks[0]["missing"]


def _on_rank_partial(edit):
    from mm_plugin.parallel import load_full_state_dict

    full = random_full_state_dict(SEED)
    edit(full)
    model = _sharded_gpt(1, 2)
    before = _snapshot(model)
    result = load_full_state_dict(model, full, allow_missing=True)
    after = _snapshot(model)
    return {"loaded": result.loaded, "missing": result.missing,
            "changed": sorted(k for k in before if not torch.equal(before[k], after[k]))}


class _WithProjector(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.language_model = gpt()
        self.projector = torch.nn.Linear(4, 48)


def _on_rank_prefix(directory):
    from mm_plugin.parallel import load_full_state_dict

    language = random_full_state_dict(SEED)
    _parallel(2, 1)
    model = _WithProjector()
    projector_before = model.projector.weight.detach().clone()
    load_full_state_dict(model, _write(language, directory, "pt"), prefix="language_model.", vocab_size=VOCAB)
    projector_kept = torch.equal(model.projector.weight, projector_before)
    projector_part = {"weight": torch.ones(48, 4), "bias": torch.zeros(48)}
    load_full_state_dict(model, projector_part, prefix="projector.")
    qkv = "decoder.layers.0.self_attention.linear_qkv.weight"
    rows = language[qkv].shape[0] // 2
    return {"projector_kept": projector_kept,
            "qkv_loaded": torch.equal(model.language_model.state_dict()[qkv],
                                      language[qkv][_rank() * rows:(_rank() + 1) * rows]),
            "projector_loaded": torch.equal(model.projector.weight, torch.ones(48, 4))}


def test_prefix_loads_a_part_file_into_its_submodule(pool, tmp_path):
    for rank in pool.run(_on_rank_prefix, str(tmp_path)):
        assert rank == {"projector_kept": True, "qkv_loaded": True, "projector_loaded": True}


def _on_rank_unreadable(path):
    from mm_plugin.parallel import FullStateDictError, load_full_state_dict

    model = _sharded_gpt(1, 2)
    try:
        load_full_state_dict(model, path)
    except FullStateDictError as error:
        return str(error)


def test_an_unreadable_file_is_reported_on_every_rank(pool, tmp_path):
    not_a_state_dict = tmp_path / "list.pt"
    torch.save([torch.zeros(1)], not_a_state_dict)
    for path, reason in [(tmp_path / "absent.pt", "absent.pt: no such file"),
                         (not_a_state_dict, "list.pt: holds a list, not a state dict")]:
        for message in pool.run(_on_rank_unreadable, str(path)):
            assert reason in message and "ranks 0, 1: WeightFileError" in message


# --- each rank reads only its own slices -----------------------------------------------------------

def _on_rank_elements_read(tp, pp):
    from megatron.core import parallel_state

    from mm_plugin.parallel import load_full_state_dict
    from mm_plugin.parallel.sources import MappingSource

    class CountingSource(MappingSource):
        elements = 0

        def read(self, key, index):
            piece = super().read(key, index)
            CountingSource.elements += piece.numel()
            return piece

    full = random_full_state_dict(SEED)
    model = _sharded_gpt(tp, pp)
    load_full_state_dict(model, CountingSource(full, "counted"), vocab_size=VOCAB)
    local = _snapshot(model)
    rows, tp_rank = PADDED_VOCAB // tp, parallel_state.get_tensor_model_parallel_rank()
    padding_rows = max(0, (tp_rank + 1) * rows - max(VOCAB, tp_rank * rows))  # rows past the vocabulary
    tables = [k for k in local if k.endswith(("word_embeddings.weight", "output_layer.weight"))]
    return {"read": CountingSource.elements, "full": sum(t.numel() for t in full.values()),
            "expected": sum(t.numel() for t in local.values()) - len(tables) * padding_rows * 48}


@pytest.mark.parametrize("tp, pp", [(2, 1), (1, 2)])
def test_each_rank_reads_only_its_own_slices(pool, tp, pp):
    ranks = pool.run(_on_rank_elements_read, tp, pp)
    for rank in ranks:
        assert rank["read"] == rank["expected"]
        assert rank["read"] < 0.6 * rank["full"]
