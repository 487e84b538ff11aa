"""``lmlab eval``: run any evaluation of ``lmlab.eval`` on a model by name, one row per task.

    runs = evaluate("smollm2", "world-facts,minimal-pairs,perplexity", limit=20)
    runs[0].metric, runs[0].value   # ("acc", 0.55)

A task is one of:

- a bundled multiple-choice task (``list_tasks()``: world-facts, shakespeare-cloze,
  sentiment), scored by ``evaluate_choice``, with its calibration (ECE, MCE, Brier);
- ``minimal-pairs`` / ``minimal-pairs-prefix`` (BLiMP, whole sentences or the one-prefix
  method), ``bias-pairs`` (CrowS-Pairs), ``behaviour`` (the default CheckList suite), a
  bundled generation task (``GENERATION_TASKS``), or ``perplexity``: bits per byte of the
  first ``PERPLEXITY_CHARS`` characters of Tiny Shakespeare's validation split
  (``split_text(text, 0.1)[1]``; a model trained on Tiny Shakespeare saw only the train split);
- a task file, its layout found from the suffix and the first row (``detect_kind``):
  ``.jsonl`` with ``choices`` (or HellaSwag's ``endings``) -> multiple choice,
  with ``prompt`` and ``reference(s)`` -> generation, with ``sentence_good`` -> minimal
  pairs; ``.csv`` with a ``sent_more`` column -> bias pairs, any other ``.csv`` -> MMLU;
  ``.tsv`` -> GLUE.

Each task gives a ``TaskRun``: its headline metric (``HEADLINE``) and value, every score,
how many items counted, the seconds it took and the evaluation's own ``to_dict()``. A task
the tokenizer cannot encode at all (digits under a Shakespeare character vocabulary) gives
a run with ``error`` set and no scores, so one such task does not stop the others.

There is no reference implementation of this layer: each evaluation has its own parity
test (``tests/eval/test_choice.py``, ``test_pairs.py``, ...); ``tests/eval/test_run.py``
checks task detection, the error rows and the JSON round trip.
"""

from __future__ import annotations

import csv
import math
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from lmlab.data import load_corpus, split_text
from lmlab.data.instructions import read_rows
from lmlab.errors import ConfigError, DataError, DataNotFoundError, DecodingError, closest
from lmlab.eval.behaviour import default_suite, run_suite
from lmlab.eval.calibration import calibration
from lmlab.eval.choice import evaluate_choice
from lmlab.eval.generation import GENERATION_TASKS, evaluate_generation, load_generation_task
from lmlab.eval.pairs import bias_score, evaluate_minimal_pairs, read_bias_pairs, read_minimal_pairs
from lmlab.eval.perplexity import surprisal
from lmlab.eval.tasks import list_tasks, load_task
from lmlab.fileio import atomic_write_json
from lmlab.lm import LM, load
from lmlab.version import __version__

KINDS = ("choice", "generation", "minimal_pairs", "bias_pairs", "behaviour", "perplexity")
SPECIAL_TASKS: dict[str, str] = {
    "minimal-pairs": "minimal_pairs",
    "minimal-pairs-prefix": "minimal_pairs",
    "bias-pairs": "bias_pairs",
    "behaviour": "behaviour",
    "perplexity": "perplexity",
}
"""Task names that are not multiple-choice or generation files: name -> kind."""
HEADLINE: dict[str, str] = {
    "choice": "acc",
    "generation": "exact_match",
    "minimal_pairs": "accuracy",
    "bias_pairs": "pct_stereotype",
    "behaviour": "failure_rate",
    "perplexity": "bits_per_byte",
}
"""The metric each kind of task reports first."""
BETTER: dict[str, str] = {
    "acc": "higher",
    "exact_match": "higher",
    "accuracy": "higher",
    "pct_stereotype": "50",
    "failure_rate": "lower",
    "bits_per_byte": "lower",
}
"""Which way each headline metric is better ("50": closest to no preference)."""
PERPLEXITY_CHARS = 5000
TASK_SUFFIXES = (".jsonl", ".json", ".csv", ".tsv")


def task_names() -> list[str]:
    """Every task name ``run_task`` takes besides a file."""
    return [*list_tasks(), *SPECIAL_TASKS, *GENERATION_TASKS]


