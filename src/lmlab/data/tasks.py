"""Small instruction tasks whose answers can be checked exactly, for measuring fine-tuning.

A fine-tuned model's accuracy is only as trustworthy as the grading. These tasks have one
right answer that a few lines of code compute and check, so accuracy is exact, not a
judge's opinion::

    arithmetic    "What is 17 + 25? Answer with the number only."         -> "42"
    reverse       "Reverse the letters of the word." / "planet"           -> "tenalp"
    count_letter  "How many times does the letter 'r' appear?" / "strawberry" -> "3"
    format        "Rewrite the text in uppercase." / "good morning"       -> "GOOD MORNING"
                  "Return a JSON object with the key "city" ..." / "paris"  -> {"city": "paris"}

Each generator is a function ``(rng: random.Random) -> {"instruction", "input",
"output"}``: an Alpaca row, which ``lmlab.data.instructions.load_examples`` reads.
``generate_tasks`` mixes several tasks (balanced, or by ``weights``) for multi-task
fine-tuning and adds a ``"task"`` key to each row; ``check`` grades one answer and
``accuracy`` a list of them.

Determinism and held-out data: every task draws from its own ``random.Random`` seeded
with ``f"{seed}:{task}"``, so a row depends only on the seed and the task (adding a task
to the mix does not change another's rows), and rows are unique within one call.
``generate_splits`` draws train, validation and test rows in one call per task and cuts
them, so no held-out prompt ever appears in training for that seed.
"""

from __future__ import annotations

import json
import os
import random
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from lmlab.errors import ConfigError, DataError, closest
from lmlab.fileio import atomic_write_text

Row = dict[str, str]

# Common English words (letters only): material for reverse, count_letter and format.
WORDS: tuple[str, ...] = tuple(
    """
    apple banana cherry grape lemon mango orange peach pear plum strawberry melon
    river mountain forest ocean island desert valley meadow canyon glacier volcano
    planet rocket comet galaxy star moon sun cloud rain thunder window garden kitchen
    pencil paper letter bottle candle mirror ladder basket blanket pillow button
    tiger rabbit turtle dolphin eagle falcon horse monkey parrot spider zebra giraffe
    music guitar piano violin drum trumpet poem story novel chapter library museum
    coffee butter cookie bread cheese pepper honey sugar yellow purple silver golden
    morning evening winter summer autumn spring friday monday journey bridge castle
    doctor teacher farmer pilot artist balloon mississippi bookkeeper committee
    """.split()
)

CITIES = ("paris", "tokyo", "lima", "cairo", "oslo", "delhi", "quito", "rome", "seoul")
KEYS = ("name", "city", "color", "animal", "fruit", "answer")


@dataclass(frozen=True)
class Task:
    """A verifiable task: how to make a row and how to grade an answer."""

    name: str
    make: Callable[[random.Random], Row]
    """Draws one ``{"instruction", "input", "output"}`` row from ``rng``."""
    check: Callable[[str, str], bool]
    """``check(output, reference)``: is the model's output a right answer?"""


# ----------------------------------------------------------------------------- checkers


def _squash(text: str) -> str:
    """Whitespace runs -> one space, ends stripped: ``"  a \\n b " -> "a b"``."""
    return " ".join(text.split())


def check_exact(output: str, reference: str) -> bool:
    """Equal after squashing whitespace (case matters): ``" HELLO  WORLD\\n" == "HELLO WORLD"``."""
    return _squash(output) == _squash(reference)


def check_integer(output: str, reference: str) -> bool:
    """The whole output is the reference integer (spaces and one final period allowed):
    ``" 42." -> 42`` passes, ``"It is 42"`` does not."""
    text = _squash(output).removesuffix(".").strip()
    return re.fullmatch(r"[+-]?\d+", text) is not None and int(text) == int(reference)


def check_word(output: str, reference: str) -> bool:
    """Equal after squashing whitespace, ignoring case and one final period."""
    return _squash(output).removesuffix(".").lower() == _squash(reference).lower()


