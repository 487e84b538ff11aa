"""Preference pairs with no human: verifiable tasks grade the replies themselves.

For the tasks of ``lmlab.data.tasks`` a reply is right or wrong by ``check``, so
preferences can be made by program (the idea behind RL from verifiable rewards, e.g.
Lambert et al. 2024, "Tulu 3"):

- ``reference_pairs(rows, seed)``: chosen = the reference answer, rejected = a plausible
  wrong one (off-policy)::

      "What is 4 * 5? Answer with the number only."  chosen "20"  rejected "21"
      "Reverse the letters of the word.\\n\\nplanet"   chosen "tenalp"  rejected "tenlap"

- ``sampled_pairs(lm, rows, k, seed)``: k replies sampled from the model itself per prompt
  (on-policy), graded with ``check``; a prompt with a right and a wrong reply gives the
  pair (first right, first wrong); one where all are right or all wrong gives none.

The prompt of a pair is the row's conversation before the reply, exactly as SFT renders
it (``example_from_row``): a plain string when it is one user message (instruction, a
blank line, input), the messages when there is a system message too. Save pairs with
``lmlab.data.preferences.write_preferences``.
"""

from __future__ import annotations

import json
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from tqdm.auto import tqdm

from lmlab.data.instructions import example_from_row, template_for
from lmlab.data.preferences import PreferencePair, Prompt
from lmlab.data.tasks import check
from lmlab.errors import ConfigError, DataError
from lmlab.lm import LM


def row_prompt(row: Mapping[str, Any]) -> Prompt:
    """The prompt of a task row as SFT sees it: the user message's text (instruction, a
    blank line, input), or the messages when the row has a system message."""
    messages = example_from_row(row).messages[:-1]
    if len(messages) == 1:
        return messages[0]["content"]
    return tuple(dict(m) for m in messages)


def _task_of(row: Mapping[str, Any], where: str) -> str:
    if "task" not in row:
        raise DataError(f"{where}: a task row needs a 'task' key to be graded (see generate_tasks)")
    return row["task"]


# ----------------------------------------------------------------------------- near misses


def _near_integers(reference: str, rng: random.Random) -> list[str]:
    value = int(reference)
    deltas = [1, -1, 2, -2, 10, -10, 3]
    rng.shuffle(deltas)
    return [str(value + d) for d in deltas if value + d >= 0 or value < 0]


def _near_strings(reference: str, rng: random.Random) -> list[str]:
    """Two neighbouring characters swapped, one dropped, one doubled (a careless copy)."""
    out = []
    if len(reference) > 1:
        i = rng.randrange(len(reference) - 1)
        out.append(reference[:i] + reference[i + 1] + reference[i] + reference[i + 2 :])
        j = rng.randrange(len(reference))
        out.append(reference[:j] + reference[j + 1 :])
    k = rng.randrange(max(len(reference), 1))
    out.append(reference[: k + 1] + reference[k:])
    return out


def near_misses(task: str, row: Mapping[str, Any], rng: random.Random) -> list[str]:
    """Plausible wrong answers to a task row, most plausible first (each fails ``check``)."""
    reference = row["output"]
    if task in ("arithmetic", "count_letter"):
        candidates = _near_integers(reference, rng)
    elif task == "reverse":
        # the word left unreversed, then careless reversals
        candidates = [row.get("input", "")] + _near_strings(reference, rng)
    elif task == "format":
        try:
            value = json.loads(reference)
        except json.JSONDecodeError:
            value = None
        if isinstance(value, dict):  # a near-miss JSON: the bare value, a wrong key
            ((key, text),) = value.items()
            candidates = [text, json.dumps({key + "s": text}), f"{key}: {text}"]
        else:  # the input unchanged, or the wrong case
            candidates = [row.get("input", ""), reference.swapcase(), reference.title()]
    else:
        candidates = _near_strings(reference, rng)
    wrong = [c for c in dict.fromkeys(candidates) if c.strip() and not check(task, c, reference)]
    if not wrong:  # a last resort: a careless copy of the reference
        fallback = _near_strings(reference, rng) + [reference + " " + reference]
        wrong = [c for c in fallback if c.strip() and not check(task, c, reference)]
    return wrong


def reference_pairs(rows: Sequence[Mapping[str, Any]], seed: int = 0) -> list[PreferencePair]:
    """One pair per task row: chosen the reference answer, rejected a near miss.

    ``rows`` are ``lmlab.data.tasks`` rows with their ``"task"``; the near miss is drawn
    from ``near_misses`` with ``random.Random(seed)`` (same seed, same pairs).
    """
    rng = random.Random(seed)
    pairs = []
    for i, row in enumerate(rows):
        task = _task_of(row, f"row {i}")
        wrong = near_misses(task, row, rng)
        if not wrong:
            raise DataError(f"row {i}: found no wrong answer near {row['output']!r}")
        pick = wrong[0] if rng.random() < 0.5 else rng.choice(wrong)
        meta = {"task": task, "source": "reference", "reference": row["output"]}
        pairs.append(PreferencePair(row_prompt(row), row["output"], pick, meta))
    return pairs


