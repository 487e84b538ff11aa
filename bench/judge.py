"""AI feedback on a verifiable task: does SmolLM2-135M-Instruct, as a constitutional judge,
pick the right arithmetic answer?

The policy (the SFT'd model of ``runs/align/sft/model`` when it exists, else SmolLM2
itself) samples two answers to each of N arithmetic prompts of ``runs/align/prompts.jsonl``;
the judge compares them by label probabilities in both orders (``lmlab.align.judge``). On
the pairs where exactly one answer is right (``lmlab.data.tasks.check``), we report how
often the judge chose it, beside a random judge's 0.5, and how position-biased its single
readings are (Zheng et al. 2023): the share of pairs whose two orders disagree.

Usage: python bench/judge.py [--n 100] [--samples 2] [--policy runs/align/sft/model]
           [--judge smollm2] [--out runs/align/judge_prefs.jsonl] [--critique]
Quick check: python bench/judge.py --n 3 --max-new-tokens 6
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

from machine import describe_machine  # bench/machine.py (the script's own folder)

SFT = "runs/align/sft/model"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=100, help="arithmetic prompts to judge")
    parser.add_argument("--samples", type=int, default=2, help="policy answers per prompt")
    parser.add_argument("--judge", default="smollm2")
    parser.add_argument(
        "--policy", default=None, help=f"default: {SFT} if it exists, else the judge"
    )
    parser.add_argument("--prompts", default="runs/align/prompts.jsonl")
    parser.add_argument("--out", default="runs/align/judge_prefs.jsonl")
    parser.add_argument("--max-new-tokens", type=int, default=8)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--dtype", default="float32", help="float32, bfloat16 or auto")
    parser.add_argument("--critique", action="store_true", help="judge writes a critique first")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print(describe_machine())

    from lmlab.align.judge import agreement, judge
    from lmlab.data.preferences import load_preferences
    from lmlab.generate import SamplingParams

    policy = args.policy or (SFT if Path(SFT, "config.json").is_file() else args.judge)
    rows = [json.loads(line) for line in Path(args.prompts).read_text().splitlines()]
    rows = [r for r in rows if r.get("task") == "arithmetic"][: args.n]
    with tempfile.TemporaryDirectory() as tmp:
        subset = Path(tmp) / "prompts.jsonl"
        subset.write_text("".join(json.dumps(r) + "\n" for r in rows))
        out = Path(args.out)
        out.unlink(missing_ok=True)  # a fresh measurement, not a resumed one
        start = time.perf_counter()
        summary = judge(
            args.judge,
            str(subset),
            policy,
            str(out),
            samples=args.samples,
            seed=args.seed,
            critique=args.critique,
            dtype=args.dtype,
            params=SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature),
        )
        wall = time.perf_counter() - start
    pairs = load_preferences(out)
    score = agreement(pairs)
    flips = [(p.meta["p_orders"][0] > 0.5) != (p.meta["p_orders"][1] > 0.5) for p in pairs]
    bias = [p.meta["p_orders"][0] - p.meta["p_orders"][1] for p in pairs]

    print(f"judge {args.judge} on {len(rows)} arithmetic prompts, policy {policy}")
    print("| pairs | ties | comparable | agreement | random judge | order flips | wall (s) |")
    print("|---|---|---|---|---|---|---|")
    rate = "n/a" if score.rate is None else f"{score.rate:.3f}"
    flip = f"{sum(flips) / len(flips):.2f}" if flips else "n/a"
    print(
        f"| {summary.pairs} | {summary.ties} | {score.comparable} | {rate} | 0.500 | {flip} "
        f"| {wall:.1f} |"
    )
    if bias:
        print(
            f"mean P(first shown wins) - P(second shown wins) reading for the chosen answer: "
            f"{statistics.mean(bias):+.3f} (position bias; averaging both orders cancels it)"
        )
    print(f"pairs written to {out}")


if __name__ == "__main__":
    main()
