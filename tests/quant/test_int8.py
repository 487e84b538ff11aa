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


def test_chunked_quantization_equals_one_pass():
    """from_float quantizes a few rows at a time; the codes and scales do not depend on
    the chunk size (an all-zero row included: scale 0, codes 0)."""
    linear = dense(37, 24)
    linear.weight[5] = 0
    whole = Int8Linear.from_float(linear, rows=1000)
    for rows in (1, 8, 36):
        part = Int8Linear.from_float(linear, rows=rows)
        assert torch.equal(part.qweight, whole.qweight) and torch.equal(part.scale, whole.scale)
    assert whole.scale[5] == 0 and not whole.qweight[5].any()


@pytest.mark.skipif(not int8.int8_kernel_available(), reason="torch without the int8 kernel")
def test_a_misaligned_weight_buffer_is_copied_before_the_kernel_reads_it():
    """Weights read from a safetensors file can start at any byte; the int8 kernel crashed
    (a segmentation fault) on such a buffer, so the layer keeps an aligned copy."""
    layer = Int8Linear.from_float(dense())
    raw = torch.zeros(layer.qweight.numel() + 64, dtype=torch.int8)
    offset = next(i for i in range(1, 64) if (raw.data_ptr() + i) % 64)
    view = raw[offset : offset + layer.qweight.numel()].view_as(layer.qweight)
    view.copy_(layer.qweight)
    assert view.data_ptr() % 64
    moved = Int8Linear(view, layer.scale, layer.bias)
    assert moved.qweight.data_ptr() % 64 == 0 and torch.equal(moved.qweight, layer.qweight)
    x = torch.randn(5, 96, dtype=torch.bfloat16)
    torch.testing.assert_close(moved(x).float(), layer(x).float(), atol=0, rtol=0)


@pytest.mark.skipif(not int8.int8_kernel_available(), reason="torch without the int8 kernel")
def test_torch_compile_lowers_the_int8_kernel():
    """Inductor's lowering of the kernel needs its scales as a stored tensor: a conversion
    inside the graph failed to compile (a LoweringException). Compiled equals eager."""
    import shutil

    if not shutil.which("g++"):
        pytest.skip("no C++ compiler (g++) for torch.compile's CPU kernels")
    layer = Int8Linear.from_float(dense(n=48))
    x = torch.randn(3, 96, dtype=torch.bfloat16)
    with torch.no_grad():
        compiled = torch.compile(layer, dynamic=True)(x)
        torch.testing.assert_close(compiled.float(), layer(x).float(), atol=ATOL, rtol=RTOL)
