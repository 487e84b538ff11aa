"""A linear layer whose weight is stored in 8 bits, one scale per output channel.

Per-channel absmax quantization (as in LLM.int8()'s vector-wise quantization, without
its outlier decomposition): each row n of W [N, K] gets the scale that maps its largest
magnitude to 127,

    s[n] = max_k |W[n, k]| / 127,    q[n, k] = round(W[n, k] / s[n]) in -127..127,
    W[n, k] ~= q[n, k] * s[n]        (error at most s[n] / 2 per weight)

so the weight takes a quarter of float32's bytes (plus one float per row). The symmetric
range -127..127 leaves -128 unused, so that negating a row negates its codes exactly.

    >>> linear = nn.Linear(3, 1, bias=False).requires_grad_(False)
    >>> linear.weight.copy_(torch.tensor([[0.5, -1.0, 0.25]]))
    >>> layer = Int8Linear.from_float(linear)
    >>> layer.qweight, layer.scale * 127     # 0.5 * 127 = 63.5 rounds to even: 64
    (tensor([[  64, -127,   32]], dtype=torch.int8), tensor([1.]))

On CPU, bf16 activations go through PyTorch's int8 weight-only kernel
(``torch._weight_int8pack_mm``, the one gpt-fast uses): bf16 times int8, scaled per output
channel, without widening the weight in memory. Other inputs (float32, another device, or
one that needs a gradient; the kernel has no backward) multiply by the dequantized weight:
the same numbers up to rounding. Measured on one 1536 x 576 layer, batch 1, one thread
(torch 2.13, a CPU with avx512_bf16): bf16 kernel 62 us (dense bf16: 82 us); for float32
inputs the kernel takes 767 us and the dequantized product 275 us, hence bf16 only.

Tests: tests/quant/test_int8.py (error bound, kernel vs dequantized weight).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lmlab.errors import ConfigError
from lmlab.quant.int4 import inference_kernel_applies


def int8_kernel_available() -> bool:
    """Whether this torch has the int8 weight-only CPU matmul kernel."""
    return hasattr(torch, "_weight_int8pack_mm")


class Int8Linear(nn.Module):
    """y = x W^T + b with W = q * scale[:, None] (see the module docstring); inference only.

    qweight: [N, K] int8 in -127..127; scale: [N] float (stored as float32); bias: [N]
    or None. The output has the input's dtype; bf16 inputs use the int8 kernel.
    """

    def __init__(
        self, qweight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None
    ):
        super().__init__()
        if qweight.dim() != 2 or qweight.dtype != torch.int8:
            raise ConfigError(
                f"Int8Linear: qweight must be a 2-d int8 tensor, got {qweight.dtype} "
                f"{tuple(qweight.shape)}"
            )
        N, K = qweight.shape
        if tuple(scale.shape) != (N,):
            raise ConfigError(
                f"Int8Linear: qweight {tuple(qweight.shape)} needs scale of shape ({N},), "
                f"got {tuple(scale.shape)}"
            )
        self.in_features, self.out_features = K, N
        self.register_buffer("qweight", qweight.contiguous())  # (N, K)
        self.register_buffer("scale", scale.float().contiguous())  # (N,)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), False)

    @classmethod
    def from_float(cls, linear: nn.Linear) -> Int8Linear:
        """Quantize a dense ``nn.Linear`` (any float dtype) per output channel."""
        w = linear.weight.detach().float()  # (N, K)
        scale = w.abs().amax(dim=1) / 127  # (N,)
        # An all-zero row has scale 0: divide by 1 instead, giving q = 0 and W = 0 exactly.
        q = torch.round(w / torch.where(scale > 0, scale, 1.0)[:, None]).clamp(-127, 127)
        return cls(q.to(torch.int8), scale, linear.bias)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """W [N, K] = q * scale, computed in float32 and returned in ``dtype``."""
        return (self.qweight.float() * self.scale[:, None]).to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        if inference_kernel_applies(x) and x.dtype == torch.bfloat16 and int8_kernel_available():
            x2 = x.reshape(-1, self.in_features).contiguous()  # (B*T, K)
            # The kernel wants the scales in the activations' dtype (bf16 here).
            y = torch._weight_int8pack_mm(x2, self.qweight, self.scale.to(x.dtype))  # (B*T, N)
            y = y.view(*shape[:-1], self.out_features)
        else:
            y = F.linear(x, self.dequantize(x.dtype))
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}"
        )
