"""Int4Linear: the int4 CPU kernels (lmlab's and torch's) against the dequantized weight
and each other, and the fallback path. Every test here runs with each kernel (``backend``)."""

import pytest
import torch
import torch.nn.functional as F

from lmlab.quant import int4
from lmlab.quant.int4 import Int4Linear

# The kernel computes in bf16: outputs of size ~10 carry rounding of about 10 * 2^-8.
# 2e-2 relative (plus 5e-2 absolute for near-zero outputs) is a few such roundings and
# still far below a wrong layout (errors of order the outputs themselves).
ATOL, RTOL = 5e-2, 2e-2

HAS_NATIVE = int4.native_int4_mm() is not None
NO_NATIVE = "lmlab's int4 kernel does not run here (no AVX-512 BF16, or no C++ compiler)"


@pytest.fixture(autouse=True, params=["lmlab", "torch"])
def backend(request, monkeypatch):
    """The kernel packed copies made in the test use: lmlab's, or torch's."""
    if request.param == "lmlab" and not HAS_NATIVE:
        pytest.skip(NO_NATIVE)
    if request.param == "torch":
        monkeypatch.setattr(int4, "native_int4_mm", lambda: None)
    return request.param


def layer(n=64, k=96, group=32, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(0, 16, (n, k), dtype=torch.uint8, generator=g)
    scale = torch.rand(n, k // group, generator=g) * 0.1
    zero = torch.randn(n, k // group, generator=g) * 0.1
    b = torch.randn(n, generator=g) if bias else None
    return Int4Linear(q, scale, zero, b), q


def test_dequantize_is_the_documented_formula():
    lin, q = layer(bias=False)
    w = lin.dequantize()
    s = lin.scale.float().repeat_interleave(32, 1)
    z = lin.zero.float().repeat_interleave(32, 1)
    assert torch.equal(lin.unpacked(), q.to(torch.int32))
    torch.testing.assert_close(w, (q.float() - 8) * s + z, atol=0, rtol=0)


def test_kernel_matches_the_dequantized_weight():
    assert int4.int4_kernel_available()  # torch 2.13 has it; the rest of the test uses it
    lin, _ = layer()
    x = torch.randn(3, 7, 96, dtype=torch.bfloat16)
    expected = F.linear(x.float(), lin.dequantize(), lin.bias)
    got = lin(x)
    assert got.shape == (3, 7, 64) and got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), expected, atol=ATOL, rtol=RTOL)


def test_fallback_without_the_kernel_gives_the_same_numbers(monkeypatch):
    lin, _ = layer()
    x = torch.randn(4, 96)
    expected = F.linear(x, lin.dequantize(), lin.bias)
    monkeypatch.setattr(int4, "int4_kernel_available", lambda: False)
    torch.testing.assert_close(lin(x), expected, atol=1e-5, rtol=1e-5)


def test_bad_shapes_are_named():
    with pytest.raises(ValueError, match="scale and zero of shape"):
        Int4Linear(torch.zeros(4, 64, dtype=torch.uint8), torch.ones(4, 3), torch.ones(4, 3))
    with pytest.raises(ValueError, match="0..15"):
        Int4Linear(torch.full((4, 64), 16, dtype=torch.uint8), torch.ones(4, 2), torch.ones(4, 2))


def test_gradient_reaches_the_input_through_the_dequantized_weight():
    """The int4 kernel has no backward: with a gradient needed (QLoRA over Int4Linear) the
    layer computes with the dequantized weight, and the gradient is W^T of the output's."""
    lin, _ = layer(bias=False)
    x = torch.randn(3, 96, requires_grad=True)
    lin(x).sum().backward()
    torch.testing.assert_close(x.grad, lin.dequantize().sum(0).expand(3, -1), atol=1e-5, rtol=1e-5)


def test_a_group_size_the_kernel_cannot_run_computes_with_the_dequantized_weight():
    """Regression: group_size=16 divided in_features and was accepted, then the first
    forward died inside torch's kernel ("expect qGroupSize to be 32, 64, 128 or 256")."""
    linear = torch.nn.Linear(64, 8)
    layer = int4.Int4Linear.from_float(linear, group_size=16)
    x = torch.randn(3, 64)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), F.linear(x, layer.dequantize(), layer.bias))


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("sizes", [(64, 32, 32), (576, 192, 192), (48, 16)])
def test_fused_layers_give_each_layer_its_own_numbers(sizes, bias):
    """Int4Linear.fuse: one kernel call for layers reading the same input (q, k, v; gate,
    up) gives, bit for bit, the outputs of the layers called one by one (sizes that are
    and are not multiples of the kernel's 64-column blocks)."""
    layers = [layer(n, k=128, bias=bias, seed=i)[0] for i, n in enumerate(sizes)]
    fused = Int4Linear.fuse(layers)
    for rows in (1, 5):
        x = torch.randn(rows, 3, 128, dtype=torch.bfloat16)
        expected = torch.cat([m(x) for m in layers], dim=-1)
        assert fused.applies(x)
        assert torch.equal(fused(x), expected)


