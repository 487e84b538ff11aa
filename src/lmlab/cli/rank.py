"""``lmlab rank``: rank a model's replies in the terminal and save preference pairs
(``lmlab.align.rank.rank``; rerun with the same ``--out`` to continue where you stopped)."""

from __future__ import annotations

import dataclasses

from jsonargparse import ArgumentParser

from lmlab.align.rank import rank
from lmlab.cli.args import options
from lmlab.generate import SamplingParams

# Decoding flags that make sense for sampling several replies (the seed is set per prompt).
DECODING_SKIP = {
    "seed",
    "num_beams",
    "length_penalty",
    "early_stopping",
    "do_sample",
    "eos_id",
    "stop_ids",
    "truncate_prompt",
}


def add_decoding_arguments(parser: ArgumentParser) -> None:
    parser.add_class_arguments(SamplingParams, nested_key=None, skip=DECODING_SKIP)
    parser.set_defaults(max_new_tokens=128)


DECODING_FLAGS = {f.name for f in dataclasses.fields(SamplingParams)} - DECODING_SKIP


def decoding_params(args) -> SamplingParams:
    return SamplingParams.from_dict({k: v for k, v in vars(args).items() if k in DECODING_FLAGS})


def with_decoding(args) -> dict:
    """The command's own flags as keyword arguments, its decoding flags as ``params``."""
    return {**options(args, skip=DECODING_FLAGS), "params": decoding_params(args)}


def add_arguments(parser: ArgumentParser) -> None:
    parser.add_function_arguments(rank, skip={"params", "ask", "show"}, as_group=False)
    add_decoding_arguments(parser)


def run(args) -> None:
    summary = rank(**with_decoding(args))
    state = "stopped" if summary.quit else "done"
    print(
        f"\n{state}: ranked {summary.ranked} prompts, skipped {summary.skipped}, "
        f"wrote {summary.pairs} pairs to {summary.out}; {summary.remaining} prompts left"
    )
