"""The int4 matrix products of SmolLM2-135M: lmlab's kernel against torch's, in one process.

SmolLM2 decodes through 120 int4 products per token (30 blocks x fused q/k/v 960 x 576,
o 576 x 576, fused gate/up 3072 x 576, down 576 x 1536; groups of 32). This bench builds
the same shapes with random weights (53 MB of nibbles, more than the L3 cache, so each
pass reads them from memory as decoding does) and times one pass over all 120:

- ``lmlab``: ``torch.ops.lmlab.int4_mm`` (``src/lmlab/quant/int4_cpu.cpp``: AVX-512 BF16
  dot products on 16 outputs and two inputs at a time);
- ``torch``: ``torch._weight_int4pack_mm_for_cpu`` on the same weights in its own layout;

each through ``lmlab.quant.int4.Int4Matmul`` (which packs the layout), as decoding calls them.

Rows of x: 1 (a decoding step) and ``--prompt`` (a prompt read at once). The two kernels
take turns, ``--rounds`` times, and the bench prints medians and their ratio, for 1 and
2 threads. It first checks that the two agree to bf16 rounding.
Needs a CPU with AVX-512 BF16 and a C++ compiler (else it says so and stops).

How much this gives a whole decoding step is measured by ``bench/smollm2.py --compile``,
run once as is and once with ``LMLAB_INT4_KERNEL=torch``, each against llama.cpp in the same
run (two models in one process do not make a fair pair: the one loaded second sometimes
decodes 20-30% slower, whatever its kernel).

Usage: python bench/int4.py [--rounds 21] [--prompt 64]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

from lmlab.quant.int4 import Int4Linear, Int4Matmul, native_int4_mm
from machine import describe_machine

SHAPES = [(960, 576), (576, 576), (3072, 576), (576, 1536)]  # (outputs, inputs) per block
GROUP = 32


def weights(seed: int = 0):
    """Per product: (K, lmlab's kernel, torch's kernel), each an ``Int4Matmul`` holding the
    same random weights in its own layout."""
    g = torch.Generator().manual_seed(seed)
    products = []
    for _ in range(30):
        for n, k in SHAPES:
            q = torch.randint(0, 16, (n, k), dtype=torch.uint8, generator=g)
            scale = torch.rand(n, k // GROUP, generator=g) * 0.02
            zero = torch.randn(n, k // GROUP, generator=g) * 0.01
            kernels = [Int4Matmul([Int4Linear(q, scale, zero)], native) for native in (True, False)]
            products.append((k, *kernels))
    return products


def check(products) -> None:
    """The kernels agree on the first block's products, to bf16 rounding (the exact bound
    against float64 is tested in tests/quant/test_int4_native.py)."""
    for k, ours, theirs in products[:4]:
        x = torch.randn(3, k).to(torch.bfloat16)
        a, b = ours(x).double(), theirs(x).double()
        scale = (a - b).abs().max() / max(b.abs().max(), 1e-9)
        if scale > 2**-7:
            sys.exit(f"lmlab's and torch's kernels disagree by {scale:.3g} of the outputs' size")


def time_pass(which: int, products, xs) -> float:
    """Seconds for all 120 products through kernel ``which`` (1: lmlab's, 2: torch's)."""
    start = time.perf_counter()
    for product in products:
        product[which](xs[product[0]])
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=21)
    ap.add_argument("--prompt", type=int, default=64, help="rows of x for the prompt rows")
    args = ap.parse_args()
    print(describe_machine())
    if native_int4_mm() is None:
        sys.exit("lmlab's int4 kernel does not run here (no AVX-512 BF16, or no C++ compiler)")
    products = weights()
    check(products)
    print(f"SmolLM2's 120 int4 products, groups of {GROUP}, median of {args.rounds} passes")
    print(f"{'threads':>7} {'rows':>5} {'lmlab ms':>9} {'torch ms':>9} {'torch / lmlab':>14}")
    for threads in (1, 2):
        torch.set_num_threads(threads)
        for rows in (1, args.prompt):
            xs = {k: torch.randn(rows, k).to(torch.bfloat16) for k in (576, 1536)}
            times: dict[int, list[float]] = {1: [], 2: []}
            for which in times:  # warm-up
                time_pass(which, products, xs)
            for _ in range(args.rounds):
                for which in times:
                    times[which].append(time_pass(which, products, xs))
            a, b = (statistics.median(times[which]) * 1e3 for which in (1, 2))
            print(f"{threads:>7} {rows:>5} {a:>9.2f} {b:>9.2f} {b / a:>13.2f}x")


if __name__ == "__main__":
    main()
