"""One decoding step's attention: lmlab's kernel (``lmlab.models.attention``,
``src/lmlab/models/attention_cpu.cpp``) against PyTorch's ``scaled_dot_product_attention``,
which lmlab called before, in one process.

SmolLM2-135M's shape: 9 query heads sharing 3 key/value heads, 64 wide, bf16; one query
token attends to a cache of ``S`` keys (a view of a longer preallocated cache, as in
decoding). Both sides get the grouped layout lmlab decodes with (q [1, 3, 3, 64]). Each
call is timed in a loop of ``--calls`` calls from Python; the sides take turns
``--rounds`` times, and the bench prints the medians in microseconds per call and their
ratio, for each cache length and for 1 and 2 threads, after checking that the two agree
to bf16 rounding. A decoding step of SmolLM2 makes 30 such calls. Needs a CPU with AVX-512
BF16 and a C++ compiler (else it says so and stops).

Usage: python bench/attention.py [--rounds 7] [--calls 300]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch
import torch.nn.functional as F

from lmlab.models import attention
from machine import describe_machine

LENGTHS = (16, 160, 1024, 4096)


def per_call_us(fn, calls: int) -> float:
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - start) / calls * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--calls", type=int, default=300)
    args = ap.parse_args()
    print(describe_machine())
    if not attention.load():
        sys.exit("lmlab's attention kernel does not run here (no AVX-512 BF16 or no compiler)")
    g = torch.Generator().manual_seed(0)
    print("| threads | cache S | PyTorch us/call | lmlab us/call | PyTorch / lmlab |")
    print("| --: | --: | --: | --: | --: |")
    for threads in (1, 2):
        torch.set_num_threads(threads)
        for S in LENGTHS:
            q = torch.randn(1, 3, 3, 64, generator=g).to(torch.bfloat16)
            k = torch.randn(1, 3, S + 64, 64, generator=g).to(torch.bfloat16)[:, :, :S]
            v = torch.randn(1, 3, S + 64, 64, generator=g).to(torch.bfloat16)[:, :, :S]
            tensors = (q, k, v)
            sides = {
                "torch": lambda a=tensors: F.scaled_dot_product_attention(*a),
                "lmlab": lambda a=tensors: attention.decode_attention(*a),
            }
            ours, theirs = sides["lmlab"]().float(), sides["torch"]().float()
            gap = (ours - theirs).abs().max().item()
            assert gap <= 2**-6 * theirs.abs().max().item(), f"disagree by {gap}"
            times = {name: [] for name in sides}
            for fn in sides.values():
                per_call_us(fn, 20)  # warm-up
            for _ in range(args.rounds):
                for name, fn in sides.items():
                    times[name].append(per_call_us(fn, args.calls))
            t, m = (statistics.median(times[name]) for name in ("torch", "lmlab"))
            print(f"| {threads} | {S} | {t:.1f} | {m:.1f} | {t / m:.2f}x |")


if __name__ == "__main__":
    main()