def detect_kind(task: str | os.PathLike) -> str:
    """The kind of a task name or file (one of ``KINDS``), from the rules of the module
    docstring: ``"world-facts" -> "choice"``, ``"pairs.csv"`` with a ``sent_more`` column
    -> ``"bias_pairs"``. An unknown name is a ``ConfigError`` naming the closest valid one."""
    key = str(task)
    if key in list_tasks():
        return "choice"
    if key in SPECIAL_TASKS:
        return SPECIAL_TASKS[key]
    if key in GENERATION_TASKS:
        return "generation"
    path = Path(key)
    if not path.exists():
        names = task_names()
        if path.suffix.lower() in TASK_SUFFIXES or os.sep in key:
            raise DataNotFoundError(f"task file {key!r} does not exist")
        raise ConfigError(
            f"task {key!r} is unknown{closest(key, names)}; valid: {', '.join(names)}, "
            "or a task file (.jsonl, .csv, .tsv)"
        )
    if path.is_dir():
        raise DataError(f"task {key!r} is a folder; give one task file (.jsonl, .csv, .tsv)")
    suffix = path.suffix.lower()
    if suffix == ".tsv":
        return "choice"
    if suffix == ".csv":
        return "bias_pairs" if "sent_more" in _csv_header(path) else "choice"
    if suffix in (".jsonl", ".json"):
        expected = (
            "expected a multiple-choice row ('query', 'choices', 'gold'), a generation row "
            "('prompt', 'reference' or 'references') or a minimal pair ('sentence_good', "
            "'sentence_bad')"
        )
        where, row = read_rows(path, "task file", expected)[0]
        if "choices" in row or "endings" in row:
            return "choice"
        if "sentence_good" in row:
            return "minimal_pairs"
        if "prompt" in row and ("reference" in row or "references" in row):
            return "generation"
        raise DataError(f"{where}: cannot tell the task's layout; {expected}; got {sorted(row)}")
    raise DataError(
        f"task file {key!r}: cannot tell the layout from the suffix {suffix!r}; use .jsonl, "
        ".csv or .tsv"
    )


def _csv_header(path: Path) -> list[str]:
    with path.open(encoding="utf-8-sig", newline="") as f:
        try:
            return next(csv.reader(f), [])
        except (csv.Error, UnicodeDecodeError) as e:
            raise DataError(f"{path}:1: unreadable CSV header: {e}") from e


# ----------------------------------------------------------------------------- results


def _plain(value: Any) -> Any:
    """JSON types only: tuples -> lists, nan and inf -> None (strict JSON has neither)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if value is None or isinstance(value, str | int | bool):
        return value
    return str(value)


@dataclass(frozen=True)
class TaskRun:
    """One task evaluated on one model."""

    task: str
    kind: str
    metric: str
    """The headline metric (``HEADLINE[kind]``)."""
    value: float | None
    """Its value; None when the run failed (``error``) or the value is not finite."""
    scores: dict[str, float | None] = field(default_factory=dict)
    n: int = 0
    """Items that counted (pairs, rows, cases; scored tokens for ``perplexity``)."""
    skipped: list[str] = field(default_factory=list)
    """Items the tokenizer could not encode, each "id: reason" (multiple choice)."""
    seconds: float = 0.0
    error: str | None = None
    """Why there is no score (e.g. the tokenizer encodes none of the task's items)."""
    settings: dict[str, Any] = field(default_factory=dict)
    details: dict[str, Any] = field(default_factory=dict, repr=False)
    """The evaluation's ``to_dict()`` (per item scores), plus ``calibration`` for choice."""
    result: Any = field(default=None, repr=False, compare=False)
    """The evaluation's result object (not saved): ``ChoiceResult`` for reliability plots."""

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if k != "result"}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TaskRun:
        return cls(**{k: v for k, v in data.items() if k != "result"})

    def value_text(self, digits: int = 4) -> str:
        """The value as a table shows it: ``"0.5500"``, or ``"n/a (why)"``."""
        if self.error is not None:
            return f"n/a ({self.error})"
        return "n/a" if self.value is None else f"{self.value:.{digits}f}"

    def summary(self) -> str:
        return (
            f"{self.task} [{self.kind}]: {self.metric} {self.value_text()} "
            f"(n={self.n}, {self.seconds:.1f} s)"
        )


def runs_table(runs: Sequence[TaskRun], markdown: bool = False) -> str:
    """task, metric, value, n, seconds: aligned text, or a Markdown table."""
    header = ("task", "metric", "value", "n", "seconds")
    rows = [
        (r.task, r.metric, r.value_text(), str(r.n) if r.error is None else "-", f"{r.seconds:.1f}")
        for r in runs
    ]
    if markdown:
        lines = ["| " + " | ".join(header) + " |", "|---|---|---:|---:|---:|"]
        lines += ["| " + " | ".join(md_cell(c) for c in row) + " |" for row in rows]
        return "\n".join(lines)
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(header)]

    def line(cells: Sequence[str]) -> str:  # n and seconds right-aligned
        return "  ".join(
            c.rjust(w) if i >= 3 else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths))
        ).rstrip()

    return "\n".join([line(header), *(line(row) for row in rows)])


