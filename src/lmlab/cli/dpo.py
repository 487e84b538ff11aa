"""``lmlab dpo``: tune a model on preference pairs with DPO or IPO (``lmlab.align.dpo.dpo``)."""

from __future__ import annotations

from jsonargparse import ArgumentParser

from lmlab.align.dpo import dpo, run_summary
from lmlab.train import TrainConfig


def add_arguments(parser: ArgumentParser) -> None:
    parser.add_function_arguments(dpo, skip={"config", "callbacks"}, as_group=False)
    parser.add_class_arguments(TrainConfig, "train", help="the trainer's settings")
    parser.set_defaults(
        {
            "train.out_dir": "runs/dpo",
            "train.lr": 5e-6,
            "train.min_lr": 5e-7,
            "train.max_steps": 200,
        }
    )


def run(args) -> None:
    options = {k: v for k, v in vars(args).items() if k not in ("train", "config", "__path__")}
    result = dpo(**options, config=TrainConfig(**vars(args.train)))
    for line in run_summary(result):
        print(line)
