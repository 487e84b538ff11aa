"""NF4: the 4-bit NormalFloat code of QLoRA, with double quantization of its scales.

Follows Dettmers et al. 2023, "QLoRA: Efficient Finetuning of Quantized LLMs" (section 3
and Appendix E), as implemented in bitsandbytes (``create_normal_map``, blocksize 64).

Pretrained weights are close to normally distributed. NF4 puts its 16 code values at
quantiles of N(0, 1), so that each code is used about equally often, rescaled to [-1, 1]
with an exact zero. A weight matrix is flattened and cut into blocks of B = 64 values;
each block stores its absmax c (a float) and, per weight, the index of the code value
nearest to w / c:

    W[i] ~= NF4_CODE[q[i]] * c[i // B]           q in 0..15, two per byte

Double quantization (section 3 of the paper) quantizes the B-block scales c themselves:
they are positive, so their mean m is subtracted and the centred values are quantized
to 8 bits in blocks of 256 scales, each with a float32 scale s2:

    c[j] ~= qc[j] * s2[j // 256] + m             qc in -127..127 (int8)

Storage per weight: 4 bits + 8 / 64 (qc) + 32 / (64 * 256) (s2) = 4.127 bits, against
4 + 32 / 64 = 4.5 bits with float32 scales. bitsandbytes quantizes the centred scales
with its "dynamic" 8-bit float map; this module uses linear absmax int8 (as int8.py
does), which is simpler to read and has the same storage.

    >>> layer = NF4Linear.from_float(nn.Linear(128, 64))
    >>> layer(torch.randn(2, 128)).shape
    torch.Size([2, 64])

The layer is frozen (its weights are buffers) but differentiable in its input: the
forward dequantizes W to the input's dtype and calls ``F.linear``, so gradients reach x
(and LoRA adapters built on top, as in QLoRA).

Tests: tests/quant/test_nf4.py (the code against the paper's table, error bounds, double
quantization, gradients to the input).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lmlab.errors import ConfigError

# The 16 NF4 values as bitsandbytes and the QLoRA paper (Appendix E) list them; the test
# checks that ``normal_float_code()`` derives exactly these float32 numbers.
NF4_CODE: tuple[float, ...] = (
    -1.0,
    -0.6961928009986877,
    -0.5250730514526367,
    -0.39491748809814453,
    -0.28444138169288635,
    -0.18477343022823334,
    -0.09105003625154495,
    0.0,
    0.07958029955625534,
    0.16093020141124725,
    0.24611230194568634,
    0.33791524171829224,
    0.44070982933044434,
    0.5626170039176941,
    0.7229568362236023,
    1.0,
)

# 1 - delta with delta = (1/30 + 1/32) / 2: the outermost quantile used. The quantile
# function is infinite at 0 and 1, so the ends are pulled in by half a step of the 15-
# and 16-level grids (the paper's "offset"; bitsandbytes' 0.9677083).
NF4_OFFSET = 0.9677083


def normal_float_code(offset: float = NF4_OFFSET) -> torch.Tensor:
    """Derive the NF4 code: float32 [16], sorted, from -1 to 1 with an exact 0.

    Asymmetric, so that zero is a code value: 8 positive values at the N(0, 1) quantiles
    of 9 equally spaced probabilities from ``offset`` down to 0.5 (the last, 0.5, is 0 and
    dropped), 7 negative values likewise from 8 probabilities, plus 0; then divided by the
    largest so the code spans [-1, 1]. As in bitsandbytes, the probabilities are float32
    and the quantiles float64 (``ndtri`` is scipy's ``norm.ppf``):

        positive: ppf([0.9677, 0.9092, ..., 0.5646]) / ppf(0.9677) -> [1.0, 0.7230, ..., 0.0796]
    """
    ppf = lambda p: torch.special.ndtri(p.double())  # noqa: E731
    positive = ppf(torch.linspace(offset, 0.5, 9)[:-1])  # (8,)
    negative = -ppf(torch.linspace(offset, 0.5, 8)[:-1])  # (7,)
    values = torch.cat([positive, torch.zeros(1, dtype=torch.float64), negative]).float()
    values = values.sort().values
    return values / values.max()


def _code(device: torch.device) -> torch.Tensor:
    return torch.tensor(NF4_CODE, dtype=torch.float32, device=device)


def quantize_nf4(w: torch.Tensor, block_size: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """Blockwise NF4 of a flattened tensor -> ``(packed uint8 [L / 2], absmax float32 [L / B])``.

    ``w`` is flattened and zero-padded to L, a multiple of ``block_size``. Each value gets
    the index of the nearest code value to w / absmax(block); indices pack two per byte,
    the even position in the low nibble:

        w = [0.5, -1.0, 0.0, 1.0] with B = 4 -> absmax [1.0], q [12, 0, 7, 15]
        -> bytes [12 | 0 << 4, 7 | 15 << 4] = [12, 247]
    """
    flat = w.detach().float().flatten()
    pad = -flat.numel() % block_size
    blocks = F.pad(flat, (0, pad)).view(-1, block_size)  # (L/B, B)
    absmax = blocks.abs().amax(dim=1)  # (L/B,)
    scaled = blocks / absmax.clamp_min(torch.finfo(torch.float32).tiny)[:, None]
    # Nearest code value: count how many midpoints between neighbouring codes lie below.
    code = _code(w.device)
    q = torch.bucketize(scaled, (code[1:] + code[:-1]) / 2).to(torch.uint8).flatten()
    return q[0::2] | (q[1::2] << 4), absmax


def quantize_absmax_int8(
    values: torch.Tensor, block_size: int = 256
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Double quantization of positive scales c [M] -> ``(qc int8 [M], s2 [M / 256], m [1])``.

    c ~= qc * s2[j // block_size] + m, with m = mean(c) and, per block of centred values,
    s2 = max|c - m| / 127 and qc = round((c - m) / s2); the error is at most s2 / 2.

        c = [1.0, 2.0, 3.0], block 256 -> m = 2.0, s2 = 1 / 127, qc = [-127, 0, 127]
    """
    m = values.float().mean().reshape(1)
    centred = values.float() - m
    pad = -centred.numel() % block_size
    blocks = F.pad(centred, (0, pad)).view(-1, block_size)  # (M/256, 256)
    s2 = blocks.abs().amax(dim=1) / 127
    qc = torch.round(blocks / s2.clamp_min(torch.finfo(torch.float32).tiny)[:, None])
    return qc.flatten()[: values.numel()].to(torch.int8), s2, m


class NF4Linear(nn.Module):
    """y = x W^T + b with W stored in NF4 (see the module docstring); frozen.

    Built with ``from_float``. The stored tensors (buffers, all saved) are ``qweight``
    (uint8 [ceil(N K / B) B / 2], two 4-bit codes per byte, row-major) and either
    ``absmax`` (float32 [ceil(N K / B)]) or, with double quantization, ``qabsmax`` (int8,
    same length), ``absmax_scale`` (float32 [ceil(N K / B / 256)]) and ``absmax_mean``
    (float32 [1]). ``bias`` stays a float tensor.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        qweight: torch.Tensor,
        absmax: torch.Tensor | None = None,
        qabsmax: torch.Tensor | None = None,
        absmax_scale: torch.Tensor | None = None,
        absmax_mean: torch.Tensor | None = None,
        bias: torch.Tensor | None = None,
        block_size: int = 64,
        double_block: int = 256,
    ):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.block_size, self.double_block = block_size, double_block
        self.double_quant = absmax is None
        blocks = -(-in_features * out_features // block_size)
        if block_size < 2 or block_size % 2 or double_block < 1:
            raise ConfigError(
                f"NF4Linear: block_size={block_size} must be even and >= 2, "
                f"double_block={double_block} must be >= 1"
            )
        if qweight.dtype != torch.uint8 or tuple(qweight.shape) != (blocks * block_size // 2,):
            raise ConfigError(
                f"NF4Linear: qweight must be uint8 of shape ({blocks * block_size // 2},) for "
                f"a {out_features}x{in_features} weight in blocks of {block_size}; got "
                f"{qweight.dtype} {tuple(qweight.shape)}"
            )
        self.register_buffer("qweight", qweight)
        if self.double_quant:
            groups = -(-blocks // double_block)
            if (
                qabsmax is None
                or absmax_scale is None
                or absmax_mean is None
                or tuple(qabsmax.shape) != (blocks,)
                or tuple(absmax_scale.shape) != (groups,)
                or tuple(absmax_mean.shape) != (1,)
            ):
                raise ConfigError(
                    f"NF4Linear: give absmax ({blocks},), or qabsmax ({blocks},), "
                    f"absmax_scale ({groups},) and absmax_mean (1,)"
                )
            self.register_buffer("qabsmax", qabsmax.to(torch.int8))
            self.register_buffer("absmax_scale", absmax_scale.float())
            self.register_buffer("absmax_mean", absmax_mean.float())
        else:
            if tuple(absmax.shape) != (blocks,):
                raise ConfigError(
                    f"NF4Linear: absmax must have shape ({blocks},), got {tuple(absmax.shape)}"
                )
            self.register_buffer("absmax", absmax.float())
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), False)

    @classmethod
    def from_float(
        cls,
        linear: nn.Linear,
        block_size: int = 64,
        double_quant: bool = True,
        double_block: int = 256,
    ) -> NF4Linear:
        """Quantize a dense ``nn.Linear`` (any float dtype) to NF4."""
        qweight, absmax = quantize_nf4(linear.weight, block_size)
        if double_quant:
            qabsmax, scale, mean = quantize_absmax_int8(absmax, double_block)
            stored = dict(qabsmax=qabsmax, absmax_scale=scale, absmax_mean=mean)
        else:
            stored = dict(absmax=absmax)
        return cls(
            linear.in_features,
            linear.out_features,
            qweight,
            bias=linear.bias,
            block_size=block_size,
            double_block=double_block,
            **stored,
        )

    def block_absmax(self) -> torch.Tensor:
        """The per-block scales c used to dequantize: float32 [ceil(N K / B)]."""
        if not self.double_quant:
            return self.absmax
        scale = self.absmax_scale.repeat_interleave(self.double_block)[: self.qabsmax.numel()]
        return self.qabsmax.float() * scale + self.absmax_mean

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """W [N, K] = NF4_CODE[q] * c, computed in float32 and returned in ``dtype``."""
        code = _code(self.qweight.device)
        # Every byte value -> its (low, high) pair of code values, viewed as one 8-byte
        # entry, so that one gather per byte yields both weights (much faster on CPU than
        # unpacking the nibbles, or an embedding lookup with rows of 2).
        byte = torch.arange(256, device=code.device)
        pairs = torch.stack([code[byte & 0x0F], code[byte >> 4]], dim=-1)  # (256, 2) float32
        table = pairs.view(torch.int64).squeeze(-1)  # (256,)
        values = table.index_select(0, self.qweight.int()).view(torch.float32)  # (L,)
        w = values.view(-1, self.block_size) * self.block_absmax()[:, None]  # (L/B, B)
        N, K = self.out_features, self.in_features
        return w.flatten()[: N * K].view(N, K).to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.dequantize(x.dtype), bias)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"block_size={self.block_size}, double_quant={self.double_quant}, "
            f"bias={self.bias is not None}"
        )