def check_format(output: str, reference: str) -> bool:
    """A JSON reference needs JSON output holding the same value (any spacing or key
    order); any other reference is ``check_exact`` (case matters: it is the format)."""
    try:
        expected = json.loads(reference)
    except json.JSONDecodeError:
        return check_exact(output, reference)
    if not isinstance(expected, dict):
        return check_exact(output, reference)
    try:
        return json.loads(output) == expected
    except json.JSONDecodeError:
        return False


# ----------------------------------------------------------------------------- generators


def arithmetic(rng: random.Random) -> Row:
    """``"What is 17 + 25? Answer with the number only." -> "42"``: + and - on 0..99,
    * on 2..12."""
    op = rng.choice("+-*")
    if op == "*":
        a, b = rng.randint(2, 12), rng.randint(2, 12)
    else:
        a, b = rng.randint(0, 99), rng.randint(0, 99)
    value = {"+": a + b, "-": a - b, "*": a * b}[op]
    return {
        "instruction": f"What is {a} {op} {b}? Answer with the number only.",
        "input": "",
        "output": str(value),
    }


def reverse(rng: random.Random) -> Row:
    """``"Reverse the letters of the word." / "planet" -> "tenalp"``."""
    word = rng.choice(WORDS) if rng.random() < 0.5 else _pseudo_word(rng)
    return {"instruction": "Reverse the letters of the word.", "input": word, "output": word[::-1]}


def count_letter(rng: random.Random) -> Row:
    """``"How many times does the letter 'r' appear in the text?..." / "strawberry" -> "3"``;
    the letter is one of the text's four times in five, else any letter (answer 0 possible)."""
    text = " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 3)))
    letters = sorted(set(text.replace(" ", "")))
    letter = rng.choice(letters) if rng.random() < 0.8 else chr(rng.randint(97, 122))
    return {
        "instruction": (
            f"How many times does the letter '{letter}' appear in the text? "
            "Answer with the number only."
        ),
        "input": text,
        "output": str(text.count(letter)),
    }


def format_following(rng: random.Random) -> Row:
    """Follow an output format: uppercase, lowercase, or a one-key JSON object.

    "Rewrite the text in uppercase." / "good morning" -> "GOOD MORNING"
    'Return a JSON object with the key "city" set to the given text.' / "paris"
        -> '{"city": "paris"}'
    """
    kind = rng.choice(("upper", "lower", "json"))
    if kind == "json":
        key, value = rng.choice(KEYS), rng.choice(WORDS + CITIES)
        return {
            "instruction": (
                f'Return a JSON object with the key "{key}" set to the given text, '
                "and nothing else."
            ),
            "input": value,
            "output": json.dumps({key: value}),
        }
    text = " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 4)))
    if kind == "upper":
        return {
            "instruction": "Rewrite the text in uppercase.",
            "input": text,
            "output": text.upper(),
        }
    shouted = "".join(c.upper() if rng.random() < 0.5 else c for c in text)
    return {
        "instruction": "Rewrite the text in lowercase.",
        "input": shouted,
        "output": shouted.lower(),
    }


def _pseudo_word(rng: random.Random) -> str:
    """Random lowercase letters, 4 to 9 of them (a word no tokenizer has memorised)."""
    return "".join(chr(rng.randint(97, 122)) for _ in range(rng.randint(4, 9)))


TASKS: dict[str, Task] = {
    t.name: t
    for t in (
        Task("arithmetic", arithmetic, check_integer),
        Task("reverse", reverse, check_word),
        Task("count_letter", count_letter, check_integer),
        Task("format", format_following, check_format),
    )
}
"""The bundled tasks by name."""


def get_task(name: str) -> Task:
    """The task called ``name``, or ``ConfigError`` listing the valid names."""
    if name not in TASKS:
        raise ConfigError(
            f"unknown task {name!r}{closest(str(name), list(TASKS))}; "
            f"valid tasks: {', '.join(TASKS)}"
        )
    return TASKS[name]


