"""Scores of generated text against references: BLEU, chrF, ROUGE, exact match, token F1.

- BLEU (Papineni et al. 2002) and chrF (Popović 2015; chrF++ with ``word_order=2``) are
  computed by sacrebleu (Post 2018, "A Call for Clarity in Reporting BLEU Scores"), whose
  signature string (``nrefs:1|case:mixed|eff:no|tok:13a|...``) travels with every score so
  that numbers stay comparable. Scale 0..100.
- ROUGE-N and ROUGE-L (Lin 2004) are computed by Google's ``rouge-score`` package; its
  tokenizer lower-cases and keeps only ``[a-z0-9]`` runs, so text in other scripts scores 0
  unless a ``tokenizer=`` is given. Scale 0..1: precision, recall and F1, averaged over
  examples; with several references an example keeps the best one by F1.
- Exact match and token F1 follow the SQuAD evaluation script (Rajpurkar et al. 2016):
  both texts are normalised (lower-cased, punctuation and the articles a/an/the removed,
  whitespace collapsed); F1 counts the bag of tokens the two share; an example scores the
  best over its references. Two empty answers agree (F1 1), as in SQuAD 2.0. Scale 0..1.

        normalize_answer("The  Cat's hat!")  ->  "cats hat"
        token_f1("the cat sat", "a cat sat down"):
            ["cat", "sat"] vs ["cat", "sat", "down"]: 2 shared, P = 2/2, R = 2/3, F1 = 0.8

Parity: ``tests/eval/test_text.py`` calls sacrebleu and rouge-score directly on the same
texts and asserts equal numbers; exact match and token F1 are checked on hand-worked
examples (no installed library exports the SQuAD functions offline).
"""

from __future__ import annotations

import inspect
import os
import re
import string
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from lmlab.data.instructions import read_rows
from lmlab.errors import ConfigError, DataError, closest

References = Sequence[str] | Sequence[Sequence[str]]
"""One reference per prediction (``["a", "b"]``) or several (``[["a", "a2"], ["b"]]``)."""

TEXT_METRICS: tuple[str, ...] = ("bleu", "chrf", "exact_match", "rouge", "token_f1")
"""The metric names ``text_scores`` knows."""

ROUGE_TYPES_HELP = "rouge1 .. rouge9 (n-grams), rougeL (longest common subsequence), rougeLsum"


