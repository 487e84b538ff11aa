"""Answer and code extraction, self-consistency votes."""

import random
import re

import pytest

from lmlab.errors import ConfigError
from lmlab.prompting.extract import (
    extract_answer,
    extract_code,
    maj_at_k,
    majority_vote,
    normalize_number,
)


@pytest.mark.parametrize(
    "text, strict, flexible",
    [
        ("She has 3 apples and buys 4. The answer is 7.", "7", "7"),
        ("3 + 4 = 7\n#### 7", "7", "7"),
        ("It costs $1,200.50 in total, so the answer is: **$1,200.50**", "1200.5", "1200.5"),
        ("so 12 - 20 = -8 degrees", None, "-8"),
        ("The answer is 7. Wait, 8 more makes 15", "7", "15"),
        ("no numbers here", None, None),
        ("The final answer is 42.0.", "42", "42"),
    ],
)
def test_strict_and_flexible_read_what_they_should(text, strict, flexible):
    assert extract_answer(text, "strict") == strict
    assert extract_answer(text, "flexible") == flexible


def lm_eval_flexible(text):
    """lm-evaluation-harness' GSM8K flexible-extract filter (the last match of its regex),
    then its exact-match ignores (commas, dollars, a final period)."""
    found = re.findall(r"(-?[$0-9.,]{2,})|(-?[0-9]+)", text)
    if not found:
        return None
    match = [m for m in found[-1] if m][0]
    for pattern in (",", r"\$", r"\.$"):
        match = re.sub(pattern, "", match)
    return match


def test_flexible_agrees_with_lm_eval_on_generated_replies():
    rng = random.Random(0)
    words = ["she", "has", "apples", "so", "then", "total", "each", "costs", "left", "in"]
    for _ in range(300):
        parts = []
        for _ in range(rng.randint(1, 12)):
            if rng.random() < 0.3:
                n = rng.randint(-5000, 2_000_000)
                text = f"{n:,}" if rng.random() < 0.5 else str(n)
                parts.append(("$" if rng.random() < 0.2 else "") + text)
            else:
                parts.append(rng.choice(words))
        text = " ".join(parts) + rng.choice([".", "", "!"])
        ours, theirs = extract_answer(text, "flexible"), lm_eval_flexible(text)
        assert ours == (normalize_number(theirs) if theirs is not None else None), text


def test_code_is_the_last_complete_python_block():
    reply = "Thought: I will write ``` a block.\n```python\nx = 1\n```\nbetter:\n```python\ndef solution():\n    return 2\n```\nDone"
    assert extract_code(reply) == "def solution():\n    return 2\n"
    # cut at the stop sequence: the block never closes
    assert (
        extract_code("```python\ndef solution():\n    return 3")
        == "def solution():\n    return 3\n"
    )
    # PAL style: the completion is the program itself
    assert extract_code("def solution():\n    return 4\n") == "def solution():\n    return 4\n"
    assert extract_code("```text\nnot code\n```") is None
    assert extract_code("The answer is 4.") is None


def test_majority_vote_and_maj_at_k():
    assert majority_vote(["3", None, "4", "4", "3"]) == ("3", 2)  # tie: first seen
    assert majority_vote([None, None]) == (None, 0)
    samples = [["1", "2", "2"], ["5", "5", "6"], ["7", "8", "9"]]
    refs = ["2", "5", "9"]
    assert maj_at_k(samples, refs, 1) == pytest.approx(1 / 3)
    assert maj_at_k(samples, refs, 3) == pytest.approx(2 / 3)
    with pytest.raises(ConfigError, match="k must be between 1"):
        maj_at_k(samples, refs, 4)
    with pytest.raises(ConfigError, match="valid: strict, flexible"):
        extract_answer("1", "loose")
