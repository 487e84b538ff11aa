"""``lmlab dpo``: tune a model on preference pairs with DPO or IPO (``lmlab.align.dpo.dpo``)."""

from __future__ import annotations

from jsonargparse import ArgumentParser

from lmlab.align.dpo import dpo
from lmlab.cli.args import add_log_arguments, log_config, options
from lmlab.cli.summaries import dpo_summary
from lmlab.finetune import LoRAConfig
from lmlab.train import TrainConfig, distributed


def add_arguments(parser: ArgumentParser) -> None:
    parser.add_function_arguments(dpo, skip={"config", "callbacks"}, as_group=False)
    parser.add_class_arguments(TrainConfig, "train", skip={"log"}, help="the trainer's settings")
    add_log_arguments(parser)
    parser.set_defaults(
        {
            "train.out_dir": "runs/dpo",
            "train.lr": 5e-6,
            "train.min_lr": 5e-7,
            "train.max_steps": 200,
        }
    )


def run(args) -> None:
    lora = LoRAConfig(**options(args.lora))
    train = TrainConfig(**options(args.train), log=log_config(args))
    result = dpo(**options(args, skip=("train", "lora", "log")), lora=lora, config=train)
    if distributed.setup(train.device).main:  # under torchrun, rank 0 reports
        for line in dpo_summary(result):
            print(line)
