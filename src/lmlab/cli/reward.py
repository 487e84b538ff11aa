"""``lmlab reward``: train a reward model on preference pairs
(``lmlab.align.reward.train_reward_model``)."""

from __future__ import annotations

from jsonargparse import ArgumentParser

from lmlab.align.reward import train_reward_model
from lmlab.cli.args import add_log_arguments, log_config, options
from lmlab.cli.summaries import reward_summary
from lmlab.finetune import LoRAConfig
from lmlab.train import TrainConfig, distributed


def add_arguments(parser: ArgumentParser) -> None:
    parser.add_function_arguments(train_reward_model, skip={"config"}, as_group=False)
    parser.add_class_arguments(TrainConfig, "train", skip={"log"}, help="the trainer's settings")
    add_log_arguments(parser)
    parser.set_defaults(
        {
            "train.out_dir": "runs/reward",
            "train.lr": 1e-5,
            "train.min_lr": 1e-6,
            "train.max_steps": 200,
        }
    )


def run(args) -> None:
    lora = LoRAConfig(**options(args.lora))
    train = TrainConfig(**options(args.train), log=log_config(args))
    result = train_reward_model(
        **options(args, skip=("train", "lora", "log")), lora=lora, config=train
    )
    if distributed.setup(train.device).main:  # under torchrun, rank 0 reports
        for line in reward_summary(result):
            print(line)
