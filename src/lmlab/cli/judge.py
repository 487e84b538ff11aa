"""``lmlab judge``: preference pairs from AI feedback: a judge model compares a policy's
replies by a constitution (``lmlab.align.judge.judge``)."""

from __future__ import annotations

from jsonargparse import ArgumentParser

from lmlab.align.judge import agreement, judge
from lmlab.cli.rank import add_decoding_arguments, with_decoding
from lmlab.data.preferences import load_preferences


def add_arguments(parser: ArgumentParser) -> None:
    parser.add_function_arguments(judge, skip={"params"}, as_group=False)
    add_decoding_arguments(parser)


def run(args) -> None:
    summary = judge(**with_decoding(args))
    print(
        f"judged {summary.prompts} prompts: wrote {summary.pairs} pairs to {summary.out} "
        f"({summary.ties} left out: identical replies or no preference)"
    )
    score = agreement(load_preferences(summary.out))
    if score.comparable:
        print(
            f"agreement with the task checker: {score.rate:.3f} on {score.comparable} of "
            f"{score.total} pairs where exactly one reply is right (random judge: 0.5)"
        )
