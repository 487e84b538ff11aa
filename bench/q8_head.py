"""SmolLM2-135M's output layer: the file's Q8_0 blocks through lmlab's kernel against the
bf16 matrix it replaced, in one process.

The output layer multiplies the last hidden state (576) by the 49152 x 576 token
embedding (tied). Three ways, each on the same random Q8_0 weights:

- ``q8_0``: ``lmlab.quant.Q8_0Linear`` (``src/lmlab/quant/q8_cpu.cpp``: int8 weights
  widened in registers, float32 logits), 28.3 MB of weights and 1.8 MB of scales;
- ``q8_0 2M``: the same on 2 MiB pages (``lmlab.devices.use_huge_pages``, as a 4-bit GGUF
  load places them; where Linux offers transparent huge pages);
- ``bf16``: ``F.linear`` with the matrix dequantized to bf16 (what a 4-bit load used
  before: 56.6 MB), bf16 logits; one-token products without oneDNN, as lmlab decodes on
  a CPU without AMX (``lmlab.devices.cpu_plan``);
- each with the weights read from memory: each way keeps three copies and takes them in
  turn, more than the last-level cache holds, as decoding reads the layer after 100 MB
  of other weights.

Rows of x: 1 (a decoding step) and ``--prompt`` (a prompt read at once). The ways take
turns ``--rounds`` times; the bench prints medians and their ratio, for 1 and 2 threads,
after checking that they agree to bf16 rounding. Needs a CPU with AVX-512 BF16 and a C++
compiler (else it says so and stops).

Usage: python bench/q8_head.py [--rounds 21] [--prompt 42]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch
import torch.nn.functional as F

from lmlab.devices import huge_pages_available, use_huge_pages
from lmlab.quant.q8 import Q8_0Linear, native_q8_0_mm
from machine import describe_machine

VOCAB, WIDTH, COPIES = 49152, 576, 3


def layers(seed: int = 0):
    """``COPIES`` triples (Q8_0Linear, the same on 2 MiB pages, its bf16 weight [V, D]) of
    random Q8_0 weights."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(COPIES):
        q = torch.randint(-127, 128, (VOCAB, WIDTH), dtype=torch.int8, generator=g)
        d = (torch.rand(VOCAB, WIDTH // 32, generator=g) * 0.002).to(torch.float16)
        layer, huge = Q8_0Linear(q, d), Q8_0Linear(q, d)
        use_huge_pages([(huge, "qweight"), (huge, "scale")])
        out.append((layer, huge, layer.dequantize(torch.bfloat16)))
    return out


def time_kind(kind: int, copies, x) -> float:
    """Seconds per product through way ``kind`` (0: q8_0, 1: q8_0 on 2 MiB pages, 2:
    bf16), over the copies."""
    start = time.perf_counter()
    with torch.inference_mode(), torch.backends.mkldnn.flags(enabled=x.shape[0] > 1):
        for ways in copies:
            ways[kind](x) if kind < 2 else F.linear(x, ways[2])
    return (time.perf_counter() - start) / len(copies)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=21)
    ap.add_argument("--prompt", type=int, default=42, help="rows of x for the prompt rows")
    args = ap.parse_args()
    print(describe_machine())
    if native_q8_0_mm() is None:
        sys.exit("lmlab's Q8_0 kernel does not run here (no AVX-512 BF16, or no C++ compiler)")
    copies = layers()
    x = torch.randn(3, WIDTH).to(torch.bfloat16)
    a, b = copies[0][1](x).double(), F.linear(x, copies[0][2]).double()
    if (a - b).abs().max() > 2**-7 * b.abs().max():
        sys.exit("the Q8_0 kernel and the bf16 product disagree beyond bf16 rounding")
    huge = "" if huge_pages_available() else " (no huge pages here: 'q8_0 2M' is on 4 KiB)"
    print(f"SmolLM2's output layer ({VOCAB} x {WIDTH}), median of {args.rounds} rounds{huge}")
    print(
        f"{'threads':>7} {'rows':>5} {'q8_0 ms':>8} {'q8_0 2M ms':>11} {'bf16 ms':>8} "
        f"{'bf16 / q8_0':>12} {'bf16 / q8_0 2M':>15}"
    )
    for threads in (1, 2):
        torch.set_num_threads(threads)
        for rows in (1, args.prompt):
            x = torch.randn(rows, WIDTH).to(torch.bfloat16)
            times: dict[int, list[float]] = {0: [], 1: [], 2: []}
            for kind in times:  # warm-up
                time_kind(kind, copies, x)
            for _ in range(args.rounds):
                for kind in times:
                    times[kind].append(time_kind(kind, copies, x))
            q8, q8_huge, bf16 = (statistics.median(times[kind]) * 1e3 for kind in times)
            print(
                f"{threads:>7} {rows:>5} {q8:>8.2f} {q8_huge:>11.2f} {bf16:>8.2f} "
                f"{bf16 / q8:>11.2f}x {bf16 / q8_huge:>14.2f}x"
            )


if __name__ == "__main__":
    main()
