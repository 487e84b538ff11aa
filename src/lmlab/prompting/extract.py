"""Reading answers and programs out of what a model wrote.

Two ways to read a final answer, as lm-evaluation-harness reports both for GSM8K:

- **strict**: only an answer stated in the requested form: ``The answer is 42.`` or
  ``#### 42`` (the last such statement wins);
- **flexible**: the last number anywhere in the text (``... so she has 42 apples``).

The gap between them says how much of a score is the model's format rather than its
arithmetic. Numbers are normalised (``$1,200.50`` -> ``1200.5``, ``42.0`` -> ``42``) so that
equal values compare equal as strings.

``extract_code`` finds the program in a reply for program-aided prompting. It takes the
last complete fenced block, ignores fences quoted inside the prose (a fence that opens
mid-line is not a fence), and accepts a reply cut at a stop sequence (a block opened and
never closed, or a bare ``def solution():`` with no fence at all).

``majority_vote`` and ``maj_at_k`` are self-consistency (Wang et al. 2022): sample several
reasoning paths and keep the most common final answer.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence

from lmlab.errors import ConfigError

MODES = ("strict", "flexible")
_NUMBER = r"-?\$?\d[\d,]*(?:\.\d+)?"
_STRICT = re.compile(
    rf"(?:the (?:final )?answer is|####)\s*:?\s*\**\s*({_NUMBER})", flags=re.IGNORECASE
)
_ANY_NUMBER = re.compile(_NUMBER)
_FENCE = re.compile(r"^[ \t]*```[ \t]*([\w+-]*)[ \t]*$", flags=re.MULTILINE)


def normalize_number(text: str) -> str:
    """``"$1,200.50"`` -> ``"1200.5"``; ``"42.0"`` -> ``"42"``; ``"-7"`` -> ``"-7"``."""
    cleaned = text.replace("$", "").replace(",", "").rstrip(".")
    try:
        value = float(cleaned)
    except ValueError:
        return cleaned
    if value.is_integer() and abs(value) < 1e16:
        return str(int(value))
    return repr(value)


def extract_answer(text: str, mode: str = "strict") -> str | None:
    """The final numeric answer in ``text`` read ``strict``ly or ``flexible``; None if none."""
    if mode not in MODES:
        raise ConfigError(f"unknown answer extraction {mode!r}; valid: {', '.join(MODES)}")
    if mode == "strict":
        found = _STRICT.findall(text)
    else:
        found = [m for m in _ANY_NUMBER.findall(text) if any(c.isdigit() for c in m)]
    return normalize_number(found[-1]) if found else None


def extract_code(text: str) -> str | None:
    """The Python program in a model's reply, or None when there is none (see module doc)."""
    fences = list(_FENCE.finditer(text))
    blocks, i = [], 0
    while i < len(fences):
        opening = fences[i]
        if i + 1 < len(fences):
            closing = fences[i + 1]
            blocks.append(text[opening.end() + 1 : closing.start()])
            i += 2
        else:  # opened and cut off (a stop sequence, or the token budget)
            blocks.append(text[opening.end() + 1 :])
            i += 1
    python = [b for b, f in zip(blocks, fences[::2]) if f.group(1).lower() in ("", "python", "py")]
    if python:
        return python[-1].rstrip() + "\n" if python[-1].strip() else None
    start = re.search(r"^(?:def |import |from \w+ import )", text, flags=re.MULTILINE)
    return text[start.start() :].rstrip() + "\n" if start else None


def majority_vote(answers: Sequence[str | None]) -> tuple[str | None, int]:
    """The most common answer (ties: the one seen first) and its count; Nones do not vote."""
    votes = Counter(a for a in answers if a is not None)
    if not votes:
        return None, 0
    top = max(votes.values())
    winner = next(a for a in answers if a is not None and votes[a] == top)
    return winner, top


def maj_at_k(samples: Sequence[Sequence[str | None]], references: Sequence[str], k: int) -> float:
    """Accuracy of the majority over the first ``k`` samples of each question."""
    if len(samples) != len(references):
        raise ConfigError(f"{len(samples)} sample lists for {len(references)} references")
    if not 1 <= k <= min(len(s) for s in samples):
        raise ConfigError(f"k must be between 1 and the fewest samples per question; got {k}")
    right = sum(
        majority_vote(s[:k])[0] == normalize_number(ref) for s, ref in zip(samples, references)
    )
    return right / len(references)
