"""``lmlab demo``: the first-contact run (``lmlab.demo.demo``)."""

from __future__ import annotations

from jsonargparse import ArgumentParser

from lmlab.demo import demo


def add_arguments(parser: ArgumentParser) -> None:
    parser.add_function_arguments(demo, as_group=False)


def run(args) -> None:
    options = {k: v for k, v in vars(args).items() if k not in ("config", "__path__")}
    result = demo(**options)
    train = result.train
    print()
    if train.train_losses:
        print(
            f"trained gpt-char-tiny for {train.step} steps ({train.wall_time_s:.0f} s, "
            f"{train.tokens_per_s:,.0f} tokens/s)"
        )
    else:
        print(
            f"found the finished run in {result.out_dir} ({train.step} steps): delete it to retrain"
        )
    print(
        f"validation loss {result.val_loss:.4f} nats/char, perplexity {result.val_perplexity:.2f} "
        "(whole validation split)"
    )
    prompt = options["prompt"]
    for label, text in result.samples.items():
        print()
        print(f"--- {label} " + "-" * max(0, 60 - len(label)))
        print(prompt + text)
    print()
    print(
        f"saved: {result.out_dir}/loss.png, {result.out_dir}/samples.md, checkpoints in {result.out_dir}/checkpoints"
    )
