"""Generation tasks: prompt a model, compare what it writes with reference answers.

A task is a JSONL file, one row a line::

    {"prompt": "Lowercase: good morning\\nUppercase:", "reference": "GOOD MORNING"}
    {"prompt": "Name a primary colour:", "references": ["red", "blue", "yellow"]}

(``"references"`` lists several acceptable answers; an optional ``"id"`` names the row in
results). ``evaluate_generation(lm, rows)`` prompts the model with every row in batches,
greedy by default, each output ending at the first newline (one-line answers), strips the
output's surrounding whitespace, and scores the outputs against the references with
``lmlab.eval.text``: exact match and token F1 (SQuAD), BLEU and chrF (sacrebleu), ROUGE
(rouge-score). Each example keeps its output and its own exact match and token F1, so a
report can show what the model wrote.

Few-shot demonstrations are written before each prompt in lm-evaluation-harness's layout
(``target_delimiter`` between a prompt and its answer, ``fewshot_delimiter`` between
examples)::

    prompt_1 + " " + reference_1 + "\\n\\n" + prompt_2 + " " + reference_2 + "\\n\\n" + prompt

With ``chat=True`` the model's chat template renders them as user/assistant turns instead,
and generation ends at the template's end-of-turn token rather than a newline.

Bundled task (``GENERATION_TASKS``, files in ``src/lmlab/eval/tasks/``):

- ``uppercase_mini`` (``uppercase_mini.jsonl``): 32 short English phrases written for
  lmlab; each prompt shows a phrase in lower case (``"Lowercase: the red fox\\nUppercase:"``)
  and the reference is the same phrase in capitals (``"THE RED FOX"``). A copy-and-transform
  task that a small pretrained model can attempt from a few demonstrations (e.g. SmolLM2
  with ``few_shot=rows[:4]``, evaluated on ``rows[4:]``); an untrained model scores about 0.
  ``tests/eval/test_generation.py`` checks every reference against its prompt.

There is no reference implementation to compare with: the metrics are sacrebleu's and
rouge-score's (parity in ``tests/eval/test_text.py``) and decoding is ``lmlab.generate``'s
(parity with transformers in ``tests/generate/test_search.py``). The tests show that one
output comes back per row, deterministically, and that a model that writes the references
scores exact match 1 and BLEU 100.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from lmlab.data.instructions import read_rows
from lmlab.errors import ConfigError, DataError, DataNotFoundError
from lmlab.eval.text import check_metrics, exact_match, text_scores, token_f1
from lmlab.generate import SamplingParams
from lmlab.lm import LM

TASKS_DIR = Path(__file__).parent / "tasks"

GENERATION_TASKS: dict[str, str] = {"uppercase_mini": "uppercase_mini.jsonl"}
"""Bundled generation tasks: name -> file in ``TASKS_DIR``."""

GENERATION_FIELDS = (
    "expected 'prompt' (a string) and either 'reference' (a string) or 'references' "
    "(a non-empty list of strings), with an optional 'id'"
)

DEFAULT_METRICS: tuple[str, ...] = ("exact_match", "token_f1", "bleu", "chrf", "rouge")


# ----------------------------------------------------------------------------- rows


@dataclass(frozen=True)
class GenerationRow:
    """One prompt with its acceptable answers; ``source`` (``"file:line"``) names it in errors."""

    prompt: str
    references: tuple[str, ...]
    id: str = ""
    source: str = ""

    def __post_init__(self) -> None:
        where = self.source or "row"
        if not isinstance(self.prompt, str) or not self.prompt:
            raise DataError(f"{where}: 'prompt' must be a non-empty string, got {self.prompt!r}")
        refs = self.references
        if isinstance(refs, list | tuple):
            object.__setattr__(self, "references", tuple(refs))
        if (
            not isinstance(self.references, tuple)
            or not self.references
            or not all(isinstance(r, str) for r in self.references)
        ):
            raise DataError(
                f"{where}: the references must be a non-empty list of strings, got {refs!r}"
            )
        if not isinstance(self.id, str):
            object.__setattr__(self, "id", str(self.id))


def row_from_dict(row: Mapping[str, Any], where: str = "row") -> GenerationRow:
    """A ``GenerationRow`` from one JSON object; errors name ``where`` and the fields.

    {"prompt": "2 + 2 =", "reference": "4"}  ->  GenerationRow("2 + 2 =", ("4",))
    """
    if not isinstance(row, Mapping):
        raise DataError(f"{where}: a row must be an object, got {type(row).__name__}")
    missing = []
    if "prompt" not in row:
        missing.append("'prompt'")
    if "reference" not in row and "references" not in row:
        missing.append("'reference' (or 'references')")
    if missing:
        raise DataError(
            f"{where}: missing {' and '.join(missing)}; {GENERATION_FIELDS}; "
            f"the line has keys {sorted(row)}"
        )
    if "reference" in row and "references" in row:
        raise DataError(f"{where}: give 'reference' or 'references', not both")
    if "reference" in row:
        if not isinstance(row["reference"], str):
            raise DataError(
                f"{where}: 'reference' must be a string, got {type(row['reference']).__name__}"
                " (use 'references' for a list)"
            )
        refs = (row["reference"],)
    else:
        refs = row["references"]
        if isinstance(refs, str) or not isinstance(refs, list):
            raise DataError(
                f"{where}: 'references' must be a list of strings, got {type(refs).__name__}"
            )
    return GenerationRow(row["prompt"], refs, str(row.get("id", "")), where)


def load_generation_task(task: str | os.PathLike) -> list[GenerationRow]:
    """The rows of a bundled task (a name in ``GENERATION_TASKS``) or of a JSONL file.

    Errors name ``file:line``: a blank or invalid line, a missing field (listing the
    expected ones), a field of the wrong type.
    """
    if isinstance(task, str) and task in GENERATION_TASKS:
        path = TASKS_DIR / GENERATION_TASKS[task]
    else:
        path = Path(task)
        if not path.exists():
            names = ", ".join(sorted(GENERATION_TASKS))
            raise DataNotFoundError(
                f"no generation task {str(task)!r}: give a JSONL file or a bundled task ({names})"
            )
    return [
        row_from_dict(row, where)
        for where, row in read_rows(path, "generation task", GENERATION_FIELDS)
    ]


def _as_rows(
    rows: Sequence[GenerationRow | Mapping[str, Any]] | str | os.PathLike,
) -> list[GenerationRow]:
    if isinstance(rows, str | os.PathLike):
        return load_generation_task(rows)
    return [
        r if isinstance(r, GenerationRow) else row_from_dict(r, f"row {i}")
        for i, r in enumerate(rows)
    ]


# ----------------------------------------------------------------------------- prompts


def build_prompt(
    row: GenerationRow,
    few_shot: Sequence[GenerationRow] = (),
    chat_template: Any | None = None,
    target_delimiter: str = " ",
    fewshot_delimiter: str = "\n\n",
) -> str:
    """The text the model continues: demonstrations (their first reference as the answer),
    then the row's prompt.

        few_shot [("2+2=", "4")], row "3+3="  ->  "2+2= 4\\n\\n3+3="

    With a ``chat_template`` (``lmlab.data.chat.ChatTemplate``) each demonstration is a
    user turn and an assistant turn, and the prompt ends with the generation prompt.
    """
    if chat_template is not None:
        messages = []
        for shot in few_shot:
            messages.append({"role": "user", "content": shot.prompt})
            messages.append({"role": "assistant", "content": shot.references[0]})
        messages.append({"role": "user", "content": row.prompt})
        return chat_template.render(messages, add_generation_prompt=True)
    shots = [shot.prompt + target_delimiter + shot.references[0] for shot in few_shot]
    return fewshot_delimiter.join([*shots, row.prompt])


# ----------------------------------------------------------------------------- evaluation


@dataclass(frozen=True)
class GenerationExample:
    """What the model wrote for one row, and how it scored."""

    id: str
    prompt: str
    """The row's prompt (without demonstrations or chat markup)."""
    references: tuple[str, ...]
    output: str
    """The generated text, cut at the stop string and stripped of surrounding whitespace."""
    exact_match: float
    token_f1: float