def md_cell(text: str) -> str:
    """A Markdown table cell: no pipes or newlines."""
    return str(text).replace("|", "\\|").replace("\n", " ")


# -------------------------------------------------------------------------- evaluation


def _perplexity_text() -> str:

    return split_text(load_corpus("tinyshakespeare"), 0.1)[1][:PERPLEXITY_CHARS]


def _check_settings(num_fewshot: int, limit: int | None, batch_size: int) -> None:
    for name, value, low in (("num_fewshot", num_fewshot, 0), ("batch_size", batch_size, 1)):
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise ConfigError(f"{name}={value!r} is invalid: must be an integer >= {low}")
    if limit is not None and (not isinstance(limit, int) or isinstance(limit, bool) or limit < 1):
        raise ConfigError(f"limit={limit!r} is invalid: must be an integer >= 1 or None")


def _load(task: str, kind: str, num_fewshot: int, limit: int | None) -> Any:
    """Read the task's data (errors in the data propagate: they are the user's to fix)."""
    bundled = task in SPECIAL_TASKS
    if kind == "choice":
        return load_task(task)
    if kind == "minimal_pairs":
        return read_minimal_pairs(None if bundled else task)[:limit]
    if kind == "bias_pairs":
        return read_bias_pairs(None if bundled else task)[:limit]
    if kind == "generation":
        rows = load_generation_task(task)
        if num_fewshot >= len(rows):
            raise ConfigError(
                f"num_fewshot={num_fewshot} is invalid for task {task!r}: the demonstrations "
                f"are its first rows, and it has only {len(rows)}"
            )
        # the first num_fewshot rows are the demonstrations, never evaluated
        return rows[:num_fewshot], rows[num_fewshot:][:limit]
    if kind == "behaviour":
        suite = default_suite()
        return type(suite)(suite.name, suite.tests[:limit])
    return _perplexity_text()


def _score(
    lm: LM, task: str, kind: str, data: Any, num_fewshot: int, limit: int | None,
    batch_size: int, seed: int, progress: bool,
) -> tuple[dict[str, float], int, list[str], dict[str, Any], Any]:  # fmt: skip
    """-> (scores, n, skipped, details, result object) of one evaluation."""
    if kind == "choice":
        r = evaluate_choice(lm, data, num_fewshot, seed, batch_size, limit, progress)
        cal = calibration(r)
        scores = {**r.scores(), "ece": cal.ece, "mce": cal.mce, "brier": cal.brier}
        return scores, r.n, list(r.skipped), {**r.to_dict(), "calibration": cal.to_dict()}, r
    if kind == "minimal_pairs":
        method = "prefix" if task == "minimal-pairs-prefix" else "full"
        r = evaluate_minimal_pairs(lm, data, method, batch_size, progress)
        scores = {"accuracy": r.accuracy, **{f"accuracy:{k}": v for k, v, _ in r.rows()}}
        return scores, r.n, [], r.to_dict(), r
    if kind == "bias_pairs":
        r = bias_score(lm, data, batch_size, progress)
        scores = {"pct_stereotype": r.pct_stereotype, "likelihood_diff": r.likelihood_diff}
        return scores, r.n, [], r.to_dict(), r
    if kind == "generation":
        shots, rows = data
        r = evaluate_generation(lm, rows, few_shot=shots, batch_size=batch_size, progress=progress)
        return dict(r.scores), len(r.examples), [], r.to_dict(), r
    if kind == "behaviour":
        r = run_suite(lm, data, batch_size=batch_size, progress=progress)
        n = sum(t.n for t in r.tests)
        return {"failure_rate": r.failure_rate}, n, [], r.to_dict(), r
    r = surprisal(lm, data)
    s = r.summary()
    scores = {k: s[k] for k in ("bits_per_byte", "bits_per_character", "perplexity")}
    details = {"text": "tinyshakespeare validation split", "n_chars": len(data), **s}
    return scores, s["n_tokens"], [], details, r


