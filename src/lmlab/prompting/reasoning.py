"""Ways to ask a model a word problem: direct, chain of thought, self-consistency, PAL.

- **direct**: few-shot question -> answer pairs; the model writes the number.
- **cot**: chain of thought (Wei et al. 2022): the examples show their working and end in
  ``The answer is N.``; ``shots=0`` is the zero-shot "Let's think step by step." (Kojima
  et al. 2022).
- **self-consistency** (Wang et al. 2022): ``samples`` chain-of-thought replies at
  ``temperature`` > 0, the most common final answer wins (``maj@k``).
- **react** (Yao et al. 2022, ``lmlab.prompting.agent``): the model reasons and acts in
  turn with a calculator and the Python sandbox until it calls ``finish[N]``; its answer
  is read strictly (the number alone) and flexibly (the last number in it), and the
  attempt keeps the trace, so the run replays (``lmlab agent --replay``).
- **pal**: program-aided (Gao et al. 2022): the examples are ``def solution():`` programs;
  the model writes one, the sandbox (``lmlab.prompting.sandbox``) runs it, its return
  value is the answer. The model's program never runs in this process.

Two layouts: ``plain`` (the examples and the question as one text to continue, above) and
``chat`` (a system line saying the method's format, each example a user turn and an
assistant turn, rendered by the model's chat template). ``training_conversations`` writes
chat rows in that layout for problems no evaluation set asks, so that a short fine-tune
(``lmlab finetune --method lora``) can teach a small model the format it is then measured
in.

Every method reads answers both ways (``strict`` and ``flexible``, see ``extract``), and
``summarise`` gives the accuracy of each with a bootstrap 95% interval.
"""

from __future__ import annotations

import random
import re
import zlib
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from tqdm import tqdm

from lmlab.data.word_problems import word_problems
from lmlab.errors import ConfigError, closest
from lmlab.prompting.agent import Agent
from lmlab.prompting.extract import extract_answer, extract_code, majority_vote, normalize_number
from lmlab.prompting.models import Completer, Message
from lmlab.prompting.sandbox import Limits, run_python
from lmlab.prompting.traces import Trace

METHODS = ("direct", "cot", "self-consistency", "pal")
"""The prompting methods (one prompt per question, or ``samples``)."""
ALL_METHODS = (*METHODS, "react")
"""What ``solve`` answers with: the prompting methods and the ReAct agent."""
REACT_TOOLS = "calculator,python"
LAYOUTS = ("plain", "chat")
SYSTEM = {
    "direct": "Answer the question with the number only.",
    "cot": "Solve the problem step by step, then end with: The answer is N.",
    "self-consistency": "Solve the problem step by step, then end with: The answer is N.",
    "pal": "Write a Python function solution() that returns the answer, in a ```python block.",
}
"""The chat layout's system line: what the reply should look like, per method."""
HELD_OUT = 1000
"""training_conversations never uses the first HELD_OUT problems of seed 0 (every
evaluation set of up to that size with the default seed)."""
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


def _worked(problem: dict[str, str], method: str) -> str:
    """A solved example's reply in the chat layout."""
    if method == "direct":
        return problem["answer"]
    if method == "pal":
        return f"```python\n{problem['program']}\n```"
    return problem["rationale"]


def build_messages(question: str, method: str, shots: int = 0, seed: int = 0) -> list[Message]:
    """The chat-layout conversation for ``question``: the method's system line, ``shots``
    solved examples as earlier turns, the question as the last user turn."""
    if method not in METHODS:
        raise ConfigError(
            f"unknown method {method!r}{closest(method, list(METHODS))}; valid: {', '.join(METHODS)}"
        )
    messages = [{"role": "system", "content": SYSTEM[method]}]
    for e in _examples(shots, seed):
        messages += [
            {"role": "user", "content": e["question"]},
            {"role": "assistant", "content": _worked(e, method)},
        ]
    return [*messages, {"role": "user", "content": question}]


