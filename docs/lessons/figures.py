"""The figures of lessons 4 and 7 that their one command does not draw. From the
repository root:

    .venv/bin/python docs/lessons/figures.py context_sweep  # lesson 4, window size (reads runs/)
    .venv/bin/python docs/lessons/figures.py schedules      # lesson 7, instant

The lessons' own commands (`lmlab ngrams`, `lmlab compare`) write their figures
themselves; the window-size runs are the `lmlab train` loop on lesson 4's page, writing
under runs/lessons/. PNGs go to docs/lessons/figures/.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

HERE = Path(__file__).resolve().parent
FIGURES = HERE / "figures"
ROOT = HERE.parent.parent


def save(fig, name: str) -> None:
    FIGURES.mkdir(exist_ok=True)
    fig.tight_layout()
    fig.savefig(FIGURES / name, dpi=90)
    plt.close(fig)
    print("wrote", FIGURES / name, f"{(FIGURES / name).stat().st_size // 1024} KB")


def evals(run_dir: Path) -> list[tuple[int, float]]:
    """(step, val_loss) of every eval event in a run's metrics.jsonl."""
    out = []
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        if r.get("event") == "eval":
            out.append((int(r["step"]), float(r["val_loss"])))
    return out


def schedules() -> None:
    from lmlab.train.objectives import keep_probability

    steps = range(0, 2001, 10)
    fig, ax = plt.subplots(figsize=(7, 3.8))
    curves = [
        ("linear, k=1, c=0.0005, eps_min=0.1", "linear", dict(k=1.0, c=0.0005, eps_min=0.1)),
        ("exponential, k=0.998", "exponential", dict(k=0.998)),
        ("inverse sigmoid, k=200", "inverse_sigmoid", dict(k=200.0)),
    ]
    for label, schedule, kw in curves:
        ax.plot(list(steps), [keep_probability(s, schedule, **kw) for s in steps], label=label)
    ax.axhline(1.0, color="gray", ls="--", lw=1)
    ax.axhline(0.0, color="gray", ls="--", lw=1)
    ax.text(1990, 0.95, "teacher forcing", ha="right", va="top", fontsize=8, color="gray")
    ax.text(1990, 0.05, "free-running", ha="right", va="bottom", fontsize=8, color="gray")
    ax.set_xlabel("training step i")
    ax.set_ylabel("eps_i = P(feed the true token)")
    ax.set_title("Scheduled sampling: the three schedules of Bengio et al. (2015)")
    ax.set_ylim(-0.03, 1.03)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="center right")
    save(fig, "ss-schedules.png")


def context_sweep() -> None:
    """Lesson 4's second figure: mlp-char with K = 1, 2, 4, 8, 16, 300 steps each."""
    import numpy as np
    import torch

    import lmlab
    from lmlab.eval.perplexity import token_nll

    runs = {k: f"mlp-k{k}" for k in (1, 2, 4, 8, 16)}
    val = np.fromfile(ROOT / "runs/lessons/mlp-k1/data/val.bin", dtype=np.uint16).astype(np.int64)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    final = {}
    for k, run in runs.items():
        lm = lmlab.load(ROOT / "runs/lessons" / run, dtype="float32")
        with torch.no_grad():
            final[k] = token_nll(lm.model.eval(), val, stride=128, context=128).mean().item()
        n_params = sum(p.numel() for p in lm.model.parameters())
        print(f"K={k:2d}  {n_params:,} parameters  whole-validation loss {final[k]:.4f}")
        xs, ys = zip(*evals(ROOT / "runs/lessons" / run))
        ax1.plot(xs, ys, "o-", ms=3, label=f"K = {k}")
    ax1.set_xlabel("optimizer step (32 x 128 characters each)")
    ax1.set_ylabel("validation loss (nats/char)")
    ax1.set_title("mlp-char, window of K characters")
    ax1.grid(alpha=0.3)
    ax1.legend(fontsize=8)
    ks = list(final)
    ax2.plot(ks, [final[k] for k in ks], "o-", color="tab:blue", label="MLP, 300 steps")
    ax2.set_xscale("log", base=2)
    ax2.set_xticks(ks)
    ax2.set_xticklabels([str(k) for k in ks])
    counted = {2: 11.964, 3: 7.676, 5: 4.764, 7: 4.556}  # lesson 3: best count model per n
    ax2.plot(
        [n - 1 for n in counted],
        [math.log(p) for p in counted.values()],
        "s--",
        color="gray",
        label="best counted n-gram (lesson 3)",
    )
    ax2.set_xlabel("context K (characters the model reads)")
    ax2.set_ylabel("validation loss (nats/char)")
    ax2.set_title("Longer windows, same 300 steps")
    ax2.grid(alpha=0.3)
    ax2.legend(fontsize=8)
    save(fig, "mlp-context.png")


if __name__ == "__main__":
    FIGURES.mkdir(exist_ok=True)
    what = sys.argv[1:] or ["schedules"]
    for w in what:
        globals()[w]()