@dataclass(frozen=True)
class Score:
    """A corpus or sentence score from sacrebleu, in a form that serialises to JSON."""

    name: str
    """sacrebleu's name for the metric: ``"BLEU"``, ``"chrF2"``, ``"chrF2++"``."""
    score: float
    """0..100."""
    signature: str
    """sacrebleu's signature: the settings that produced the number (report it with it)."""
    details: dict[str, Any] = field(default_factory=dict)
    """BLEU: n-gram ``counts``/``totals``/``precisions``, brevity penalty ``bp``, ``sys_len``,
    ``ref_len``; chrF: ``char_order``, ``word_order``, ``beta``."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ----------------------------------------------------------------------------- inputs


def _check_predictions(predictions: Sequence[str]) -> list[str]:
    if isinstance(predictions, str) or not isinstance(predictions, Sequence):
        raise DataError("predictions must be a list of strings (one per example)")
    if not predictions:
        raise DataError("no predictions to score; give at least one")
    for i, p in enumerate(predictions):
        if not isinstance(p, str):
            raise DataError(f"prediction {i} must be a string, got {type(p).__name__}")
    return list(predictions)


def _reference_lists(references: References, n: int) -> list[list[str]]:
    """The references of each of ``n`` examples as a non-empty list of strings."""
    if isinstance(references, str) or not isinstance(references, Sequence):
        raise DataError("references must be a list (one entry per prediction)")
    if len(references) != n:
        raise DataError(f"{n} predictions but {len(references)} references; need one entry each")
    out = []
    for i, refs in enumerate(references):
        refs = [refs] if isinstance(refs, str) else refs
        if not isinstance(refs, Sequence) or not refs or not all(isinstance(r, str) for r in refs):
            raise DataError(
                f"references of example {i} must be a string or a non-empty list of strings, "
                f"got {refs!r}"
            )
        out.append(list(refs))
    return out


def _reference_streams(refs: list[list[str]]) -> list[list[str | None]]:
    """Per-example references -> sacrebleu's reference streams (stream k holds the k-th
    reference of every example; None where an example has fewer):

        [["a", "a2"], ["b"]]  ->  [["a", "b"], ["a2", None]]
    """
    width = max(len(r) for r in refs)
    return [[r[k] if k < len(r) else None for r in refs] for k in range(width)]


def _build(cls: Callable[..., Any], options: dict[str, Any], what: str):
    """``cls(**options)``, with an unknown option named with the valid ones."""
    valid = [p for p in inspect.signature(cls).parameters if p != "references"]
    for key in options:
        if key not in valid:
            raise ConfigError(
                f"unknown {what} option {key!r}{closest(key, valid)}; valid: {', '.join(valid)}"
            )
    return cls(**options)


# ----------------------------------------------------------------------------- sacrebleu


def bleu(predictions: Sequence[str], references: References, **options: Any) -> Score:
    """Corpus BLEU of ``predictions`` against ``references`` (sacrebleu's ``BLEU``).

    ``options`` are ``sacrebleu.metrics.BLEU`` arguments (``tokenize="13a"``,
    ``lowercase``, ``smooth_method``, ``max_ngram_order``, ...). Examples may have
    different numbers of references.

        bleu(["the cat sat on the mat"], ["the cat sat on the mat"]).score  ->  100.0
    """
    from sacrebleu.metrics import BLEU  # deferred: sacrebleu is slow to import

    predictions = _check_predictions(predictions)
    refs = _reference_lists(references, len(predictions))
    metric = _build(BLEU, options, "BLEU")
    result = metric.corpus_score(predictions, _reference_streams(refs))
    return _bleu_score(result, metric)


def sentence_bleu(prediction: str, references: str | Sequence[str], **options: Any) -> Score:
    """BLEU of one sentence; ``effective_order=True`` by default (sacrebleu's advice for
    single sentences: n-gram orders longer than the sentence are left out, not zero)."""
    from sacrebleu.metrics import BLEU  # deferred: sacrebleu is slow to import

    (prediction,) = _check_predictions([prediction])
    (refs,) = _reference_lists([references], 1)
    metric = _build(BLEU, {"effective_order": True, **options}, "BLEU")
    return _bleu_score(metric.sentence_score(prediction, refs), metric)


def _bleu_score(result: Any, metric: Any) -> Score:
    details = {
        "counts": list(result.counts),
        "totals": list(result.totals),
        "precisions": list(result.precisions),
        "bp": result.bp,
        "sys_len": result.sys_len,
        "ref_len": result.ref_len,
    }
    return Score(result.name, float(result.score), str(metric.get_signature()), details)


def chrf(predictions: Sequence[str], references: References, **options: Any) -> Score:
    """Corpus chrF of ``predictions`` against ``references`` (sacrebleu's ``CHRF``).

    ``options``: ``char_order`` (6), ``word_order`` (0; 2 gives chrF++), ``beta`` (2),
    ``lowercase``, ``whitespace``, ``eps_smoothing``.
    """
    from sacrebleu.metrics import CHRF  # deferred: sacrebleu is slow to import

    predictions = _check_predictions(predictions)
    refs = _reference_lists(references, len(predictions))
    metric = _build(CHRF, options, "chrF")
    return _chrf_score(metric.corpus_score(predictions, _reference_streams(refs)), metric)


def sentence_chrf(prediction: str, references: str | Sequence[str], **options: Any) -> Score:
    """chrF of one sentence against its reference(s)."""
    from sacrebleu.metrics import CHRF  # deferred: sacrebleu is slow to import

    (prediction,) = _check_predictions([prediction])
    (refs,) = _reference_lists([references], 1)
    metric = _build(CHRF, options, "chrF")
    return _chrf_score(metric.sentence_score(prediction, refs), metric)


def _chrf_score(result: Any, metric: Any) -> Score:
    details = {
        "char_order": result.char_order,
        "word_order": result.word_order,
        "beta": result.beta,
    }
    return Score(result.name, float(result.score), str(metric.get_signature()), details)


# ----------------------------------------------------------------------------- rouge-score


def rouge(
    predictions: Sequence[str],
    references: References,
    types: Sequence[str] = ("rouge1", "rouge2", "rougeL"),
    use_stemmer: bool = False,
    **scorer_options: Any,
) -> dict[str, dict[str, float]]:
    """Mean ROUGE precision, recall and F1 per type, 0..1 (rouge-score's ``RougeScorer``).

        rouge(["the cat sat"], ["the cat sat down"], types=["rouge1"])
            -> {"rouge1": {"precision": 1.0, "recall": 0.75, "f1": 0.857...}}

    ``use_stemmer`` applies the Porter stemmer ("cats" matches "cat"); ``scorer_options``
    are other ``RougeScorer`` arguments (``split_summaries``, ``tokenizer``). An example
    with several references keeps, per type, the reference with the best F1
    (``RougeScorer.score_multi``).
    """
    from rouge_score import rouge_scorer  # deferred: pulls in nltk and absl

    predictions = _check_predictions(predictions)
    refs = _reference_lists(references, len(predictions))
    types = [types] if isinstance(types, str) else list(types)
    if not types:
        raise ConfigError(f"types is empty; give at least one of {ROUGE_TYPES_HELP}")
    for t in types:
        if not re.fullmatch(r"rouge[1-9]|rougeL|rougeLsum", str(t)):
            raise ConfigError(f"ROUGE type {t!r} is invalid; valid: {ROUGE_TYPES_HELP}")
    options = {"use_stemmer": use_stemmer, **scorer_options}
    scorer = _build(partial(rouge_scorer.RougeScorer, types), options, "ROUGE")
    sums = {t: {"precision": 0.0, "recall": 0.0, "f1": 0.0} for t in types}
    for prediction, targets in zip(predictions, refs):
        scores = scorer.score_multi(targets, prediction)
        for t in types:
            sums[t]["precision"] += scores[t].precision
            sums[t]["recall"] += scores[t].recall
            sums[t]["f1"] += scores[t].fmeasure
    n = len(predictions)
    return {t: {k: v / n for k, v in s.items()} for t, s in sums.items()}


# ----------------------------------------------------------------------------- SQuAD


def normalize_answer(text: str) -> str:
    """SQuAD's normalisation: lower-case, drop punctuation, drop the articles a/an/the,
    collapse whitespace.

        "The  Cat's hat!"  ->  "cats hat"          "An apple, a day."  ->  "apple day"
    """
    text = "".join(c for c in text.lower() if c not in _PUNCTUATION)
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


_PUNCTUATION = frozenset(string.punctuation)


def exact_match(prediction: str, reference: str | Sequence[str], normalize: bool = True) -> float:
    """1.0 if ``prediction`` equals a reference (after ``normalize_answer`` when
    ``normalize``), else 0.0.

        exact_match("The cat.", "cat") -> 1.0      exact_match("cats", ["cat", "dog"]) -> 0.0
        exact_match("The cat.", "cat", normalize=False) -> 0.0
    """
    (refs,) = _reference_lists([reference], 1)
    (prediction,) = _check_predictions([prediction])
    clean = normalize_answer if normalize else (lambda s: s)
    return float(any(clean(prediction) == clean(r) for r in refs))


def token_f1(prediction: str, reference: str | Sequence[str]) -> float:
    """SQuAD token F1 between ``prediction`` and the best-matching reference.

    Tokens are the whitespace-separated words of ``normalize_answer``; shared tokens are
    counted as a multiset (``Counter`` intersection):

        token_f1("the cat sat", "a cat sat down")  ->  0.8     (P = 2/2, R = 2/3)
        token_f1("cat cat", "cat")                 ->  0.667   (1 shared: P = 1/2, R = 1/1)
        token_f1("", "")  ->  1.0      token_f1("", "cat")  ->  0.0      (SQuAD 2.0)
    """
    (refs,) = _reference_lists([reference], 1)
    (prediction,) = _check_predictions([prediction])
    return max(_f1(normalize_answer(prediction).split(), normalize_answer(r).split()) for r in refs)


def _f1(predicted: list[str], gold: list[str]) -> float:
    if not predicted or not gold:
        return float(predicted == gold)  # both empty: they agree
    shared = sum((Counter(predicted) & Counter(gold)).values())
    if shared == 0:
        return 0.0
    precision, recall = shared / len(predicted), shared / len(gold)
    return 2 * precision * recall / (precision + recall)


# ----------------------------------------------------------------------------- all at once


def check_metrics(metrics: Sequence[str]) -> tuple[str, ...]:
    """``metrics`` as a tuple of known names (``TEXT_METRICS``), or ``ConfigError``."""
    metrics = (metrics,) if isinstance(metrics, str) else tuple(metrics)
    if not metrics:
        raise ConfigError(f"metrics is empty; choose from {', '.join(TEXT_METRICS)}")
    for m in metrics:
        if m not in TEXT_METRICS:
            raise ConfigError(
                f"unknown metric {m!r}{closest(str(m), TEXT_METRICS)}; "
                f"valid: {', '.join(TEXT_METRICS)}"
            )
    return metrics


def text_scores(
    predictions: Sequence[str],
    references: References,
    metrics: Sequence[str] = ("exact_match", "token_f1", "bleu", "chrf", "rouge"),
) -> tuple[dict[str, float], dict[str, Any]]:
    """Corpus scores of ``predictions`` -> (scores, details), both JSON-ready.

    ``scores`` maps a name to one number: ``exact_match`` and ``token_f1`` (means, 0..1),
    ``bleu`` and ``chrf`` (0..100), ``rouge1``/``rouge2``/``rougeL`` (mean F1, 0..1).
    ``details`` holds the rest: sacrebleu's signatures and statistics, ROUGE precision and
    recall.
    """
    metrics = check_metrics(metrics)
    predictions = _check_predictions(predictions)
    refs = _reference_lists(references, len(predictions))
    scores: dict[str, float] = {}
    details: dict[str, Any] = {}
    n = len(predictions)
    for m in metrics:
        if m == "exact_match":
            scores[m] = sum(exact_match(p, r) for p, r in zip(predictions, refs)) / n
        elif m == "token_f1":
            scores[m] = sum(token_f1(p, r) for p, r in zip(predictions, refs)) / n
        elif m in ("bleu", "chrf"):
            score = (bleu if m == "bleu" else chrf)(predictions, refs)
            scores[m] = score.score
            details[m] = score.to_dict()
        else:  # rouge
            result = rouge(predictions, refs)
            scores.update({t: v["f1"] for t, v in result.items()})
            details[m] = result
    return scores, details


# ----------------------------------------------------------------------------- one candidate, in pieces

SCORING_EXAMPLES = Path(__file__).parent / "tasks" / "bleu_rouge_examples.jsonl"
"""Bundled candidates of known kinds (identical, one word changed, paraphrase, word salad,
too short, too long, unrelated) against two references (lesson 33, ``lmlab score``)."""


def score_breakdown(prediction: str, references: str | Sequence[str]) -> dict[str, Any]:
    """Every piece of one candidate's scores, JSON-ready:

    - ``bleu``: sentence BLEU (0..100, sacrebleu, effective order) with its clipped
      n-gram ``precisions`` (0..100; only the orders the candidate is long enough for;
      ``smoothed_precisions``: what the score uses, a zero replaced as sacrebleu's
      ``exp`` smoothing does),
      brevity penalty ``bp`` = min(1, exp(1 - ref_len / sys_len)), ``sys_len``, ``ref_len``;
      BLEU = bp * exp(mean log precision);
    - ``chrf``: sentence chrF (0..100), the F-beta (beta 2) of character 1..6-grams;
    - ``rouge1``, ``rouge2``, ``rougeL``: precision, recall and F1 (0..1, rouge-score).

        score_breakdown("the cat sat", "the cat sat on the mat")["bleu"]
            -> precisions [100, 100, 100] (3 orders), bp exp(1 - 6/3) = 0.368, score 36.8
    """
    b = sentence_bleu(prediction, references)
    counts, totals = b.details["counts"], b.details["totals"]
    # the raw clipped precisions of the orders that exist; sacrebleu's are smoothed
    # (exp: a zero count counts as 1 / 2^k), which is what its score multiplies
    b_details = {
        **b.details,
        "precisions": [100.0 * c / t for c, t in zip(counts, totals) if t],
        "smoothed_precisions": b.details["precisions"][: sum(1 for t in totals if t)],
    }
    refs = [references] if isinstance(references, str) else list(references)
    character = sentence_chrf(prediction, refs)
    return {
        "bleu": {"score": b.score, "signature": b.signature, **b_details},
        "chrf": character.score,
        "chrf_signature": character.signature,
        **rouge([prediction], [refs], types=("rouge1", "rouge2", "rougeL")),
    }


def load_scoring_examples(path: str | os.PathLike | None = None) -> list[dict[str, str]]:
    """Rows ``{"candidate", "reference", "kind", "group"}`` of a JSONL file (default: the
    bundled ``SCORING_EXAMPLES``); ``kind`` and ``group`` are optional labels. Errors name
    ``file:line``."""
    expected = (
        'a JSON object with "candidate" and "reference" (strings), "kind" and "group" optional'
    )
    rows = []
    for where, row in read_rows(path or SCORING_EXAMPLES, "scoring examples", expected):
        missing = [k for k in ("candidate", "reference") if not isinstance(row.get(k), str)]
        if missing:
            raise DataError(f"{where}: needs {' and '.join(map(repr, missing))} as strings; "
                            f"expected {expected}")  # fmt: skip
        rows.append({
            "candidate": row["candidate"], "reference": row["reference"],
            "kind": str(row.get("kind", f"row {len(rows) + 1}")), "group": str(row.get("group", "")),
        })  # fmt: skip
    return rows