def run_task(
    lm: LM,
    task: str,
    num_fewshot: int = 0,
    limit: int | None = None,
    batch_size: int = 16,
    seed: int = 0,
    progress: bool = True,
) -> TaskRun:
    """Evaluate ``lm`` (an ``lmlab.LM``) on one task (a name or file, see the module
    docstring) -> ``TaskRun``.

    ``num_fewshot``: examples before each multiple-choice item; for generation, the first
    ``num_fewshot`` rows become demonstrations (and are not evaluated); pairs, behaviour
    and perplexity are zero-shot. ``limit``: the first ``limit`` items (pairs, rows, tests
    of the behaviour suite); perplexity always scores ``PERPLEXITY_CHARS`` characters.
    A task whose data the tokenizer cannot encode (or whose prompts do not fit the model's
    context, for generation) gives a run with ``error`` set.
    """
    _check_settings(num_fewshot, limit, batch_size)
    task = str(task)
    kind = detect_kind(task)
    data = _load(task, kind, num_fewshot, limit)
    settings = {"num_fewshot": num_fewshot, "limit": limit, "seed": seed}
    metric = HEADLINE[kind]
    start = time.perf_counter()
    try:
        scores, n, skipped, details, result = _score(
            lm, task, kind, data, num_fewshot, limit, batch_size, seed, progress
        )
    except (DataError, DecodingError) as e:  # a character outside the vocabulary, a prompt
        # longer than the model's context: this model cannot take this task
        seconds = time.perf_counter() - start
        return TaskRun(task, kind, metric, None, seconds=seconds, error=str(e), settings=settings)
    seconds = time.perf_counter() - start
    scores = _plain(scores)
    return TaskRun(
        task=task,
        kind=kind,
        metric=metric,
        value=scores[metric],
        scores=scores,
        n=n,
        skipped=skipped,
        seconds=seconds,
        settings=settings,
        details=_plain(details),
        result=result,
    )


def short_name(model: str | os.PathLike) -> str:
    """A name for a model in tables and folders: ``"smollm2"``, a run folder's name
    (``runs/tiny/checkpoints/step_000100 -> "tiny"``), a file's stem (``m.gguf -> "m"``)."""
    path = Path(str(model).rstrip("/\\"))
    if not path.exists():
        return path.name or str(model)
    path = path.resolve()
    if path.is_file():
        return path.stem
    while path.parent != path and (
        path.name in ("checkpoints", "model", "latest", "final") or path.name.startswith("step")
    ):
        path = path.parent
    return path.name


def parse_tasks(tasks: str | Sequence[str]) -> list[str]:
    """``"a,b"`` or ``["a", "b,c"]`` -> ``["a", "b", "c"]`` (checked: at least one)."""
    parts = [tasks] if isinstance(tasks, str) else list(tasks)
    names = [t.strip() for part in parts for t in str(part).split(",") if t.strip()]
    if not names:
        raise ConfigError(f"tasks={tasks!r} is empty; valid: {', '.join(task_names())}")
    return names


def evaluate(
    model: str,
    tasks: str | list[str],
    num_fewshot: int = 0,
    limit: int | None = None,
    batch_size: int = 16,
    seed: int = 0,
    out: str | None = None,
    dtype: str = "auto",
    device: str = "auto",
) -> list[TaskRun]:
    """Load ``model`` (anything ``lmlab.load`` takes, or ``"smollm2"``) and run each task.

    Args:
        model: a checkpoint or run folder, a Hugging Face folder, a .gguf file, "smollm2".
        tasks: comma-separated task names or files (see ``lmlab.eval.run``).
        num_fewshot: few-shot examples per multiple-choice item (demonstrations for
            generation tasks).
        limit: evaluate only the first ``limit`` items of each task.
        batch_size: requests scored together.
        seed: picks the few-shot examples.
        out: write the runs as JSON here (model, settings, lmlab version, runs).
        dtype: the weights' dtype: auto (bf16 where the CPU computes it natively),
            float32 or bfloat16.
        device: where the model runs: auto (CUDA, then MPS, then the CPU), cpu, cuda, cuda:N, mps.
    """

    names = parse_tasks(tasks)
    _check_settings(num_fewshot, limit, batch_size)
    for name in names:  # a misspelt task fails before the model loads
        detect_kind(name)
    lm = load(model, dtype=dtype, device=device)
    runs = [run_task(lm, t, num_fewshot, limit, batch_size, seed) for t in names]
    if out is not None:
        atomic_write_json(
            out, results_dict(model, runs, num_fewshot, limit, batch_size, seed, dtype)
        )
    return runs


def results_dict(
    model: str, runs: Sequence[TaskRun], num_fewshot: int, limit: int | None,
    batch_size: int, seed: int, dtype: str,
) -> dict[str, Any]:  # fmt: skip
    """What ``evaluate`` writes: model, settings, lmlab version and the runs."""

    return {
        "model": str(model),
        "name": short_name(model),
        "lmlab_version": __version__,
        "settings": {
            "num_fewshot": num_fewshot,
            "limit": limit,
            "batch_size": batch_size,
            "seed": seed,
            "dtype": dtype,
        },
        "runs": [r.to_dict() for r in runs],
    }
