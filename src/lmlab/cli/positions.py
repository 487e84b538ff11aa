"""``lmlab positions``: learned, sinusoidal, rotary and no positions on a task where order
is everything, the k-th token (``lmlab.train.ablations.compare_positions``).

lmlab positions --out runs/positions
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from jsonargparse import ArgumentParser

from lmlab.cli.args import options
from lmlab.fileio import atomic_write_json
from lmlab.train.ablations import PositionsConfig, compare_positions


def add_arguments(parser: ArgumentParser) -> None:
    parser.add_class_arguments(PositionsConfig, as_group=False)
    parser.add_argument("--out", type=str, default="runs/positions", help="folder for the results")


def run(args) -> None:
    from matplotlib.figure import Figure  # deferred: slow to import, only for plots

    config = PositionsConfig(**options(args, skip=("out",)))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report = compare_positions(config)
    atomic_write_json(out / "positions.json", {"config": dataclasses.asdict(config), **report})

    # 1. The encodings: the fixed sinusoids, and what learned embeddings became.
    panels = [("sinusoidal (fixed, Vaswani et al.)", report["sinusoidal"])]
    if "learned" in report:
        panels.append(("learned, after training", report["learned"]))
    fig = Figure(figsize=(5.5 * len(panels), 3.8))
    for ax, (title, table) in zip(fig.subplots(1, len(panels), squeeze=False)[0], panels):
        image = ax.imshow(table, aspect="auto", cmap="RdBu_r", interpolation="nearest")
        ax.set(title=title, xlabel="dimension", ylabel="position")
        fig.colorbar(image, ax=ax)
    fig.tight_layout()
    fig.savefig(out / "encodings.png", dpi=100)

    # 2. Held-out accuracy of each scheme during training.
    fig = Figure(figsize=(7, 4))
    ax = fig.subplots()
    for kind, curve in report["curves"].items():
        steps, accuracy = [c[0] for c in curve], [c[1] for c in curve]
        ax.plot(steps, accuracy, marker=".", label=f"{kind} ({accuracy[-1]:.3f})")
    ax.axhline(report["chance"], color="grey", ls=":", lw=1)
    ax.text(steps[-1], report["chance"] + 0.02, "chance", color="grey", ha="right", fontsize=8)
    ax.set(
        title=f"the k-th of {config.n_tokens} tokens: held-out accuracy",
        xlabel="training step",
        ylabel="accuracy",
        ylim=(0, 1.05),
    )
    ax.legend(fontsize=8, title="positions")
    fig.tight_layout()
    fig.savefig(out / "curves.png", dpi=100)

    print(f"{'positions':12s} held-out accuracy (chance {report['chance']:.3f})")
    for kind, accuracy in report["final"].items():
        print(f"{kind:12s} {accuracy:.3f}")
    print(f"saved: {out}/positions.json, encodings.png, curves.png")
