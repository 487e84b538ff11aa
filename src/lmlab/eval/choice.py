"""Multiple-choice evaluation by log-likelihood, as lm-evaluation-harness scores it.

Each choice is scored as a continuation of the prompt with ``score_continuations`` (the
harness's ``loglikelihood`` request); the prediction is the choice with the highest score.
For item i with choices j (``ll_ij`` = summed log-probability of the continuation
``delimiter + choice_j`` in nats, ``text_j`` = the choice as written, without the
delimiter)::

    acc        = [argmax_j ll_ij                   == gold_i]   (harness: acc)
    acc_norm   = [argmax_j ll_ij / len(text_j)     == gold_i]   (harness: acc_norm, characters)
    acc_bytes  = [argmax_j ll_ij / bytes(text_j)   == gold_i]   (UTF-8 bytes of text_j)
    acc_tokens = [argmax_j ll_ij / n_tokens_ij     == gold_i]   (continuation tokens, with
                                                                 the delimiter's)

averaged over items, each with the standard error of the mean
``sqrt(sample variance / n)`` (sample variance with n - 1, the harness's ``mean_stderr``).
Ties go to the lowest index (``argmax``). ``probs`` is the softmax of ``ll_i`` over the
item's choices: the model's probability for each choice given that one is right, which
``lmlab.eval.calibration`` uses.

Prompt construction with k few-shot examples (the harness's ``fewshot_context``)::

    description + shot_1 + "\\n\\n" + ... + shot_k + "\\n\\n" + render(item)
    shot = render(example) + delimiter + choice_text(example)[example.gold]

The examples are k items drawn without replacement, with ``random.Random(f"{seed}:{i}")``
for the i-th evaluated item (so an item's prompt does not depend on ``limit`` or order),
from the task's few-shot pool (its train/dev items) or, when it has none, from the task's
other items (all of them, whatever ``limit``): the asked item is never among its own
examples (the harness draws k + 1 and drops it). k = 0 gives ``description + render(item)``.

Parity: ``tests/eval/test_choice.py::test_choice_loglikelihoods_match_lm_eval_harness``
scores the same prompts with lm-evaluation-harness's ``HFLM`` on a tiny random Llama.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from lmlab.errors import ConfigError, DataError
from lmlab.eval.scoring import score_continuations
from lmlab.eval.tasks import ChoiceItem, ChoiceTask
from lmlab.lm import LM

METRICS = ("acc", "acc_norm", "acc_bytes", "acc_tokens")
FEWSHOT_SEPARATOR = "\n\n"


# -------------------------------------------------------------------------------- maths


def predictions(loglikelihoods: Sequence[float], lengths: Sequence[int]) -> int:
    """argmax_j ll_j / length_j (lowest index on ties): ``[-4, -6], [1, 3] -> 1``."""
    scores = np.asarray(loglikelihoods, dtype=np.float64) / np.asarray(lengths, np.float64)
    return int(np.argmax(scores))


def choice_probs(loglikelihoods: Sequence[float]) -> list[float]:
    """softmax over the choices: ``[log .2, log .6] -> [.25, .75]``."""
    ll = np.asarray(loglikelihoods, dtype=np.float64)
    p = np.exp(ll - ll.max())
    return (p / p.sum()).tolist()


def mean_stderr(values: Sequence[float]) -> float:
    """Standard error of the mean, ``sqrt(sum (x - mean)^2 / (n - 1) / n)``; nan if n < 2.

    ``[1, 0, 1, 1] -> sqrt(0.25 / 4) = 0.25``.
    """
    n = len(values)
    if n < 2:
        return math.nan
    x = np.asarray(values, dtype=np.float64)
    return float(math.sqrt(((x - x.mean()) ** 2).sum() / (n - 1) / n))


# ------------------------------------------------------------------------------ prompts


def fewshot_examples(task: ChoiceTask, index: int, k: int, seed: int = 0) -> list[ChoiceItem]:
    """The k examples shown before ``task.items[index]`` (see the module docstring)."""
    if k < 0:
        raise ConfigError(f"num_fewshot={k} is invalid: must be >= 0")
    if k == 0:
        return []
    pool = list(task.fewshot) or [it for i, it in enumerate(task.items) if i != index]
    if k > len(pool):
        where = "few-shot pool" if task.fewshot else "other items"
        raise ConfigError(
            f"num_fewshot={k} is invalid for task {task.name!r}: its {where} hold only "
            f"{len(pool)} example(s)"
        )
    return random.Random(f"{seed}:{index}").sample(pool, k)


def build_prompt(task: ChoiceTask, item: ChoiceItem, examples: Sequence[ChoiceItem]) -> str:
    """``description + shots joined and followed by "\\n\\n" + render(item)``."""
    fmt = task.prompt
    shots = [fmt.render(ex) + fmt.continuations(ex)[ex.gold] for ex in examples]
    return task.description + "".join(s + FEWSHOT_SEPARATOR for s in shots) + fmt.render(item)


# ------------------------------------------------------------------------------ results


@dataclass(frozen=True)
class ItemResult:
    """The scores of one item."""

    id: str | None
    subject: str | None
    gold: int
    loglikelihoods: list[float]
    """Summed log-probability of each choice's continuation (nats)."""
    n_tokens: list[int]
    n_chars: list[int]
    n_bytes: list[int]
    probs: list[float]
    """softmax of ``loglikelihoods``: the model's probability for each choice."""
    pred: dict[str, int]
    """Predicted index under each metric's normalisation."""
    prompt: str

    @property
    def correct(self) -> dict[str, bool]:
        return {m: p == self.gold for m, p in self.pred.items()}

    @property
    def confidence(self) -> float:
        """The probability of the ``acc`` prediction."""
        return self.probs[self.pred["acc"]]


