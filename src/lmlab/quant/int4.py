"""A linear layer whose weight is stored in 4 bits, in groups along the input dimension.

Each row of the weight W [N, K] (N outputs, K inputs) is cut into groups of G consecutive
inputs; a group holds G integers q in 0..15 and two floats, a scale s and a zero z:

    W[n, k] = (q[n, k] - 8) * s[n, k // G] + z[n, k // G]

This is the layout of GGUF's Q4_0 (z = 0, s = d) and Q4_1 (w = d q + m, so s = d and
z = m + 8 d) with G = 32, so a GGUF file's 4-bit weights are used as they are, not widened
to 16 or 32 bits: a quarter of the memory of bf16, and a quarter of the bytes to read per
decoded token, which is what bounds decoding speed on a CPU.

The matrix product runs in one of two CPU kernels, both taking bf16 activations and bf16
scales and zeros and giving the same numbers up to the last bit of a bf16 output:

- lmlab's own (``int4_cpu.cpp``, the operator ``torch.ops.lmlab.int4_mm``), on CPUs with
  AVX-512 BF16 (AMD Zen 4 and later, Intel Sapphire Rapids and later): one
  bf16 dot-product instruction per 16 outputs and two inputs, the nibbles widened in two
  instructions. Built once per machine by ``lmlab.native`` with the C++ compiler (a few
  seconds). SmolLM2's 120 products per token, weights read from memory: 1.22-1.33x
  torch's kernel on 1 thread; on 2, 1.03-1.12x on a quiet machine (both near what short
  calls stream from memory) and 0.84-0.97x on a busy one; 1.05-1.09x for a 64-token
  prompt (quiet), 2x with the weights in cache
  (``bench/int4.py``, AMD EPYC; the whole decoding step: ``bench/smollm2.py``).
- PyTorch's (``torch._weight_int4pack_mm_for_cpu``, the one gpt-fast and torchao use)
  everywhere else, or with ``LMLAB_INT4_KERNEL=torch``.

Where neither runs (another device, an older torch) the layer multiplies by the
dequantized weight instead: slower, same numbers up to rounding.

    >>> q = torch.randint(0, 16, (64, 32), dtype=torch.uint8)
    >>> layer = Int4Linear(q, scale=torch.full((64, 1), 0.1), zero=torch.zeros(64, 1))
    >>> layer(torch.randn(2, 32, dtype=torch.bfloat16)).shape
    torch.Size([2, 64])

Tests: tests/quant/test_int4.py (kernel vs dequantized weight; GGUF Q4_0/Q4_1 round trips).
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from lmlab import native
from lmlab.devices import cpu_flags, give_back_pages
from lmlab.errors import ConfigError
from lmlab.models.layers import FixedTensors

# what lmlab's kernel (int4_cpu.cpp) needs of the CPU
NATIVE_FLAGS = frozenset({"avx512f", "avx512bw", "avx512vl", "avx512_bf16"})


def int4_kernel_available() -> bool:
    """Whether an int4 CPU matmul kernel can run: torch's or lmlab's."""
    has_torch = hasattr(torch, "_weight_int4pack_mm_for_cpu") and hasattr(
        torch, "_convert_weight_to_int4pack_for_cpu"
    )
    return has_torch or native_int4_mm() is not None


def native_int4_mm():
    """``torch.ops.lmlab.int4_mm`` (lmlab's kernel, ``int4_cpu.cpp``), built and loaded
    once per process; None where it does not run: ``LMLAB_INT4_KERNEL=torch``, a CPU
    without AVX-512 BF16, no C++ compiler or a failed build (``lmlab.native``)."""
    choice = os.environ.get("LMLAB_INT4_KERNEL", "lmlab")
    if choice not in ("lmlab", "torch"):
        raise ConfigError(f"LMLAB_INT4_KERNEL={choice!r}: use 'lmlab' or 'torch'")
    return _native_op() if choice == "lmlab" else None


@functools.cache
def _native_op():
    def fake(x, packed, scale_zero, group_size):
        return x.new_empty(x.shape[0], packed.shape[0] * 16)

    source = Path(__file__).with_name("int4_cpu.cpp")
    missing = NATIVE_FLAGS - (cpu_flags() or set())
    return native.load_operator(source, "int4_mm", fake, missing)


def pack_blocks(q: torch.Tensor) -> torch.Tensor:
    """q [N, K] (0..15, N a multiple of 16, K of 32) in lmlab's kernel layout: uint8
    [N/16, K/32, 256], chunk c byte 2 r + e of each 256 holding output r's weights at
    4c + e (low nibble) and 4c + 2 + e (high nibble); see ``int4_cpu.cpp``."""
    N, K = q.shape
    blocks = q.to(torch.uint8).view(N // 16, 16, K // 32, 8, 2, 2)  # (nb, r, j, c, h, e)
    low = blocks[..., 0, :].permute(0, 2, 3, 1, 4)  # (nb, j, c, r, e)
    high = blocks[..., 1, :].permute(0, 2, 3, 1, 4)
    return (low | (high << 4)).reshape(N // 16, K // 32, 256)


def unpack_blocks(packed: torch.Tensor) -> torch.Tensor:
    """``pack_blocks``' inverse: q [N, K] uint8."""
    blocks, chunks = packed.shape[:2]
    v = packed.view(blocks, chunks, 8, 16, 2)  # (nb, j, c, r, e)
    low, high = (v & 0x0F).permute(0, 3, 1, 2, 4), (v >> 4).permute(0, 3, 1, 2, 4)
    return torch.stack([low, high], dim=4).reshape(blocks * 16, chunks * 32)  # (nb, r, j, c, h, e)


def inference_kernel_applies(x: torch.Tensor) -> bool:
    """Whether a weight-only CPU kernel may compute with ``x``: it runs on the CPU, and
    nothing needs a gradient through it (the int4 and int8 kernels have no backward, so
    QLoRA's gradients to earlier layers go through the dequantized weight instead)."""
    return x.device.type == "cpu" and not (x.requires_grad and torch.is_grad_enabled())


# The group sizes torch's int4 CPU kernel (_weight_int4pack_mm_for_cpu) accepts; other
# sizes (and output counts that are not a multiple of 16) compute with the dequantized weight.
GROUP_SIZES = (32, 64, 128, 256)


class Int4Linear(nn.Module):
    """y = x W^T + b with W in 4 bits (see the module docstring); inference only.

    q: [N, K] integers in 0..15; scale, zero: [N, K / G]; bias: [N] or None. Activations
    are computed in bf16 (the kernel's dtype) and returned in the input's dtype.
    """

    def __init__(
        self,
        q: torch.Tensor,
        scale: torch.Tensor,
        zero: torch.Tensor,
        bias: torch.Tensor | None = None,
    ):
        super().__init__()
        N, K = q.shape
        groups = scale.shape[-1]
        if scale.shape != (N, groups) or zero.shape != (N, groups) or K % groups:
            raise ConfigError(
                f"Int4Linear: q {tuple(q.shape)} needs scale and zero of shape (N, K / G) with "
                f"G dividing K; got {tuple(scale.shape)} and {tuple(zero.shape)}"
            )
        if q.min() < 0 or q.max() > 15:
            raise ConfigError("Int4Linear: q must hold integers in 0..15")
        self.in_features, self.out_features, self.group_size = K, N, K // groups
        q = q.to(torch.uint8)
        # Two weights per byte, low nibble first: the canonical copy (saved, dequantized).
        self.register_buffer("qweight", q[:, 0::2] | (q[:, 1::2] << 4))  # (N, K/2)
        self.register_buffer("scale", scale.to(torch.bfloat16).contiguous())  # (N, K/G)
        self.register_buffer("zero", zero.to(torch.bfloat16).contiguous())  # (N, K/G)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), False)
        # Once the kernel has run: the Int4Matmul holding this layer's weights (perhaps with
        # other layers' beside them) and this layer's outputs among its outputs [a, b).
        self._kernel: Int4Matmul | None = None
        self._columns = (0, N)

    @classmethod
    def from_float(cls, linear: nn.Linear, group_size: int = 32) -> Int4Linear:
        """Quantize a dense ``nn.Linear`` in groups of ``group_size`` inputs, asymmetrically.

        Each group's range [min, max] is cut into 15 steps, s = (max - min) / 15, and
        q = round((w - min) / s) in 0..15; in this layer's form that is
        W = (q - 8) s + z with z = min + 8 s. s and z are rounded to bf16 first (the
        kernel's dtype) and q is chosen against the rounded values, so the error is at
        most s / 2 per weight, plus the bf16 rounding of the group's ends at the edges:

            group [-1.0, -0.5, 0.0, 0.5] -> s = 0.1 (bf16: 0.10009766),
            z = -1 + 8 s = -0.19921875 -> q = [0, 5, 10, 15]
        """
        K = linear.in_features
        if group_size < 1 or K % group_size:
            raise ConfigError(
                f"Int4Linear.from_float: group_size={group_size} must divide in_features={K}"
            )
        w = linear.weight.detach().float().view(linear.out_features, K // group_size, -1)
        lo, hi = w.amin(dim=-1), w.amax(dim=-1)  # (N, K/G)
        scale = ((hi - lo) / 15).to(torch.bfloat16).float()
        zero = (lo + 8 * scale).to(torch.bfloat16).float()
        # A constant group has s = 0: every q = 8 then gives W = z.
        q = torch.round((w - zero[..., None]) / torch.where(scale > 0, scale, 1.0)[..., None])
        q = (q + 8).clamp(0, 15).to(torch.uint8).view(linear.out_features, K)  # (N, K)
        return cls(q, scale, zero, linear.bias)

    def canonical(self) -> Int4Linear:
        """Give this layer its saved form back (the buffers ``qweight``, ``scale``, ``zero``)
        if it handed it over to the kernel's packed copy (``Int4Matmul``); returns ``self``.
        Exact: the packed copy is read back through the kernel itself
        (``Int4Matmul.release``), every layer sharing that copy included."""
        if self._kernel is not None and self.qweight is None:
            self._kernel.release()
        return self

    def unfuse(self) -> None:
        """Compute alone from now on: if this layer shares a packed copy with others
        (``fuse``), that copy gives their weights back, and each packs its own on its next
        call. The plain decoding path (``use_fast_decoding(False)``) asks for it, so that
        it stays the reference the fused path is compared with."""
        if self._kernel is not None and len(self._kernel.layers) > 1:
            self._kernel.release()

    def _adopt(self, kernel: Int4Matmul, start: int) -> None:
        """``kernel`` now holds this layer's weights at outputs [start, start + N): the
        saved ``qweight`` is dropped, so that the weights are in memory once, and
        ``scale`` and ``zero`` become views of the kernel's copy of them."""
        rows = slice(start, start + self.out_features)
        scale, zero = kernel.scale_and_zero(rows)  # (N, K/G) each
        self._buffers.update(qweight=None, scale=scale, zero=zero)
        self.__dict__["_kernel"] = kernel  # a reference, not a submodule (see Int4Matmul)
        self._columns = (rows.start, rows.stop)

    def _restore(self, qweight: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> None:
        self._buffers.update(qweight=qweight, scale=scale, zero=zero)
        self._kernel, self._columns = None, (0, self.out_features)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        self.canonical()  # the saved form, whatever the kernel's layout on this CPU
        super()._save_to_state_dict(destination, prefix, keep_vars)

    def _apply(self, fn, recurse=True):
        # .to(), .float(), .cuda() ... act on the saved form; a call that changes nothing
        # (lmlab.load's .to("cpu")) leaves the packed copy alone.
        probes = (torch.empty(0, dtype=torch.uint8), torch.empty(0, dtype=torch.bfloat16))
        if any(fn(t) is not t for t in probes):
            self.canonical()
        return super()._apply(fn, recurse)

    def unpacked(self) -> torch.Tensor:
        """q [N, K] as int32 in 0..15."""
        self.canonical()
        low, high = self.qweight & 0x0F, self.qweight >> 4
        return torch.stack([low, high], dim=-1).view(self.out_features, -1).to(torch.int32)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """W [N, K] = (q - 8) * scale + zero, from the bf16 scale and zero the kernel uses."""
        G = self.group_size
        self.canonical()
        scale = self.scale.to(dtype).repeat_interleave(G, dim=1)  # (N, K)
        zero = self.zero.to(dtype).repeat_interleave(G, dim=1)
        return (self.unpacked() - 8).to(dtype) * scale + zero

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if inference_kernel_applies(x) and self._kernel_fits():
            if self._kernel is None:
                Int4Matmul([self])  # it takes the weights over: self._kernel
            y = self._kernel(x)
            a, b = self._columns  # a kernel shared with fused layers computes theirs too
            return y if (a, b) == (0, y.shape[-1]) else y[..., a:b]
        y = F.linear(x, self.dequantize(x.dtype))
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def _kernel_fits(self) -> bool:
        # the kernel packs outputs 16 at a time
        sizes_fit = self.group_size in GROUP_SIZES and self.out_features % 16 == 0
        return sizes_fit and int4_kernel_available()

    @staticmethod
    def fuse(layers: list[Int4Linear]) -> Int4Matmul | None:
        """One kernel call for several layers reading the same input (a block's q, k and v
        projections; SwiGLU's gate and up): their weights stacked along the outputs, the
        outputs concatenated in the order given. Each output is the same sum over the same
        inputs as in its own layer, so the numbers are identical (tested); a decoding step
        makes 4 kernel calls per block instead of 7. None when they cannot share one call
        (some with a bias and some without, different group sizes, no kernel). Layers
        that already share one packed copy in this order get that copy back."""
        first = layers[0]
        kernel = first._kernel
        if kernel is not None and kernel.layers == layers and kernel.packed is not None:
            return kernel
        same = all(
            type(m) is Int4Linear
            and (m.bias is None) == (first.bias is None)
            and (m.in_features, m.group_size) == (first.in_features, first.group_size)
            for m in layers
        )
        return Int4Matmul(layers) if same and all(m._kernel_fits() for m in layers) else None

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"group_size={self.group_size}, bias={self.bias is not None}"
        )


class Int4Matmul(FixedTensors):
    """The int4 CPU kernel's own copy of the weights of one or more ``Int4Linear`` layers,
    stacked along the outputs: ``x [.., K] -> y [.., N1 + N2 + ..]`` in ``x``'s dtype.
    The copy is in lmlab's kernel layout (``native``: ``pack_blocks``, scale_zero
    [K/G, 2, N]) where that kernel runs, else in torch's (scale_zero [K/G, N, 2]).

    It takes the layers' weights over: each layer drops its saved form (``_adopt``) and
    computes through this copy, so that a model decoding in 4 bits holds its weights once
    (SmolLM2: 63 MB less than with both forms). ``release`` gives them back. No model
    registers it as a submodule (``FixedTensors``): what is saved stays the layers' own
    form, read back from here on demand."""

    def __init__(self, layers: list[Int4Linear], native: bool | None = None):
        """``native``: lmlab's kernel (True) or torch's (False); None chooses as
        ``native_int4_mm`` says (``bench/int4.py`` builds one of each)."""
        super().__init__()
        for m in layers:
            m.canonical()
        first = layers[0]
        self.layers = list(layers)
        self.in_features, self.group_size = first.in_features, first.group_size
        self.out_features = sum(m.out_features for m in layers)
        self.device = first.qweight.device
        self.native = native_int4_mm() is not None if native is None else native
        # uint8 for lmlab's layout; torch's packing function takes int32
        dtype = torch.uint8 if self.native else torch.int32
        q = torch.empty(self.out_features, self.in_features, dtype=dtype)  # (N, K)
        start = 0
        for m in layers:  # filled in place: the int32 temporaries are what a load peaks on
            rows = q[start : start + m.out_features]
            torch.bitwise_and(m.qweight, 0x0F, out=rows[:, 0::2])
            torch.bitwise_right_shift(m.qweight, 4, out=rows[:, 1::2])
            start += m.out_features
        if self.native:
            self.packed: torch.Tensor | None = pack_blocks(q)
        else:
            self.packed = torch._convert_weight_to_int4pack_for_cpu(q, 1)
        del q
        scale = torch.cat([m.scale for m in layers])  # (N, K/G)
        zero = torch.cat([m.zero for m in layers])
        # each group's scale and zero: (K/G, 2, N) for lmlab's kernel, (K/G, N, 2) for torch's
        pair = torch.stack([scale.t(), zero.t()], dim=1 if self.native else -1)
        self.scale_zero = pair.contiguous()
        self.bias = None if first.bias is None else torch.cat([m.bias for m in layers])
        start = 0
        for m in layers:
            m._adopt(self, start)
            start += m.out_features

    def applies(self, x: torch.Tensor) -> bool:
        return self.packed is not None and x.device == self.device and inference_kernel_applies(x)

    def scale_and_zero(self, rows: slice) -> tuple[torch.Tensor, torch.Tensor]:
        """Views of the scales and zeros of outputs ``rows``, each (rows, K/G)."""
        if self.native:
            return self.scale_zero[:, 0, rows].t(), self.scale_zero[:, 1, rows].t()
        return self.scale_zero[:, rows, 0].t(), self.scale_zero[:, rows, 1].t()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, self.in_features).to(torch.bfloat16)  # (B*T, K)
        if self.native:
            y = torch.ops.lmlab.int4_mm(
                x2.contiguous(), self.packed, self.scale_zero, self.group_size
            )
        else:
            y = torch._weight_int4pack_mm_for_cpu(x2, self.packed, self.group_size, self.scale_zero)
        y = y.view(*x.shape[:-1], self.out_features).to(x.dtype)
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def unpack(self) -> torch.Tensor:
        """q [N, K] int32 in 0..15, read back from the packed copy: from lmlab's layout by
        ``unpack_blocks``; from torch's by its kernel itself, whatever layout it chose on
        this CPU: with every scale 1 and zero 0 the weight is q - 8, and multiplying the
        identity by it gives (q - 8)^T exactly (integers in -8..7, one nonzero product per
        sum). About 30 ms for a 3072 x 576 weight."""
        if self.native:
            return unpack_blocks(self.packed).to(torch.int32)
        K, G = self.in_features, self.group_size
        eye = torch.eye(K, dtype=torch.bfloat16)  # (K, K)
        unit = torch.zeros_like(self.scale_zero)
        unit[..., 0] = 1
        rows = []
        for start in range(0, K, 256):  # (256, N) at a time: small temporaries
            y = torch._weight_int4pack_mm_for_cpu(eye[start : start + 256], self.packed, G, unit)
            rows.append(y.to(torch.int8))
        return (torch.cat(rows).t() + 8).to(torch.int32)  # (N, K)

    def release(self) -> None:
        """Give every layer its saved form back (exactly; see ``unpack``) and drop the
        packed copy: the layers compute alone again, repacking on their next call."""
        with torch.inference_mode(False), torch.no_grad():  # plain tensors, even in decoding
            q = self.unpack().to(torch.uint8)
            start = 0
            for m in self.layers:
                rows = slice(start, start + m.out_features)
                qm = q[rows]
                m._restore(
                    qm[:, 0::2] | (qm[:, 1::2] << 4),  # (N, K/2), low nibble first
                    m.scale.clone(memory_format=torch.contiguous_format),  # own copies
                    m.zero.clone(memory_format=torch.contiguous_format),
                )
                start += m.out_features
        give_back_pages(self.packed)  # where it shared a block of huge pages with others
        self.packed = self.scale_zero = None


class Float32Head(nn.Module):
    """The output layer of a low-precision model, kept in float32: logits [.., V] float32.

    Next-token logits of a chat model reach 20-30, where bf16 can only tell values 0.125
    apart: coarser than the gap between the two best tokens often is, so a bf16 head makes
    greedy decoding pick by rounding. This head reads bf16 activations and computes the
    logits in float32 (the weight costs 2x the bytes of a bf16 head).
    """

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.weight = nn.Parameter(weight.detach().float().contiguous(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x.float(), self.weight)
