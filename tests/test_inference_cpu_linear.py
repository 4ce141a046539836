"""The CPU linear route of inference: packed oneDNN weights, equal to ``F.linear``, repacked when a weight changes."""

import pytest
import torch
import torch.nn.functional as F

from mm_plugin.inference import cpu_linear
from seeds import varied

pytestmark = [pytest.mark.numeric, pytest.mark.skipif(not cpu_linear.has_onednn(), reason="this torch has no oneDNN")]


@pytest.mark.parametrize("dtype, tolerance", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("rows", [(1,), (7,), (5, 3)])
def test_packed_linear_computes_f_linear(dtype, tolerance, rows):
    generator = torch.Generator().manual_seed(varied(0))
    weight = torch.randn(96, 64, generator=generator).to(dtype)
    x = torch.randn(*rows, 64, generator=generator).to(dtype)
    expected = F.linear(x.float(), weight.float())
    result = cpu_linear.packed_linear(x, weight)
    assert result.dtype == dtype and result.shape == expected.shape
    torch.testing.assert_close(result.float(), expected, rtol=tolerance, atol=tolerance * expected.abs().max().item())


def test_a_weight_changed_in_place_is_packed_again():
    weight = torch.nn.Parameter(torch.randn(32, 16), requires_grad=False)
    x = torch.randn(4, 16)
    before = cpu_linear.packed_linear(x, weight)
    with torch.no_grad():
        weight.mul_(-2.0)  # what load_state_dict's copy_ does to the version counter, too
    torch.testing.assert_close(cpu_linear.packed_linear(x, weight), -2.0 * before)


def test_views_of_one_weight_are_packed_once_each_and_again_when_it_changes():
    weight = torch.nn.Parameter(torch.randn(64, 16), requires_grad=False)
    x = torch.randn(4, 16)
    for half in weight.chunk(2):  # a new view object at each slicing: packed once, kept with the weight
        torch.testing.assert_close(cpu_linear.packed_linear(x, half), F.linear(x, half), rtol=1e-5, atol=1e-5)
    first, second = weight.chunk(2)
    packed = cpu_linear.packed_copy(first)
    assert packed is not None and cpu_linear.packed_copy(weight.chunk(2)[0]) is packed
    assert cpu_linear.packed_copy(second) is not packed and cpu_linear.packed_copy(weight) is None
    with torch.no_grad():
        weight.mul_(-1.0)
    torch.testing.assert_close(cpu_linear.packed_linear(x, weight.chunk(2)[1]), F.linear(x, second), rtol=1e-5, atol=1e-5)


def test_a_non_contiguous_input_is_taken():
    weight, x = torch.randn(24, 16), torch.randn(16, 6)
    torch.testing.assert_close(cpu_linear.packed_linear(x.t(), weight), F.linear(x.t(), weight), rtol=1e-5, atol=1e-5)


def test_the_route_follows_device_dtype_and_setting(monkeypatch):
    monkeypatch.delenv("MM_PLUGIN_CPU_LINEAR", raising=False)
    assert cpu_linear.linear_for(torch.zeros(1)) is cpu_linear.linear
    assert cpu_linear.linear_for(torch.zeros(1, dtype=torch.bfloat16)) is cpu_linear.linear
    assert cpu_linear.linear_for(torch.zeros(1, dtype=torch.float16)) is F.linear  # no fast fp16 GEMM on most CPUs
    assert cpu_linear.linear_for(torch.zeros(1, device="meta")) is F.linear
    monkeypatch.setenv("MM_PLUGIN_CPU_LINEAR", "torch")
    assert cpu_linear.linear_for(torch.zeros(1)) is F.linear
    monkeypatch.setenv("MM_PLUGIN_CPU_LINEAR", "mkl")
    with pytest.raises(ValueError, match="MM_PLUGIN_CPU_LINEAR='mkl': use onednn or torch"):
        cpu_linear.linear_for(torch.zeros(1))


def test_only_products_big_enough_to_gain_are_packed():
    small, wide = torch.randn(256, 256), torch.randn(512, 512)  # 2^16 and 2^18 elements
    one_row, rows = torch.randn(1, 512), torch.randn(4, 512)
    for x, weight, packed in ((torch.randn(64, 256), small, False), (one_row, wide, False), (rows, wide, True)):
        result = cpu_linear.linear(x, weight)
        torch.testing.assert_close(result, F.linear(x, weight), rtol=1e-5, atol=1e-4)
        assert (weight in cpu_linear._PACKED) is packed


def test_no_packing_when_it_would_leave_too_little_memory(monkeypatch):
    assert cpu_linear.memory()[0] is not None  # Linux: /proc/meminfo
    weight, x = torch.randn(1024, 512), torch.randn(8, 512)
    monkeypatch.setattr(cpu_linear, "memory", lambda: (weight.numel() * 4 + (1 << 30), 64 << 30))  # 1 GiB left after
    with pytest.warns(RuntimeWarning, match="no longer packed"):
        result = cpu_linear.linear(x, weight)
    torch.testing.assert_close(result, F.linear(x, weight))
    assert weight in cpu_linear._PACKED and cpu_linear.packed_copy(weight) is None
    monkeypatch.setattr(cpu_linear, "memory", lambda: (64 << 30, 64 << 30))
    with torch.no_grad():
        weight.mul_(2.0)  # a changed weight is considered again
    torch.testing.assert_close(cpu_linear.linear(x, weight), F.linear(x, weight), rtol=1e-5, atol=1e-4)
    assert cpu_linear.packed_copy(weight) is not None


def test_a_product_autograd_records_is_not_packed():
    weight, x = torch.nn.Parameter(torch.randn(1024, 512)), torch.randn(8, 512)
    cpu_linear.linear(x, weight).sum().backward()
    assert weight.grad is not None and weight not in cpu_linear._PACKED
    with torch.no_grad():
        cpu_linear.linear(x, weight)
    assert weight in cpu_linear._PACKED
