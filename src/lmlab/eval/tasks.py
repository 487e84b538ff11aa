"""Multiple-choice tasks: items, prompt formats, file readers and the bundled tasks.

A multiple-choice item is a query, two or more choices and the index of the right one::

    {"query": "What is the capital of France?", "choices": ["Lyon", "Paris", "Nice", "Metz"],
     "gold": 1, "subject": "geography"}

Evaluation (``lmlab.eval.choice``) renders the query with the task's ``PromptFormat`` and
scores each choice as a continuation of it, as lm-evaluation-harness's ``multiple_choice``
tasks do: ``prompt = template.format(query=...)``, ``continuation = delimiter + choice``.

File layouts (``load_task(path, format="auto")`` picks by suffix and, for JSONL, by keys):

- ``lmlab`` JSONL, one item a line: ``query`` (or ``context``), ``choices`` (list of
  strings), ``gold`` (0-based int); optional ``id``, ``subject``, and ``split``
  (``"train"``/``"dev"`` items form the few-shot pool, every other item is evaluated);
  other keys are kept in ``ChoiceItem.meta``.
- ``mmlu`` CSV (the MMLU release files): no header; ``question, A, B, C, D, answer
  letter``. The subject is the file name without ``_test``/``_dev``/``_val``
  (``anatomy_test.csv`` -> ``anatomy``). MMLU's own dev file goes in ``fewshot_path``.
- ``hellaswag`` JSONL (the HellaSwag release): ``ctx`` (or ``ctx_a`` + ``ctx_b``),
  ``endings``, ``label``, optional ``activity_label``. Text gets the harness's light
  preprocessing (``preprocess_hellaswag``): query = ``activity_label + ": " + ctx_a +
  " " + ctx_b.capitalize()``; in query and endings, " [title]" -> ". ", any other
  ``[...]`` tag removed, double spaces -> one, ends stripped.
- ``glue`` TSV (GLUE's SST-2, ...): a header row, a text column (``text_column``,
  default ``sentence``) and a label column (``label_column``, default ``label``) holding
  an index into ``label_names`` or one of the names; the choices are ``label_names``
  (the verbalisers, e.g. ``["negative", "positive"]``). No quoting, as in GLUE's files.

Every problem is a ``DataError`` naming ``file:line`` and what was expected.

Bundled tasks (``list_tasks()``, ``load_task(name)``), written for lmlab (no benchmark
rows are copied) and small enough to score in seconds on CPU:

- ``world-facts``: 40 (+5 ``dev``) four-choice questions on capitals, arithmetic facts, animal sounds
  and everyday language, in the lmlab JSONL layout (the dev items are the few-shot pool).
- ``shakespeare-cloze``: 40 lines of the public-domain Tiny Shakespeare corpus
  (``lmlab.data.load_corpus("tinyshakespeare")``) cut before a word; choose the real
  next word among it and three other words of the corpus.
- ``sentiment``: 40 short review sentences written for lmlab in the SST-2 GLUE TSV
  layout (``sentence<TAB>label``), labels negative/positive.

Reference: the prompt construction and metrics follow lm-evaluation-harness v0.4
(``ConfigurableTask`` with ``output_type: multiple_choice``); the parity test in
``tests/eval/test_choice.py`` scores the same prompts with the harness's ``HFLM``.
"""

from __future__ import annotations

import csv
import io
import os
import re
import string
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from lmlab.data.instructions import read_rows
from lmlab.errors import ConfigError, DataError, DataNotFoundError, closest

FORMATS = ("auto", "lmlab", "mmlu", "hellaswag", "glue")
FEWSHOT_SPLITS = ("train", "dev", "validation")
"""``split`` values of items that form the few-shot pool instead of being evaluated."""
LETTERS = string.ascii_uppercase


@dataclass(frozen=True)
class ChoiceItem:
    """One multiple-choice question."""

    query: str
    choices: tuple[str, ...]
    gold: int
    """Index of the right choice in ``choices``."""
    id: str | None = None
    subject: str | None = None
    where: str = ""
    """``file:line`` the item was read from (for messages)."""
    meta: dict[str, Any] = field(default_factory=dict)
    """Other fields of the row, kept as read."""

    def __post_init__(self):
        _check_item(self.where or "item", self.choices, self.gold)


