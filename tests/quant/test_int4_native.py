"""lmlab's int4 kernel (``int4_cpu.cpp``, ``torch.ops.lmlab.int4_mm``) on its own: its
layout, its numbers against float64 and torch's kernel on random sizes, rows and threads,
its argument checks, and the choice of kernel (``LMLAB_INT4_KERNEL``). The layer-level
tests in test_int4.py run with both kernels."""

import pytest
import torch

from builders import assert_rows_and_threads_agree
from lmlab.quant import int4
from lmlab.quant.int4 import Int4Linear

HAS_NATIVE = int4.native_int4_mm() is not None
needs_native = pytest.mark.skipif(
    not HAS_NATIVE,
    reason="lmlab's int4 kernel does not run here (no AVX-512 BF16, or no C++ compiler)",
)


def random_weights(n, k, group, g):
    q = torch.randint(0, 16, (n, k), dtype=torch.uint8, generator=g)
    scale = (torch.rand(n, k // group, generator=g) * 0.05).to(torch.bfloat16)
    zero = (torch.randn(n, k // group, generator=g) * 0.05).to(torch.bfloat16)
    return q, scale, zero


def test_pack_blocks_round_trips_and_places_each_weight_where_documented():
    g = torch.Generator().manual_seed(3)
    q = torch.randint(0, 16, (48, 96), dtype=torch.uint8, generator=g)
    packed = int4.pack_blocks(q)
    assert packed.shape == (3, 3, 256) and packed.dtype == torch.uint8
    assert torch.equal(int4.unpack_blocks(packed), q)
    # output n = 16 nb + r, input k = 32 j + 4 c + 2 h + e: chunk c, byte 2 r + e, nibble h
    for n, k in [(0, 0), (17, 33), (47, 95), (5, 70), (30, 6)]:
        nb, r, j, rest = n // 16, n % 16, k // 32, k % 32
        c, h, e = rest // 4, rest % 4 // 2, rest % 2
        byte = int(packed[nb, j, 32 * c + 2 * r + e])
        assert (byte >> 4 if h else byte & 0x0F) == q[n, k]


@needs_native
@pytest.mark.parametrize("seed", range(6))
def test_native_kernel_matches_float64_and_torchs_kernel_on_random_inputs(seed):
    """Random sizes (rows of x 1-11, so every 4-row tile and remainder; N in 16s; group
    sizes 32-256): lmlab's kernel is the float64 product rounded to bf16, within float32
    summation error (2^-8 relative, the bf16 half-ulp and a margin, plus 2^-16 of the sum
    of |terms| for cancellation); torch's kernel meets the same bound."""
    g = torch.Generator().manual_seed(seed)
    group = (32, 64, 128, 256)[int(torch.randint(0, 4, (), generator=g))]
    n = 16 * int(torch.randint(1, 12, (), generator=g))
    k = group * int(torch.randint(1, 5, (), generator=g))
    m = int(torch.randint(1, 12, (), generator=g))
    q, scale, zero = random_weights(n, k, group, g)
    x = (torch.randn(m, k, generator=g) * 3).to(torch.bfloat16)
    w = (q.double() - 8) * scale.double().repeat_interleave(group, 1)
    w = w + zero.double().repeat_interleave(group, 1)
    exact = x.double() @ w.t()
    bound = exact.abs() * 2**-8 + (x.double().abs() @ w.abs().t()) * 2**-16
    lin = Int4Linear(q, scale, zero)
    y = lin(x)
    assert lin._kernel.native and y.dtype == torch.bfloat16 and y.shape == (m, n)
    assert ((y.double() - exact).abs() <= bound).all()
    ref = torch._weight_int4pack_mm_for_cpu(
        x,
        torch._convert_weight_to_int4pack_for_cpu(q.int(), 1),
        group,
        torch.stack([scale.t(), zero.t()], -1).contiguous(),
    )
    assert ((ref.double() - exact).abs() <= bound).all()


@needs_native
def test_native_kernel_rows_are_independent_and_threads_do_not_change_numbers():
    """Each row of x gets the same numbers alone as in a batch (the 4-row tiles and the
    rest), and on 1 or 2 threads: decoding one token and reading a prompt agree bit for bit."""
    g = torch.Generator().manual_seed(11)
    q, scale, zero = random_weights(96, 128, 32, g)
    x = torch.randn(7, 128, generator=g).to(torch.bfloat16)
    assert_rows_and_threads_agree(Int4Linear(q, scale, zero), x)


@needs_native
def test_native_op_names_a_wrong_argument():
    x = torch.randn(2, 64, dtype=torch.bfloat16)
    packed = torch.zeros(2, 2, 256, dtype=torch.uint8)
    scale_zero = torch.zeros(2, 2, 32, dtype=torch.bfloat16)
    torch.ops.lmlab.int4_mm(x, packed, scale_zero, 32)  # right: no error
    with pytest.raises(RuntimeError, match="contiguous bf16"):
        torch.ops.lmlab.int4_mm(x.float(), packed, scale_zero, 32)
    with pytest.raises(RuntimeError, match="scale_zero"):
        torch.ops.lmlab.int4_mm(x, packed, scale_zero[:, :, :16].contiguous(), 32)
    with pytest.raises(RuntimeError, match="multiple of group_size"):
        torch.ops.lmlab.int4_mm(x, packed, scale_zero, 48)


def test_the_kernel_is_chosen_by_LMLAB_INT4_KERNEL(monkeypatch):
    monkeypatch.setenv("LMLAB_INT4_KERNEL", "fast")
    with pytest.raises(ValueError, match="LMLAB_INT4_KERNEL='fast': use 'lmlab' or 'torch'"):
        int4.native_int4_mm()
    monkeypatch.setenv("LMLAB_INT4_KERNEL", "torch")
    assert int4.native_int4_mm() is None
    lin = Int4Linear(*random_weights(32, 64, 32, torch.Generator().manual_seed(0)))
    lin(torch.randn(1, 64, dtype=torch.bfloat16))
    assert not lin._kernel.native
