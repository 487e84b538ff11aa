"""Is a preference-tuning gain the skill or the form? Greedy answers of several models to
the same held-out task rows, split by form.

For each model: exact accuracy (what the task's checker accepts), the share of answers
in the sentence form that ``lmlab.data.tasks.mixed_demonstrators`` teaches ("The answer
is 42."), and the accuracy of the value alone, read from either form (so a right number
in a sentence counts). If tuning raised the exact accuracy but not the value accuracy,
it taught the form, not the arithmetic. The value accuracy is also split by form (right
values among the sentence answers, and among the others), since a model may add better
in one form than in the other. Prints a Markdown table.

Usage (lesson 9's mixed-demonstrator runs):
    python bench/answer_forms.py --models runs/mixed/sft/model,runs/mixed/dpo/run/model \\
        --names SFT,DPO [--test_data runs/align/test.jsonl] [--n 100]
"""

from __future__ import annotations

import argparse
import re
import time

from machine import describe_machine  # bench/machine.py (the script's own folder)


def value_of(answer: str) -> str:
    """The answer with a leading "The answer is" and a final period removed."""
    text = " ".join(answer.split())
    text = re.sub(r"^the answer is\s*", "", text, flags=re.IGNORECASE)
    return text.removesuffix(".").strip()


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--models", required=True, help="comma-separated models (lmlab.load)")
    ap.add_argument("--names", default=None, help="comma-separated names for the table")
    ap.add_argument("--test_data", default="runs/align/test.jsonl")
    ap.add_argument("--n", type=int, default=100, help="held-out rows")
    ap.add_argument("--max_new_tokens", type=int, default=12)
    args = ap.parse_args()
    print(describe_machine())

    import lmlab
    from lmlab.data.instructions import read_jsonl
    from lmlab.data.tasks import check
    from lmlab.finetune.run import task_accuracy

    models = args.models.split(",")
    names = args.names.split(",") if args.names else models
    if len(names) != len(models):
        raise SystemExit(f"--names has {len(names)} entries but --models has {len(models)}")
    rows = read_jsonl(args.test_data)[: args.n]
    print(f"greedy answers to {len(rows)} rows of {args.test_data}")
    print(
        "| model | exact accuracy | sentence answers | value accuracy (either form) "
        "| value accuracy: sentences | other answers | s |"
    )
    print("| --- | --: | --: | --: | --: | --: | --: |")
    for name, path in zip(names, models):
        t = time.perf_counter()
        lm = lmlab.load(path, dtype="float32", keep_quantized=False)
        exact, answers = task_accuracy(lm, rows, max_new_tokens=args.max_new_tokens)
        sentence = [a.strip().lower().startswith("the answer is") for a in answers]
        right = [check(r["task"], value_of(a), r["output"]) for r, a in zip(rows, answers)]
        print(
            f"| {name} | {exact:.2f} | {sum(sentence) / len(rows):.2f} | "
            f"{sum(right) / len(rows):.2f} | {share_right(right, sentence, True)} | "
            f"{share_right(right, sentence, False)} | {time.perf_counter() - t:.0f} |"
        )


def share_right(right: list[bool], sentence: list[bool], form: bool) -> str:
    """Value accuracy among the answers in one form, as "0.52 of 77" (or "-" if none)."""
    picked = [r for r, s in zip(right, sentence) if s == form]
    return f"{sum(picked) / len(picked):.2f} of {len(picked)}" if picked else "-"


if __name__ == "__main__":
    main()
