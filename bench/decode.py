"""Decoding speed: lmlab vs transformers' ``generate`` on the same GPT-2-small weights.

Batch 1, greedy, a 32-token prompt and 128 new tokens (prefill included in the time), on
random weights (the speed of a forward pass does not depend on the values). Prints tokens/s
for each and the ratios:

- default settings: lmlab as ``lmlab.load`` would run it (bf16 weights where the CPU
  supports bf16, see ``lmlab.api.default_dtype``) vs transformers' default (float32);
- same dtype: both in float32 (and both in bf16).

Usage: python bench/decode.py [--new-tokens 128] [--repeats 3] [--threads N]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import transformers

from lmlab.api import default_dtype
from lmlab.checkpoint.hf import from_transformers
from lmlab.generate import SamplingParams, generate_ids
from machine import describe_machine  # bench/machine.py (the script's own folder)


def timed(fn, repeats: int) -> float:
    fn()  # warm-up: allocations, oneDNN kernel selection
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--prompt-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    config = transformers.GPT2Config(bos_token_id=None, eos_token_id=None)  # GPT-2 small
    hf = transformers.GPT2LMHeadModel(config).eval()
    ours = from_transformers(hf)
    prompt = torch.randint(0, config.vocab_size, (1, args.prompt_tokens))
    n = args.new_tokens

    def run_hf(model):
        def go():
            with torch.inference_mode():
                out = model.generate(
                    prompt,
                    attention_mask=torch.ones_like(prompt),
                    max_new_tokens=n,
                    min_new_tokens=n,
                    do_sample=False,
                    pad_token_id=0,
                )
            assert out.shape[1] == prompt.shape[1] + n
            return out[0, prompt.shape[1] :].tolist()

        return go

    def run_ours(model):
        params = SamplingParams(max_new_tokens=n, temperature=0.0)

        def go():
            out = generate_ids(model, [prompt[0].tolist()], params)[0]
            assert len(out) == n
            return out

        return go

    # Same weights, same greedy tokens in float32: the comparison is like for like.
    same = run_ours(ours)() == run_hf(hf)()
    rows = {}
    rows["transformers fp32"] = n / timed(run_hf(hf), args.repeats)
    rows["lmlab fp32"] = n / timed(run_ours(ours), args.repeats)
    lm_default = default_dtype()
    rows["transformers bf16"] = n / timed(run_hf(hf.to(torch.bfloat16)), args.repeats)
    rows["lmlab bf16"] = n / timed(run_ours(ours.to(torch.bfloat16)), args.repeats)
    default_row = "lmlab bf16" if lm_default == torch.bfloat16 else "lmlab fp32"

    print(describe_machine())
    print(
        f"GPT-2 small (124M), batch 1, greedy, {args.prompt_tokens}-token prompt, {n} new tokens, "
        f"{torch.get_num_threads()} threads"
    )
    print(f"greedy ids identical to transformers in fp32: {same}")
    for name, tps in rows.items():
        print(f"  {name:<20} {tps:8.1f} tokens/s")
    print(
        f"ratio, default settings (lmlab {lm_default} vs transformers fp32): "
        f"{rows[default_row] / rows['transformers fp32']:.2f}x"
    )
    print(f"ratio, same dtype fp32: {rows['lmlab fp32'] / rows['transformers fp32']:.2f}x")
    print(f"ratio, same dtype bf16: {rows['lmlab bf16'] / rows['transformers bf16']:.2f}x")


if __name__ == "__main__":
    main()
