"""NF4Linear: the code against the QLoRA paper's table, error bounds, double quantization,
and gradients to the input (what QLoRA's LoRA adapters need)."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lmlab.quant.nf4 import (
    NF4_CODE,
    NF4Linear,
    normal_float_code,
    quantize_absmax_int8,
    quantize_nf4,
)

# Half the widest gap between neighbouring code values (between 0.7230 and 1.0).
HALF_GAP = max(b - a for a, b in zip(NF4_CODE, NF4_CODE[1:])) / 2


def dense(n=48, k=128, bias=True, seed=0):
    torch.manual_seed(seed)
    return nn.Linear(k, n, bias=bias).requires_grad_(False)


def test_code_matches_the_qlora_table():
    # Derived as bitsandbytes does (float32 probabilities, float64 quantiles, float32
    # result), the code is exactly the published float32 table.
    assert torch.equal(normal_float_code(), torch.tensor(NF4_CODE))
    # Fully in float64 it agrees to two float32 ulps at 1.0 (2.4e-7).
    ppf = torch.special.ndtri
    pos = ppf(torch.linspace(0.9677083, 0.5, 9, dtype=torch.float64)[:-1])
    neg = -ppf(torch.linspace(0.9677083, 0.5, 8, dtype=torch.float64)[:-1])
    code = torch.cat([pos, torch.zeros(1, dtype=torch.float64), neg]).sort().values
    torch.testing.assert_close(
        code / code.max(), torch.tensor(NF4_CODE).double(), atol=2.5e-7, rtol=0
    )
    assert len(NF4_CODE) == 16 and NF4_CODE[7] == 0.0 and NF4_CODE[0] == -1 and NF4_CODE[15] == 1


def test_worked_example_packs_two_codes_per_byte():
    packed, absmax = quantize_nf4(torch.tensor([0.5, -1.0, 0.0, 1.0]), block_size=4)
    assert packed.tolist() == [12, 247] and absmax.tolist() == [1.0]


def test_dequantize_error_bound_without_double_quant():
    linear = dense()
    layer = NF4Linear.from_float(linear, block_size=64, double_quant=False)
    err = (layer.dequantize() - linear.weight).abs().view(-1, 64)  # blocks of 64, row-major
    # Nearest code value: |w / c - code| <= half the widest gap, so |w - c code| <= c HALF_GAP.
    bound = layer.absmax[:, None] * HALF_GAP * (1 + 1e-5)
    assert (err <= bound).all()


def test_dequantize_error_bound_with_double_quant():
    linear = dense(n=300, k=128)  # 600 blocks of 64: three double-quantization blocks
    layer = NF4Linear.from_float(linear, block_size=64, double_quant=True, double_block=256)
    plain = NF4Linear.from_float(linear, block_size=64, double_quant=False)
    # The scales: round to nearest in 8 bits, so |c - c'| <= s2 / 2 per block of 256.
    scale_err = (layer.block_absmax() - plain.absmax).abs()
    s2 = layer.absmax_scale.repeat_interleave(256)[:600]
    assert (scale_err <= s2 / 2 * (1 + 1e-4) + 1e-8).all()
    assert (scale_err / plain.absmax).max() < 0.02  # small against the scales themselves
    # The weights: the single-quantization bound plus |code| <= 1 times the scale error.
    err = (layer.dequantize() - linear.weight).abs().view(-1, 64)
    bound = plain.absmax[:, None] * HALF_GAP + s2[:, None] / 2
    assert (err <= bound * (1 + 1e-4)).all()


def test_double_quant_stores_fewer_bytes():
    linear = dense(n=256, k=256, bias=False)
    sizes = {}
    for dq in (False, True):
        layer = NF4Linear.from_float(linear, double_quant=dq)
        sizes[dq] = sum(b.numel() * b.element_size() for b in layer.buffers())
    n = 256 * 256
    # 4 + 32/64 = 4.5 bits per weight, and 4 + 8/64 + 32/(64*256) (+ the mean) ~= 4.127.
    assert sizes[False] == n // 2 + 4 * n // 64
    assert sizes[True] == n // 2 + n // 64 + 4 * (n // 64 // 256) + 4
    assert 8 * sizes[True] / n == pytest.approx(4.127, abs=0.01)


def test_double_quant_worked_example():
    qc, s2, m = quantize_absmax_int8(torch.tensor([1.0, 2.0, 3.0]))
    assert qc.tolist() == [-127, 0, 127] and m.tolist() == [2.0]
    torch.testing.assert_close(s2, torch.tensor([1 / 127]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_forward_is_linear_with_the_dequantized_weight(dtype):
    layer = NF4Linear.from_float(dense(n=20, k=96))  # 1920 weights: 30 blocks, no padding
    x = torch.randn(2, 5, 96, dtype=dtype)
    got = layer(x)
    assert got.shape == (2, 5, 20) and got.dtype == dtype
    expected = F.linear(x, layer.dequantize(dtype), layer.bias.to(dtype))
    torch.testing.assert_close(got, expected, atol=0, rtol=0)


def test_padding_when_the_weight_is_not_a_whole_number_of_blocks():
    linear = dense(n=5, k=7)  # 35 weights -> one padded block of 64
    layer = NF4Linear.from_float(linear)
    assert layer.qweight.numel() == 32 and layer.dequantize().shape == (5, 7)
    assert (layer.dequantize() - linear.weight).abs().max() <= linear.weight.abs().max() * 0.14


def test_gradient_flows_to_the_input_not_the_weights():
    layer = NF4Linear.from_float(dense())
    assert layer.in_features == 128 and layer.out_features == 48
    assert not any(p.requires_grad for p in layer.parameters())
    x = torch.randn(3, 128, requires_grad=True)
    layer(x).pow(2).sum().backward()
    assert x.grad is not None
    # d/dx sum((x W^T + b)^2) = 2 (x W^T + b) W
    w = layer.dequantize()
    torch.testing.assert_close(x.grad, 2 * (x.detach() @ w.T + layer.bias) @ w)
    assert all(b.grad is None for b in layer.buffers())


def test_bad_stored_tensors_are_named():
    with pytest.raises(ValueError, match="qweight must be uint8"):
        NF4Linear(8, 8, torch.zeros(3, dtype=torch.uint8), absmax=torch.ones(1))
    with pytest.raises(ValueError, match="absmax must have shape"):
        NF4Linear(8, 8, torch.zeros(32, dtype=torch.uint8), absmax=torch.ones(2))


def test_indices_are_the_nearest_code_values():
    torch.manual_seed(0)
    w = torch.randn(4096)
    packed, absmax = quantize_nf4(w, block_size=64)
    q = torch.stack([packed & 0x0F, packed >> 4], dim=-1).flatten().long()
    scaled = w.view(-1, 64) / absmax[:, None]
    nearest = (scaled.flatten()[:, None] - torch.tensor(NF4_CODE)).abs().argmin(dim=1)
    assert torch.equal(q, nearest)
