"""``lmlab architectures``: an encoder, a decoder and an encoder-decoder trained from
scratch on a seq2seq task and on sentence classification, same budget
(``lmlab.eval.architectures.compare_architectures``)."""

from __future__ import annotations

from jsonargparse import ArgumentParser

from lmlab.cli.args import options
from lmlab.eval.architectures import ArchitecturesConfig, compare_architectures, markdown_table


def add_arguments(parser: ArgumentParser) -> None:
    parser.add_class_arguments(ArchitecturesConfig, as_group=False)
    parser.add_argument(
        "--out_dir", type=str, default="runs/architectures", help="where the results go"
    )
    parser.add_argument(
        "--data",
        type=str,
        default=None,
        help="a sentence<TAB>label file (0/1 labels, a header line); default: the bundled "
        "sentiment.tsv",
    )


def run(args) -> None:
    settings = options(args, skip=("out_dir", "data"))
    extra = {"data": args.data} if args.data else {}
    report = compare_architectures(ArchitecturesConfig(**settings), args.out_dir, **extra)
    print()
    print(markdown_table(report["results"]))
    print()
    print(
        f"saved: {args.out_dir}/architectures.json, architectures.md and architectures.png "
        "(training losses and scores)"
    )