@dataclass(frozen=True)
class PromptFormat:
    """How an item becomes a prompt and its continuations (the harness's ``doc_to_text``,
    ``target_delimiter`` and ``doc_to_choice``).

    ``template`` may use ``{query}``, ``{subject}`` and ``{options}`` (the choices listed
    as ``A. text`` lines); ``choice`` may use ``{choice}`` (its text) and ``{letter}``.
    With the default ``"Question: {query}\\nAnswer:"``, ``" "``, ``"{choice}"``::

        prompt:        "Question: What is 2 + 2?\\nAnswer:"
        continuations: [" 3", " 4", " 5", " 22"]
    """

    template: str = "Question: {query}\nAnswer:"
    delimiter: str = " "
    """Put between the prompt and every choice (the harness's ``target_delimiter``)."""
    choice: str = "{choice}"

    def __post_init__(self):
        for name, text, allowed in (
            ("template", self.template, ("query", "subject", "options")),
            ("choice", self.choice, ("choice", "letter")),
        ):
            try:
                names = {f for _, f, _, _ in string.Formatter().parse(text) if f is not None}
            except ValueError as e:
                raise ConfigError(f"PromptFormat.{name}={text!r} is invalid: {e}") from e
            bad = sorted(names - set(allowed))
            if bad:
                raise ConfigError(
                    f"PromptFormat.{name}={text!r} uses {{{bad[0]}}}; valid fields: "
                    + ", ".join(f"{{{a}}}" for a in allowed)
                )

    def render(self, item: ChoiceItem) -> str:
        """The prompt for ``item`` (no few-shot examples)."""
        options = "\n".join(f"{LETTERS[i]}. {c}" for i, c in enumerate(item.choices))
        return self.template.format(query=item.query, subject=item.subject or "", options=options)

    def choice_texts(self, item: ChoiceItem) -> list[str]:
        """Each choice as the model must write it, without the delimiter (the text whose
        length ``acc_norm`` divides by)."""
        return [self.choice.format(choice=c, letter=LETTERS[i]) for i, c in enumerate(item.choices)]

    def continuations(self, item: ChoiceItem) -> list[str]:
        return [self.delimiter + c for c in self.choice_texts(item)]


QA = PromptFormat()
PLAIN = PromptFormat(template="{query}")
LETTER_CHOICES = PromptFormat(template="{query}\n{options}\nAnswer:", choice="{letter}")
"""MMLU's harness format: the options listed in the prompt, the answer a letter."""


@dataclass(frozen=True)
class ChoiceTask:
    """A multiple-choice task: the items to evaluate, a few-shot pool and a prompt format."""

    name: str
    items: tuple[ChoiceItem, ...]
    prompt: PromptFormat = QA
    fewshot: tuple[ChoiceItem, ...] = ()
    """Items few-shot examples come from; empty means the other evaluated items."""
    description: str = ""
    """Put before the first example of every prompt (the harness's ``description``)."""
    source: str = ""

    def __post_init__(self):
        if not self.items:
            raise DataError(f"task {self.name!r} has no items to evaluate")

    def __len__(self) -> int:
        return len(self.items)


# ------------------------------------------------------------------------------- bundled


@dataclass(frozen=True)
class _Bundled:
    file: str
    prompt: PromptFormat
    about: str
    label_names: tuple[str, ...] | None = None


_SENTIMENT_PROMPT = PromptFormat(
    template="{query}\nQuestion: Is this sentence positive or negative?\nAnswer:"
)
BUNDLED: dict[str, _Bundled] = {
    "world-facts": _Bundled(
        "world_facts.jsonl",
        QA,
        "40 four-choice questions (+5 dev) on capitals, arithmetic, animal sounds, language; "
        "written for lmlab",
    ),
    "shakespeare-cloze": _Bundled(
        "shakespeare_cloze.jsonl",
        PLAIN,
        "40 Tiny Shakespeare lines cut before a word: the real next word vs three other "
        "corpus words",
    ),
    "sentiment": _Bundled(
        "sentiment.tsv",
        _SENTIMENT_PROMPT,
        "40 review sentences, negative/positive, SST-2 GLUE TSV layout; written for lmlab",
        ("negative", "positive"),
    ),
}
TASK_DIR = Path(__file__).parent / "tasks"


def list_tasks() -> dict[str, str]:
    """The bundled tasks: name -> one-line description."""
    return {name: b.about for name, b in sorted(BUNDLED.items())}


