"""Regenerate the figures of lessons 3 to 7 (the model ladder). From the repository root:

    .venv/bin/python docs/lessons/figures.py ngram          # lesson 3: fits 48 n-gram models
    .venv/bin/python docs/lessons/figures.py feedforward    # lessons 4 and 5 (reads runs/)
    .venv/bin/python docs/lessons/figures.py context_sweep  # lesson 4, window size (reads runs/)
    .venv/bin/python docs/lessons/figures.py recurrent      # lesson 6 (reads runs/)
    .venv/bin/python docs/lessons/figures.py schedules      # lesson 7, instant
    .venv/bin/python docs/lessons/figures.py objectives     # lesson 7 (reads runs/)

The training runs themselves are the `lmlab compare` / `lmlab train` commands printed on
each lesson page, writing under runs/lessons/; this script fits the n-grams (lesson 3),
draws the keep-probability schedules (lesson 7), scores the trained runs and plots their
metrics.jsonl. PNGs go to docs/lessons/figures/.
"""

from __future__ import annotations

import json
import math
import sys
import time
import warnings
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


# ----------------------------------------------------------------------------- lesson 3


def ngram() -> None:
    import numpy as np

    from lmlab.api import prepare_data
    from lmlab.models import build_model
    from lmlab.models.ngram import ngram_perplexity

    tok, train, val = prepare_data("tinyshakespeare", ROOT / "runs/lessons/ngram", "char")
    train, val = np.asarray(train, dtype=np.int64), np.asarray(val, dtype=np.int64)
    orders = range(1, 8)
    methods = [
        "mle",
        "add_k",
        "backoff",
        "witten_bell",
        "linear_interpolation",
        "kneser_ney",
        "modified_kneser_ney",
    ]
    table: dict[str, list[float]] = {m: [] for m in methods}
    for method in methods:
        for n in orders:
            if method in ("kneser_ney", "modified_kneser_ney") and n == 1:
                table[method].append(math.nan)  # KN needs bigrams
                continue
            spec = dict(family="ngram", vocab_size=tok.vocab_size, order=n, smoothing=method)
            t0 = time.perf_counter()
            model = build_model(spec).fit(train)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # MLE's "perplexity is infinite" warning
                ppl = ngram_perplexity(model, val)
            table[method].append(ppl)
            print(
                f"{method:20s} n={n}  val perplexity {ppl:8.3f}  ({time.perf_counter() - t0:.1f} s)"
            )
            if method == "linear_interpolation":
                weights = ", ".join(f"{w:.3f}" for w in model.interpolation_weights.tolist())
                print(f"{'':20s}      EM weights lambda_0..{n}: {weights}")
    (ROOT / "runs/lessons/ngram.json").write_text(
        json.dumps({m: table[m] for m in methods}, indent=1)
    )
    plot_ngram()


def plot_ngram() -> None:
    """Draw ngram-orders.png from the perplexities ngram() saved in runs/lessons/ngram.json."""
    from matplotlib.ticker import NullFormatter

    table = json.loads((ROOT / "runs/lessons/ngram.json").read_text())
    orders = range(1, 8)
    fig, ax = plt.subplots(figsize=(7, 4.3))
    styles = {
        "mle": ("MLE (no smoothing)", "k", "x"),
        "add_k": ("add-1 (Laplace)", "tab:red", "o"),
        "backoff": ("backoff, D=0.75", "tab:orange", "s"),
        "witten_bell": ("Witten-Bell", "tab:purple", "D"),
        "linear_interpolation": ("linear interpolation (EM weights)", "tab:brown", "P"),
        "kneser_ney": ("interpolated Kneser-Ney, D=0.75", "tab:blue", "^"),
        "modified_kneser_ney": ("modified Kneser-Ney", "tab:green", "v"),
    }
    for method, (label, color, marker) in styles.items():
        ppl = [math.inf if p is None else p for p in table[method]]  # json has no inf
        xs = [n for n, p in zip(orders, ppl) if math.isfinite(p)]
        ys = [p for p in ppl if math.isfinite(p)]
        ax.plot(xs, ys, marker=marker, color=color, label=label)
        inf = [n for n, p in zip(orders, ppl) if math.isinf(p)]
        if inf:
            ax.plot(inf, [45] * len(inf), "x", color=color, markersize=9, mew=2)
            ax.text(
                4.5,
                36,
                "MLE, n >= 2: infinite (unseen n-grams)",
                fontsize=8,
                color=color,
                ha="center",
            )
    ax.axhline(65, color="gray", lw=0.8, ls=":")
    ax.text(7, 58, "uniform guess (65)", fontsize=8, color="gray", ha="right")
    ax.set_yscale("log")
    ax.set_ylim(3.5, 80)
    ax.yaxis.set_minor_formatter(NullFormatter())
    ax.set_yticks([4, 5, 7, 10, 15, 20, 30, 65])
    ax.set_yticklabels(["4", "5", "7", "10", "15", "20", "30", "65"])
    ax.set_xlabel("order n (the model reads the n - 1 previous characters)")
    ax.set_ylabel("validation perplexity (log scale)")
    ax.set_title("n-gram LMs on Tiny Shakespeare, characters")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower left")
    save(fig, "ngram-orders.png")


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


