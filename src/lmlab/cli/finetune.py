"""``lmlab finetune``: adapt a model to instruction data (``lmlab.finetune.finetune``)."""

from __future__ import annotations

from jsonargparse import ArgumentParser

from lmlab.cli.args import add_log_arguments, log_config, options
from lmlab.cli.summaries import finetune_summary
from lmlab.finetune import LoRAConfig
from lmlab.finetune.run import finetune
from lmlab.train import TrainConfig


def add_arguments(parser: ArgumentParser) -> None:
    parser.add_function_arguments(finetune, skip={"config"}, as_group=False)
    parser.add_class_arguments(TrainConfig, "train", skip={"log"}, help="the trainer's settings")
    add_log_arguments(parser)
    parser.set_defaults(
        {"train.out_dir": "runs/finetune", "train.lr": 1e-4, "train.max_steps": 200}
    )


def run(args) -> None:
    lora = LoRAConfig(**options(args.lora))
    train = TrainConfig(**options(args.train), log=log_config(args))
    result = finetune(**options(args, skip=("train", "lora", "log")), lora=lora, config=train)
    for line in finetune_summary(result):
        print(line)
