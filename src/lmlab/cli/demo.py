"""``lmlab demo``: the first-contact run (``lmlab.demo.demo``)."""

from __future__ import annotations

import shutil
import textwrap

from jsonargparse import ArgumentParser

from lmlab.demo import demo, plan_demo


def add_arguments(parser: ArgumentParser) -> None:
    parser.add_function_arguments(demo, as_group=False)


def run(args) -> None:
    options = {k: v for k, v in vars(args).items() if k not in ("config", "__path__")}
    # What was found in out_dir and what will be done, before minutes of training.
    plan = plan_demo(options["out_dir"], options["max_steps"], options["seed"])
    print(plan.message)
    result = demo(**options)
    train = result.train
    print()
    if train.train_losses:
        print(
            f"trained gpt-char-tiny to step {train.step} ({train.wall_time_s:.0f} s, "
            f"{train.tokens_per_s:,.0f} tokens/s)"
        )
    print(
        f"validation loss {result.val_loss:.4f} nats/char, perplexity {result.val_perplexity:.2f} "
        "(whole validation split)"
    )
    print()
    prompt = options["prompt"]
    print(side_by_side({label: prompt + text for label, text in result.samples.items()}))
    print()
    print(
        f"saved: {result.out_dir}/loss.png, {result.out_dir}/samples.md, checkpoints in {result.out_dir}/checkpoints"
    )


def side_by_side(columns: dict[str, str], width: int | None = None, gap: int = 3) -> str:
    """Texts in labelled columns across the terminal; one block after another when the
    terminal is too narrow for columns of at least 24 characters."""
    width = width or shutil.get_terminal_size((120, 24)).columns
    col = (width - gap * (len(columns) - 1)) // len(columns)
    if col < 24:
        return "\n\n".join(f"--- {label}\n{text}" for label, text in columns.items())
    wrapped = []
    for label, text in columns.items():
        lines = [label[:col], "-" * min(col, len(label))]
        for line in text.splitlines():
            lines += textwrap.wrap(line, col) or [""]
        wrapped.append(lines)
    height = max(len(lines) for lines in wrapped)
    rows = zip(*(lines + [""] * (height - len(lines)) for lines in wrapped))
    return "\n".join((" " * gap).join(cell.ljust(col) for cell in row).rstrip() for row in rows)
