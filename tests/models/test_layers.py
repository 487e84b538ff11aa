"""Shared layers: RMSNorm against its formula, HookPoint's fast identity."""

import pytest
import torch
from torch import nn

from lmlab.models.layers import HookPoint, RMSNorm


@pytest.mark.parametrize("shape", [(2, 7, 64), (1, 1, 576), (3, 5, 1536)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rmsnorm_gives_the_bits_of_its_formula(shape, dtype):
    """weight * (x * rsqrt(mean(x^2) + eps)) in float32, the squares summed in float64 and
    the rsqrt rounded to float32 once, cast back: those bits, within one float32 rounding
    of the plain float32 spelling, and its gradients."""
    g = torch.Generator().manual_seed(0)
    norm = RMSNorm(shape[-1], eps=1e-5)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(shape[-1], generator=g))
    norm = norm.to(dtype)
    x = (torch.randn(shape, generator=g) * 3).to(dtype).requires_grad_()
    xf = x.float()
    r = torch.rsqrt((xf * xf).double().sum(-1, keepdim=True) / shape[-1] + 1e-5).float()
    expected = norm.weight * (xf * r).to(dtype)
    plain = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-5)  # all float32
    got = norm(x)
    assert torch.equal(got, expected)
    torch.testing.assert_close(xf * r, plain, rtol=2**-22, atol=0)
    (grad_expected,) = torch.autograd.grad(
        (norm.weight * plain.to(dtype)).float().square().sum(), x
    )
    (grad_got,) = torch.autograd.grad(got.float().square().sum(), x)
    # bf16 gradients: within a rounding or two of bf16 (2^-8 relative)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(grad_got, grad_expected, rtol=tol, atol=tol)


def test_hook_point_calls_its_hooks_and_is_the_identity_without_them():
    hook = HookPoint()
    x = torch.randn(2, 3)
    assert hook(x) is x
    handle = hook.register_forward_hook(lambda m, args, out: out * 2)
    assert torch.equal(hook(x), x * 2)
    handle.remove()
    pre = hook.register_forward_pre_hook(lambda m, args: (args[0] + 1,))
    assert torch.equal(hook(x), x + 1)
    pre.remove()
    assert hook(x) is x


def test_hook_point_honours_hooks_registered_for_every_module():
    seen = []
    handle = nn.modules.module.register_module_forward_hook(lambda m, a, out: seen.append(m))
    try:
        hook = HookPoint()
        hook(torch.zeros(1))
    finally:
        handle.remove()
    assert seen == [hook]
