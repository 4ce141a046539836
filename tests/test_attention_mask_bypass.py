"""MindSpeed's attention wrapper keeps the caller's mask, whichever of MindSpeed and mm_plugin is imported first.

MindSpeed is not on PyPI: ``tests/stubs/mindspeed`` stands in for it (see its docstring). Each scenario
runs in a fresh interpreter, because importing the adaptor patches megatron-core for the whole process;
the scenario code is :func:`scenario` below, run there with the stand-in on sys.path. The scenarios
start together (they are independent) and each test reads its own.
"""

import json
import os
import sys

import pytest

from subprocesses import finish, start_python
from seeds import varied

pytestmark = pytest.mark.numeric

STUBS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "stubs")
BYPASS = ["mindspeed.attention_mask_factory", "mindspeed.attention_mask_forward"]
SEQUENCE, BATCH, HEADS, HEAD_DIM = 5, 2, 2, 8


SCENARIOS = {  # name: (steps, MindSpeed release of the stand-in)
    "adaptor first, undo, apply": (["adaptor", "plugin", "check", "undo", "check", "apply", "check"], "3da17d56"),
    "plugin first": (["plugin", "adaptor", "check"], "3da17d56"),
    "plugin first, undone": (["plugin", "undo", "adaptor", "check"], "3da17d56"),
    "fixed, adaptor first": (["adaptor", "plugin", "check"], "4e126097"),
    "fixed, plugin first": (["plugin", "adaptor", "check"], "4e126097"),
}


class _Scenarios:
    """Every scenario started at once; ``reports[name]`` waits for that one's JSON report."""

    def __init__(self):
        tests = os.path.dirname(os.path.abspath(__file__))
        self._running = {
            name: start_python(f"import test_attention_mask_bypass as t; t.scenario({steps!r})", tests, STUBS,
                               env={"MINDSPEED_STUB_RELEASE": release})
            for name, (steps, release) in SCENARIOS.items()
        }
        self._reports = {}

    def __getitem__(self, name):
        if name not in self._reports:
            self._reports[name] = json.loads(finish(self._running[name]).strip().splitlines()[-1])
        return self._reports[name]

    def close(self):
        for process in self._running.values():
            if process.poll() is None:
                process.kill()
                process.communicate()


@pytest.fixture(scope="module")
def reports():
    scenarios = _Scenarios()
    yield scenarios
    scenarios.close()


# --- run inside the fresh interpreter ------------------------------------------------------------

def scenario(steps):
    """Run ``steps`` in order and print what each "check" saw, as JSON: adaptor, plugin, undo, apply, check."""
    import importlib
    import warnings

    warnings.simplefilter("ignore")
    report = {"checks": []}
    for step in steps:
        if step == "adaptor":
            importlib.import_module("mindspeed.megatron_adaptor")
        elif step == "plugin":
            importlib.import_module("mm_plugin")
        elif step == "undo":
            sys.modules["mm_plugin.patches"].undo(BYPASS)
        elif step == "apply":
            sys.modules["mm_plugin.patches"].apply_patches()
        elif step == "check":
            report["checks"].append(_check())
    report["records"] = {r.patch.name: [r.status, r.detail] for r in sys.modules["mm_plugin.patches"].applied()
                         if r.patch.name in BYPASS}
    print(json.dumps(report))


def _attention():
    import torch.distributed as dist
    from megatron.core.transformer import TransformerConfig
    from megatron.core.transformer.dot_product_attention import DotProductAttention
    from megatron.core.transformer.enums import AttnMaskType

    from process_pool import free_port, parallel

    if not dist.is_initialized():
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
        dist.init_process_group("gloo", rank=0, world_size=1)
        parallel(1, 1)
    config = TransformerConfig(num_layers=1, hidden_size=HEADS * HEAD_DIM, num_attention_heads=HEADS,
                               use_cpu_initialization=True, attention_dropout=0.0, masked_softmax_fusion=False)
    return DotProductAttention(config=config, layer_number=1, attn_mask_type=AttnMaskType.no_mask,
                               attention_type="self")


