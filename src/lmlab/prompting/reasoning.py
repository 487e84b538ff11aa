"""Ways to ask a model a word problem: direct, chain of thought, self-consistency, PAL.

- **direct**: few-shot question -> answer pairs; the model writes the number.
- **cot**: chain of thought (Wei et al. 2022): the examples show their working and end in
  ``The answer is N.``; ``shots=0`` is the zero-shot "Let's think step by step." (Kojima
  et al. 2022).
- **self-consistency** (Wang et al. 2022): ``samples`` chain-of-thought replies at
  ``temperature`` > 0, the most common final answer wins (``maj@k``).
- **pal**: program-aided (Gao et al. 2022): the examples are ``def solution():`` programs;
  the model writes one, the sandbox (``lmlab.prompting.sandbox``) runs it, its return
  value is the answer. The model's program never runs in this process.

Every method reads answers both ways (``strict`` and ``flexible``, see ``extract``), and
``summarise`` gives the accuracy of each with a bootstrap 95% interval.
"""

from __future__ import annotations

import random
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from tqdm import tqdm

from lmlab.data.word_problems import word_problems
from lmlab.errors import ConfigError, closest
from lmlab.prompting.extract import extract_answer, extract_code, majority_vote, normalize_number
from lmlab.prompting.models import Completer
from lmlab.prompting.sandbox import Limits, run_python

METHODS = ("direct", "cot", "self-consistency", "pal")
ZERO_SHOT_COT = "Let's think step by step."
STOP = ("\n\nQuestion:", "\nQuestion:")
PAL_LIMITS = Limits(seconds=5)
_BARE = re.compile(r"-?\$?\d[\d,]*(?:\.\d+)?\.?")


def _examples(shots: int, seed: int) -> list[dict[str, str]]:
    """Worked examples from a seed no evaluation set uses (``seed + 10_000``)."""
    return word_problems(shots, seed=seed + 10_000) if shots else []


def build_prompt(question: str, method: str, shots: int = 4, seed: int = 0) -> str:
    """The plain-text prompt for ``question`` under ``method`` with ``shots`` examples."""
    if method not in METHODS:
        raise ConfigError(
            f"unknown method {method!r}{closest(method, list(METHODS))}; valid: {', '.join(METHODS)}"
        )
    examples = _examples(shots, seed)
    if method == "direct":
        body = [f"Question: {e['question']}\nAnswer: {e['answer']}" for e in examples]
        return "\n\n".join([*body, f"Question: {question}\nAnswer:"])
    if method == "pal":
        body = [f"Question: {e['question']}\n```python\n{e['program']}\n```" for e in examples]
        return "\n\n".join([*body, f"Question: {question}\n```python\n"])
    if not examples:
        return f"Question: {question}\nAnswer: {ZERO_SHOT_COT}"
    body = [f"Question: {e['question']}\nAnswer: {e['rationale']}" for e in examples]
    return "\n\n".join([*body, f"Question: {question}\nAnswer:"])


@dataclass
class Attempt:
    """One question answered by one method."""

    question: str
    reference: str
    method: str
    replies: list[str]
    strict: str | None
    flexible: str | None
    program: str | None = None
    program_status: str | None = None
    votes: list[str | None] = field(default_factory=list)

    def correct(self, how: str = "strict") -> bool:
        return getattr(self, how) == normalize_number(self.reference)


def _pal_answer(reply: str, limits: Limits) -> tuple[str | None, str, str | None]:
    """(answer, status, program) of a PAL reply: the program runs in the sandbox."""
    program = extract_code("```python\n" + reply)  # the prompt opened the block
    if program is None:
        return None, "no-program", None
    result = run_python(program, limits)
    if not result.ok or result.answer is None:
        return None, result.status if not result.ok else "no-answer", program
    return normalize_number(str(result.answer)), "ok", program