@dataclass(frozen=True)
class GenerationResult:
    """Corpus scores, per-example outputs and the settings that produced them."""

    scores: dict[str, float]
    """``exact_match``, ``token_f1`` (0..1), ``bleu``, ``chrf`` (0..100), ``rouge1``,
    ``rouge2``, ``rougeL`` (mean F1, 0..1): those of the metrics asked for."""
    details: dict[str, Any]
    """sacrebleu signatures and statistics, ROUGE precision and recall."""
    examples: tuple[GenerationExample, ...]
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def outputs(self) -> list[str]:
        return [e.output for e in self.examples]

    def to_dict(self) -> dict[str, Any]:
        """Everything as plain JSON types (for a report file)."""
        return {
            "n": len(self.examples),
            "scores": dict(self.scores),
            "details": self.details,
            "settings": self.settings,
            "examples": [asdict(e) for e in self.examples],
        }


def evaluate_generation(
    lm: LM,
    rows: Sequence[GenerationRow | Mapping[str, Any]] | str | os.PathLike,
    metrics: Sequence[str] = DEFAULT_METRICS,
    max_new_tokens: int = 32,
    batch_size: int = 8,
    few_shot: Sequence[GenerationRow | Mapping[str, Any]] = (),
    chat: bool = False,
    stop: Sequence[str] | None = None,
    target_delimiter: str = " ",
    fewshot_delimiter: str = "\n\n",
    progress: bool = True,
    **decoding: Any,
) -> GenerationResult:
    """Generate an answer for every row and score the answers against the references.

    Args:
        lm: an ``lmlab.LM`` (``lmlab.load(...)``): its ``generate`` takes a list of prompts.
        rows: ``GenerationRow``s, dicts of the JSONL shape, a JSONL path or a bundled task name.
        metrics: any of ``exact_match``, ``token_f1``, ``bleu``, ``chrf``, ``rouge``.
        max_new_tokens: most tokens generated per row.
        batch_size: prompts decoded together (greedy output does not depend on it).
        few_shot: demonstrations written before every prompt (keep them out of ``rows``).
        chat: render prompts with the model's chat template (``lm.chat_template``).
        stop: stop strings; None means ``["\\n"]`` for plain prompts and none for chat
            (the end-of-turn token ends the answer).
        target_delimiter, fewshot_delimiter: the few-shot layout (see ``build_prompt``).
        progress: show a progress bar over batches.
        decoding: other ``SamplingParams`` fields; ``temperature`` defaults to 0 (greedy).
    """
    metrics = check_metrics(metrics)
    rows = _as_rows(rows)
    if not rows:
        raise DataError("no rows to evaluate; give at least one")
    shots = [
        s if isinstance(s, GenerationRow) else row_from_dict(s, f"few_shot {i}")
        for i, s in enumerate(few_shot)
    ]
    for name, value in (("max_new_tokens", max_new_tokens), ("batch_size", batch_size)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ConfigError(f"{name}={value!r} is invalid: must be an integer >= 1")
    template = None
    if chat:
        template = getattr(lm, "chat_template", None)
        if template is None:
            raise ConfigError(
                "chat=True needs a model with a chat template, and this one has none; "
                "use chat=False (plain prompts)"
            )
    if stop is None:
        stop = () if chat else ("\n",)
    stop = (stop,) if isinstance(stop, str) else tuple(stop)
    params = {"temperature": 0.0, **decoding, "max_new_tokens": max_new_tokens, "stop": stop}
    SamplingParams.from_dict(params)  # a bad setting fails here, before any decoding

    prompts = [build_prompt(r, shots, template, target_delimiter, fewshot_delimiter) for r in rows]
    outputs: list[str] = []
    batches = range(0, len(prompts), batch_size)
    for start in tqdm(batches, desc="generating", unit="batch", disable=not progress):
        batch = prompts[start : start + batch_size]
        texts = lm.generate(batch, **params)
        if len(texts) != len(batch):
            raise RuntimeError(f"lm.generate returned {len(texts)} texts for {len(batch)} prompts")
        outputs += [t.strip() for t in texts]

    references = [list(r.references) for r in rows]
    scores, details = text_scores(outputs, references, metrics)
    examples = tuple(
        GenerationExample(
            r.id or r.source,
            r.prompt,
            r.references,
            out,
            exact_match(out, list(r.references)),
            token_f1(out, list(r.references)),
        )
        for r, out in zip(rows, outputs)
    )
    settings = {
        "metrics": list(metrics),
        "n_shots": len(shots),
        "chat": bool(chat),
        "target_delimiter": target_delimiter,
        "fewshot_delimiter": fewshot_delimiter,
        **{k: list(v) if isinstance(v, tuple) else v for k, v in params.items()},
    }
    return GenerationResult(scores, details, examples, settings)