def check(task: str, output: str, reference: str) -> bool:
    """Is ``output`` a right answer to a ``task`` row whose reference output is
    ``reference``? Each task normalises as its checker says (``check("arithmetic",
    " 42\\n", "42") -> True``)."""
    if not isinstance(output, str):
        raise DataError(f"an answer must be a string, got {type(output).__name__}")
    return get_task(task).check(output, reference)


# ----------------------------------------------------------------------------- phrasings

# FLAN-style instruction templates (Wei et al. 2022 wrote about ten per task): the same row
# asked in other words. Phrasing 0 is the generator's own; the last is kept out of every
# training mixture in ``lmlab.finetune.mixture``, so it measures unseen wording.
PHRASINGS: dict[str, tuple[str, ...]] = {
    "arithmetic": (
        "What is {a} {op} {b}? Answer with the number only.",
        "Compute {a} {op} {b}. Reply with just the number.",
        "Calculate {a} {op} {b} and give only the result.",
        "{a} {op} {b} = ? Write the number and nothing else.",
    ),
    "reverse": (
        "Reverse the letters of the word.",
        "Write the word backwards.",
        "Spell the word in reverse order.",
        "Give the word with its letters in the opposite order.",
    ),
    "count_letter": (
        "How many times does the letter '{letter}' appear in the text? "
        "Answer with the number only.",
        "Count how often '{letter}' occurs in the text. Reply with a number only.",
        "In the text, how many '{letter}' characters are there? Give just the count.",
        "Tell me how many times the letter '{letter}' is used in the text, as a number.",
    ),
    "format:upper": (
        "Rewrite the text in uppercase.",
        "Convert the text to capital letters.",
        "Write the text again in all caps.",
        "Change every letter of the text to upper case.",
    ),
    "format:lower": (
        "Rewrite the text in lowercase.",
        "Convert the text to small letters.",
        "Write the text again with no capital letters.",
        "Change every letter of the text to lower case.",
    ),
    "format:json": (
        'Return a JSON object with the key "{key}" set to the given text, and nothing else.',
        'Output only JSON: an object whose "{key}" field is the given text.',
        'Wrap the text in a JSON object under the key "{key}". Reply with the JSON only.',
        'Give a JSON object mapping "{key}" to the text, with nothing else.',
    ),
}
"""Instruction templates per task (``format`` per kind), phrasing 0 first."""

N_PHRASINGS = 4


def _template_pattern(template: str) -> re.Pattern[str]:
    """A regex that matches ``template`` with its fields captured by name."""
    fields = {"a": r"(?P<a>-?\d+)", "b": r"(?P<b>-?\d+)", "op": r"(?P<op>[-+*])"}
    fields |= {"letter": r"(?P<letter>.)", "key": r'(?P<key>[^"]+)'}
    pattern = re.sub(r"\\\{(\w+)\\\}", lambda m: fields[m.group(1)], re.escape(template))
    return re.compile(pattern + r"\Z")


def read_phrasing(row: Mapping[str, Any]) -> tuple[str, int, dict[str, str]]:
    """Which template of ``PHRASINGS`` asks ``row`` -> (kind, phrasing, its fields)::

    read_phrasing({"task": "arithmetic", "instruction": "Compute 7 * 3. Reply with just
    the number.", ...}) -> ("arithmetic", 1, {"a": "7", "op": "*", "b": "3"})
    """
    task = row.get("task")
    if task not in TASKS:
        raise DataError(f"row has task {task!r}; phrasings exist for {', '.join(TASKS)}")
    instruction = str(row.get("instruction", ""))
    for kind, templates in PHRASINGS.items():
        if kind != task and not kind.startswith(f"{task}:"):
            continue
        for k, template in enumerate(templates):
            match = _template_pattern(template).match(instruction)
            if match:
                return kind, k, match.groupdict()
    raise DataError(
        f"the {task} row's instruction {instruction!r} is none of its phrasings; "
        "rephrase works on rows made by generate_tasks"
    )


