"""Robustness of a multiple-choice score to simple, meaning-preserving perturbations.

The same task is evaluated unchanged (``"none"``) and under each perturbation:

- ``lowercase`` / ``uppercase``: the query's case (choices unchanged);
- ``typos``: in the query only, each letter is, with probability ``typo_rate``, swapped
  with the next character or dropped (half and half), seeded per item
  (``random.Random(f"{seed}:typos:{i}")``);
- ``shuffle_choices``: the choices in a seeded random order per item, ``gold`` remapped
  so it points at the same text (exposes a preference for a position or letter);
- ``prompt_format``: each template of ``PROMPT_VARIANTS`` in place of the task's
  (named ``prompt_format:<variant>``); a task that lists its options in the prompt
  (``{options}``) keeps them after the query.

For the chosen metric (default ``acc``)::

    delta[p]  = score[p] - score["none"]
    spread    = max_p score[p] - min_p score[p]     (over all conditions, "none" included)
    std       = population standard deviation of the same scores

In the spirit of the perturbation suites of HELM (Liang et al. 2022, "robustness":
typos, case) and of answer-order sensitivity studies (Pezeshkpour and Hruschka 2023).
``tests/eval/test_robustness.py`` checks each perturbation's invariants.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from lmlab.errors import ConfigError, DataError, closest
from lmlab.eval.choice import METRICS, ChoiceResult, evaluate_choice
from lmlab.eval.tasks import ChoiceItem, ChoiceTask
from lmlab.lm import LM

PERTURBATIONS = ("lowercase", "uppercase", "typos", "shuffle_choices", "prompt_format")
PROMPT_VARIANTS = {
    "qa": "Question: {query}\nAnswer:",
    "qa_short": "Q: {query}\nA:",
    "plain": "{query}",
    "arrow": "{query} ->",
}


def add_typos(text: str, rate: float, rng: random.Random) -> str:
    """Swap each letter with the next character or drop it, with probability ``rate``."""
    chars, out, i = list(text), [], 0
    while i < len(chars):
        c = chars[i]
        if c.isalpha() and rng.random() < rate:
            if rng.random() < 0.5 and i + 1 < len(chars):
                out += [chars[i + 1], c]  # swap with the next character
                i += 2
                continue
            i += 1  # drop
            continue
        out.append(c)
        i += 1
    return "".join(out)


def shuffle_item(item: ChoiceItem, rng: random.Random) -> ChoiceItem:
    """The choices permuted, ``gold`` following its text."""
    order = list(range(len(item.choices)))
    rng.shuffle(order)
    choices = tuple(item.choices[j] for j in order)
    return replace(item, choices=choices, gold=order.index(item.gold))


def perturb(task: ChoiceTask, name: str, seed: int = 0, typo_rate: float = 0.05) -> ChoiceTask:
    """``task`` under one perturbation (``"lowercase"``, ``"typos"``, ...,
    ``"prompt_format:<variant>"``); the few-shot pool is perturbed alike."""

    def each(fn) -> ChoiceTask:
        items = tuple(fn(it, i) for i, it in enumerate(task.items))
        pool = tuple(fn(it, -1 - i) for i, it in enumerate(task.fewshot))
        return replace(task, items=items, fewshot=pool)

    if name == "none":
        return task
    if name == "lowercase":
        return each(lambda it, i: replace(it, query=it.query.lower()))
    if name == "uppercase":
        return each(lambda it, i: replace(it, query=it.query.upper()))
    if name == "typos":
        if not 0 <= typo_rate <= 1:
            raise ConfigError(f"typo_rate={typo_rate} is invalid: must be in [0, 1]")
        return each(
            lambda it, i: replace(
                it, query=add_typos(it.query, typo_rate, random.Random(f"{seed}:typos:{i}"))
            )
        )
    if name == "shuffle_choices":
        return each(lambda it, i: shuffle_item(it, random.Random(f"{seed}:shuffle:{i}")))
    if name.startswith("prompt_format:"):
        variant = name.split(":", 1)[1]
        if variant not in PROMPT_VARIANTS:
            raise ConfigError(
                f"prompt format {variant!r} is unknown{closest(variant, list(PROMPT_VARIANTS))}"
                f"; valid: {', '.join(PROMPT_VARIANTS)}"
            )
        template = PROMPT_VARIANTS[variant]
        if "{options}" in task.prompt.template:
            template = template.replace("{query}", "{query}\n{options}")
        return replace(task, prompt=replace(task.prompt, template=template))
    valid = list(PERTURBATIONS) + [f"prompt_format:{v}" for v in PROMPT_VARIANTS]
    raise ConfigError(
        f"perturbation {name!r} is unknown{closest(name, valid)}; valid: {', '.join(valid)}"
    )


def expand(perturbations: Sequence[str]) -> list[str]:
    """``"prompt_format"`` -> one ``"prompt_format:<variant>"`` per variant."""
    out = []
    for p in perturbations:
        out += [f"prompt_format:{v}" for v in PROMPT_VARIANTS] if p == "prompt_format" else [p]
    return out


@dataclass(frozen=True)
class RobustnessResult:
    task: str
    metric: str
    results: dict[str, ChoiceResult]
    """One result per condition, ``"none"`` first."""
    unscored: dict[str, str] = field(default_factory=dict)
    """Conditions the model's tokenizer cannot encode at all (e.g. a prompt format with
    ">" under a character vocabulary without it), with the reason; left out of the spread."""

    @property
    def scores(self) -> dict[str, float]:
        return {k: r.scores()[self.metric] for k, r in self.results.items()}

    @property
    def deltas(self) -> dict[str, float]:
        base = self.scores["none"]
        return {k: v - base for k, v in self.scores.items() if k != "none"}

    @property
    def spread(self) -> float:
        v = list(self.scores.values())
        return max(v) - min(v)

    @property
    def std(self) -> float:
        return float(np.std(list(self.scores.values())))

    def rows(self) -> list[dict[str, Any]]:
        base = self.scores["none"]
        return [
            {"perturbation": k, self.metric: v, "delta": v - base, "n": self.results[k].n}
            for k, v in self.scores.items()
        ]

    def summary(self) -> str:
        worst = min(self.deltas.items(), key=lambda kv: kv[1]) if self.deltas else ("-", 0.0)
        return (
            f"{self.task}: {self.metric} {self.scores['none']:.3f} unperturbed; spread "
            f"{self.spread:.3f}, std {self.std:.3f}; worst {worst[0]} ({worst[1]:+.3f})"
            + (f"; {len(self.unscored)} conditions not encodable" if self.unscored else "")
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "task": self.task,
            "metric": self.metric,
            "scores": self.scores,
            "deltas": self.deltas,
            "spread": self.spread,
            "std": self.std,
            "results": {k: r.to_dict() for k, r in self.results.items()},
            "unscored": dict(self.unscored),
        }


def evaluate_robustness(
    lm: LM,
    task: ChoiceTask,
    perturbations: Sequence[str] = PERTURBATIONS,
    seed: int = 0,
    metric: str = "acc",
    typo_rate: float = 0.05,
    num_fewshot: int = 0,
    batch_size: int = 16,
    limit: int | None = None,
    progress: bool = True,
) -> RobustnessResult:
    """``evaluate_choice`` on ``task`` unchanged and under each perturbation."""
    if metric not in METRICS:
        raise ConfigError(
            f"metric={metric!r} is invalid{closest(metric, METRICS)}; valid: " + ", ".join(METRICS)
        )
    names = ["none"] + [p for p in expand(perturbations) if p != "none"]
    results, unscored = {}, {}
    for name in names:
        perturbed = perturb(task, name, seed, typo_rate)
        try:
            results[name] = evaluate_choice(
                lm, perturbed, num_fewshot, seed, batch_size, limit, progress
            )
        except DataError as e:
            if name == "none":
                raise
            unscored[name] = str(e)
    return RobustnessResult(task.name, metric, results, unscored)