@dataclass(frozen=True)
class ChoiceResult:
    """Accuracy of a model on a multiple-choice task, per item and per subject."""

    task: str
    num_fewshot: int
    seed: int
    items: list[ItemResult] = field(repr=False)
    skipped: list[str] = field(default_factory=list)
    """Items the tokenizer cannot encode (e.g. a digit under a Shakespeare character
    vocabulary), each as "id: reason"; they count in no score."""

    @property
    def n(self) -> int:
        return len(self.items)

    def scores(self, items: Sequence[ItemResult] | None = None) -> dict[str, float]:
        """Each metric of ``METRICS`` and its ``<metric>_stderr``."""
        items = self.items if items is None else items
        out: dict[str, float] = {}
        for m in METRICS:
            hits = [float(it.correct[m]) for it in items]
            out[m] = float(np.mean(hits))
            out[f"{m}_stderr"] = mean_stderr(hits)
        return out

    def by_subject(self) -> dict[str, dict[str, float]]:
        """``scores`` per subject (empty when no item has one), with ``n``."""
        subjects = sorted({it.subject for it in self.items if it.subject is not None})
        out = {}
        for s in subjects:
            group = [it for it in self.items if it.subject == s]
            out[s] = {"n": len(group), **self.scores(group)}
        return out

    def rows(self) -> list[dict[str, Any]]:
        """Table rows: "all" then one per subject (subject, n, acc, acc_norm, ...)."""
        rows = [{"subject": "all", "n": self.n, **self.scores()}]
        rows += [{"subject": s, **v} for s, v in self.by_subject().items()]
        return rows

    def summary(self) -> str:
        s = self.scores()
        return (
            f"{self.task} ({self.num_fewshot}-shot, n={self.n}): "
            f"acc {s['acc']:.3f} ± {s['acc_stderr']:.3f}, acc_norm {s['acc_norm']:.3f}, "
            f"acc_bytes {s['acc_bytes']:.3f}, acc_tokens {s['acc_tokens']:.3f}"
            + (f" ({len(self.skipped)} items skipped: not encodable)" if self.skipped else "")
        )

    def to_dict(self) -> dict[str, Any]:
        def clean(v: float) -> float | None:
            return None if isinstance(v, float) and math.isnan(v) else v

        return {
            "task": self.task,
            "num_fewshot": self.num_fewshot,
            "seed": self.seed,
            "n": self.n,
            "skipped": list(self.skipped),
            "scores": {k: clean(v) for k, v in self.scores().items()},
            "by_subject": {
                s: {k: clean(v) for k, v in d.items()} for s, d in self.by_subject().items()
            },
            "items": [
                {
                    "id": it.id,
                    "subject": it.subject,
                    "gold": it.gold,
                    "loglikelihoods": it.loglikelihoods,
                    "n_tokens": it.n_tokens,
                    "probs": it.probs,
                    "pred": it.pred,
                    "prompt": it.prompt,
                }
                for it in self.items
            ],
        }


# --------------------------------------------------------------------------- evaluation


def evaluate_choice(
    lm: LM,
    task: ChoiceTask,
    num_fewshot: int = 0,
    seed: int = 0,
    batch_size: int = 16,
    limit: int | None = None,
    progress: bool = True,
) -> ChoiceResult:
    """Score every choice of the first ``limit`` items (all when None) of ``task`` with
    ``lm`` (an ``lmlab.LM``: ``.model`` and ``.tokenizer``) -> ``ChoiceResult``.

    An item whose prompt or choices the tokenizer cannot encode (a character outside a
    character vocabulary) is skipped and listed in ``skipped``; if none is left, DataError.
    """
    if limit is not None and limit < 1:
        raise ConfigError(f"limit={limit} is invalid: must be >= 1 or None")
    chosen = task.items[:limit] if limit is not None else task.items
    encode = getattr(getattr(lm, "tokenizer", None), "encode", len)  # len: nothing to check
    prompts, requests, spans, items, skipped = [], [], [], [], []
    for i, item in enumerate(chosen):
        prompt = build_prompt(task, item, fewshot_examples(task, i, num_fewshot, seed))
        try:
            for continuation in task.prompt.continuations(item):
                encode(prompt + continuation)
        except DataError as e:
            skipped.append(f"{item.id if item.id is not None else i}: {e}")
            continue
        items.append(item)
        start = len(requests)
        requests += [(prompt, c) for c in task.prompt.continuations(item)]
        prompts.append(prompt)
        spans.append((start, len(requests)))
    if not items:
        raise DataError(
            f"task {task.name!r}: the tokenizer encodes none of its {len(chosen)} items; "
            f"first: {skipped[0]}"
        )
    scored = score_continuations(lm, requests, batch_size=batch_size, progress=progress)
    results = []
    for item, prompt, (a, b) in zip(items, prompts, spans):
        ll = [s.logprob for s in scored[a:b]]
        texts = task.prompt.choice_texts(item)
        lengths = {
            "acc": [1] * len(ll),
            "acc_norm": [max(len(t), 1) for t in texts],
            "acc_bytes": [max(len(t.encode("utf-8")), 1) for t in texts],
            "acc_tokens": [s.n_tokens for s in scored[a:b]],
        }
        results.append(
            ItemResult(
                id=item.id,
                subject=item.subject,
                gold=item.gold,
                loglikelihoods=ll,
                n_tokens=lengths["acc_tokens"],
                n_chars=[len(t) for t in texts],
                n_bytes=[len(t.encode("utf-8")) for t in texts],
                probs=choice_probs(ll),
                pred={m: predictions(ll, lengths[m]) for m in METRICS},
                prompt=prompt,
            )
        )
    return ChoiceResult(task.name, num_fewshot, seed, results, skipped)