def test_layers_that_cannot_share_a_call_are_not_fused():
    a, b = layer(bias=True)[0], layer(bias=False)[0]
    assert Int4Linear.fuse([a, b]) is None
    assert Int4Linear.fuse([layer(k=128)[0], layer(k=96)[0]]) is None
    assert Int4Linear.fuse([layer(n=40)[0], layer(n=8)[0]]) is None  # the kernel packs 16 rows


def test_outputs_the_kernel_cannot_pack_compute_with_the_dequantized_weight():
    lin, _ = layer(n=40)
    x = torch.randn(2, 96, dtype=torch.bfloat16)
    expected = F.linear(x.float(), lin.dequantize(), lin.bias)
    torch.testing.assert_close(lin(x).float(), expected, atol=ATOL, rtol=RTOL)


def test_the_kernel_takes_the_weights_over_and_gives_them_back_exactly(backend):
    """After a kernel call the layer holds its weights once (the packed copy; ``qweight`` is
    dropped); its saved form, read back through the kernel, is bit for bit the one it had,
    and the layer computes the same numbers before and after."""
    lin, q = layer()
    saved = {k: v.clone() for k, v in lin.state_dict().items()}
    x = torch.randn(2, 5, 96, dtype=torch.bfloat16)
    first = lin(x)
    assert lin.qweight is None and lin._kernel is not None
    state = lin.state_dict()  # brings the saved form back
    assert state.keys() == saved.keys()
    for k in saved:
        assert torch.equal(state[k], saved[k]), k
    assert torch.equal(lin.unpacked(), q.to(torch.int32))
    assert torch.equal(lin(x), first)  # packed again on this call
    assert lin.qweight is None
    assert lin._kernel.native == (backend == "lmlab")


def test_fused_layers_share_one_copy_and_each_still_computes_alone():
    """Int4Linear.fuse: the fused copy holds the three layers' weights; each layer called
    alone (the plain decoding path) reads its outputs from it, with its own numbers; asking
    to fuse them again returns the same copy; one layer's saved form brings all back."""
    layers = [layer(n, k=128, seed=i)[0] for i, n in enumerate((64, 32, 32))]
    x = torch.randn(3, 128, dtype=torch.bfloat16)
    alone = [m(x) for m in layers]  # each packs its own copy first
    fused = Int4Linear.fuse(layers)
    assert all(m.qweight is None and m._kernel is fused for m in layers)
    assert Int4Linear.fuse(layers) is fused
    assert torch.equal(fused(x), torch.cat(alone, dim=-1))
    for m, expected in zip(layers, alone):
        assert torch.equal(m(x), expected)
    layers[1].canonical()
    assert all(m.qweight is not None and m._kernel is None for m in layers)
    assert fused.packed is None and not fused.applies(x)


def test_moving_a_packed_layer_moves_its_saved_form():
    """.to() that changes nothing keeps the packed copy; one that casts (here the scales to
    float32) acts on the saved form, as before packing."""
    lin, _ = layer()
    x = torch.randn(2, 96, dtype=torch.bfloat16)
    lin(x)
    lin.to("cpu")
    assert lin.qweight is None
    lin.float()
    assert lin.qweight is not None and lin.scale.dtype == torch.float32


def test_weights_packed_while_decoding_serve_training_afterwards():
    """Packed under inference_mode (as decoding does), then needed with a gradient (QLoRA
    over Int4Linear): the saved form comes back as ordinary tensors and backward runs."""
    lin, _ = layer(bias=False, k=32, group=32)
    with torch.inference_mode():
        lin(torch.randn(2, 32, dtype=torch.bfloat16))
    assert lin.qweight is None
    x = torch.randn(3, 32, requires_grad=True)
    lin(x).sum().backward()
    assert not lin.qweight.is_inference() and not lin.scale.is_inference()
    torch.testing.assert_close(x.grad, lin.dequantize().sum(0).expand(3, -1), atol=1e-5, rtol=1e-5)
