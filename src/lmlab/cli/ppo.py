"""``lmlab ppo``: PPO against a reward on task prompts (``lmlab.align.ppo.ppo_from_files``)."""

from __future__ import annotations

from jsonargparse import ArgumentParser

from lmlab.align.ppo import PPOConfig, ppo_from_files
from lmlab.cli.args import options
from lmlab.cli.summaries import ppo_summary
from lmlab.finetune import LoRAConfig


def add_arguments(parser: ArgumentParser) -> None:
    parser.add_function_arguments(ppo_from_files, skip={"config"}, as_group=False)
    parser.add_class_arguments(PPOConfig, "ppo", help="the PPO settings")


def run(args) -> None:
    lora = LoRAConfig(**options(args.ppo.lora))
    config = PPOConfig(**options(args.ppo, skip=("lora",)), lora=lora)
    result = ppo_from_files(**options(args, skip=("ppo",)), config=config)
    for line in ppo_summary(result):
        print(line)
