"""Word-level n-grams on Tiny Shakespeare: lmlab vs nltk.lm (fit + score) and vs KenLM (score).

Words come from lmlab's ``WordTokenizer`` (one sentence per line, ``</s>`` at each line's
end, the 10,000 most frequent words, the rest ``<unk>``), trained on the first 90% of the
lines; the last 10% is held out. Two comparisons, each in one run, interleaved, medians:

1. nltk.lm: fit plus score, 3-gram and 5-gram interpolated Kneser-Ney (discount 0.1,
   nltk's default). nltk's Kneser-Ney scores a word by walking every context of the next
   order (seconds per hundred words here), so it runs on a subsample: the first
   ``--nltk-train`` training words and ``--nltk-test`` held-out words (held-out words
   unseen in that sample read as ``<unk>``, so both perplexities are finite). lmlab runs
   on the same sample with nltk's conventions (n-1 BOS, no sentence resets,
   ``uniform_floor=False``, two never-seen ids for nltk's ``<s>`` and ``<UNK>``): the
   perplexities must agree to 1e-6. Target: lmlab >= 50x nltk.
2. KenLM: lmlab fits modified Kneser-Ney on the whole training split (sentences as KenLM
   counts them), writes it as an ARPA file, and the ``kenlm`` module loads that file.
   lmlab builds its hash indexes once (``NGramLM.build_index``, timed like KenLM's load;
   the first build on a machine also compiles the C kernel, about 0.2 s). Both score the
   whole held-out split: KenLM one ``Model.score`` call per sentence (its Python API, what
   a user calls; sentences pre-joined) and, for reference, its ``full_scores`` (per-word
   scores, summed); lmlab one ``log_prob`` call on the ids (pre-encoded), by default
   through its C kernel (``lmlab/models/ngram_stream.c``) and, for reference, in PyTorch
   alone (``build_index(native=False)``). The four run interleaved, ``--kenlm-reps``
   times; medians of wall time and of CPU time (``time.process_time``, which a loaded
   machine disturbs less). Their total log10 probabilities must agree (KenLM stores
   float32; lmlab's two paths bit for bit). Target: lmlab at least as fast as KenLM's
   ``score``.

``--level char`` runs the nltk comparison on characters instead (the first ``--chars`` of
the corpus, all of them given to nltk), and ``--smoothing mle|add_k`` compares those.

Usage: python bench/ngram.py [--orders 3 5] [--reps 5] [--kenlm-reps 31] [--nltk-reps 1]
       [--threads 1]
       [--vocab 10000] [--nltk-train 20000] [--nltk-test 500] [--smoothing kneser_ney]
       [--level word|char] [--chars 100000]
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import statistics
import tempfile
import time
from pathlib import Path

import nltk.lm
import torch

from lmlab.checkpoint.arpa import write_arpa
from lmlab.data import CharTokenizer, WordTokenizer, load_corpus
from lmlab.models.ngram import NGramConfig, NGramLM, ngram_perplexity
from machine import describe_machine

LN10 = math.log(10)


NLTK_MODELS = {
    "mle": lambda order: nltk.lm.MLE(order),
    "add_k": lambda order: nltk.lm.Lidstone(0.5, order),
    "kneser_ney": lambda order: nltk.lm.KneserNeyInterpolated(order, discount=0.1),
}


def nltk_fit_and_score(train: list[int], test: list[int], vocab_size: int, order: int, smoothing):
    """nltk.lm on lmlab's n-grams: (perplexity, fit s, score s)."""
    words, held_out = [str(i) for i in train], [str(i) for i in test]
    padded = ["<s>"] * (order - 1) + words
    start = time.perf_counter()
    lm = NLTK_MODELS[smoothing](order)
    grams = (
        tuple(padded[t + order - m : t + order])
        for t in range(len(words))
        for m in range(1, order + 1)
    )
    lm.fit([grams], [str(i) for i in range(vocab_size)] + ["<s>"])
    fitted = time.perf_counter()
    padded = ["<s>"] * (order - 1) + held_out
    ppl = lm.perplexity(tuple(padded[t : t + order]) for t in range(len(held_out)))
    return ppl, fitted - start, time.perf_counter() - fitted


def lmlab_fit_and_score(
    train: torch.Tensor, test: torch.Tensor, vocab_size: int, order: int, smoothing: str
):
    """lmlab with nltk's conventions: (perplexity, fit s, score s)."""
    config = NGramConfig(
        vocab_size=vocab_size + 2,  # nltk's vocabulary also holds "<s>" and "<UNK>"
        order=order,
        smoothing=smoothing,
        k=0.5,
        discount=0.1,
        uniform_floor=False,
    )
    start = time.perf_counter()
    model = NGramLM(config).fit(train)
    fitted = time.perf_counter()
    ppl = ngram_perplexity(model, test)
    return ppl, fitted - start, time.perf_counter() - fitted


