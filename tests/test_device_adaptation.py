"""megatron-core on a CPU-only torch after ``import mm_plugin``: models, process groups, RNG, training, checkpoints.

Functions named ``_on_rank_*`` run on both ranks of the 2-process gloo pool; the tests check what they return.
"""

import pytest
import torch

from tiny_megatron import SEQUENCE, batches, clip_block, clip_config, clip_layer_spec, ddp_and_optimizer, gpt, \
    gpt_config, run_schedule

pytestmark = [pytest.mark.numeric,
              pytest.mark.skipif(torch.cuda.is_available(), reason="on CUDA megatron-core runs unadapted")]


def _parallel(tp=1, pp=1, seed=1234):
    from process_pool import parallel

    parallel(tp, pp, seed=seed)


def _snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}


def _raises_on_cuda(make) -> str:
    """The error a CUDA request outside megatron-core raises ('' if none)."""
    try:
        make()
    except (AssertionError, RuntimeError) as error:
        return str(error)
    return ""


# --- user code is not redirected ------------------------------------------------------------------

@pytest.mark.compat
def test_users_own_cuda_request_still_fails():
    import mm_plugin  # noqa: F401
    import megatron.core.utils as megatron_utils

    assert megatron_utils.torch.zeros(1, device="cuda").device == torch.device("cpu")  # inside megatron-core
    assert "CUDA" in _raises_on_cuda(lambda: torch.zeros(1, device="cuda"))
    assert "CUDA" in _raises_on_cuda(lambda: torch.ones(2).cuda())
    assert "CUDA" in _raises_on_cuda(torch.cuda.current_device)


# --- process groups and RNG ------------------------------------------------------------------------

def _on_rank_process_groups():
    from megatron.core import parallel_state as ps

    shapes = {}
    for tp, pp in [(2, 1), (1, 2), (1, 1)]:
        _parallel(tp, pp)
        shapes[f"tp{tp}pp{pp}"] = (ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank(),
                                   ps.get_pipeline_model_parallel_world_size(), ps.is_pipeline_first_stage(),
                                   ps.get_data_parallel_world_size())
    return shapes


@pytest.mark.compat
def test_initialize_model_parallel_with_gloo(pool):
    first, second = pool.run(_on_rank_process_groups)
    # (tp size, tp rank, pp size, first stage, dp size)
    assert first == {"tp2pp1": (2, 0, 1, True, 1), "tp1pp2": (1, 0, 2, True, 1), "tp1pp1": (1, 0, 1, True, 2)}
    assert second == {"tp2pp1": (2, 1, 1, True, 1), "tp1pp2": (1, 0, 2, False, 1), "tp1pp1": (1, 0, 1, True, 2)}


def _on_rank_random_streams():
    from megatron.core import tensor_parallel

    _parallel(2, 1, seed=7)  # model_parallel_cuda_manual_seed(7)
    tracker = tensor_parallel.get_cuda_rng_tracker()
    with tracker.fork():
        forked = torch.randn(4)
    with tracker.fork():
        forked_next = torch.randn(4)
    default = torch.randn(4)
    tensor_parallel.model_parallel_cuda_manual_seed(7)
    with tracker.fork():
        forked_again = torch.randn(4)
    default_again = torch.randn(4)
    tensor_parallel.model_parallel_cuda_manual_seed(8)
    default_other_seed = torch.randn(4)
    return {"forked": forked, "forked_next": forked_next, "forked_again": forked_again, "default": default,
            "default_again": default_again, "default_other_seed": default_other_seed}


@pytest.mark.compat
def test_rng_tracker_forks_reproducible_distinct_streams_and_seeding_seeds(pool):
    first, second = pool.run(_on_rank_random_streams)
    for rank in (first, second):
        assert torch.equal(rank["forked"], rank["forked_again"])  # reseeding reproduces the forked stream
        assert not torch.equal(rank["forked"], rank["forked_next"])  # a fork continues its own stream
        assert not torch.equal(rank["forked"], rank["default"])  # distinct from the default stream
        # model_parallel_cuda_manual_seed really seeds the default generator (a CPU-only torch ignores
        # torch.cuda.manual_seed, so without the device patch these two would differ)
        assert torch.equal(rank["default"], rank["default_again"])
        assert not torch.equal(rank["default"], rank["default_other_seed"])
    assert not torch.equal(first["forked"], second["forked"])  # each TP rank its own model-parallel stream
    assert torch.equal(first["default"], second["default"])  # one data-parallel stream


# --- models: forward and backward ---------------------------------------------------------------

def _on_rank_gpt_forward_backward(cpu_initialization):
    from mm_plugin import device

    _parallel()
    model = gpt(gpt_config(use_cpu_initialization=cpu_initialization))
    (tokens, labels), = batches(0, count=1)
    per_token_loss = model(tokens, None, None, labels=labels)
    per_token_loss.mean().backward()
    return {"shape": tuple(per_token_loss.shape), "loss": float(per_token_loss.mean()),
            "devices": {p.device.type for p in model.parameters()}, "active": device.current().type,
            "without_gradient": [n for n, p in model.named_parameters() if p.grad is None or not p.grad.any()]}


@pytest.mark.compat
@pytest.mark.parametrize("cpu_initialization", [True, False], ids=["cpu-init", "device-init"])
def test_gpt_model_runs_forward_and_backward(pool, cpu_initialization):
    for rank in pool.run(_on_rank_gpt_forward_backward, cpu_initialization):
        assert rank["shape"] == (2, SEQUENCE)
        assert 4.0 < rank["loss"] < 5.5  # about ln(104) for a fresh model
        assert rank["devices"] == {rank["active"]}
        assert rank["without_gradient"] == []


