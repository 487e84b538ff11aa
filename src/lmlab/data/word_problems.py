"""Generated arithmetic word problems, each with its answer, a worked rationale and a program.

GSM8K-like in shape, small in numbers, and generated here (no download): every problem is
two or three steps of +, -, * or / over whole numbers, told as a short story. Each comes
with three views of the same solution, for the three ways of prompting a model:

- ``answer``: the number (for direct answering and for scoring);
- ``rationale``: the steps in words ending in ``The answer is N.`` (chain of thought);
- ``program``: a ``def solution():`` that computes it (program-aided, PAL).

    >>> word_problems(1, seed=0)[0]["question"]
    'Grace buys 6 marbles at 10 dollars each and pays with 100 dollars. How much change does she get?'

The same seed gives the same problems on every machine.
"""

from __future__ import annotations

import random
from collections.abc import Callable

NAMES = ["Ava", "Ben", "Chloe", "Dan", "Ella", "Finn", "Grace", "Hugo", "Iris", "Jack"]
THINGS = ["marbles", "apples", "stickers", "books", "coins", "pencils", "shells", "cards"]
PRONOUN = {n: ("She" if n in {"Ava", "Chloe", "Ella", "Grace", "Iris"} else "He") for n in NAMES}

Problem = dict[str, str]


def _buys_bags(rng: random.Random) -> Problem:
    name, thing = rng.choice(NAMES), rng.choice(THINGS)
    start, bags, each = rng.randint(2, 30), rng.randint(2, 6), rng.randint(2, 12)
    total = start + bags * each
    he = PRONOUN[name]
    return {
        "question": f"{name} has {start} {thing}. {he} buys {bags} bags with {each} {thing} each. "
        f"How many {thing} does {he.lower()} have now?",
        "rationale": f"{name} buys {bags} * {each} = {bags * each} {thing}. "
        f"{start} + {bags * each} = {total}. The answer is {total}.",
        "program": f"def solution():\n    start = {start}\n    bought = {bags} * {each}\n"
        "    return start + bought",
        "answer": str(total),
    }


def _gives_away(rng: random.Random) -> Problem:
    name, friend, thing = *rng.sample(NAMES, 2), rng.choice(THINGS)
    start, given, found = rng.randint(20, 60), rng.randint(2, 19), rng.randint(2, 15)
    total = start - given + found
    he = PRONOUN[name]
    return {
        "question": f"{name} had {start} {thing}. {he} gave {given} to {friend} and then found "
        f"{found} more. How many {thing} does {name} have?",
        "rationale": f"After giving {given} away, {name} has {start} - {given} = {start - given}. "
        f"Finding {found} more makes {start - given} + {found} = {total}. "
        f"The answer is {total}.",
        "program": f"def solution():\n    left = {start} - {given}\n    return left + {found}",
        "answer": str(total),
    }


def _shares(rng: random.Random) -> Problem:
    name, thing = rng.choice(NAMES), rng.choice(THINGS)
    friends, each, keep = rng.randint(2, 6), rng.randint(2, 9), rng.randint(1, 9)
    start = friends * each + keep
    he = PRONOUN[name]
    return {
        "question": f"{name} has {start} {thing}. {he} keeps {keep} and shares the rest equally "
        f"among {friends} friends. How many {thing} does each friend get?",
        "rationale": f"{name} shares {start} - {keep} = {start - keep} {thing}. "
        f"{start - keep} / {friends} = {each}. The answer is {each}.",
        "program": f"def solution():\n    shared = {start} - {keep}\n    return shared // {friends}",
        "answer": str(each),
    }


def _price(rng: random.Random) -> Problem:
    name, thing = rng.choice(NAMES), rng.choice(THINGS)
    count, price, paid = rng.randint(2, 9), rng.randint(2, 12), 0
    cost = count * price
    paid = (cost // 10 + 1 + rng.randint(0, 3)) * 10
    he = PRONOUN[name]
    return {
        "question": f"{name} buys {count} {thing} at {price} dollars each and pays with "
        f"{paid} dollars. How much change does {he.lower()} get?",
        "rationale": f"The {thing} cost {count} * {price} = {cost} dollars. "
        f"{paid} - {cost} = {paid - cost}. The answer is {paid - cost}.",
        "program": f"def solution():\n    cost = {count} * {price}\n    return {paid} - cost",
        "answer": str(paid - cost),
    }


def _rows(rng: random.Random) -> Problem:
    name = rng.choice(NAMES)
    rows, per_row, extra, removed = (
        rng.randint(2, 9),
        rng.randint(3, 12),
        rng.randint(1, 9),
        rng.randint(1, 5),
    )
    total = rows * per_row + extra - removed
    return {
        "question": f"{name} plants {rows} rows of {per_row} trees, then {extra} more trees. "
        f"{removed} trees die. How many trees are left?",
        "rationale": f"{rows} * {per_row} = {rows * per_row} trees in rows. "
        f"{rows * per_row} + {extra} = {rows * per_row + extra}. "
        f"{rows * per_row + extra} - {removed} = {total}. The answer is {total}.",
        "program": f"def solution():\n    planted = {rows} * {per_row} + {extra}\n"
        f"    return planted - {removed}",
        "answer": str(total),
    }


KINDS: dict[str, Callable[[random.Random], Problem]] = {
    "buys_bags": _buys_bags,
    "gives_away": _gives_away,
    "shares": _shares,
    "price": _price,
    "rows": _rows,
}


def word_problems(n: int = 200, seed: int = 0) -> list[Problem]:
    """``n`` distinct problems (question, rationale, program, answer, kind), seeded."""
    rng = random.Random(seed)
    out, seen = [], set()
    while len(out) < n:
        kind = rng.choice(list(KINDS))
        problem = KINDS[kind](rng)
        if problem["question"] not in seen:
            seen.add(problem["question"])
            out.append({**problem, "kind": kind})
    return out