def compare_with_nltk(tok, train_ids: list[int], test_ids: list[int], args) -> None:
    train, test = train_ids, test_ids
    if args.level == "word":
        train = train_ids[: args.nltk_train]
        seen = set(train)
        test = [i if i in seen else tok.unk_id for i in test_ids[: args.nltk_test]]
    print(
        f"\n== vs nltk.lm: fit + score, {args.smoothing} (Kneser-Ney discount 0.1, add_k "
        f"k=0.5) on {len(train)} training and {len(test)} held-out {args.level}s"
        + (" (a subsample: nltk's word-level scoring is slow)" if args.level == "word" else "")
    )
    as_tensors = torch.tensor(train), torch.tensor(test)
    for order in args.orders:
        ours, theirs = [], []
        run = (tok.vocab_size, order, args.smoothing)
        lmlab_fit_and_score(*as_tensors, *run)  # warm-up
        for r in range(args.reps):  # interleaved: nltk runs in the first nltk-reps rounds
            ours.append(lmlab_fit_and_score(*as_tensors, *run))
            if r < args.nltk_reps:
                theirs.append(nltk_fit_and_score(train, test, *run))
        ppl_ours, ppl_theirs = ours[0][0], theirs[0][0]
        fit_ours, score_ours = (statistics.median(r[i] for r in ours) for i in (1, 2))
        fit_theirs, score_theirs = (statistics.median(r[i] for r in theirs) for i in (1, 2))
        if math.isinf(ppl_ours) and math.isinf(ppl_theirs):
            print(f"{order}-gram  perplexity: both infinite (a held-out n-gram never seen)")
        else:
            rel = abs(ppl_ours - ppl_theirs) / ppl_theirs
            print(
                f"{order}-gram  perplexity lmlab {ppl_ours:.6f} nltk {ppl_theirs:.6f} "
                f"(rel. diff {rel:.1e}, agree < 1e-6: {rel < 1e-6})"
            )
            if args.smoothing == "add_k" and rel >= 1e-6:
                print(
                    "  expected for add_k: a context never seen in training backs off to a "
                    "shorter one in lmlab and is uniform in nltk (lmlab.models.ngram)"
                )
        print(
            f"  lmlab fit {fit_ours * 1e3:8.1f} ms  score {score_ours * 1e3:8.1f} ms "
            f"(median of {len(ours)})"
        )
        print(
            f"  nltk  fit {fit_theirs * 1e3:8.1f} ms  score {score_theirs * 1e3:8.1f} ms "
            f"(median of {len(theirs)})"
        )
        total = (fit_theirs + score_theirs) / (fit_ours + score_ours)
        print(
            f"  speed-up: fit {fit_theirs / fit_ours:.0f}x, score {score_theirs / score_ours:.0f}x,"
            f" fit + score {total:.0f}x (target >= 50x: {total >= 50})"
        )


def timed(score) -> tuple[float, float, float]:
    """(what ``score()`` returns, its wall seconds, its CPU seconds)."""
    wall, cpu = time.perf_counter(), time.process_time()
    total = score()
    return total, time.perf_counter() - wall, time.process_time() - cpu


