"""``lmlab train``: tokenize a corpus, build a model, train it (``lmlab.api.train``)."""

from __future__ import annotations

import math

from jsonargparse import ArgumentParser

from lmlab import api
from lmlab.train import TrainConfig


def add_arguments(parser: ArgumentParser) -> None:
    parser.add_function_arguments(api.train, skip={"config"}, as_group=False)
    parser.add_class_arguments(TrainConfig, "train", help="the trainer's settings")


def run(args) -> None:
    options = {k: v for k, v in vars(args).items() if k not in ("train", "config", "__path__")}
    config = TrainConfig(**vars(args.train))
    result = api.train(**options, config=config)
    if result.step == 0 and result.val_losses:  # a count-based model: fitted, not trained
        loss = result.val_losses[-1][1]
        print(f"fitted in {result.wall_time_s:.2f} s ({result.tokens_per_s:,.0f} tokens/s)")
        print(f"validation loss {loss:.4f} (perplexity {math.exp(loss):.2f})")
        print(f"checkpoint: {result.checkpoint}")
        return
    print(
        f"trained {result.step} steps in {result.wall_time_s:.0f} s ({result.tokens_per_s:,.0f} tokens/s)"
    )
    if result.val_losses:
        step, loss = result.val_losses[-1]
        print(f"validation loss {loss:.4f} (perplexity {math.exp(loss):.2f}) at step {step}")
    if result.skipped:
        print(
            f"skipped {len(result.skipped)} steps (non-finite or spiking loss): see metrics.jsonl"
        )
    print(f"checkpoint: {result.checkpoint}")
    print(f"run directory: {config.out_dir} (metrics.jsonl, loss.png)")
