"""The plugin's patches other than device adaptation change nothing for a plain megatron-core GPT run.

A plain run: no images, no MindSpeed, a stock GPTModel. It runs once with every patch applied and once
with only the device patches (``device.*``; every other applied patch undone), on the 2-process pool,
and both runs must agree bit for bit. Generic over whatever non-device patches are registered.
"""

import pytest
import torch

from tiny_megatron import batches, ddp_and_optimizer, gpt, gpt_config, run_schedule

pytestmark = pytest.mark.numeric


def _plain_gpt_run():
    """Logits, losses, gradients and the parameters after one Adam step, from a fixed start (TP=2)."""
    from process_pool import parallel

    parallel(2, 1, seed=99)
    config = gpt_config()
    model = gpt(config)
    ddp, optimizer = ddp_and_optimizer(config, model)
    data = batches(5)
    with torch.no_grad():
        logits = ddp(data[0][0], None, None)
    losses = torch.tensor(run_schedule(ddp, data))
    gradients = {n: p.main_grad.clone() for n, p in model.named_parameters()}
    optimizer.step()
    return {"logits": logits, "losses": losses, "gradients": gradients,
            "parameters": {n: p.detach().clone() for n, p in model.named_parameters()}}


def _on_rank_with_device_patches_only():
    from mm_plugin import patches

    others = [r.patch.name for r in patches.applied()
              if not r.patch.name.startswith("device.") and r.status in ("applied", "pending")]
    undone = patches.undo(others)
    try:
        return {"run": _plain_gpt_run(), "undone": sorted(undone),
                "still_applied": sorted(r.patch.name for r in patches.applied()
                                        if r.status == "applied" and not r.patch.name.startswith("device."))}
    finally:
        patches.apply_patches()


def _on_rank_with_every_patch():
    from mm_plugin import patches

    return {"run": _plain_gpt_run(),
            "applied": sorted(r.patch.name for r in patches.applied() if r.status == "applied")}


def _same(first, second) -> list[str]:
    """Names of the outputs that differ (tensors compared exactly)."""
    differ = []
    for name, value in first.items():
        if isinstance(value, dict):
            differ += [f"{name}.{key}" for key in value if not torch.equal(value[key], second[name][key])]
        elif not torch.equal(value, second[name]):
            differ.append(name)
    return differ


@pytest.mark.compat
def test_non_device_patches_change_nothing_for_a_plain_gpt_run(pool):
    everything = pool.run(_on_rank_with_every_patch)
    device_only = pool.run(_on_rank_with_device_patches_only)
    after = pool.run(_on_rank_with_every_patch)
    for all_patches, only_device, again in zip(everything, device_only, after):
        assert only_device["still_applied"] == []
        non_device_applied = [n for n in all_patches["applied"] if not n.startswith("device.")]
        assert set(non_device_applied) <= set(only_device["undone"])
        assert _same(all_patches["run"], only_device["run"]) == []
        assert again["applied"] == all_patches["applied"]  # re-applied afterwards
    # the patched targets were really in use: at least the embedding patch applies to a GPT run
    assert any(not n.startswith("device.") for n in everything[0]["applied"])