def compare_with_kenlm(tok, train_ids: list[int], test_text: str, args) -> None:
    try:
        import kenlm
    except ImportError:
        print("\n== vs KenLM: skipped, the kenlm module is not installed (pip install kenlm)")
        return
    sentences = [" ".join(words) for words, _ in tok.split(test_text)]
    ids = torch.tensor(tok.encode(test_text))
    # A row starting with </s>: its first word is predicted from BOS alone, like the rest.
    row, targets = torch.cat([torch.tensor([tok.eos_id]), ids[:-1]])[None], ids[None]
    print(
        f"\n== vs KenLM: score {len(ids)} held-out tokens ({len(sentences)} sentences) with a "
        f"modified Kneser-Ney model fitted on {len(train_ids)} words, in ARPA form"
    )
    for order in args.orders:
        config = NGramConfig(
            vocab_size=tok.vocab_size,
            order=order,
            smoothing="modified_kneser_ney",
            sentence_end_id=tok.eos_id,
        )
        start = time.perf_counter()
        model = NGramLM(config).fit(torch.tensor(train_ids))
        fit_s = time.perf_counter() - start
        with tempfile.TemporaryDirectory() as folder:
            path = Path(folder) / "lm.arpa"
            start = time.perf_counter()
            write_arpa(model, path, tok.words)
            write_s = time.perf_counter() - start
            size = path.stat().st_size
            start = time.perf_counter()
            reference = kenlm.Model(str(path))
            load_s = time.perf_counter() - start
        plain = copy.deepcopy(model).build_index(native=False)  # PyTorch alone
        start = time.perf_counter()
        model.build_index()  # once per fitted model, like KenLM's load
        index_s = time.perf_counter() - start
        scorer = "C kernel" if model._levels()[0].native is not None else "PyTorch (no C compiler)"
        model.log_prob(row, targets)  # warm-up
        plain.log_prob(row, targets)

        runs = {
            "lmlab": lambda model=model: float(model.log_prob(row, targets).sum()) / LN10,
            "torch": lambda model=plain: float(model.log_prob(row, targets).sum()) / LN10,
            "score": lambda kenlm=reference: sum(kenlm.score(s) for s in sentences),
            "full_scores": lambda kenlm=reference: sum(
                p for s in sentences for p, _, _ in kenlm.full_scores(s)
            ),
        }
        times = {name: [] for name in runs}
        for _ in range(args.kenlm_reps):  # interleaved
            for name, score in runs.items():
                times[name].append(timed(score))
        total = {name: t[-1][0] for name, t in times.items()}
        wall = {name: statistics.median(x[1] for x in t) for name, t in times.items()}
        cpu = {name: statistics.median(x[2] for x in t) for name, t in times.items()}
        print(
            f"{order}-gram  total log10 p: lmlab {total['lmlab']:.4f} KenLM {total['score']:.4f} "
            f"(diff {abs(total['lmlab'] - total['score']):.1e}; full_scores "
            f"{total['full_scores']:.4f}; lmlab's two paths equal: "
            f"{total['lmlab'] == total['torch']})"
        )
        print(
            f"  lmlab fit {fit_s:.2f} s, index {index_s:.2f} s, ARPA write {write_s:.2f} s "
            f"({size / 1e6:.1f} MB), KenLM load {load_s:.2f} s"
        )
        for kind, m in (("wall", wall), ("CPU", cpu)):
            print(
                f"  score, {kind} ms (medians of {args.kenlm_reps}): lmlab {m['lmlab'] * 1e3:.2f} "
                f"({scorer}; PyTorch alone {m['torch'] * 1e3:.2f}), KenLM score "
                f"{m['score'] * 1e3:.2f}, full_scores {m['full_scores'] * 1e3:.2f}; lmlab is "
                f"{m['score'] / m['lmlab']:.2f}x KenLM score's speed (PyTorch alone "
                f"{m['score'] / m['torch']:.2f}x; {m['full_scores'] / m['lmlab']:.2f}x "
                f"full_scores'; target >= 1: {m['score'] >= m['lmlab']})"
            )


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--orders", type=int, nargs="+", default=[3, 5])
    ap.add_argument("--vocab", type=int, default=10_000, help="most word ids (with <unk>, </s>)")
    ap.add_argument("--reps", type=int, default=5, help="lmlab and nltk repetitions")
    ap.add_argument("--kenlm-reps", type=int, default=31, help="lmlab and KenLM repetitions")
    ap.add_argument("--nltk-reps", type=int, default=1, help="nltk repetitions (slow)")
    ap.add_argument("--nltk-train", type=int, default=20_000, help="training words for nltk")
    ap.add_argument("--nltk-test", type=int, default=500, help="held-out words for nltk")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (nltk, KenLM: one)")
    ap.add_argument("--skip-nltk", action="store_true")
    ap.add_argument(
        "--level",
        choices=["word", "char"],
        default="word",
        help="char: the first --chars characters, nltk on all of them, no KenLM",
    )
    ap.add_argument("--chars", type=int, default=100_000, help="with --level char")
    ap.add_argument(
        "--smoothing",
        choices=sorted(NLTK_MODELS),
        default="kneser_ney",
        help="the nltk comparison's smoothing (KenLM's is modified Kneser-Ney)",
    )
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(describe_machine())
    print(f"load average: {' '.join(f'{x:.1f}' for x in os.getloadavg())}")

    if args.level == "char":
        text = load_corpus("tinyshakespeare")[: args.chars]
        tok = CharTokenizer.train(text)
        ids = tok.encode(text)
        split = int(0.9 * len(ids))
        print(f"Tiny Shakespeare, characters: V={tok.vocab_size}")
        compare_with_nltk(tok, ids[:split], ids[split:], args)
        return
    lines = load_corpus("tinyshakespeare").splitlines(keepends=True)
    split = int(0.9 * len(lines))
    train_text, test_text = "".join(lines[:split]), "".join(lines[split:])
    tok = WordTokenizer.train(train_text, max_vocab=args.vocab)
    train_ids, test_ids = tok.encode(train_text), tok.encode(test_text)
    unk = sum(i == tok.unk_id for i in test_ids) / len(test_ids)
    print(
        f"Tiny Shakespeare, words: V={tok.vocab_size}, {len(train_ids)} training / "
        f"{len(test_ids)} held-out tokens ({unk:.1%} of them <unk>)"
    )
    if not args.skip_nltk:
        compare_with_nltk(tok, train_ids, test_ids, args)
    compare_with_kenlm(tok, train_ids, test_text, args)
    print(f"load average after: {' '.join(f'{x:.1f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
