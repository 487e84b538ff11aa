"""The figures of the alignment runs: ``dpo.png`` (``plot_dpo``) and ``ppo.png``
(``plot_ppo``), drawn from a run's metrics.

``lmlab.align.dpo.dpo`` and ``lmlab.align.ppo.ppo`` call them at the end of a run, so an API
user finds the figure in the run folder as a CLI user does; the algorithm modules
themselves draw nothing. matplotlib is imported inside each function: it is slow to import
and only needed here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lmlab.fileio import atomic_write_with
from lmlab.train.metrics import draw_series, note, read_metrics


def _draw_metrics(ax, records: list[dict[str, Any]], keys, title: str) -> bool:
    """Each of ``keys`` against step on ``ax``: the training records' values (solid) and
    the validation ones (``val_<key>``, dashed, with markers). -> whether anything was drawn
    (a legend then labels the lines)."""
    for key in keys:
        for event, prefix, style in (("train", "", "-"), ("eval", "val_", "--")):
            points = [
                (r["step"], r[prefix + key])
                for r in records
                if r.get("event") == event and r.get(prefix + key) is not None
            ]
            label = f"{'validation' if prefix else 'train'} {key.replace('rewards_', '')}"
            draw_series(ax, points, style, markers=bool(prefix) or None, label=label)
    ax.set_title(title, fontsize=9)
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)
    if ax.get_lines():
        ax.legend(fontsize=7)
    return bool(ax.get_lines())


def plot_dpo(metrics_path: str | Path, png_path: str | Path, eval_interval: int | None = None):
    """Implicit rewards, margin and reward accuracy (train and validation) and the
    validation KL to the reference, against step; a panel with nothing to show says why
    (``eval_interval``: how often validation runs, for that note). Returns the Figure."""
    from matplotlib.figure import Figure  # deferred: slow to import, only for plots

    records = read_metrics(metrics_path)
    fig = Figure(figsize=(15, 3.5), dpi=100)
    axes = fig.subplots(1, 4)
    panels = [
        (("rewards_chosen", "rewards_rejected"), "implicit reward (beta log ratio)"),
        (("margin",), "reward margin (chosen - rejected)"),
        (("reward_accuracy",), "reward accuracy"),
        (("kl",), "KL to the reference (nats per reply token)"),
    ]
    validated = any(r.get("event") == "eval" for r in records)
    for ax, (keys, title) in zip(axes, panels):
        if _draw_metrics(ax, records, keys, title):
            continue
        if keys == ("kl",) and validated:
            note(ax, "not measured in this run:\nno reference weights to compare with")
        elif keys == ("kl",):
            every = f": runs every {eval_interval} steps" if eval_interval else ""
            note(ax, f"no validation yet{every}")
        else:
            note(ax, "no step logged yet:\nlogged every log_interval steps")
    fig.tight_layout()
    fig.savefig(png_path)
    return fig


def plot_ppo(records: list[dict[str, Any]], png_path: str | Path):
    """Mean score and KL to the reference against iteration, saved as a PNG (an empty
    panel says no iteration has finished). Returns the Figure."""
    from matplotlib.figure import Figure  # deferred: slow to import, only for plots

    fig = Figure(figsize=(6, 4), dpi=100)
    ax = fig.add_subplot()
    steps = [r["step"] for r in records]
    draw_series(ax, list(zip(steps, [r["score"] for r in records])), markers=True, color="C0")
    ax.set_xlabel("iteration")
    ax.set_ylabel("mean score", color="C0")
    ax.grid(alpha=0.3)
    twin = ax.twinx()
    kl = list(zip(steps, [r["kl"] for r in records]))
    draw_series(twin, kl, "--", markers=True, color="C1", marker="s")
    twin.set_ylabel("KL to the reference (nats per sequence)", color="C1")
    if not records:
        note(ax, "no iteration finished yet")
    fig.tight_layout()
    fig.savefig(png_path)
    return fig


def plot_preferences(
    report: dict[str, Any],
    png_path: str | Path,
    dpo_metrics: str | Path | None = None,
    reward_metrics: str | Path | None = None,
):
    """``lmlab align``'s figure: DPO's implicit rewards and margin (train and validation),
    its KL to the reference, the reward model's margin as it trains, and the accuracies
    before and after (``lmlab.align.study``). Returns the Figure."""
    from matplotlib.figure import Figure  # deferred: slow to import, only for plots

    fig = Figure(figsize=(16, 3.6), dpi=100)
    axes = fig.subplots(1, 4)
    dpo = read_metrics(dpo_metrics) if dpo_metrics else []
    rm = read_metrics(reward_metrics) if reward_metrics else []
    panels = [
        (axes[0], dpo, ("rewards_chosen", "rewards_rejected", "margin"), "DPO: implicit reward"),
        (axes[1], dpo, ("kl",), "DPO: KL to the reference (nats per reply token)"),
        (axes[2], rm, ("margin",), "reward model: reward margin (chosen - rejected)"),
    ]
    for ax, records, keys, title in panels:
        if not _draw_metrics(ax, records, keys, title):
            note(ax, "not run" if not records else "not logged")
    bars = [("test accuracy\nas loaded", report["accuracy_before"])]
    if "dpo" in report:
        bars.append(("test accuracy\nafter DPO", report["dpo"]["accuracy_after"]))
    if "reward" in report:
        bars += [
            ("RM: validation\npairs", report["reward"]["val_accuracy"]),
            ("RM: right vs\nnear miss", report["reward"]["near_miss_accuracy"]),
        ]
    names, values = zip(*bars)
    drawn = axes[3].bar(range(len(values)), values, color=["0.6", "C0", "C2", "C3"][: len(bars)])
    axes[3].bar_label(drawn, fmt="%.2f", fontsize=8)
    axes[3].set_xticks(range(len(values)), names, fontsize=7)
    axes[3].set(ylim=(0, 1.1), title="accuracy (greedy answers; RM: pairs ranked right)")
    axes[3].title.set_fontsize(9)
    fig.tight_layout()
    atomic_write_with(png_path, lambda tmp: fig.savefig(tmp, format="png"))
    return fig
