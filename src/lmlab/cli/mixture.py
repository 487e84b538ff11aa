"""``lmlab mixture``: single-task fine-tuning against a FLAN-style mixture, measured on
every bundled task in seen and unseen wording (``lmlab.finetune.mixture``).

lmlab mixture --model smollm2 --single arithmetic --held_out format --out runs/mixture
"""

from __future__ import annotations

from pathlib import Path

from jsonargparse import ArgumentParser

from lmlab.cli.args import options
from lmlab.fileio import atomic_write_with
from lmlab.finetune.mixture import MixtureConfig, mixture_study, table


def add_arguments(parser: ArgumentParser) -> None:
    parser.add_class_arguments(MixtureConfig, as_group=False)
    parser.add_argument("--out", type=str, default="runs/mixture", help="folder for the results")


def run(args) -> None:
    from matplotlib.figure import Figure  # deferred: slow to import, only for plots

    config = MixtureConfig(**options(args, skip=("out",)))
    out = Path(args.out)
    report = mixture_study(config, out)

    tasks, models = report["tasks"], list(report["models"])
    fig = Figure(figsize=(11, 4))
    axes = fig.subplots(1, 2, sharey=True)
    width = 0.8 / len(models)
    for ax, how in zip(axes, ("seen", "unseen")):
        for i, name in enumerate(models):
            values = [report["models"][name]["accuracy"][t][how] for t in tasks]
            bars = ax.bar([x + i * width for x in range(len(tasks))], values, width, label=name)
            for bar, task in zip(bars, tasks):
                if task in report["trained"][name]:
                    bar.set_hatch("//")
        labels = [t + ("\n(held out)" if t == config.held_out else "") for t in tasks]
        ax.set_xticks([x + width * (len(models) - 1) / 2 for x in range(len(tasks))], labels)
        wording = "the generator's wording" if how == "seen" else "a wording no run trained on"
        ax.set(title=f"accuracy, asked in {wording}", ylim=(0, 1.05))
    axes[0].set_ylabel("held-out accuracy (hatched: trained on)")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    atomic_write_with(out / "mixture.png", lambda tmp: fig.savefig(tmp, format="png", dpi=100))

    print(table(report))
    print("cells: accuracy in seen / unseen wording; * trained on that task")
    print(f"saved: {out}/mixture.json, mixture.png")
