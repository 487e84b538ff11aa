"""Would ``torch.compile`` of the one-token step pay for SmolLM2 4-bit decoding on a CPU?

An experiment for issue 21 (section 1), not a default of lmlab: the model loaded as users
get it (``lmlab.load("smollm2", dtype="auto")``: 4-bit layers, fused projections) decodes
``--new-tokens`` greedy tokens after a chat prompt, one token per call with a KV cache,
eagerly and through ``torch.compile(model, dynamic=True)`` (one graph for every cache
length), in turns, in one process. Printed: the compile's CPU seconds, then per round the
CPU time per step of each (``time.thread_time``: it does not count time spent waiting for
a busy machine's cores, but memory-bandwidth contention still shows) and whether the
greedy ids are equal.

``--emulate-casts`` sets inductor's ``emulate_precision_casts``, which rounds every bf16
intermediate as eager PyTorch does; without it the fused kernels keep float32
intermediates and the greedy ids drift from the eager ones after a few tokens.

Usage: python bench/smollm2_compile.py [--new-tokens 48] [--rounds 3] [--threads 1]
       [--emulate-casts]
"""

from __future__ import annotations

import argparse
import time

import torch

from machine import describe_machine  # bench/machine.py

PROMPT = [{"role": "user", "content": "Write a short story about a robot who learns to paint."}]


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--new-tokens", type=int, default=48)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--emulate-casts", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    import torch._inductor.config as inductor

    import lmlab

    inductor.emulate_precision_casts = args.emulate_casts
    lm = lmlab.load("smollm2", dtype="auto")
    model = lm.model
    text = lm.chat_template.render(PROMPT, add_generation_prompt=True)
    prompt = torch.tensor([lm.tokenizer.encode(text)])
    # one-token steps run without oneDNN on CPUs where lmlab's plan says so (generate does too)
    torch._C._set_mkldnn_enabled(False)
    compiled = torch.compile(model, dynamic=True)

    def decode(step, n: int) -> tuple[float, list[int]]:
        """(CPU ms per one-token step, the greedy ids) after an eager prompt pass."""
        cache = model.new_cache(1, prompt.shape[1] + n + 1)
        with torch.inference_mode():
            token = model(prompt, cache=cache)[:, -1].argmax(-1, keepdim=True)
            ids, start = [], time.thread_time()
            for _ in range(n):
                token = step(token, cache=cache)[:, -1].argmax(-1, keepdim=True)
                ids.append(int(token))
        return (time.thread_time() - start) / n * 1e3, ids

    start = time.process_time()
    decode(compiled, 3)
    print(describe_machine())
    print(
        f"SmolLM2-135M-Instruct 4-bit, batch 1, greedy, {prompt.shape[1]}-token prompt, "
        f"{args.new_tokens} one-token steps, {args.threads} threads, "
        f"emulate_precision_casts={args.emulate_casts}"
    )
    print(f"compile (first steps): {time.process_time() - start:.1f} CPU s")
    for _ in range(args.rounds):
        eager_ms, eager_ids = decode(model, args.new_tokens)
        compiled_ms, compiled_ids = decode(compiled, args.new_tokens)
        differ = next((i for i, (a, b) in enumerate(zip(eager_ids, compiled_ids)) if a != b), None)
        print(
            f"  eager {eager_ms:6.2f} ms/step   compiled {compiled_ms:6.2f} ms/step   "
            f"({eager_ms / compiled_ms:.2f}x)   greedy ids equal: {differ is None}"
            + ("" if differ is None else f" (first differ at token {differ})")
        )


if __name__ == "__main__":
    main()
