"""``lmlab finetune``: adapt a model to instruction data (``lmlab.finetune.finetune``)."""

from __future__ import annotations

from jsonargparse import ArgumentParser

from lmlab.finetune.run import finetune, run_summary
from lmlab.train import TrainConfig


def add_arguments(parser: ArgumentParser) -> None:
    parser.add_function_arguments(finetune, skip={"config"}, as_group=False)
    parser.add_class_arguments(TrainConfig, "train", help="the trainer's settings")
    parser.set_defaults(
        {"train.out_dir": "runs/finetune", "train.lr": 1e-4, "train.max_steps": 200}
    )


def run(args) -> None:
    options = {k: v for k, v in vars(args).items() if k not in ("train", "config", "__path__")}
    result = finetune(**options, config=TrainConfig(**vars(args.train)))
    for line in run_summary(result):
        print(line)
