"""``lmlab finetune``: adapt a model to instruction data (``lmlab.finetune.finetune``), or,
with ``--task sequence|token|span``, fine-tune an encoder's head on its bundled task and
score it before and after (``lmlab.eval.heads.finetune_head``)."""

from __future__ import annotations

from jsonargparse import ArgumentParser

from lmlab.cli.args import add_log_arguments, log_config, options
from lmlab.cli.summaries import finetune_summary, head_summary_lines
from lmlab.errors import ConfigError
from lmlab.eval.heads import HEADS, STRATEGIES, finetune_head
from lmlab.finetune import LoRAConfig
from lmlab.finetune.run import finetune
from lmlab.train import TrainConfig, distributed

HEAD_FLAGS = ("task", "strategy", "doc_stride")


def add_arguments(parser: ArgumentParser) -> None:
    parser.add_function_arguments(finetune, skip={"config"}, as_group=False)
    parser.add_argument(
        "--task",
        type=str | None,
        default=None,
        help=f"fine-tune an encoder head on its bundled task instead of instruction data: "
        f"{', '.join(HEADS)} (sentiment accuracy, NER entity F1, extractive-QA EM/F1); "
        "--method full or lora, --data is not read",
    )
    parser.add_argument(
        "--strategy",
        type=str,
        default="first",
        help=f"token head: word labels from subword scores by {', '.join(STRATEGIES)}",
    )
    parser.add_argument(
        "--doc_stride",
        type=int,
        default=32,
        help="span head: tokens shared by consecutive windows of a long context (with --max_len)",
    )
    parser.add_class_arguments(TrainConfig, "train", skip={"log"}, help="the trainer's settings")
    add_log_arguments(parser)
    parser.set_defaults(
        {"train.out_dir": "runs/finetune", "train.lr": 1e-4, "train.max_steps": 200}
    )


def run(args) -> None:
    lora = LoRAConfig(**options(args.lora))
    train = TrainConfig(**options(args.train), log=log_config(args))
    if args.task is not None:
        if args.data != "train.jsonl" or args.val_data is not None:
            raise ConfigError(
                "--task fine-tunes a head on its bundled task and reads no --data or "
                "--val_data; drop them, or drop --task to fine-tune on instruction data"
            )
        result = finetune_head(
            args.model,
            args.task,
            args.method,
            args.strategy,
            args.max_len,
            args.doc_stride,
            lora=lora,
            config=train,
        )
        for line in head_summary_lines(result):
            print(line)
        return
    result = finetune(
        **options(args, skip=("train", "lora", "log", *HEAD_FLAGS)), lora=lora, config=train
    )
    if distributed.setup(train.device).main:  # under torchrun, rank 0 reports
        for line in finetune_summary(result):
            print(line)
