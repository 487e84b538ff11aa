"""One decoding step's attention on a CPU: lmlab's kernel (``attention_cpu.cpp``, the
operator ``torch.ops.lmlab.decode_attention``) where it runs, else None and the caller's
``F.scaled_dot_product_attention``.

A decoding step asks one query per head to attend to the whole cache. PyTorch's CPU
kernel spends 21-24 us a call on that for SmolLM2's 9 query and 3 key/value heads at a
short cache (buffers allocated, threads forked, two small matrix products), 30 calls a
token; lmlab's reads the cache once on the calling thread (threads only for long caches)
and writes its output in place. ``bench/attention.py`` (AMD EPYC, 2 threads, per call from
Python): 11 against 23 us at 160 keys, 39 against 99 at 1024, 92 against 380 at 4096.

It runs where the CPU has AVX-512 BF16 and a C++ compiler is found (``lmlab.native``),
for bf16 tensors on the CPU, head sizes 32, 64, 128 or 256, up to 64 query heads per
key/value head, no mask (every cached key visible: a batch without padding) and no
gradient. Its outputs are within one bf16 rounding of float64 attention, and its float32
sums run in its own order, so its bits are not PyTorch's: a decoding step uses it in the
fast and the plain path alike, and in a compiled step as in eager mode (tested).

    >>> q = torch.randn(1, 3, 3, 64, dtype=torch.bfloat16)
    >>> k = v = torch.randn(1, 3, 10, 64, dtype=torch.bfloat16)
    >>> out = decode_attention(q, k, v)  # None where the kernel does not run
    >>> out is None or out.shape == (1, 3, 3, 64)
    True

Tests: tests/models/test_attention.py.
"""

from __future__ import annotations

from pathlib import Path

import torch

from lmlab import native
from lmlab.devices import cpu_flags

# what the kernel (attention_cpu.cpp) needs of the CPU
NATIVE_FLAGS = frozenset({"avx512f", "avx512bw", "avx512vl", "avx512_bf16"})
HEAD_SIZES = (32, 64, 128, 256)

_runs: bool | None = None  # whether the kernel runs here; None: not looked for yet


def load() -> bool:
    """Build (once per machine) and load the kernel; whether it runs here. Called eagerly
    before a decoding run (``KVCache``), so that a compiled step never traces the build."""
    global _runs
    if _runs is None:

        def fake(q, k, v, scale):
            return torch.empty_like(q, memory_format=torch.contiguous_format)

        source = Path(__file__).with_name("attention_cpu.cpp")
        missing = NATIVE_FLAGS - (cpu_flags() or set())
        _runs = native.load_operator(source, "decode_attention", fake, missing) is not None
    return _runs


def decode_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None
) -> torch.Tensor | None:
    """softmax(scale q k^T) v for q [B, Hkv, G, D] (the G query heads sharing each of Hkv
    key/value heads) and k, v [B, Hkv, S, D], every key visible, ``scale`` 1/sqrt(D) by
    default; None where lmlab's kernel does not apply (see the module docstring)."""
    if _runs is None and not torch.compiler.is_compiling():
        load()
    if not _runs:
        return None
    D = q.shape[-1]
    if (
        q.dtype != torch.bfloat16
        or q.device.type != "cpu"
        or D not in HEAD_SIZES
        or q.shape[2] > 64
        or k.dtype != torch.bfloat16
        or v.dtype != torch.bfloat16
        or k.stride(-1) != 1
        or v.stride(-1) != 1
        or (torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad))
    ):
        return None
    scale = D**-0.5 if scale is None else scale
    return torch.ops.lmlab.decode_attention(q.contiguous(), k, v, scale)