def rephrase(row: Mapping[str, Any], phrasing: int) -> Row:
    """``row`` (made by ``generate_tasks``, in any phrasing) asked with template
    ``phrasing`` of ``PHRASINGS``; input and output unchanged::

        rephrase({"task": "reverse", "instruction": "Reverse the letters of the word.",
                  "input": "planet", "output": "tenalp"}, 1)["instruction"]
            -> "Write the word backwards."
    """
    if isinstance(phrasing, bool) or not isinstance(phrasing, int):
        raise ConfigError(f"phrasing={phrasing!r} is invalid: an integer 0..{N_PHRASINGS - 1}")
    if not 0 <= phrasing < N_PHRASINGS:
        raise ConfigError(f"phrasing={phrasing} is invalid: valid are 0..{N_PHRASINGS - 1}")
    kind, _, fields = read_phrasing(row)
    return {**row, "instruction": PHRASINGS[kind][phrasing].format(**fields)}


# ----------------------------------------------------------------------------- mixing


def generate_tasks(
    names: str | Sequence[str],
    n: int,
    seed: int = 0,
    weights: Sequence[float] | None = None,
) -> list[Row]:
    """``n`` distinct rows mixing the tasks ``names``, shuffled, each with its ``"task"``.

    Without ``weights`` the tasks get equal shares (the first ones one more when ``n``
    does not divide); with them, shares proportional to the weights (largest remainders
    rounding), so the mixture is exact, not sampled.

        generate_tasks(["arithmetic", "reverse"], 3, seed=0)
            -> 2 arithmetic rows and 1 reverse row, in a seeded order
    """
    return generate_splits(names, n, 0, 0, seed, weights)[0]


def generate_splits(
    names: str | Sequence[str],
    n_train: int,
    n_val: int = 0,
    n_test: int = 0,
    seed: int = 0,
    weights: Sequence[float] | None = None,
) -> tuple[list[Row], list[Row], list[Row]]:
    """(train, val, test) rows of the task mixture, no prompt shared between splits.

    Each task's rows for all three splits are drawn together as one sequence of distinct
    prompts and cut in order, so each split holds the same mixture and held-out prompts
    are never trained on. The train rows equal ``generate_tasks(names, n_train, seed)``
    up to order.
    """
    names = [names] if isinstance(names, str) else list(names)
    if not names:
        raise ConfigError(f"name at least one task; valid tasks: {', '.join(TASKS)}")
    if len(set(names)) != len(names):
        raise ConfigError(f"tasks are named more than once: {names}")
    tasks = [get_task(name) for name in names]
    sizes = {"n_train": n_train, "n_val": n_val, "n_test": n_test}
    for key, value in sizes.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ConfigError(f"{key}={value!r} is invalid: must be an integer >= 0")
    shares = [_shares(size, len(tasks), weights) for size in (n_train, n_val, n_test)]
    splits: tuple[list[Row], list[Row], list[Row]] = ([], [], [])
    for k, task in enumerate(tasks):
        counts = [share[k] for share in shares]
        rows = _distinct_rows(task, sum(counts), seed)
        start = 0
        for split, count in zip(splits, counts):
            split.extend(rows[start : start + count])
            start += count
    for i, split in enumerate(splits):
        random.Random(f"{seed}:shuffle:{i}").shuffle(split)
    return splits


def _shares(n: int, k: int, weights: Sequence[float] | None) -> list[int]:
    """Split ``n`` into ``k`` integer shares by ``weights`` (largest remainders):
    ``_shares(10, 3, None) -> [4, 3, 3]``, ``_shares(10, 2, [3, 1]) -> [8, 2]``."""
    if weights is None:
        weights = [1.0] * k
    weights = list(weights)
    if len(weights) != k or any(
        isinstance(w, bool) or not isinstance(w, int | float) or w < 0 for w in weights
    ):
        raise ConfigError(f"weights={weights!r} is invalid: need {k} numbers >= 0, one per task")
    total = sum(weights)
    if total <= 0:
        raise ConfigError(f"weights={weights!r} is invalid: at least one must be positive")
    exact = [n * w / total for w in weights]
    shares = [int(x) for x in exact]
    by_remainder = sorted(range(k), key=lambda i: (-(exact[i] - shares[i]), i))
    for i in by_remainder[: n - sum(shares)]:
        shares[i] += 1
    return shares