def _check():
    """What the attention computed with a caller's (non-causal, padding) mask, by position and by keyword,
    and with no mask, against megatron-core's own forward; and whether MindSpeed's global was restored."""
    import inspect

    import torch
    from megatron.core.transformer.dot_product_attention import DotProductAttention
    from megatron.core.transformer.enums import AttnMaskType

    from mindspeed import arguments
    from mindspeed.model import transformer as mindspeed_masks

    arguments.set_args(micro_batch_size=BATCH, seq_length=SEQUENCE)  # as MindSpeed parses them at start-up
    attention = _attention()
    torch.manual_seed(varied(0))
    query, key, value = (torch.randn(SEQUENCE, BATCH, HEADS, HEAD_DIM) for _ in range(3))
    padding = torch.zeros(BATCH, 1, SEQUENCE, SEQUENCE, dtype=torch.bool)
    padding[1, :, :, -2:] = True  # the second sample's last two positions are padding; no causal part
    causal = torch.ones(SEQUENCE, SEQUENCE, dtype=torch.bool).triu(1).expand(BATCH, 1, -1, -1)
    megatron_forward = inspect.unwrap(DotProductAttention.forward)

    def megatron_with(mask):
        return megatron_forward(attention, query, key, value, mask, attn_mask_type=AttnMaskType.no_mask)

    without_mask = attention(query, key, value, None, attn_mask_type=AttnMaskType.causal)
    global_before = mindspeed_masks._GLOBAL_ATTN_MASK  # built by the call above
    by_position = attention(query, key, value, padding, attn_mask_type=AttnMaskType.no_mask)
    by_keyword = attention(query, key, value, attention_mask=padding, attn_mask_type=AttnMaskType.no_mask)
    global_restored = mindspeed_masks._GLOBAL_ATTN_MASK is global_before
    return {
        "wrapped_by_mindspeed": DotProductAttention.forward is not megatron_forward,
        "masks_differ": not torch.equal(megatron_with(padding), megatron_with(causal)),
        "by_position_keeps": torch.equal(by_position, megatron_with(padding)),
        "by_keyword_keeps": torch.equal(by_keyword, megatron_with(padding)),
        "by_position_got_global": torch.equal(by_position, megatron_with(causal)),
        "none_uses_global": torch.equal(without_mask, megatron_with(causal)),
        "global_restored": global_restored,
    }


# --- the tests -----------------------------------------------------------------------------------

KEPT = {"wrapped_by_mindspeed": True, "masks_differ": True, "by_position_keeps": True, "by_keyword_keeps": True,
        "by_position_got_global": False, "none_uses_global": True, "global_restored": True}
LOST = dict(KEPT, by_position_keeps=False, by_keyword_keeps=False, by_position_got_global=True)


@pytest.mark.compat
def test_adaptor_imported_first_then_plugin_keeps_mask_and_undo_loses_it(reports):
    report = reports["adaptor first, undo, apply"]
    kept, undone, reapplied = report["checks"]
    assert kept == KEPT
    assert undone == LOST  # without the patch the caller's mask is replaced by MindSpeed's causal one
    assert reapplied == KEPT
    assert [status for status, _ in report["records"].values()] == ["applied", "applied"]


@pytest.mark.compat
def test_plugin_imported_first_then_adaptor_keeps_mask(reports):
    report = reports["plugin first"]
    assert report["checks"] == [KEPT]
    factory, forward = report["records"].values()
    assert factory[0] == "applied"
    assert forward == ["skipped", "DotProductAttention.forward was not built by MindSpeed's "
                                  "dot_product_attention_forward_wrapper"]


@pytest.mark.compat
def test_plugin_imported_first_with_the_patch_undone_loses_mask(reports):
    report = reports["plugin first, undone"]
    assert report["checks"] == [LOST]


@pytest.mark.compat
@pytest.mark.parametrize("name", ["fixed, adaptor first", "fixed, plugin first"])
def test_mindspeed_with_the_fix_is_left_alone(reports, name):
    report = reports[name]
    assert report["checks"] == [KEPT]
    factory = report["records"]["mindspeed.attention_mask_factory"]
    assert factory == ["skipped", "MindSpeed's dot_product_attention_forward_wrapper already keeps a mask the "
                                  "caller passes (its `if attention_mask is None` fix)"]
    assert report["records"]["mindspeed.attention_mask_forward"][0] == "skipped"


def test_without_mindspeed_the_patches_are_skipped():
    import mm_plugin

    records = {r.patch.name: r for r in mm_plugin.patches.applied()}
    assert (records[BYPASS[0]].status, records[BYPASS[0]].detail) == ("skipped", "mindspeed is not installed")
    assert records[BYPASS[1]].status in ("pending", "skipped")
