"""``lmlab pretrain``: pretrain a BERT encoder from scratch with masked-LM and
next-sentence prediction (``lmlab.train.bert.pretrain_encoder``)."""

from __future__ import annotations

from jsonargparse import ArgumentParser

from lmlab.cli.args import add_log_arguments, log_config, options
from lmlab.train import TrainConfig
from lmlab.train.bert import pretrain_encoder


def add_arguments(parser: ArgumentParser) -> None:
    parser.add_function_arguments(pretrain_encoder, skip={"config"}, as_group=False)
    parser.add_class_arguments(TrainConfig, "train", skip={"log"}, help="the trainer's settings")
    add_log_arguments(parser)
    parser.set_defaults({"train.out_dir": "runs/bert", "train.batch_size": 32, "train.lr": 5e-4})


def run(args) -> None:
    config = TrainConfig(**options(args.train), log=log_config(args))
    result = pretrain_encoder(**options(args, skip=("train", "log")), config=config)
    print(
        f"trained {result.step} step{'' if result.step == 1 else 's'} in {result.wall_time_s:.0f} s"
    )
    print(f"checkpoint: {result.checkpoint}")
    print(
        f"run directory: {config.out_dir} (metrics.jsonl with mlm/nsp loss and accuracy, pretraining.png)"
    )
