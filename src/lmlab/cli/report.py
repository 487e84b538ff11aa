"""``lmlab report``: evaluation reports of one or more models, side by side
(``lmlab.eval.report.report``)."""

from __future__ import annotations

from jsonargparse import ArgumentParser

from lmlab.eval.report import report


def add_arguments(parser: ArgumentParser) -> None:
    parser.add_function_arguments(report, as_group=False)


def run(args) -> None:
    options = {k: v for k, v in vars(args).items() if k not in ("config", "__path__")}
    result = report(**options)
    print()
    print(result.table)
    print()
    for rep in result.models:
        print(f"{rep.name}: {rep.files['markdown']}, {rep.files['html']}, {rep.files['json']}")
    if result.files:
        print(
            f"comparison: {result.files['markdown']}, {result.files['html']}, "
            f"{result.files['plot']}"
        )