def load_task(
    path_or_name: str | os.PathLike,
    format: str = "auto",
    prompt: PromptFormat | None = None,
    fewshot_path: str | os.PathLike | None = None,
    text_column: str = "sentence",
    label_column: str = "label",
    label_names: Sequence[str] | None = None,
    name: str | None = None,
) -> ChoiceTask:
    """A bundled task by name (``list_tasks()``; a name wins over a file of the same name)
    or a task file in one of the layouts of the module docstring. ``prompt`` overrides the format (default: the bundled task's,
    else ``LETTER_CHOICES`` for MMLU, ``PLAIN`` for HellaSwag, ``QA`` otherwise).
    ``fewshot_path`` (same layout) gives the few-shot pool."""
    if format not in FORMATS:
        raise ConfigError(
            f"format={format!r} is invalid{closest(format, FORMATS)}; valid: " + ", ".join(FORMATS)
        )
    key = str(path_or_name)
    if key in BUNDLED:
        b = BUNDLED[key]
        task = load_task(
            TASK_DIR / b.file,
            prompt=prompt or b.prompt,
            label_names=b.label_names,
            name=key,
        )
        return replace(task, source=f"bundled: {b.about}")
    path = Path(path_or_name)
    if not path.exists():
        hint = closest(key, list(BUNDLED))
        raise DataNotFoundError(
            f"task {key!r} is neither a file nor a bundled task{hint}; bundled: "
            + ", ".join(sorted(BUNDLED))
        )
    if path.is_dir():
        raise DataError(f"task {key!r} is a folder; give one task file (.jsonl, .csv, .tsv)")
    fmt = _detect_format(path) if format == "auto" else format
    glue = dict(text_column=text_column, label_column=label_column, label_names=label_names)
    items = _read(path, fmt, glue)
    pool: list[ChoiceItem] = []
    if fewshot_path is not None:
        fewshot_path = Path(fewshot_path)
        if not fewshot_path.is_file():
            raise DataNotFoundError(f"few-shot file {str(fewshot_path)!r} does not exist")
        pool = _read(fewshot_path, fmt, glue)
    pool += [it for it in items if it.meta.get("split") in FEWSHOT_SPLITS]
    items = [it for it in items if it.meta.get("split") not in FEWSHOT_SPLITS]
    if not items:
        raise DataError(f"{path}: no items to evaluate (every row is in a few-shot split)")
    default = {"mmlu": LETTER_CHOICES, "hellaswag": PLAIN}.get(fmt, QA)
    return ChoiceTask(
        name=name or path.stem,
        items=tuple(items),
        prompt=prompt or default,
        fewshot=tuple(pool),
        source=str(path),
    )