def curves(runs: dict[str, Path], name: str, title: str, ylim=None) -> None:
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for label, run in runs.items():
        xs, ys = zip(*evals(run))
        ax.plot(xs, ys, "o-", ms=3, label=f"{label} ({ys[-1]:.2f})")
    ax.set_xlabel("optimizer step (32 x 128 characters each)")
    ax.set_ylabel("validation loss (nats/char)")
    ax.set_title(title)
    if ylim:
        ax.set_ylim(*ylim)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    save(fig, name)


def reference(ax, nats: float, text: str, color="gray", left=False) -> None:
    ax.axhline(nats, color=color, ls="--", lw=1)
    x = ax.get_xlim()[0] if left else ax.get_xlim()[1]
    ax.text(
        x, nats, f" {text} ", fontsize=8, color=color, ha="left" if left else "right", va="bottom"
    )


def scored(runs: Path) -> dict[str, float]:
    """Each model's validation loss over the whole validation split, from compare.json."""
    models = json.loads((runs / "compare.json").read_text())["models"]
    return {m["name"]: m["val_loss"] for m in models}


def feedforward() -> None:
    """Lessons 4 and 5, from `lmlab compare ... --out_dir runs/lessons/feedforward`."""
    runs = ROOT / "runs/lessons/feedforward"
    final = scored(runs)
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for label, name, color in [
        ("bigram (learned)", "bigram", "tab:red"),
        ("fixed-window MLP, K=8", "mlp", "tab:blue"),
    ]:
        xs, ys = zip(*evals(runs / name))
        ax.plot(xs, ys, "o-", ms=3, color=color, label=f"{label}: {final[name]:.2f}")
    ax.set_xlim(0, 1000)
    reference(ax, math.log(11.964), "counted bigram, add-1 (lesson 3): 2.48")
    reference(ax, math.log(4.789), "counted 5-gram, Kneser-Ney (lesson 3): 1.57")
    ax.set_xlabel("optimizer step (32 x 128 characters each)")
    ax.set_ylabel("validation loss (nats/char)")
    ax.set_title("Bengio et al.'s MLP against the bigram, same 4M characters")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, title="whole validation split, nats/char", title_fontsize=8)
    save(fig, "mlp-vs-bigram.png")

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for label, name, color in [
        ("bag of context, mean", "bag", "tab:purple"),
        ("bag of context, sum", "bag-sum", "tab:pink"),
        ("bigram (learned)", "bigram", "tab:red"),
        ("fixed-window MLP, K=8", "mlp", "tab:blue"),
    ]:
        xs, ys = zip(*evals(runs / name))
        ax.plot(xs, ys, "o-", ms=3, color=color, label=f"{label}: {final[name]:.2f}")
    ax.set_xlim(0, 1000)
    reference(ax, math.log(28.427), "letter frequencies (unigram): 3.35", left=True)
    reference(ax, math.log(11.964), "counted bigram: 2.48", left=True)
    ax.set_xlabel("optimizer step (32 x 128 characters each)")
    ax.set_ylabel("validation loss (nats/char)")
    ax.set_title("Adding up the context throws away its order")
    ax.grid(alpha=0.3)
    ax.legend(
        fontsize=8,
        loc="lower right",
        bbox_to_anchor=(1, 0.12),
        title="whole validation split, nats/char",
        title_fontsize=8,
    )
    save(fig, "bag-vs-mlp.png")


