"""``lmlab ngrams``: count-based models of every order and smoothing on one corpus, a
perplexity table, a figure and a sample from the best (``lmlab.eval.ngram_sweep``).

lmlab ngrams --orders 1-7 --out runs/ngrams
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Literal

from jsonargparse import ArgumentParser

from lmlab.api import prepare_data
from lmlab.errors import ConfigError
from lmlab.eval.ngram_sweep import (
    SWEEP_SMOOTHINGS,
    as_json,
    parse_orders,
    parse_smoothings,
    perplexity_table,
    sample_lines,
    sweep_ngrams,
)
from lmlab.fileio import atomic_write_json, atomic_write_text, atomic_write_with
from lmlab.generate import SamplingParams

LABELS = {
    "mle": "MLE (no smoothing)",
    "add_k": "add-k (k=1: Laplace)",
    "backoff": "backoff (absolute discount)",
    "witten_bell": "Witten-Bell",
    "linear_interpolation": "linear interpolation (EM weights)",
    "kneser_ney": "interpolated Kneser-Ney",
    "modified_kneser_ney": "modified Kneser-Ney",
}


def add_arguments(parser: ArgumentParser) -> None:
    parser.add_argument("--data", type=str, default="tinyshakespeare", help="corpus")
    parser.add_argument(
        "--tokenizer", type=Literal["char", "byte", "word"], default="char", help="units"
    )
    parser.add_argument("--vocab_size", type=int | None, default=None, help="word vocabulary")
    parser.add_argument("--orders", type=str, default="1-7", help="e.g. 1-7, 2,3,5 or 1-3,6")
    parser.add_argument(
        "--smoothings",
        type=str,
        default=",".join(SWEEP_SMOOTHINGS),
        help=f"comma-separated, of {', '.join(SWEEP_SMOOTHINGS)}",
    )
    parser.add_argument("--prompt", type=str, default="ROMEO:", help="the best model continues it")
    parser.add_argument("--sample_tokens", type=int, default=150, help="tokens to sample")
    parser.add_argument("--temperature", type=float, default=0.8, help="sampling temperature")
    parser.add_argument("--seed", type=int, default=1, help="seeds the sample")
    parser.add_argument("--progress", type=bool, default=True, help="show a progress bar")
    parser.add_argument("--out", type=str, default="runs/ngrams", help="folder for the results")


def run(args) -> None:
    orders = parse_orders(args.orders)
    smoothings = parse_smoothings(args.smoothings)
    if args.sample_tokens < 0:
        raise ConfigError(f"sample_tokens={args.sample_tokens} is invalid: >= 0 (0: no sample)")
    params = None
    if args.sample_tokens:  # bad sampling settings fail before any fitting
        params = SamplingParams(
            max_new_tokens=args.sample_tokens, temperature=args.temperature, seed=args.seed
        )
    out = Path(args.out)
    tok, train, val = prepare_data(args.data, out, args.tokenizer, args.vocab_size)
    scores, best = sweep_ngrams(train, val, tok.vocab_size, orders, smoothings, args.progress)
    table = perplexity_table(scores)
    sample = ""
    if best is not None and params is not None:
        sample = sample_lines(best, tok, args.prompt, params)
    best_score = min(scores, key=lambda s: s.perplexity)
    report = {
        "data": args.data,
        "tokenizer": args.tokenizer,
        "vocab_size": tok.vocab_size,
        "train_tokens": len(train),
        "val_tokens": len(val),
        "orders": orders,
        "models": as_json(scores),
        "best": {"order": best_score.order, "smoothing": best_score.smoothing},
        "sample": {"prompt": args.prompt, "temperature": args.temperature, "text": sample},
    }
    atomic_write_json(out / "ngrams.json", report)
    markdown = markdown_table(table, orders)
    zeros: dict[str, list[str]] = {}
    for s in scores:
        if s.zero_probability:
            zeros.setdefault(s.smoothing, []).append(f"n = {s.order}: {s.zero_probability:,}")
    for smoothing, counts in zeros.items():
        markdown += (
            f"\n\n{LABELS[smoothing]}: validation tokens with probability 0 "
            f"(of {len(val):,}): {', '.join(counts)}"
        )
    text = f"# n-gram perplexities on {args.data} ({args.tokenizer})\n\n{markdown}\n"
    if sample:
        text += (
            f"\nSample of the best ({best_score.smoothing}, n = {best_score.order}), "
            f"temperature {args.temperature}, seed {args.seed}:\n\n```\n{args.prompt}{sample}\n```\n"
        )
    atomic_write_text(out / "ngrams.md", text)
    plot(table, orders, tok.vocab_size, f"{args.data}, {args.tokenizer} tokens", out / "ngrams.png")

    print(markdown)
    for s in scores:
        if s.weights is not None and s.order == max(orders):
            weights = ", ".join(f"{w:.3f}" for w in s.weights)
            print(
                f"\nlinear interpolation, n = {s.order}: EM weights lambda_0..{s.order} = {weights}"
            )
    if sample:
        print(f"\nbest: {best_score.smoothing}, n = {best_score.order}")
        print(args.prompt + sample)
    print(f"\nsaved: {out}/ngrams.json, ngrams.md, ngrams.png")


def markdown_table(table: dict[str, dict[int, float]], orders: list[int]) -> str:
    """Validation perplexity, one row per smoothing and one column per order; the best of
    each row in bold."""
    lines = [
        "| order n | " + " | ".join(str(n) for n in orders) + " |",
        "| --- |" + " --: |" * len(orders),
    ]
    for smoothing, row in table.items():
        finite = [p for p in row.values() if math.isfinite(p)]
        best = min(finite) if finite else None
        cells = []
        for n in orders:
            p = row.get(n)
            cell = "" if p is None else ("inf" if math.isinf(p) else f"{p:.2f}")
            cells.append(f"**{cell}**" if p is not None and p == best else cell)
        lines.append(f"| {LABELS.get(smoothing, smoothing)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(
    table: dict[str, dict[int, float]], orders: list[int], vocab: int, what: str, path: Path
) -> None:
    """Validation perplexity against order (log scale), one line per smoothing; an infinite
    perplexity is an x above the plot's finite values."""
    from matplotlib.figure import Figure  # deferred: slow to import, only for plots
    from matplotlib.ticker import NullFormatter  # deferred: slow to import, only for plots

    fig = Figure(figsize=(9, 4.3))
    ax = fig.subplots()
    finite = [p for row in table.values() for p in row.values() if math.isfinite(p)]
    top = max(finite + [float(vocab)]) * 2.2
    for smoothing, row in table.items():
        xs = [n for n in orders if n in row and math.isfinite(row[n])]
        (line,) = ax.plot(xs, [row[n] for n in xs], marker="o", ms=4, label=LABELS[smoothing])
        infinite = [n for n in orders if n in row and math.isinf(row[n])]
        if infinite:
            ax.plot(infinite, [top / 1.15] * len(infinite), "x", color=line.get_color(), ms=9)
            ax.text(
                (infinite[0] + infinite[-1]) / 2, top / 1.45, f"{LABELS[smoothing]}: infinite",
                color=line.get_color(), fontsize=8, ha="center",
            )  # fmt: skip
    ax.axhline(vocab, color="gray", lw=0.8, ls=":")
    ax.text(orders[-1], vocab * 0.9, f"uniform guess ({vocab})", fontsize=8, color="gray",
            ha="right", va="top")  # fmt: skip
    ax.set_yscale("log")
    if finite:
        ax.set_ylim(min(finite) * 0.85, top)
    ax.yaxis.set_minor_formatter(NullFormatter())
    ticks = [t for t in (2, 3, 4, 5, 7, 10, 15, 20, 30, 50, 100, 200, 500, 1000)
             if ax.get_ylim()[0] <= t <= ax.get_ylim()[1]]  # fmt: skip
    ax.set_yticks(ticks)
    ax.set_yticklabels([str(t) for t in ticks])
    ax.set_xticks(orders)
    ax.set_xlabel("order n (the model reads the n - 1 previous tokens)")
    ax.set_ylabel("validation perplexity (log scale)")
    ax.set_title(f"n-gram language models: {what}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    atomic_write_with(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