def _on_rank_clip_block():
    _parallel()
    block = clip_block()
    hidden = torch.randn(6, 2, 32, requires_grad=True)  # [sequence, batch, hidden]
    output = block(hidden, attention_mask=None)
    output.sum().backward()
    changed_last = hidden.detach().clone()
    changed_last[-1] += 1.0
    causal = torch.ones(6, 6, dtype=torch.bool).triu(1).expand(2, 1, 6, 6)  # True = masked

    def first_position_moves(mask):
        with torch.no_grad():
            return not torch.equal(block(changed_last, attention_mask=mask)[0], block(hidden, attention_mask=mask)[0])

    return {"shape": tuple(output.shape), "first_position_sees_last": first_position_moves(None),
            "causal_mask_hides_last": not first_position_moves(causal),
            "input_gradient": bool(hidden.grad.abs().sum() > 0),
            "biases": sorted({n.rsplit(".", 2)[-2] for n, _ in block.named_parameters() if n.endswith("bias")})}


@pytest.mark.compat
def test_clip_style_block_runs_unmasked_forward_and_backward(pool):
    for rank in pool.run(_on_rank_clip_block):
        assert rank["shape"] == (6, 2, 32)
        assert rank["first_position_sees_last"]  # no causal mask ...
        assert rank["causal_mask_hides_last"]  # ... though a passed one is applied
        assert rank["input_gradient"]
        assert rank["biases"] == ["input_layernorm", "linear_fc1", "linear_fc2", "linear_proj", "linear_qkv",
                                  "pre_mlp_layernorm"]


def _on_rank_clip_vit_model():
    from megatron.core.models.vision.clip_vit_model import CLIPViTModel
    from megatron.core.transformer.torch_norm import WrappedTorchNorm

    _parallel()
    model = CLIPViTModel(clip_config(), clip_layer_spec(), ln_pre_impl=WrappedTorchNorm, add_class_token=True,
                         class_token_len=1, patch_dim=14, img_h=28, img_w=28)
    features = model(torch.randn(2, 3, 28, 28))
    return {"shape": tuple(features.shape), "position_ids": model.position_ids.device.type,
            "cuda_after_init": _raises_on_cuda(lambda: torch.zeros(1, device="cuda"))}


@pytest.mark.compat
def test_clip_vit_model_builds_and_leaves_no_device_mode_behind(pool):
    for rank in pool.run(_on_rank_clip_vit_model):
        assert rank["shape"] == (2, 5, 32)  # 4 patches + the class token
        assert rank["position_ids"] == "cpu"
        assert "CUDA" in rank["cuda_after_init"]


# --- a training step: DDP, optimizer, schedule --------------------------------------------------

def _on_rank_training_steps(distributed_optimizer):
    _parallel()  # 2-way data parallel
    config = gpt_config()
    model = gpt(config)
    ddp, optimizer = ddp_and_optimizer(config, model, distributed_optimizer)
    initial = _snapshot(model)
    data = batches(seed=torch.distributed.get_rank())  # different data on each data-parallel rank
    losses, steps = [], []
    for _ in range(3):
        ddp.zero_grad_buffer()
        optimizer.zero_grad()
        losses.append(sum(run_schedule(ddp, data)) / len(data))
        steps.append(optimizer.step())
    return {"losses": losses, "steps": [(ok, float(norm)) for ok, norm, _ in steps],
            "initial": initial, "final": _snapshot(model)}


@pytest.mark.compat
@pytest.mark.parametrize("distributed_optimizer", [False, True], ids=["adam", "distributed-adam"])
def test_schedule_ddp_and_optimizer_train(pool, distributed_optimizer):
    first, second = pool.run(_on_rank_training_steps, distributed_optimizer)
    for rank in (first, second):
        assert all(ok and norm > 0 for ok, norm in rank["steps"])
        assert rank["losses"][-1] < rank["losses"][0]
        assert all(not torch.equal(rank["initial"][k], rank["final"][k]) for k in rank["initial"])
    assert first["losses"] != second["losses"]  # the ranks saw different data ...
    assert all(torch.equal(first["final"][k], second["final"][k]) for k in first["final"])  # ... one model


# --- dist_checkpointing ---------------------------------------------------------------------------

def _on_rank_checkpoint_round_trip(directory):
    from megatron.core import dist_checkpointing

    _parallel(2, 1, seed=1)
    saved = gpt()
    dist_checkpointing.save(saved.sharded_state_dict(), directory)
    _parallel(2, 1, seed=2)
    restored = gpt()
    different_before = any(not torch.equal(a, b) for a, b in zip(_snapshot(saved).values(),
                                                                 _snapshot(restored).values()))
    restored.load_state_dict(dist_checkpointing.load(restored.sharded_state_dict(), directory))
    same_after = all(torch.equal(a, b) for a, b in zip(_snapshot(saved).values(), _snapshot(restored).values()))
    return different_before, same_after


@pytest.mark.compat
def test_dist_checkpointing_round_trips_a_tensor_parallel_model(pool, tmp_path):
    directory = tmp_path / "checkpoint"
    directory.mkdir()
    assert pool.run(_on_rank_checkpoint_round_trip, str(directory)) == [(True, True)] * 2
    assert any(directory.iterdir())
