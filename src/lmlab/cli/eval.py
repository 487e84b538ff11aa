"""``lmlab eval``: evaluate a model on tasks (``lmlab.eval.run.evaluate``).

lmlab eval --model smollm2 --task world-facts,minimal-pairs,perplexity --limit 20
"""

from __future__ import annotations

from jsonargparse import ArgumentParser

from lmlab.eval.run import evaluate, runs_table, task_names


def add_arguments(parser: ArgumentParser) -> None:
    parser.add_function_arguments(evaluate, skip={"tasks"}, as_group=False)
    parser.add_argument(
        "--task",
        type=str,
        required=True,
        help="comma-separated tasks: " + ", ".join(task_names()) + ", or task files "
        "(.jsonl, .csv, .tsv)",
    )


def run(args) -> None:
    options = {k: v for k, v in vars(args).items() if k not in ("config", "__path__", "task")}
    runs = evaluate(tasks=args.task, **options)
    print()
    print(runs_table(runs))
    print()
    if options.get("out"):
        print(f"saved: {options['out']} (scores, settings and per-item details)")
    else:
        print("not saved: give --out results.json to keep the scores and per-item details")
