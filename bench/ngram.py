"""Fitting and scoring speed: lmlab's count-based n-gram LM vs nltk.lm on the same n-grams.

A character-level n-gram (default: 3-gram, interpolated Kneser-Ney with discount 0.1) on
the first 100k characters of Tiny Shakespeare: fit on the first 90%, score the held-out
rest. Both sides see the same n-grams (left padding with n-1 BOS symbols, see
``lmlab.models.ngram``), so their perplexities must agree; the script prints both, their
relative difference, the fit and score times, and lmlab's speed-up (target: >= 50x).

nltk's Kneser-Ney gives a character never seen in training probability 0, so lmlab runs
with ``uniform_floor=False`` here to compute the same numbers.

Usage: python bench/ngram.py [--chars 100000] [--order 3] [--smoothing kneser_ney] [--threads 1]
"""

from __future__ import annotations

import argparse
import math
import statistics
import time

import nltk.lm
import torch

from lmlab.data import load_corpus
from lmlab.data.tokenizers import CharTokenizer
from lmlab.models.ngram import NGramConfig, NGramLM, ngram_perplexity

NLTK_MODELS = {
    "mle": lambda order, args: nltk.lm.MLE(order),
    "add_k": lambda order, args: nltk.lm.Lidstone(args.k, order),
    "kneser_ney": lambda order, args: nltk.lm.KneserNeyInterpolated(order, args.discount),
}


def nltk_training_ngrams(words: list[str], order: int):
    """Every m-gram (m = 1..n) ending on a real token, after n-1 "<s>" of left padding."""
    padded = ["<s>"] * (order - 1) + words
    for t in range(len(words)):
        for m in range(1, order + 1):
            yield tuple(padded[t + order - m : t + order])


def run_nltk(train: list[int], test: list[int], vocab_size: int, args) -> tuple[float, ...]:
    n = args.order
    train_words, test_words = [str(i) for i in train], [str(i) for i in test]
    start = time.perf_counter()
    lm = NLTK_MODELS[args.smoothing](n, args)
    lm.fit([nltk_training_ngrams(train_words, n)], [str(i) for i in range(vocab_size)] + ["<s>"])
    fitted = time.perf_counter()
    padded = ["<s>"] * (n - 1) + test_words
    ppl = lm.perplexity(tuple(padded[t : t + n]) for t in range(len(test_words)))
    return ppl, fitted - start, time.perf_counter() - fitted


def run_lmlab(train: torch.Tensor, test: torch.Tensor, vocab_size: int, args) -> tuple[float, ...]:
    # nltk's vocabulary also holds "<s>" and "<UNK>" (add_k normalises over them): two
    # never-seen ids make lmlab's V the same.
    config = NGramConfig(
        vocab_size=vocab_size + 2,
        order=args.order,
        smoothing=args.smoothing,
        k=args.k,
        discount=args.discount,
        uniform_floor=False,
    )
    start = time.perf_counter()
    model = NGramLM(config).fit(train)
    fitted = time.perf_counter()
    ppl = ngram_perplexity(model, test)
    return ppl, fitted - start, time.perf_counter() - fitted


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--chars", type=int, default=100_000)
    ap.add_argument("--order", type=int, default=3)
    ap.add_argument("--smoothing", choices=sorted(NLTK_MODELS), default="kneser_ney")
    ap.add_argument("--k", type=float, default=0.5, help="add_k pseudo-count")
    ap.add_argument("--discount", type=float, default=0.1, help="Kneser-Ney discount")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (nltk uses one)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    text = load_corpus("tinyshakespeare")[: args.chars]
    tok = CharTokenizer.train(text)
    ids = tok.encode(text)
    split = int(0.9 * len(ids))
    train, test = ids[:split], ids[split:]
    print(
        f"{args.order}-gram {args.smoothing}, V={tok.vocab_size}, "
        f"{len(train)} train / {len(test)} test chars"
    )

    # lmlab takes milliseconds: warm up once, then the median of 5 runs (nltk runs once).
    # Each side gets its input in its own format, made outside the timing: nltk strings
    # (run_nltk converts before its clock starts), lmlab a tensor of ids.
    as_tensors = torch.tensor(train), torch.tensor(test)
    runs = [run_lmlab(*as_tensors, tok.vocab_size, args) for _ in range(6)][1:]
    ours = (runs[0][0], *(statistics.median(r[i] for r in runs) for i in (1, 2)))
    theirs = run_nltk(train, test, tok.vocab_size, args)
    for name, (ppl, fit_s, score_s) in (("lmlab", ours), ("nltk.lm", theirs)):
        print(f"{name:8s} perplexity {ppl:.10g}  fit {fit_s:8.3f} s  score {score_s:8.3f} s")
    if math.isinf(ours[0]) and math.isinf(theirs[0]):
        print("perplexities agree: both infinite (a held-out n-gram never seen in training)")
    else:
        rel = abs(ours[0] - theirs[0]) / theirs[0]
        print(f"perplexities agree (rel. diff {rel:.2e} < 1e-6): {rel < 1e-6}")
        if args.smoothing == "add_k" and rel >= 1e-6:
            print(
                "  expected for add_k on held-out text: a context never seen in training backs "
                "off to a shorter one in lmlab and is uniform in nltk (lmlab.models.ngram)"
            )
    print(
        f"speed-up: fit {theirs[1] / ours[1]:.0f}x, score {theirs[2] / ours[2]:.0f}x, "
        f"total {(theirs[1] + theirs[2]) / (ours[1] + ours[2]):.0f}x"
    )


if __name__ == "__main__":
    main()
