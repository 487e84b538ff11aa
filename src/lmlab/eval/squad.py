"""Extractive question answering: from start/end logits over windows to an answer, and
SQuAD's exact match and F1.

Post-processing (``best_answers``, as BERT's run_squad and transformers' run_qa do it): in
each window of an example take the ``n_best`` highest start logits and the ``n_best``
highest end logits; every pair with both tokens in the context, start <= end and at most
``max_answer_len`` tokens is a candidate scored start + end logit; the best candidate over
all the example's windows wins, and its tokens' character offsets cut the answer out of the
context.

Scores follow the official SQuAD v1.1 evaluation script (``evaluate-v1.1.py``): both
strings are normalised (lower case, punctuation removed, the articles a/an/the removed,
whitespace collapsed); exact match is 1 when they are equal; F1 is the harmonic mean of
the precision and recall of their bags of words; with several gold answers the best one
counts; the means over questions are given in percent::

    normalise("The  Eiffel Tower!") -> "eiffel tower"
    f1("in Paris", "Paris")  -> precision 1/2, recall 1/1 -> 0.667

Reference: tests/eval/test_squad.py checks these functions on examples worked by hand from
the script's formulas (``evaluate``'s squad metric downloads its script from the Hub, so it
cannot serve offline).
"""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Sequence

import torch

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = set(string.punctuation)


def normalise_answer(text: str) -> str:
    """Lower case, no punctuation, no articles, single spaces (SQuAD v1.1's normalize_answer)."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def exact_match(prediction: str, truth: str) -> float:
    return float(normalise_answer(prediction) == normalise_answer(truth))


def token_f1(prediction: str, truth: str) -> float:
    """F1 of the normalised words of ``prediction`` against ``truth`` (0 with no overlap)."""
    pred, gold = normalise_answer(prediction).split(), normalise_answer(truth).split()
    common = sum((Counter(pred) & Counter(gold)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(gold)
    return 2 * precision * recall / (precision + recall)


def squad_scores(
    predictions: Sequence[str], truths: Sequence[str | Sequence[str]]
) -> dict[str, float]:
    """Mean exact match and F1 in percent; each truth is one answer or a list of them
    (the best one counts)."""
    if len(predictions) != len(truths):
        raise ValueError(f"{len(predictions)} predictions but {len(truths)} answers")
    em = f1 = 0.0
    for prediction, truth in zip(predictions, truths):
        answers = [truth] if isinstance(truth, str) else list(truth)
        em += max(exact_match(prediction, a) for a in answers)
        f1 += max(token_f1(prediction, a) for a in answers)
    n = max(len(predictions), 1)
    return {"exact_match": 100.0 * em / n, "f1": 100.0 * f1 / n}


def best_answers(
    contexts: Sequence[str],
    windows: Sequence[tuple[int, Sequence[tuple[int, int] | None]]],
    start_logits: Sequence[torch.Tensor],
    end_logits: Sequence[torch.Tensor],
    n_best: int = 20,
    max_answer_len: int = 30,
) -> list[str]:
    """The answer text of each context from its windows' logits.

    ``windows[i]`` is (index of its context, offsets of its tokens: (start, end)
    characters in the context, None outside it); ``start_logits[i]`` and
    ``end_logits[i]`` are that window's logits [T]. A context whose windows hold no valid
    span gets the empty answer.
    """
    best: dict[int, tuple[float, str]] = {}
    for (context_index, offsets), starts, ends in zip(windows, start_logits, end_logits):
        context = contexts[context_index]
        T = len(offsets)
        starts, ends = starts[:T].float(), ends[:T].float()
        top_starts = starts.topk(min(n_best, T)).indices.tolist()
        top_ends = ends.topk(min(n_best, T)).indices.tolist()
        for s in top_starts:
            for e in top_ends:
                if offsets[s] is None or offsets[e] is None or e < s or e - s + 1 > max_answer_len:
                    continue
                score = float(starts[s] + ends[e])
                if context_index not in best or score > best[context_index][0]:
                    text = context[offsets[s][0] : offsets[e][1]].strip()
                    best[context_index] = (score, text)
    return [best.get(i, (0.0, ""))[1] for i in range(len(contexts))]