def _detect_format(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix == ".csv":
        return "mmlu"
    if suffix == ".tsv":
        return "glue"
    if suffix in (".jsonl", ".json"):
        rows = read_rows(path, "task file", "expected " + _LMLAB_FIELDS)
        return "hellaswag" if "endings" in rows[0][1] else "lmlab"
    raise DataError(
        f"{path}: cannot tell the layout from the suffix {suffix!r}; use .jsonl (lmlab or "
        "hellaswag), .csv (mmlu) or .tsv (glue), or give format="
    )


def _read(path: Path, fmt: str, glue: dict[str, Any]) -> list[ChoiceItem]:
    if fmt == "lmlab":
        return _read_lmlab(path)
    if fmt == "hellaswag":
        return _read_hellaswag(path)
    if fmt == "mmlu":
        return _read_mmlu(path)
    return _read_glue(path, **glue)


# --------------------------------------------------------------------------- the readers

_LMLAB_FIELDS = "'query' (or 'context'), 'choices' (a list of strings) and 'gold' (an index)"


def _read_lmlab(path: Path) -> list[ChoiceItem]:
    items = []
    for where, row in read_rows(path, "task file", "expected " + _LMLAB_FIELDS):
        query_key = "context" if "context" in row and "query" not in row else "query"
        missing = [k for k in (query_key, "choices", "gold") if k not in row]
        if missing:
            raise DataError(
                f"{where}: missing field(s) {', '.join(map(repr, missing))}; expected "
                + _LMLAB_FIELDS
            )
        query, choices, gold = row[query_key], row["choices"], row["gold"]
        if not isinstance(query, str):
            raise DataError(f"{where}: {query_key!r} must be a string, got {type(query).__name__}")
        if not isinstance(choices, list) or not all(isinstance(c, str) for c in choices):
            raise DataError(f"{where}: 'choices' must be a list of strings, got {choices!r}")
        meta = {k: v for k, v in row.items() if k not in (query_key, "choices", "gold")}
        item_id, subject = meta.pop("id", None), meta.pop("subject", None)
        items.append(
            ChoiceItem(
                query,
                tuple(choices),
                gold,
                id=None if item_id is None else str(item_id),
                subject=subject,
                where=where,
                meta=meta,
            )
        )
    return items


def preprocess_hellaswag(text: str) -> str:
    """HellaSwag's cleanup, as the harness applies it (WikiHow "[title]" tags and stray
    brackets): ``"Bake it. [title] Serve  warm [step]"`` -> ``"Bake it.. Serve warm"``."""
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def _read_hellaswag(path: Path) -> list[ChoiceItem]:
    expected = "expected 'ctx' (or 'ctx_a' and 'ctx_b'), 'endings' and 'label'"
    items = []
    for where, row in read_rows(path, "task file", expected):
        has_ctx = "ctx" in row or ("ctx_a" in row and "ctx_b" in row)
        missing = ([] if has_ctx else ["ctx"]) + [k for k in ("endings", "label") if k not in row]
        if missing:
            raise DataError(
                f"{where}: missing field(s) {', '.join(map(repr, missing))}; {expected}"
            )
        if "ctx_a" in row and "ctx_b" in row:
            ctx = row["ctx_a"] + " " + row["ctx_b"].capitalize()
        else:
            ctx = row["ctx"]
        label = row.get("activity_label")
        query = preprocess_hellaswag(f"{label}: {ctx}" if label else ctx)
        if not isinstance(row["endings"], list):
            raise DataError(f"{where}: 'endings' must be a list of strings")
        try:
            gold = int(row["label"])
        except (TypeError, ValueError) as e:
            raise DataError(f"{where}: 'label' must be an integer, got {row['label']!r}") from e
        items.append(
            ChoiceItem(
                query,
                tuple(preprocess_hellaswag(str(e)) for e in row["endings"]),
                gold,
                id=str(row["ind"]) if "ind" in row else None,
                subject=label,
                where=where,
            )
        )
    return items


def _read_text(path: Path) -> str:
    try:
        return path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not valid UTF-8 ({e.reason} at byte {e.start})") from e


def _read_mmlu(path: Path) -> list[ChoiceItem]:
    subject = re.sub(r"_(test|dev|val|validation)$", "", path.stem)
    reader = csv.reader(io.StringIO(_read_text(path), newline=""))
    items = []
    for row in reader:
        where = f"{path}:{reader.line_num}"
        if not row:
            raise DataError(f"{where}: blank line; expected question, choices..., answer letter")
        if len(row) < 4:
            raise DataError(
                f"{where}: {len(row)} column(s); expected question, at least 2 choices and the "
                "answer letter (MMLU: question,A,B,C,D,answer)"
            )
        question, choices, answer = row[0], tuple(row[1:-1]), row[-1].strip().upper()
        valid = LETTERS[: len(choices)]
        if len(answer) != 1 or answer not in valid:
            raise DataError(
                f"{where}: answer {row[-1]!r} is not one of the letters {', '.join(valid)}"
            )
        items.append(
            ChoiceItem(question, choices, valid.index(answer), subject=subject, where=where)
        )
    if not items:
        raise DataError(f"{path}: the file is empty; expected question,A,B,C,D,answer rows")
    return items


def _read_glue(
    path: Path, text_column: str, label_column: str, label_names: Sequence[str] | None
) -> list[ChoiceItem]:
    if not label_names or len(label_names) < 2:
        raise ConfigError(
            f"{path}: a GLUE TSV task needs label_names, the text of each label in order "
            "(e.g. ['negative', 'positive'] for SST-2), at least 2"
        )
    lines = _read_text(path).split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    if not lines or not lines[0].strip():
        raise DataError(f"{path}: the file is empty; expected a header row naming the columns")
    header = lines[0].rstrip("\r").split("\t")
    for col, what in ((text_column, "text_column"), (label_column, "label_column")):
        if col not in header:
            raise DataError(
                f"{path}:1: no column {col!r} ({what}){closest(col, header)}; the header "
                f"has: {', '.join(header)}"
            )
    t, lab = header.index(text_column), header.index(label_column)
    items = []
    for number, line in enumerate(lines[1:], start=2):
        where = f"{path}:{number}"
        cells = line.rstrip("\r").split("\t")
        if len(cells) != len(header):
            raise DataError(
                f"{where}: {len(cells)} column(s), the header has {len(header)} "
                f"({', '.join(header)})"
            )
        label = cells[lab].strip()
        if label in label_names:
            gold = list(label_names).index(label)
        elif label.lstrip("-").isdigit():
            gold = int(label)
        else:
            raise DataError(
                f"{where}: label {label!r} is neither an index nor one of "
                + ", ".join(map(repr, label_names))
            )
        meta = {h: c for h, c in zip(header, cells) if h not in (text_column, label_column)}
        items.append(ChoiceItem(cells[t], tuple(label_names), gold, where=where, meta=meta))
    if not items:
        raise DataError(f"{path}: no rows after the header")
    return items


def _check_item(where: str, choices: Sequence[str], gold: Any) -> None:
    if len(choices) < 2:
        raise DataError(f"{where}: {len(choices)} choice(s); a multiple-choice item needs >= 2")
    if isinstance(gold, bool) or not isinstance(gold, int):
        raise DataError(f"{where}: 'gold' must be an integer index, got {gold!r}")
    if not 0 <= gold < len(choices):
        raise DataError(
            f"{where}: gold={gold} is out of range for {len(choices)} choices "
            f"(valid: 0..{len(choices) - 1})"
        )