def training_conversations(
    n: int, methods: Sequence[str] = ("cot", "pal"), seed: int = 1
) -> list[dict[str, list[Message]]]:
    """``n`` chat rows ``{"messages": [system, user, assistant]}`` for ``lmlab finetune``:
    generated problems (drawn with ``seed``) solved in the chat layout, the methods taking
    turns. None is among the first ``HELD_OUT`` problems of seed 0, nor a prompt's worked
    example, so a model tuned on them is measured on problems it never saw."""
    for method in methods:
        if method not in METHODS or method == "self-consistency":
            valid = ", ".join(m for m in METHODS if m != "self-consistency")
            raise ConfigError(f"cannot write training replies for {method!r}; valid: {valid}")
    if n < 1 or not methods:
        raise ConfigError(f"need n >= 1 and at least one method, got n={n}, methods={methods}")
    held_out = {p["question"] for p in word_problems(HELD_OUT, seed=0)}
    held_out |= {p["question"] for p in _examples(8, 0)}
    rows, draw = [], n
    while len(rows) < n:  # draw more until n problems outside the held-out ones
        fresh = [p for p in word_problems(draw, seed=seed) if p["question"] not in held_out]
        rows, draw = fresh[:n], draw * 2
    out = []
    for i, problem in enumerate(rows):
        method = methods[i % len(methods)]
        messages = build_messages(problem["question"], method)
        out.append(
            {"messages": [*messages, {"role": "assistant", "content": _worked(problem, method)}]}
        )
    return out


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
    trace: Trace | None = None
    """ReAct's episode (its steps, tool calls and raw replies)."""

    def correct(self, how: str = "strict") -> bool:
        return getattr(self, how) == normalize_number(self.reference)


def _pal_answer(
    reply: str, limits: Limits, opened: bool = True
) -> tuple[str | None, str, str | None]:
    """(answer, status, program) of a PAL reply: the program runs in the sandbox.
    ``opened``: the prompt opened the code block (plain layout), the reply continues it."""
    program = extract_code("```python\n" + reply if opened else reply)
    if program is None:
        return None, "no-program", None
    result = run_python(program, limits)
    if not result.ok or result.answer is None:
        return None, result.status if not result.ok else "no-answer", program
    return normalize_number(str(result.answer)), "ok", program


def _ask(model: Completer, prompts: Sequence[str | list[Message]], **options) -> list[str]:
    """Replies to prompts: texts are completed in one batch; conversations (the chat layout
    for a model that cannot render them itself, e.g. a served one) go one by one."""
    if all(isinstance(p, str) for p in prompts):
        return model.complete(list(prompts), **options)
    return [model.chat(p, **options) for p in prompts]


def _prompts(model: Completer, problems, method: str, shots: int, seed: int, layout: str):
    """Each problem's prompt: a text, or in the chat layout the conversation rendered by the
    model's chat template (the conversation itself when the model renders its own)."""
    if layout not in LAYOUTS:
        raise ConfigError(
            f"unknown layout {layout!r}{closest(layout, list(LAYOUTS))}; valid: {', '.join(LAYOUTS)}"
        )
    if layout == "plain":
        return [build_prompt(p["question"], method, shots, seed) for p in problems]
    conversations = [build_messages(p["question"], method, shots, seed) for p in problems]
    render = getattr(model, "render", None)
    return [render(c) for c in conversations] if render else conversations


