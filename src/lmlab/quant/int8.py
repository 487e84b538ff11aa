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
        qweight = qweight.contiguous()
        if qweight.data_ptr() % 64:
            # A tensor read from a file (safetensors) may start anywhere; the int8 kernel
            # reads its rows with aligned vector loads and crashes on such a buffer.
            qweight = qweight.clone()
        self.register_buffer("qweight", qweight)  # (N, K)
        self.register_buffer("scale", scale.float().contiguous())  # (N,)
        # The kernel takes the scales in the activations' dtype; a bf16 copy made once (not
        # saved) also keeps torch.compile's lowering of the kernel, which needs a stored
        # tensor there rather than a conversion.
        self.register_buffer("kernel_scale", self.scale.bfloat16(), persistent=False)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), False)

    @classmethod
    def from_float(cls, linear: nn.Linear, rows: int = 8192) -> Int8Linear:
        """Quantize a dense ``nn.Linear`` (any float dtype) per output channel, ``rows``
        rows at a time (a 49152-row output layer never makes a float32 copy of itself)."""
        weight = linear.weight.detach()
        N, K = weight.shape
        q = torch.empty(N, K, dtype=torch.int8, device=weight.device)
        scale = torch.empty(N, device=weight.device)
        for start in range(0, N, rows):
            w = weight[start : start + rows].float()  # (rows, K)
            s = w.abs().amax(dim=1) / 127  # (rows,)
            # An all-zero row has scale 0: divide by 1 instead, giving q = 0 and W = 0.
            codes = torch.round(w / torch.where(s > 0, s, 1.0)[:, None]).clamp(-127, 127)
            q[start : start + rows], scale[start : start + rows] = codes, s
        return cls(q, scale, linear.bias)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """W [N, K] = q * scale, computed in float32 and returned in ``dtype``."""
        return (self.qweight.float() * self.scale[:, None]).to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        if inference_kernel_applies(x) and x.dtype == torch.bfloat16 and int8_kernel_available():
            x2 = x.reshape(-1, self.in_features).contiguous()  # (B*T, K)
            scale = self.kernel_scale
            if scale.dtype != x.dtype:  # e.g. after model.to(float32)
                scale = self.scale.to(x.dtype)
            y = torch._weight_int8pack_mm(x2, self.qweight, scale)  # (B*T, N)
            y = y.view(*shape[:-1], self.out_features)
        else:
            y = F.linear(x, self.dequantize(x.dtype))
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}"
        )
