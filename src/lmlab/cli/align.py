"""``lmlab align``: a reward model and DPO on a checkable task, before and after
(``lmlab.align.study``, lesson 9).

lmlab align --model smollm2 --task arithmetic --out runs/preferences
"""

from __future__ import annotations

from pathlib import Path

from jsonargparse import ArgumentParser

from lmlab.align.plots import plot_preferences
from lmlab.align.study import PreferenceConfig, preference_study, table
from lmlab.cli.args import options


def add_arguments(parser: ArgumentParser) -> None:
    parser.add_class_arguments(PreferenceConfig, as_group=False)
    parser.add_argument(
        "--out", type=str, default="runs/preferences", help="folder for the results"
    )
    parser.add_argument("--progress", type=bool, default=True, help="show progress bars")


def run(args) -> None:
    config = PreferenceConfig(**options(args, skip=("out", "progress")))
    out = Path(args.out)
    report = preference_study(config, out, progress=args.progress)
    runs = {
        "dpo_metrics": out / "dpo" / "metrics.jsonl",
        "reward_metrics": out / "reward" / "metrics.jsonl",
    }
    plot_preferences(
        report, out / "preferences.png", **{k: v for k, v in runs.items() if v.is_file()}
    )
    pairs = report["pairs"]["train"]
    print(f"pairs: {pairs['pairs']} from {pairs['prompts']} prompts ({pairs['sampled']} sampled "
          f"right over wrong, {pairs['reference']} the reference over a wrong sample); "
          f"{pairs['sample_accuracy']:.0%} of the samples were right")  # fmt: skip
    print(table(report))
    print(f"saved: {out}/preferences.json, preferences.png")
