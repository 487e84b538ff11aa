"""GGUF's Q8_0 blocks kept as the file stores them: an output layer and, when the two are
tied, the token embeddings read from the same bytes.

Each row of the weight W [N, K] is cut into blocks of 32 inputs; a block holds 32 integers
q in -128..127 and one fp16 scale d:

    W[n, k] = q[n, k] * d[n, k // 32]

Small GGUF models keep their output matrix so (SmolLM2-135M's Q4_1 file: the 49152 x 576
token embedding, tied to the output, in Q8_0), and llama.cpp computes the logits from
those bytes. Widened to bf16 the matrix is 57 MB read per decoded token, the largest
single read of a 4-bit model (over a third of its weights); in Q8_0 it is 30 MB, and the
weights are the file's exactly rather than their bf16 rounding.

``Q8_0Linear`` multiplies through lmlab's own CPU kernel (``q8_cpu.cpp``, the operator
``torch.ops.lmlab.q8_0_mm``; AVX-512 BF16, as lmlab's int4 kernel): bf16 activations,
int8 weights widened to bf16 (exact) in registers, float32 logits (a chat model's logits
reach 20-30, where bf16 tells only values 0.125 apart; see ``Float32Head``).
``Q8_0Embedding`` is the ``nn.Embedding`` that reads its rows from such a layer's blocks:
``q * d`` in float32 rounded once to the model's dtype, the numbers the dense load gives.
``bench/q8_head.py`` (AMD EPYC, weights read from memory): SmolLM2's output layer for
one token takes 1.3-1.8 ms on 2 threads against 2.2-3.1 ms for ``F.linear`` with the bf16
matrix (1.7x; 2.0-2.1x on 1 thread), and 1.1-1.6 ms on 2 MiB pages, where a GGUF load
puts it (``lmlab.devices.use_huge_pages``; 2.0x, 2.7x on 1 thread); for 42 rows at once
it is 0.9-1.0x the bf16 product, which decoding avoids (only a prompt's last position
needs logits: ``logits_to_keep``). ``bench/smollm2.py`` measures the whole step.

Where the kernel does not run (another device, a CPU without AVX-512 BF16, no C++
compiler, a gradient needed) the layer multiplies by the dequantized weight in float32:
the same numbers up to float32 rounding, slower; a 4-bit GGUF load then keeps the dense
bf16 head.

    >>> q = torch.randint(-128, 128, (32, 64), dtype=torch.int8)
    >>> layer = Q8_0Linear(q, torch.full((32, 2), 0.01, dtype=torch.float16))
    >>> layer(torch.randn(3, 64, dtype=torch.bfloat16)).dtype
    torch.float32

Tests: tests/quant/test_q8.py.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from lmlab import native
from lmlab.devices import cpu_flags
from lmlab.errors import ConfigError
from lmlab.models.layers import FixedTensors
from lmlab.quant.int4 import inference_kernel_applies

# what lmlab's kernel (q8_cpu.cpp) needs of the CPU
NATIVE_FLAGS = frozenset({"avx512f", "avx512bw", "avx512vl", "avx512_bf16"})
BLOCK = 32  # inputs per scale (GGUF's QK8_0)


@functools.cache
def native_q8_0_mm():
    """``torch.ops.lmlab.q8_0_mm`` (``q8_cpu.cpp``), built and loaded once per process;
    None where it does not run: a CPU without AVX-512 BF16, no C++ compiler or a failed build
    (``lmlab.native``)."""

    def fake(x, qweight, scale):
        return x.new_empty(x.shape[0], qweight.shape[0] * 16, dtype=torch.float32)

    source = Path(__file__).with_name("q8_cpu.cpp")
    missing = NATIVE_FLAGS - (cpu_flags() or set())
    return native.load_operator(source, "q8_0_mm", fake, missing)


def pack_q8_0(q: torch.Tensor, d: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """q [N, K] int8 and d [N, K/32] fp16 in the kernel's layout: qweight [N/16, K/2, 32]
    (for 16 outputs and inputs 2p, 2p + 1: byte 2 r + e is output r's weight at 2p + e)
    and scale [N/16, K/32, 16]; see ``q8_cpu.cpp``."""
    N, K = q.shape
    pairs = q.view(N // 16, 16, K // 2, 2).permute(0, 2, 1, 3)  # (nb, p, r, e)
    qweight = pairs.reshape(N // 16, K // 2, 32)
    scale = d.view(N // 16, 16, K // BLOCK).transpose(1, 2).contiguous()
    return qweight, scale


def unpack_q8_0(qweight: torch.Tensor, scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``pack_q8_0``'s inverse: (q [N, K] int8, d [N, K/32] fp16)."""
    blocks, half, _ = qweight.shape
    q = qweight.view(blocks, half, 16, 2).permute(0, 2, 1, 3).reshape(blocks * 16, 2 * half)
    return q, scale.transpose(1, 2).reshape(blocks * 16, half // (BLOCK // 2))


class Q8_0Linear(nn.Module):
    """y = x W^T with W in Q8_0 blocks (see the module docstring); inference only, no bias.

    q: [N, K] int8; d: [N, K / 32] fp16 (other float dtypes are rounded to it). N must be a
    multiple of 16 and K of 32. With ``float_output`` (the default: an output layer's
    logits) the output is float32 whatever the input's dtype; without it (a layer inside
    the model, as a Q8_0 GGUF file's) it is rounded once to the input's dtype.
    """

    def __init__(self, q: torch.Tensor, d: torch.Tensor):
        super().__init__()
        if q.dim() != 2 or q.dtype != torch.int8:
            raise ConfigError(
                f"Q8_0Linear: q must be a 2-d int8 tensor, got {q.dtype} {tuple(q.shape)}"
            )
        N, K = q.shape
        if N % 16 or K % BLOCK or tuple(d.shape) != (N, K // BLOCK):
            raise ConfigError(
                f"Q8_0Linear: q {tuple(q.shape)} needs N a multiple of 16, K of {BLOCK}, and "
                f"d of shape (N, K / {BLOCK}); got d {tuple(d.shape)}"
            )
        self._hold(*pack_q8_0(q, d.to(torch.float16)))

    def _hold(self, qweight: torch.Tensor, scale: torch.Tensor) -> None:
        blocks, half, _ = qweight.shape
        self.in_features, self.out_features = 2 * half, 16 * blocks
        self.bias = None  # as nn.Linear(bias=False) has
        self.register_buffer("qweight", qweight)  # (N/16, K/2, 32)
        self.register_buffer("scale", scale)  # (N/16, K/32, 16)
        self.float_output = True
        self._group: Q8_0Fused | None = None  # the fused call whose blocks these are views of
        # decided once, so that a compiled step's trace sees a plain setting, not the lookup
        self.native = native_q8_0_mm() is not None

    @classmethod
    def from_float(cls, weight: torch.Tensor) -> Q8_0Linear:
        """Quantize a dense weight [N, K] as GGUF's Q8_0 does (ggml's reference
        ``quantize_row_q8_0``, in float32): per block of 32, d = max |w| / 127, q = w / d
        rounded half away from zero, d stored in fp16. The same bytes as
        ``gguf.quants.quantize`` (tested)."""
        N, K = weight.shape
        if K % BLOCK:
            raise ConfigError(f"Q8_0Linear.from_float: in_features={K} must be a multiple of 32")
        w = weight.detach().float().view(N, K // BLOCK, BLOCK)
        d = w.abs().amax(dim=-1, keepdim=True) / 127  # (N, K/32, 1)
        inverse = torch.where(d == 0, 0.0, 1 / d)
        v = w * inverse
        q = (torch.sign(v) * torch.floor(v.abs() + 0.5)).to(torch.int8).view(N, K)
        return cls(q, d.view(N, -1).to(torch.float16))

    @classmethod
    def packed(cls, qweight: torch.Tensor, scale: torch.Tensor) -> Q8_0Linear:
        """The layer holding ``qweight`` and ``scale`` already in the kernel's layout (as
        ``state_dict`` saves them), after checking their dtypes and shapes."""
        blocks, half, width = qweight.shape if qweight.dim() == 3 else (0, 0, 0)
        K = 2 * half
        if (
            qweight.dtype != torch.int8
            or width != 32
            or K % BLOCK
            or scale.dtype != torch.float16
            or tuple(scale.shape) != (blocks, K // BLOCK, 16)
        ):
            raise ConfigError(
                f"Q8_0Linear: qweight must be int8 (N/16, K/2, 32) with K a multiple of {BLOCK} "
                f"and scale fp16 (N/16, K/{BLOCK}, 16); got {qweight.dtype} "
                f"{tuple(qweight.shape)} and {scale.dtype} {tuple(scale.shape)}"
            )
        layer = cls.__new__(cls)
        nn.Module.__init__(layer)
        layer._hold(qweight.contiguous(), scale.contiguous())
        return layer

    @classmethod
    def from_blocks(
        cls,
        read: Callable[[int, int], bytes | bytearray],
        N: int,
        K: int,
        rows: int = 2048,
        empty: Callable[..., list[torch.Tensor]] | None = None,
    ) -> Q8_0Linear:
        """The layer of a GGUF Q8_0 matrix [N, K]: ``read(start, stop)`` returns the raw
        blocks of rows [start, stop) (34 bytes each: the fp16 scale, then 32 int8),
        taken ``rows`` at a time, so that nothing beside the layer's own copy is ever
        the matrix's size. ``empty(*(shape, dtype))`` makes the layer's two tensors
        (``lmlab.devices.empty_on_huge_pages`` builds them in place on 2 MiB pages;
        default ``torch.empty``)."""
        if N % 16 or K % BLOCK or rows % 16:
            raise ConfigError(
                f"Q8_0Linear.from_blocks: N={N} and rows={rows} must be multiples of 16, "
                f"K={K} of {BLOCK}"
            )
        shapes = [((N // 16, K // 2, 32), torch.int8), ((N // 16, K // BLOCK, 16), torch.float16)]
        if empty is None:
            qweight, scale = (torch.empty(shape, dtype=dtype) for shape, dtype in shapes)
        else:
            qweight, scale = empty(*shapes)
        for start in range(0, N, rows):
            stop = min(N, start + rows)
            raw = read(start, stop)
            raw = raw if isinstance(raw, bytearray) else bytearray(raw)  # frombuffer: writable
            blocks = torch.frombuffer(raw, dtype=torch.uint8).view(-1, 2 + BLOCK)
            if blocks.shape[0] != (stop - start) * (K // BLOCK):
                raise ConfigError(
                    f"Q8_0Linear.from_blocks: rows {start}..{stop} of a {N} x {K} matrix are "
                    f"{(stop - start) * (K // BLOCK)} blocks; read gave {blocks.shape[0]}"
                )
            # pack_q8_0's layout written straight from the blocks through strided views:
            # no temporary of the chunk's size, whose holes the C heap would keep
            nb, kb = (stop - start) // 16, K // BLOCK
            blocks = blocks.view(nb, 16, kb, 2 + BLOCK)  # (block, r, kb, byte)
            part = slice(start // 16, stop // 16)
            q = blocks[..., 2:].view(torch.int8).unflatten(-1, (16, 2))  # (nb, r, kb, j, e)
            qweight[part].view(nb, kb, 16, 16, 2).copy_(q.permute(0, 2, 3, 1, 4))
            scale[part].copy_(blocks[..., :2].view(torch.float16)[..., 0].transpose(1, 2))
        return cls.packed(qweight, scale)

    def unpacked(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(q [N, K] int8, d [N, K/32] fp16)."""
        return unpack_q8_0(self.qweight, self.scale)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """W [N, K] = q * d, computed in float32 (exact) and returned in ``dtype``."""
        q, d = self.unpacked()
        w = q.float().unflatten(1, (-1, BLOCK)) * d.float()[..., None]  # (N, K/32, 32)
        return w.flatten(1).to(dtype)

    def rows(self, ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """W[ids] [*ids.shape, K] in ``dtype``: q * d in float32, rounded once."""
        blocks, half, _ = self.qweight.shape
        pairs = self.qweight.view(blocks, half, 16, 2)[ids // 16, :, ids % 16]  # (*ids, K/2, 2)
        q = pairs.flatten(-2)  # (*ids, K)
        d = self.scale[ids // 16, :, ids % 16]  # (*ids, K/32)
        w = q.float().unflatten(-1, (-1, BLOCK)) * d.float()[..., None]
        return w.flatten(-2).to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.native and x.dtype == torch.bfloat16 and inference_kernel_applies(x):
            x2 = x.reshape(-1, self.in_features).contiguous()  # (B*T, K)
            y = torch.ops.lmlab.q8_0_mm(x2, self.qweight, self.scale)
            y = y.view(*x.shape[:-1], self.out_features)
        else:
            y = F.linear(x.float(), self.dequantize())
        return y if self.float_output else y.to(x.dtype)

    def _apply(self, fn, recurse=True):
        # .to(device) moves the blocks; a dtype change (model.to(torch.bfloat16)) would
        # round the fp16 scales, so they keep theirs
        for name, t in self._buffers.items():
            moved = fn(t)
            moved = moved if moved.dtype == t.dtype else t.to(moved.device)
            if moved is not t and self._group is not None:
                self._group.packed = None  # its blocks are no longer this layer's
            self._buffers[name] = moved
        return self

    @staticmethod
    def fuse(layers: list[Q8_0Linear]) -> Q8_0Fused | None:
        """One kernel call for several layers reading the same input (a block's q, k and v
        projections; SwiGLU's gate and up), where their blocks already lie side by side in
        one tensor, in this order (as a GGUF load lays them out: ``place_side_by_side``):
        the call reads them in place, so nothing is copied, and each output is the same
        sum as in its own layer (the numbers are identical; tested). None for layers laid
        out otherwise, for output layers (float32 logits), or without the kernel."""
        first = layers[0]
        if not first.native or any(
            type(m) is not Q8_0Linear or m.float_output or m.in_features != first.in_features
            for m in layers
        ):
            return None
        qweight = _side_by_side([m.qweight for m in layers])
        scale = _side_by_side([m.scale for m in layers])
        if qweight is None or scale is None:
            return None
        return Q8_0Fused(layers, qweight, scale)

    def extra_repr(self) -> str:
        out = "float32" if self.float_output else "the input's dtype"
        return f"in_features={self.in_features}, out_features={self.out_features}, Q8_0 ({out})"


def _side_by_side(parts: list[torch.Tensor]) -> torch.Tensor | None:
    """The one tensor that ``parts`` (contiguous, alike but for their first dimension) are
    consecutive pieces of, as a view of their storage; None if they are not laid out so."""
    first = parts[0]
    at = first.data_ptr()
    for t in parts:
        if (
            not t.is_contiguous()
            or t.dtype != first.dtype
            or t.device != first.device
            or t.shape[1:] != first.shape[1:]
            or t.untyped_storage().data_ptr() != first.untyped_storage().data_ptr()
            or t.data_ptr() != at
        ):
            return None
        at += t.numel() * t.element_size()
    shape = (sum(t.shape[0] for t in parts), *first.shape[1:])
    whole = torch.empty(0, dtype=first.dtype, device=first.device)
    return whole.set_(first.untyped_storage(), first.storage_offset(), shape)


class Q8_0Fused(FixedTensors):
    """Several ``Q8_0Linear`` layers computed in one kernel call, reading their blocks
    where they are (``Q8_0Linear.fuse``): the outputs side by side in the layers' order,
    in the input's dtype. ``packed`` becomes None when a layer's blocks move (``.to()``),
    and ``fused_projection`` then asks for the call again. Views of a block, held fixed
    for torch.compile (``FixedTensors``)."""

    def __init__(self, layers: list[Q8_0Linear], qweight: torch.Tensor, scale: torch.Tensor):
        super().__init__()
        self.layers, self.qweight, self.scale = layers, qweight, scale
        self.packed: torch.Tensor | None = qweight
        self.in_features, self.out_features = layers[0].in_features, 16 * qweight.shape[0]
        self.device = qweight.device
        for m in layers:
            m.__dict__["_group"] = self  # a back reference, not a submodule of the layer

    def applies(self, x: torch.Tensor) -> bool:
        return (
            self.packed is not None
            and x.dtype == torch.bfloat16
            and x.device == self.device
            and inference_kernel_applies(x)
        )

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, self.in_features).contiguous()  # (B*T, K)
        y = torch.ops.lmlab.q8_0_mm(x2, self.qweight, self.scale)
        return y.view(*x.shape[:-1], self.out_features).to(x.dtype)


class Q8_0Embedding(nn.Embedding):
    """Token embeddings whose table is a ``Q8_0Linear``'s weight (a tied output layer): no
    copy of their own. ``forward`` reads the rows it needs, in ``dtype``; ``weight`` is
    the whole table dequantized, made on each access (V x D values: for tools that read
    the table, not for the forward pass).

    The layer is referred to, not owned: the model holds it (as ``lm_head``), saves its
    blocks once and moves them with ``.to()``."""

    def __init__(self, head: Q8_0Linear, dtype: torch.dtype):
        nn.Module.__init__(self)
        self.num_embeddings, self.embedding_dim = head.out_features, head.in_features
        self.padding_idx, self.max_norm, self.norm_type = None, None, 2.0
        self.scale_grad_by_freq = self.sparse = False
        self.__dict__["head"] = head  # not a submodule: the blocks belong to lm_head
        # the rows' dtype and device, which follow the model's .to() as a buffer does
        self.register_buffer("like", torch.empty(0, dtype=dtype), persistent=False)

    @property
    def weight(self) -> torch.Tensor:
        return self.head.dequantize(self.like.dtype).to(self.like.device)

    def reset_parameters(self) -> None:
        pass  # the table is the file's

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head.rows(ids, self.like.dtype).to(self.like.device)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, Q8_0 (tied to the output layer)"