def solve(
    model: Completer,
    problems: Sequence[dict[str, str]],
    method: str = "cot",
    shots: int = 4,
    samples: int = 5,
    temperature: float = 0.7,
    max_tokens: int = 160,
    seed: int = 0,
    batch_size: int = 8,
    limits: Limits = PAL_LIMITS,
    progress: bool = True,
) -> list[Attempt]:
    """Each problem (``question``, ``answer``) answered by ``method`` (see module doc)."""
    if method not in METHODS:
        raise ConfigError(f"unknown method {method!r}; valid: {', '.join(METHODS)}")
    if method == "self-consistency" and samples < 1:
        raise ConfigError(f"self-consistency needs samples >= 1, got {samples}")
    prompts = [build_prompt(p["question"], method, shots, seed) for p in problems]
    stop = STOP + (("```",) if method == "pal" else ())
    tokens = 16 if method == "direct" else max_tokens
    n = samples if method == "self-consistency" else 1
    replies: list[list[str]] = [[] for _ in problems]
    bar = tqdm(total=len(problems) * n, desc=method, disable=not progress, unit="reply")
    for draw in range(n):
        sampled = method == "self-consistency"
        for start in range(0, len(prompts), batch_size):
            batch = prompts[start : start + batch_size]
            outs = model.complete(
                batch,
                max_tokens=tokens,
                temperature=temperature if sampled else 0.0,
                stop=stop,
                seed=seed * 1_000_003 + draw * 1009 + start if sampled else None,
            )
            for i, text in enumerate(outs):
                replies[start + i].append(text)
            bar.update(len(batch))
    bar.close()
    attempts = []
    for problem, texts in zip(problems, replies):
        attempt = Attempt(problem["question"], problem["answer"], method, texts, None, None)
        if method == "pal":
            answer, attempt.program_status, attempt.program = _pal_answer(texts[0], limits)
            attempt.strict = attempt.flexible = answer
        elif method == "self-consistency":
            for how in ("strict", "flexible"):
                votes = [extract_answer(t, how) for t in texts]
                setattr(attempt, how, majority_vote(votes)[0])
                if how == "strict":
                    attempt.votes = votes
        elif method == "direct":  # strict: the first line is the number and nothing else
            first = (texts[0].strip().split("\n") or [""])[0].strip()
            attempt.strict = normalize_number(first) if _BARE.fullmatch(first) else None
            attempt.flexible = extract_answer(first, "flexible")
        else:
            attempt.strict = extract_answer(texts[0], "strict")
            attempt.flexible = extract_answer(texts[0], "flexible")
        attempts.append(attempt)
    return attempts


def bootstrap_interval(
    correct: Sequence[bool], resamples: int = 2000, seed: int = 0, level: float = 0.95
) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of ``correct`` (seeded)."""
    if not correct:
        raise ConfigError("a bootstrap interval needs at least one result")
    rng = random.Random(seed)
    n, values = len(correct), [float(c) for c in correct]
    means = sorted(sum(rng.choices(values, k=n)) / n for _ in range(resamples))
    lo = means[int((1 - level) / 2 * resamples)]
    hi = means[min(resamples - 1, int((1 + level) / 2 * resamples))]
    return lo, hi


def maj_curve(attempts: Sequence[Attempt], how: str = "strict") -> list[float]:
    """Self-consistency accuracy using the first 1, 2, ... k samples (the maj@k curve)."""
    k = min(len(a.replies) for a in attempts)
    curve = []
    for j in range(1, k + 1):
        right = 0
        for a in attempts:
            votes = [extract_answer(t, how) for t in a.replies[:j]]
            right += majority_vote(votes)[0] == normalize_number(a.reference)
        curve.append(right / len(attempts))
    return curve


def summarise(attempts: Sequence[Attempt], seed: int = 0) -> dict[str, Any]:
    """Accuracy (strict and flexible) with bootstrap 95% intervals, and PAL's run statuses."""
    out: dict[str, Any] = {"method": attempts[0].method if attempts else None, "n": len(attempts)}
    for how in ("strict", "flexible"):
        correct = [a.correct(how) for a in attempts]
        lo, hi = bootstrap_interval(correct, seed=seed)
        out[how] = {"accuracy": sum(correct) / len(correct), "ci95": [lo, hi]}
    statuses = [a.program_status for a in attempts if a.program_status]
    if statuses:
        out["programs"] = {s: statuses.count(s) for s in sorted(set(statuses))}
    return out


def attempt_rows(attempts: Sequence[Attempt]) -> list[dict[str, Any]]:
    return [asdict(a) for a in attempts]