def _distinct_rows(task: Task, n: int, seed: int) -> list[Row]:
    """``n`` rows of ``task`` with distinct prompts, from its own seeded generator."""
    rng = random.Random(f"{seed}:{task.name}")
    rows, seen = [], set()
    misses = 0
    while len(rows) < n:
        row = task.make(rng)
        key = (row["instruction"], row["input"])
        if key in seen:
            misses += 1
            if misses > 1000 + 10 * n:
                raise ConfigError(
                    f"task {task.name!r} ran out of distinct examples after {len(rows)}; "
                    f"asked for {n}"
                )
            continue
        seen.add(key)
        rows.append({"task": task.name, **row})
    return rows


def mixed_demonstrators(
    rows: Sequence[Mapping[str, Any]],
    share: float = 0.5,
    seed: int = 0,
    sentence: str = "The answer is {output}.",
) -> list[Row]:
    """SFT data from two demonstrators: a ``share`` of the rows (chosen with a seeded
    shuffle, exactly ``round(share * len(rows))``) answered in a sentence, the rest as the
    task asks. Each row gets ``"demonstrator": "terse"`` or ``"chatty"``.

    A model fine-tuned on the mixture answers both ways, and the checkers reject the
    sentence (the instruction says "the number only"), so it is a model that can do the
    task but often does not: the case preference tuning is for (lesson 9).

        {"instruction": "What is 4 * 5? ...", "output": "20"}
            -> chatty: {..., "output": "The answer is 20.", "demonstrator": "chatty"}
    """
    if isinstance(share, bool) or not isinstance(share, int | float) or not 0 <= share <= 1:
        raise ConfigError(f"share={share!r} is invalid: must be a number in [0, 1]")
    if "{output}" not in sentence:
        raise ConfigError(f"sentence={sentence!r} is invalid: it must contain {{output}}")
    order = list(range(len(rows)))
    random.Random(f"{seed}:demonstrators").shuffle(order)
    chatty = set(order[: round(share * len(rows))])
    mixed = []
    for i, row in enumerate(rows):
        if "output" not in row:
            raise DataError(f"row {i} has no 'output': {dict(row)!r}")
        out = dict(row)
        if i in chatty:
            out["output"] = sentence.format(output=row["output"])
        out["demonstrator"] = "chatty" if i in chatty else "terse"
        mixed.append(out)
    return mixed


# ----------------------------------------------------------------------------- files, scores


def write_jsonl(rows: Sequence[Mapping[str, Any]], path: str | os.PathLike) -> None:
    """Write ``rows`` as JSONL, one object a line, atomically (never half a file)."""
    lines = [json.dumps(dict(row), ensure_ascii=False) for row in rows]
    atomic_write_text(path, "".join(line + "\n" for line in lines))


def accuracy(rows: Sequence[Mapping[str, Any]], predictions: Sequence[str]) -> float:
    """The fraction of ``predictions`` that ``check`` accepts against each row's
    ``"output"``, graded by the row's ``"task"``.

        rows of arithmetic "42" and reverse "cba", predictions ["42", "abc"] -> 0.5
    """
    if len(rows) != len(predictions):
        raise DataError(f"accuracy got {len(rows)} rows but {len(predictions)} predictions")
    if not rows:
        raise DataError("accuracy of no rows is undefined; give at least one")
    right = 0
    for i, (row, prediction) in enumerate(zip(rows, predictions)):
        missing = [k for k in ("task", "output") if k not in row]
        if missing:
            raise DataError(
                f"row {i} is missing {', '.join(map(repr, missing))}; accuracy needs rows "
                "made by generate_tasks (with 'task' and 'output')"
            )
        right += check(row["task"], prediction, row["output"])
    return right / len(rows)