def context_sweep() -> None:
    """Lesson 4's second figure: mlp-char with K = 1, 2, 4, 8, 16, 300 steps each (the K = 8
    run is lesson 7's teacher-forcing run, the same command without an override)."""
    import numpy as np
    import torch

    import lmlab
    from lmlab.eval.perplexity import token_nll

    runs = {1: "mlp-k1", 2: "mlp-k2", 4: "mlp-k4", 8: "ss-teacher_forcing", 16: "mlp-k16"}
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


def recurrent() -> None:
    """Lesson 6, from `lmlab compare --models rnn,gru,lstm ... --out_dir runs/lessons/recurrent`."""
    runs = ROOT / "runs/lessons/recurrent"
    final = scored(runs)
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for label, name, color in [
        ("Elman RNN", "rnn", "tab:orange"),
        ("GRU", "gru", "tab:purple"),
        ("LSTM", "lstm", "tab:green"),
    ]:
        xs, ys = zip(*evals(runs / name))
        ax.plot(xs, ys, "o-", ms=3, color=color, label=f"{label}: {final[name]:.2f}")
    reference(ax, math.log(11.964), "counted bigram: 2.48")
    reference(ax, math.log(4.789), "counted 5-gram, Kneser-Ney: 1.57")
    ax.set_xlabel("optimizer step (32 x 128 characters each)")
    ax.set_ylabel("validation loss (nats/char)")
    ax.set_title("Recurrent LMs (2 layers x 256), same characters each")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, title="whole validation split, nats/char", title_fontsize=8)
    save(fig, "rnn-gru-lstm.png")


def objectives() -> None:
    """Lesson 7, from the three `lmlab train --model mlp-char --train.objective ...` runs."""
    import numpy as np
    import torch

    import lmlab
    from lmlab.train.objectives import mix_inputs

    runs = {
        "teacher forcing": "ss-teacher_forcing",
        "scheduled sampling (linear)": "ss-linear",
        "free-running": "ss-free_running",
    }
    colors = ["tab:blue", "tab:orange", "tab:red"]
    # Fixed validation windows: 64 rows of 129 characters spread over the split.
    val = np.fromfile(ROOT / "runs/lessons/ss-teacher_forcing/data/val.bin", dtype=np.uint16)
    starts = np.linspace(0, len(val) - 130, 64).astype(int)
    windows = torch.tensor(np.stack([val[s : s + 129] for s in starts]).astype(np.int64))
    x, y = windows[:, :-1], windows[:, 1:]
    keeps = [1.0, 0.75, 0.5, 0.25, 0.0]
    table = {}
    for label, run in runs.items():
        model = lmlab.load(ROOT / "runs/lessons" / run, dtype="float32").model.eval()
        row = []
        for keep in keeps:
            losses = []
            for seed in range(3):  # average over three draws of the model's samples
                torch.manual_seed(seed)
                with torch.no_grad():
                    logits = model(mix_inputs(model, x, keep))
                    losses.append(
                        torch.nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten()).item()
                    )
            row.append(sum(losses) / len(losses))
        table[label] = row
        print(f"{label:28s}", "  ".join(f"keep {k:.2f}: {v:.3f}" for k, v in zip(keeps, row)))

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    for (label, run), color in zip(runs.items(), colors):
        xs, ys = zip(*evals(ROOT / "runs/lessons" / run))
        ax1.plot(xs, ys, "o-", ms=3, color=color, label=label)
        ax2.plot(keeps, table[label], "o-", color=color, label=label)
    ax1.set_xlabel("optimizer step (32 x 128 characters each)")
    ax1.set_ylabel("validation loss, true inputs (nats/char)")
    ax1.set_title("Training: evaluated with teacher forcing")
    ax1.grid(alpha=0.3)
    ax1.legend(fontsize=8)
    ax2.invert_xaxis()
    ax2.set_xlabel("eps: share of inputs that are true (rest: own samples)")
    ax2.set_ylabel("validation loss (nats/char)")
    ax2.set_title("After training: fed its own samples")
    ax2.grid(alpha=0.3)
    ax2.legend(fontsize=8)
    save(fig, "ss-training.png")


if __name__ == "__main__":
    FIGURES.mkdir(exist_ok=True)
    what = sys.argv[1:] or ["ngram", "schedules"]
    for w in what:
        globals()[w]()
