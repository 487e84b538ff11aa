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

from lmlab.train.metrics import read_metrics


def plot_dpo(metrics_path: str | Path, png_path: str | Path) -> None:
    """Implicit rewards, margin and reward accuracy (train and validation) and the
    validation KL to the reference, against step."""
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
    for ax, (keys, title) in zip(axes, panels):
        for key in keys:
            for event, prefix, style in (("train", "", "-"), ("eval", "val_", "o--")):
                points = [
                    (r["step"], r[prefix + key])
                    for r in records
                    if r.get("event") == event and r.get(prefix + key) is not None
                ]
                if points:
                    label = f"{'validation' if prefix else 'train'} {key.replace('rewards_', '')}"
                    ax.plot(*zip(*points), style, label=label, markersize=3, linewidth=1)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if ax.get_lines():
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(png_path)


def plot_ppo(records: list[dict[str, Any]], png_path: str | Path) -> None:
    """Mean score and KL to the reference against iteration, saved as a PNG."""
    from matplotlib.figure import Figure  # deferred: slow to import, only for plots

    fig = Figure(figsize=(6, 4), dpi=100)
    ax = fig.add_subplot()
    steps = [r["step"] for r in records]
    ax.plot(steps, [r["score"] for r in records], "o-", color="C0", markersize=3)
    ax.set_xlabel("iteration")
    ax.set_ylabel("mean score", color="C0")
    ax.grid(alpha=0.3)
    twin = ax.twinx()
    twin.plot(steps, [r["kl"] for r in records], "s--", color="C1", markersize=3)
    twin.set_ylabel("KL to the reference (nats per sequence)", color="C1")
    fig.tight_layout()
    fig.savefig(png_path)
