"""``lmlab compare``: several model families on the same data and budget
(``lmlab.compare.compare``)."""

from __future__ import annotations

from jsonargparse import ArgumentParser

from lmlab.cli.args import options
from lmlab.compare import compare


def add_arguments(parser: ArgumentParser) -> None:
    parser.add_function_arguments(compare, as_group=False)


def run(args) -> None:
    result = compare(**options(args))
    print()
    print(result.table)
    print()
    for r in result.models:
        print(f"{r.name}: {args.prompt}{r.sample}".replace("\n", " ")[:120])
    print()
    exposure = result.files.get("exposure")
    print(
        f"saved: {result.files['markdown']} (table and samples), {result.files['json']}, "
        f"{result.files['plot']} (validation loss curves)"
        + (f", {exposure} (loss fed its own samples)" if exposure else "")
        + f"; runs in {result.out_dir}/<model>"
    )