# ----------------------------------------------------------------------------- on-policy


@dataclass
class SampledPairs:
    """What ``sampled_pairs`` made, and how often the prompts allowed a pair."""

    pairs: list[PreferencePair]
    prompts: int
    """Prompts asked."""
    with_pair: int
    """Prompts that gave a pair: a right and a wrong reply (or, with
    ``reference_if_all_wrong``, any wrong reply)."""
    all_right: int
    all_wrong: int
    accuracy: float
    """Fraction of all sampled replies that were right."""
    replies: list[list[str]] = field(default_factory=list)
    """The k replies of each prompt, in order."""


def sampled_pairs(
    lm: LM,
    rows: Sequence[Mapping[str, Any]],
    k: int = 4,
    seed: int = 0,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
    max_new_tokens: int = 16,
    batch_size: int = 16,
    progress: bool = False,
    reference_if_all_wrong: bool = False,
) -> SampledPairs:
    """On-policy pairs: ``k`` sampled replies per prompt, graded with ``check``.

    A prompt with a right and a wrong reply gives one pair (the first right one over the
    first wrong one). With ``reference_if_all_wrong``, a prompt whose k replies are all
    wrong gives one too: the row's reference answer over the first wrong reply (meta
    ``source="reference"``), so the prompts the model cannot yet answer also teach it, as
    in iterative reasoning preference optimisation (Pang et al. 2024), which pairs the
    gold answer with the model's own mistake.

    ``lm``: an ``lmlab.LM`` (model, tokenizer, chat template). Each row is asked as
    SFT renders it (``template.render(prompt, add_generation_prompt=True)``); the k
    samples of a prompt come from one batch, seeded by ``(seed, batch number)``, so the
    result depends only on the arguments. ``batch_size`` prompts (times k) per batch.
    """
    if k < 2:
        raise ConfigError(f"k={k} is invalid: a pair needs at least 2 samples per prompt")
    if temperature <= 0:
        raise ConfigError(f"temperature={temperature} is invalid: sampling needs > 0")
    template = template_for(lm.tokenizer, lm.chat_template)
    prompts = [row_prompt(row) for row in rows]
    tasks = [_task_of(row, f"row {i}") for i, row in enumerate(rows)]
    texts = [
        template.render(
            [{"role": "user", "content": p}] if isinstance(p, str) else list(p),
            add_generation_prompt=True,
        )
        for p in prompts
    ]
    replies: list[list[str]] = []
    starts = range(0, len(texts), batch_size)
    for number, start in enumerate(tqdm(starts, disable=not progress, unit="batch")):
        chunk = texts[start : start + batch_size]
        asked = [text for text in chunk for _ in range(k)]  # each prompt k times in a row
        outs = lm.generate(
            asked,
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_p=top_p,
            top_k=top_k,
            seed=seed * 1_000_003 + number,
        )
        replies += [[o.strip() for o in outs[i * k : (i + 1) * k]] for i in range(len(chunk))]
    pairs, all_right, all_wrong, right_total = [], 0, 0, 0
    for row, prompt, task, answers in zip(rows, prompts, tasks, replies):
        grades = [check(task, a, row["output"]) for a in answers]
        right_total += sum(grades)
        if all(grades):
            all_right += 1
            continue
        right = any(grades)
        if not right:
            all_wrong += 1
            if not reference_if_all_wrong:
                continue
        chosen = answers[grades.index(True)] if right else row["output"]
        rejected = answers[grades.index(False)]
        source = "sampled" if right else "reference"
        meta = {"task": task, "source": source, "reference": row["output"]}
        pairs.append(PreferencePair(prompt, chosen, rejected, meta))
    return SampledPairs(
        pairs,
        len(rows),
        len(pairs),
        all_right,
        all_wrong,
        right_total / max(len(rows) * k, 1),
        replies,
    )


def sampled_reward(
    lm: LM, rows: Sequence[Mapping[str, Any]], k: int = 4, seed: int = 7, **sampling: Any
) -> float:
    """The mean checker score of ``k`` replies sampled per row (temperature 1 unless
    ``sampling`` says otherwise): the reward RLHF maximises, for held-out prompts. The same
    seed gives every model the same random draws. ``sampling``: ``sampled_pairs``'s
    temperature, top_p, top_k, max_new_tokens, batch_size."""
    return sampled_pairs(lm, rows, k=k, seed=seed, **sampling).accuracy
