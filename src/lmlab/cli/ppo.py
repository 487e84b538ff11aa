"""``lmlab ppo``: PPO against a reward on task prompts (``lmlab.align.ppo.ppo_from_files``)."""

from __future__ import annotations

from jsonargparse import ArgumentParser

from lmlab.align.ppo import PPOConfig, PPOResult, ppo_from_files
from lmlab.finetune.run import written_lines


def add_arguments(parser: ArgumentParser) -> None:
    parser.add_function_arguments(ppo_from_files, skip={"config"}, as_group=False)
    parser.add_class_arguments(PPOConfig, "ppo", help="the PPO settings")


def summary(result: PPOResult) -> list[str]:
    """Lines the CLI prints."""
    lines = [f"PPO: {result.iterations} iterations in {result.wall_time_s:.0f} s"]
    if result.metrics:
        last = result.metrics[-1]
        first = result.metrics[0]
        lines.append(
            f"mean score {first['score']:.3f} (first iteration) -> {last['score']:.3f} (last); "
            f"KL to the reference {last['kl']:.4f} nats per sequence"
        )
    return lines + written_lines(result.adapter_dir, result.model_dir, result.plot)


def run(args) -> None:
    options = {k: v for k, v in vars(args).items() if k not in ("ppo", "config", "__path__")}
    result = ppo_from_files(**options, config=PPOConfig(**vars(args.ppo)))
    for line in summary(result):
        print(line)
