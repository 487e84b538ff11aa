"""Int8Linear: the per-channel absmax error bound, and the int8 kernel against the
dequantized weight."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lmlab.quant import int8
from lmlab.quant.int8 import Int8Linear

# The kernel computes in bf16: same tolerance, and reason, as tests/quant/test_int4.py.
ATOL, RTOL = 5e-2, 2e-2


def dense(n=64, k=96, bias=True, seed=0):
    torch.manual_seed(seed)
    return nn.Linear(k, n, bias=bias).requires_grad_(False)


def test_worked_example():
    linear = dense(1, 3, bias=False)
    linear.weight.copy_(torch.tensor([[0.5, -1.0, 0.25]]))
    layer = Int8Linear.from_float(linear)
    assert layer.qweight.tolist() == [[64, -127, 32]]  # 63.5 rounds to even
    torch.testing.assert_close(layer.scale, torch.tensor([1 / 127]))


def test_dequantize_error_is_at_most_half_a_step():
    linear = dense()
    linear.weight[3] = 0.0  # an all-zero row must stay exactly zero
    layer = Int8Linear.from_float(linear)
    assert layer.qweight.abs().max() <= 127
    err = (layer.dequantize() - linear.weight).abs()  # (N, K)
    # Round to nearest: |w - q s| <= s / 2, up to float32 rounding of w / s and q * s.
    bound = layer.scale[:, None] / 2 * (1 + 1e-5) + 1e-7
    assert (err <= bound).all()
    assert torch.equal(layer.dequantize()[3], torch.zeros(96))


def test_kernel_matches_the_dequantized_weight():
    assert int8.int8_kernel_available()  # torch 2.13 has it
    layer = Int8Linear.from_float(dense(n=40))
    x = torch.randn(3, 7, 96, dtype=torch.bfloat16)
    expected = F.linear(x.float(), layer.dequantize(), layer.bias)
    got = layer(x)
    assert got.shape == (3, 7, 40) and got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), expected, atol=ATOL, rtol=RTOL)


def test_float32_and_fallback_use_the_dequantized_weight(monkeypatch):
    layer = Int8Linear.from_float(dense())
    x = torch.randn(4, 96)
    expected = F.linear(x, layer.dequantize(), layer.bias)
    torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=1e-5)  # float32: no kernel
    calls = []
    monkeypatch.setattr(torch, "_weight_int8pack_mm", lambda *a: calls.append(a))
    layer(x)
    assert not calls  # the kernel is slower than the dequantized product in float32
    monkeypatch.setattr(int8, "int8_kernel_available", lambda: False)
    torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=1e-5)


def test_gradient_reaches_the_input():
    layer = Int8Linear.from_float(dense())
    for dtype in (torch.float32, torch.bfloat16):  # bf16 leaves the kernel (no backward)
        x = torch.randn(2, 96, dtype=dtype, requires_grad=True)
        layer(x).sum().backward()
        assert x.grad is not None and x.grad.shape == x.shape


def test_bad_shapes_are_named():
    with pytest.raises(ValueError, match="int8"):
        Int8Linear(torch.zeros(4, 8), torch.ones(4))
    with pytest.raises(ValueError, match=r"scale of shape \(4,\)"):
        Int8Linear(torch.zeros(4, 8, dtype=torch.int8), torch.ones(3))
