"""``lmlab score``: BLEU, chrF and ROUGE of candidate texts against references, taken
apart (``lmlab.eval.text.score_breakdown``): n-gram precisions, brevity penalty, ROUGE
precision, recall and F1, with a figure.

lmlab score --out runs/lessons/bleu                       # the bundled examples
lmlab score --examples my_scores.jsonl --out runs/scores  # {"candidate", "reference", ...}
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from jsonargparse import ArgumentParser

from lmlab.eval.text import load_scoring_examples, score_breakdown
from lmlab.fileio import atomic_write_json, atomic_write_with

METRICS = ("BLEU", "chrF", "ROUGE-1", "ROUGE-2", "ROUGE-L")


def add_arguments(parser: ArgumentParser) -> None:
    parser.add_argument(
        "--examples",
        type=str | None,
        default=None,
        help='JSONL, one {"candidate", "reference", "kind", "group"} per line (kind and group '
        "optional); default: the bundled examples (identical, one word changed, paraphrase, "
        "word salad, too short, too long, unrelated, against two references)",
    )
    parser.add_argument(
        "--out", type=str, default="runs/scores", help="folder for scores.json and scores.png"
    )


def headline(scores: dict) -> list[float]:
    """The five numbers of one candidate, each on 0..1, in ``METRICS`` order."""
    return [scores["bleu"]["score"] / 100, scores["chrf"] / 100,
            scores["rouge1"]["f1"], scores["rouge2"]["f1"], scores["rougeL"]["f1"]]  # fmt: skip


def run(args) -> None:
    rows = load_scoring_examples(args.examples)
    for row in rows:
        row["scores"] = score_breakdown(row["candidate"], row["reference"])
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "scores.json", {"examples": args.examples or "bundled", "rows": rows})
    plot(rows, out / "scores.png")
    print(f"{'group':<12} {'kind':<17} {'BLEU':>5} {'p1/p2/p3/p4':>15} {'BP':>5} {'chrF':>5}"
          f" {'R1 P/R/F':>14} {'R2 F':>5} {'RL F':>5}")  # fmt: skip
    for row in rows:
        s = row["scores"]
        b, r1 = s["bleu"], s["rouge1"]
        precisions = "/".join(f"{p:.0f}" for p in b["precisions"])
        print(f"{row['group'][:12]:<12} {row['kind'][:17]:<17} {b['score']:5.1f} {precisions:>15}"
              f" {b['bp']:5.2f} {s['chrf']:5.1f} {r1['precision']:4.2f}/{r1['recall']:4.2f}/"
              f"{r1['f1']:4.2f} {s['rouge2']['f1']:5.2f} {s['rougeL']['f1']:5.2f}")  # fmt: skip
    print("BLEU, chrF: 0..100 (sentence level, sacrebleu); ROUGE: 0..1 (rouge-score)")
    print(f"wrote {out / 'scores.json'}\nwrote {out / 'scores.png'}")


def plot(rows: list[dict], png: Path) -> None:
    """Left: the five scores of each kind of candidate (mean over groups). Middle: BLEU's
    pieces, the clipped n-gram precisions and the brevity penalty. Right: ROUGE-1 precision
    against recall."""
    from matplotlib.figure import Figure  # deferred: slow to import, only for plots

    kinds = list(dict.fromkeys(row["kind"] for row in rows))
    by_kind = {k: [row["scores"] for row in rows if row["kind"] == k] for k in kinds}

    def mean(kind: str, get) -> float:
        values = [get(s) for s in by_kind[kind]]
        values = [v for v in values if v is not None]
        return float(np.mean(values)) if values else float("nan")

    fig = Figure(figsize=(16, 4.8), layout="constrained")
    left, middle, right = fig.subplots(1, 3, width_ratios=[2.2, 2.2, 1.2])
    x = np.arange(len(kinds))
    width = 0.8 / len(METRICS)
    for m, name in enumerate(METRICS):
        heights = [mean(k, lambda s, m=m: headline(s)[m]) for k in kinds]
        left.bar(x + (m - 2) * width, heights, width, label=name)
    left.set_xticks(x, kinds, rotation=30, ha="right", fontsize=8)
    left.set(ylim=(0, 1.3), ylabel="score (BLEU and chrF / 100)", title="five scores per candidate")
    left.legend(fontsize=8, ncol=5, loc="upper right")
    pieces = [(f"p{n + 1}", lambda s, n=n: s["bleu"]["precisions"][n] / 100
               if n < len(s["bleu"]["precisions"]) else None) for n in range(4)]  # fmt: skip
    pieces.append(("brevity penalty", lambda s: s["bleu"]["bp"]))
    pieces.append(("BLEU", lambda s: s["bleu"]["score"] / 100))
    width = 0.8 / len(pieces)
    for p, (name, get) in enumerate(pieces):
        heights = [mean(k, get) for k in kinds]
        middle.bar(x + (p - 2.5) * width, heights, width, label=name,
                   color="black" if name == "BLEU" else None)  # fmt: skip
    middle.set_xticks(x, kinds, rotation=30, ha="right", fontsize=8)
    middle.set(ylim=(0, 1.3), title="BLEU = BP x geometric mean of p1..p4")
    middle.legend(fontsize=8, ncol=3, loc="upper right")
    points: dict[tuple[float, float], list[str]] = {}  # kinds on one point share a label
    for k in kinds:
        p = mean(k, lambda s: s["rouge1"]["precision"])
        r = mean(k, lambda s: s["rouge1"]["recall"])
        points.setdefault((round(r, 3), round(p, 3)), []).append(k)
    for (r, p), names in points.items():
        right.scatter(r, p, s=40)
        right.annotate(", ".join(names), (r, p), fontsize=8, xytext=(-4, -12),
                       textcoords="offset points", ha="right" if r > 0.6 else "left")  # fmt: skip
    right.set(xlim=(-0.05, 1.15), ylim=(-0.05, 1.1), xlabel="ROUGE-1 recall",
              ylabel="ROUGE-1 precision", title="ROUGE-1: precision vs recall")  # fmt: skip
    fig.suptitle("one reference, candidates of known kinds (mean over the groups)")
    atomic_write_with(png, lambda tmp: fig.savefig(tmp, format="png", dpi=90))