def _sample(
    model, problems, prompts, samples, temperature, tokens, stop, seed, batch_size, progress
) -> list[list[str]]:
    """``samples`` sampled replies per prompt. The samples of one question are drawn
    together (its prompt ``samples`` times in a batch, so no row is padding) from a seed
    made of ``seed`` and the question's text: they do not depend on which other questions
    are asked in the same run, so the first n of a set get the same samples in any run."""
    replies = []
    bar = tqdm(
        total=len(problems) * samples, desc="self-consistency", disable=not progress, unit="reply"
    )
    for problem, prompt in zip(problems, prompts):
        texts: list[str] = []
        question_seed = seed * 1_000_003 + zlib.crc32(problem["question"].encode())
        for start in range(0, samples, batch_size):
            rows = min(batch_size, samples - start)
            texts += _ask(
                model,
                [prompt] * rows,
                max_tokens=tokens,
                temperature=temperature,
                stop=stop,
                seed=question_seed + start,
            )
            bar.update(rows)
        replies.append(texts)
    bar.close()
    return replies


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
    layout: str = "plain",
    max_steps: int = 6,
) -> list[Attempt]:
    """Each problem (``question``, ``answer``) answered by ``method`` in ``layout`` (see
    module doc); ``max_steps``: ReAct's step budget."""
    if method not in ALL_METHODS:
        raise ConfigError(
            f"unknown method {method!r}{closest(method, list(ALL_METHODS))}; "
            f"valid: {', '.join(ALL_METHODS)}"
        )
    if method == "react":
        return _react(model, problems, layout, max_steps, max_tokens, seed, progress)
    if method == "self-consistency" and samples < 1:
        raise ConfigError(f"self-consistency needs samples >= 1, got {samples}")
    prompts = _prompts(model, problems, method, shots, seed, layout)
    # In the plain layout the prompt opens PAL's code block and the closing fence ends it;
    # in the chat layout the reply opens its own block and its end of turn ends it.
    stop = STOP + (("```",) if method == "pal" and layout == "plain" else ())
    tokens = 16 if method == "direct" else max_tokens
    if method == "self-consistency":
        replies = _sample(
            model, problems, prompts, samples, temperature, tokens, stop, seed, batch_size, progress
        )
    else:
        replies = []
        bar = tqdm(total=len(problems), desc=method, disable=not progress, unit="reply")
        for start in range(0, len(prompts), batch_size):
            batch = prompts[start : start + batch_size]
            outs = _ask(model, batch, max_tokens=tokens, temperature=0.0, stop=stop)
            replies += [[text] for text in outs]
            bar.update(len(batch))
        bar.close()
    attempts = []
    for problem, texts in zip(problems, replies):
        attempt = Attempt(problem["question"], problem["answer"], method, texts, None, None)
        if method == "pal":
            answer, attempt.program_status, attempt.program = _pal_answer(
                texts[0], limits, opened=layout == "plain"
            )
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


def _react(model, problems, layout, max_steps, max_tokens, seed, progress) -> list[Attempt]:
    """ReAct with a calculator and the sandbox. The plain layout is the agent's ``complete``
    (one growing prompt), the chat layout its ``chat``."""
    if layout not in LAYOUTS:
        raise ConfigError(f"unknown layout {layout!r}; valid: {', '.join(LAYOUTS)}")
    agent_layout = "chat" if layout == "chat" else "complete"
    agent = Agent(model, REACT_TOOLS, max_steps, agent_layout, max_tokens, seed=seed)
    attempts = []
    for problem in tqdm(problems, desc="react", disable=not progress, unit="question"):
        trace = agent.run(problem["question"])
        answer = (trace.answer or "").strip()
        strict = normalize_number(answer) if _BARE.fullmatch(answer) else None
        flexible = extract_answer(answer, "flexible")
        replies = [step.raw for step in trace.steps]
        attempt = Attempt(
            problem["question"], problem["answer"], "react", replies, strict, flexible
        )
        attempt.trace = trace
        trace.meta = {
            "reference": problem["answer"],
            "correct": attempt.correct("flexible"),
            "strict": attempt.correct("strict"),
        }
        attempts.append(attempt)
    return attempts


def bootstrap_interval(
    correct: Sequence[bool], resamples: int = 2000, seed: int = 0, level: float = 0.95
) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of ``correct`` (Efron 1979): resample the
    questions with replacement, recompute the accuracy, take the (1 - level) / 2 and
    (1 + level) / 2 quantiles; seeded."""
    if not correct:
        raise ConfigError("a bootstrap interval needs at least one result")
    if not 0 < level < 1:
        raise ConfigError(f"level must be between 0 and 1, got {level}")
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
