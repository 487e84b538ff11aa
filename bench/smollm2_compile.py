"""What ``compile=True`` (the compiled one-token step, ``lmlab.generate.compiled``) gives
SmolLM2 4-bit decoding on a CPU, and what the compile costs, cold and loaded from disk.

The model as users get it (``lmlab.load("smollm2", dtype="auto")``: 4-bit layers, fused
projections) decodes greedily after a chat prompt through ``lmlab.generate``, eagerly and
with ``compile=True`` (lmlab's whole-graph step) and through dynamo's compiled step (what
lmlab falls back to for a model that breaks the graph), in turns, for ``--rounds`` rounds
in one process. CPU time per new token is ``time.thread_time`` of a run of
``--new-tokens`` + 1 tokens minus that of a 1-token run, over ``--new-tokens`` (it does
not count time spent waiting for a busy machine's cores; memory-bandwidth contention
still shows). Printed per round, then the
medians, and whether the greedy ids are equal.

The compile is measured in two fresh processes sharing a new, empty cache directory
(``TORCHINDUCTOR_CACHE_DIR`` and ``LMLAB_COMPILE_CACHE``): the first compiles cold and saves
the step, the second loads it (what every later ``lmlab chat --compile true`` does).
Both report wall seconds (``compile_seconds``) and the process's CPU seconds (the C++
builds run in worker processes, so the wall time is the fairer cost on a quiet machine).

``--profile`` also prints torch.profiler's top operators (self CPU time) for 16 steps of
each kind.

Usage: python bench/smollm2_compile.py [--new-tokens 64] [--rounds 5] [--threads 1]
       [--profile]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

PROMPT = [{"role": "user", "content": "Write a short story about a robot who learns to paint."}]


def load():
    import lmlab

    lm = lmlab.load("smollm2", dtype="auto")
    ids = lm.tokenizer.encode(lm.chat_template.render(PROMPT, add_generation_prompt=True))
    return lm.model, ids


def run(model, ids, n: int, mode: str):
    """(thread CPU seconds, the Generation) of one greedy run of n new tokens, ``mode``
    "eager", "compiled" (lmlab's whole-graph step) or "dynamo" (dynamo's compiled step,
    with its guards skipped after a run's first step: what lmlab falls back to for a
    model that breaks the graph)."""
    import lmlab.generate.compiled as compiled
    from lmlab.generate import SamplingParams, generate

    params = SamplingParams(temperature=0, max_new_tokens=n, compile=mode != "eager")
    find = compiled._STEPS.find
    if mode == "dynamo":
        compiled._STEPS.find = lambda *args: (None, "breaks")
    try:
        start = time.thread_time()
        result = generate(model, [ids], params)
        return time.thread_time() - start, result
    finally:
        compiled._STEPS.find = find


def compile_child() -> dict:
    """In a fresh process: load, then the first compiled run (which compiles)."""
    model, ids = load()
    cpu = time.process_time()
    _, result = run(model, ids, 2, "compiled")
    return {"wall_s": result.compile_seconds, "cpu_s": time.process_time() - cpu}


def profile(model, ids, mode: str) -> str:
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    run(model, ids, 17, mode)  # warm
    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        run(model, ids, 17, mode)
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12)


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--compile-child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    if args.compile_child:
        print(json.dumps(compile_child()))
        return

    from lmlab.generate.compiled import step_cache_dir
    from machine import describe_machine  # bench/machine.py

    compiles = []
    with tempfile.TemporaryDirectory(prefix="lmlab-inductor-") as cache:
        env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache, "LMLAB_COMPILE_CACHE": cache}
        for _ in ("cold", "warm"):
            cmd = [sys.executable, __file__, "--compile-child", "--threads", str(args.threads)]
            out = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True).stdout
            compiles.append(json.loads(out.strip().splitlines()[-1]))

    model, ids = load()
    n = args.new_tokens
    for mode in ("compiled", "dynamo"):
        run(model, ids, 2, mode)  # compiles or loads here too (the default cache)
    print(describe_machine())
    print(
        f"SmolLM2-135M-Instruct 4-bit, batch 1, greedy, {len(ids)}-token prompt, {n} new "
        f"tokens, {args.threads} threads, CPU ms per new token (thread_time)"
    )
    cold, warm = compiles
    print(
        f"compile: cold {cold['wall_s']:.1f} s wall ({cold['cpu_s']:.1f} CPU s in the process), "
        f"loading the saved step {warm['wall_s']:.1f} s wall ({warm['cpu_s']:.1f} CPU s); "
        f"steps are saved in {step_cache_dir()}"
    )
    per_token: dict[str, list[float]] = {"eager": [], "dynamo": [], "compiled": []}
    equal = True
    for r in range(args.rounds):
        line = []
        ids_of = {}
        for name in per_token:
            one, _ = run(model, ids, 1, name)
            full, result = run(model, ids, n + 1, name)
            per_token[name].append((full - one) / n * 1e3)
            ids_of[name] = result.ids
            line.append(f"{name} {per_token[name][-1]:6.2f}")
        equal &= ids_of["eager"] == ids_of["compiled"] == ids_of["dynamo"]
        print(f"  round {r + 1}: " + "   ".join(line) + " ms/token")
    medians = {k: statistics.median(v) for k, v in per_token.items()}

    def ratio(a: str, b: str) -> float:
        return statistics.median(x / y for x, y in zip(per_token[a], per_token[b]))

    print(
        "median: " + ", ".join(f"{k} {v:.2f}" for k, v in medians.items()) + " ms/token; "
        f"median of per-round ratios: eager / compiled {ratio('eager', 'compiled'):.2f}x, "
        f"dynamo / compiled {ratio('dynamo', 'compiled'):.2f}x; greedy ids equal in every "
        f"round: {equal}"
    )
    if args.profile:
        for mode in per_token:
            print(f"\ntorch.profiler, 16 {mode} steps:")
            print(profile(model, ids, mode))


if __name__ == "__main__":
    main()
