"""How often an agent gets the answer: accuracy with a bootstrap 95% interval, what its
steps looked like, and the direct-answer baseline on the same questions.

    agent = Agent(LMCompleter(lmlab.load("smollm2")), tools="search,lookup", max_steps=6)
    result = evaluate_agent(agent, multihop_questions(30))
    result.score          # Score(method="react", n=30, correct=.., accuracy=.., low=.., high=..)
    result.well_formed    # the fraction of steps whose reply held a valid action

An answer is right when it equals the reference or one of its aliases after lower-casing
and dropping punctuation and a leading article (``"The Arvon River."`` = ``"Arvon River"``);
for a numeric reference (word problems), when the last number in the answer equals it.

The interval is the percentile bootstrap (Efron 1979): resample the questions with
replacement, recompute the accuracy, take the 2.5th and 97.5th percentiles; seeded.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

from tqdm.auto import tqdm

from lmlab.data.documents import example_questions
from lmlab.errors import ConfigError
from lmlab.prompting.agent import Agent
from lmlab.prompting.extract import extract_answer, normalize_number
from lmlab.prompting.models import Completer
from lmlab.prompting.reasoning import bootstrap_interval
from lmlab.prompting.traces import Trace

_BARE_NUMBER = re.compile(r"-?\$?\d[\d,]*(?:\.\d+)?")


def _words(text: str) -> str:
    words = re.findall(r"[\w]+", text.lower())
    return " ".join(words[1:] if words[:1] in (["the"], ["a"], ["an"]) else words)


def answer_matches(prediction: str | None, item: dict, how: str = "flexible") -> bool:
    """Whether ``prediction`` answers ``item`` (its ``answer`` or one of its ``aliases``).
    A numeric answer read ``flexible``: the last number in the prediction; ``strict``: the
    prediction is the number and nothing else (``"42"``, ``"42.0"``, not ``"42 apples"``)."""
    if how not in ("strict", "flexible"):
        raise ConfigError(f"unknown answer reading {how!r}; valid: strict, flexible")
    if prediction is None:
        return False
    references = [item["answer"], *item.get("aliases", [])]
    if re.fullmatch(r"-?\d+(?:\.\d+)?", str(item["answer"])):
        if how == "strict":
            bare = prediction.strip().rstrip(".")
            return bool(_BARE_NUMBER.fullmatch(bare)) and normalize_number(bare) == (
                normalize_number(str(item["answer"]))
            )
        found = extract_answer(prediction, "flexible")
        return found is not None and found == normalize_number(str(item["answer"]))
    return any(_words(prediction) == _words(r) for r in references if _words(r))


@dataclass
class Score:
    method: str
    n: int
    correct: int
    accuracy: float
    low: float
    high: float
    """The bootstrap 95% interval of the accuracy."""

    def __str__(self) -> str:
        return (
            f"{self.method}: {self.accuracy:.3f} ({self.correct}/{self.n}), "
            f"95% CI [{self.low:.3f}, {self.high:.3f}]"
        )


def score(method: str, outcomes: Sequence[bool], seed: int = 0) -> Score:
    low, high = bootstrap_interval(outcomes, seed=seed)
    right = sum(outcomes)
    return Score(method, len(outcomes), right, right / len(outcomes), low, high)


@dataclass
class AgentEvaluation:
    score: Score
    traces: list[Trace]
    well_formed: float
    """Steps whose reply held a valid action, over all steps."""
    finished: float
    """Runs that ended with finish[...] (the rest ran out of steps or failed)."""
    actions: dict[str, int] = field(default_factory=dict)
    """How often each tool was called (``invalid``: replies without a valid action)."""
    strict: Score | None = None
    """``score`` with answers read strictly (a numeric answer must be the number alone)."""


def evaluate_agent(
    agent: Agent, items: Sequence[dict], seed: int = 0, progress: bool = True
) -> AgentEvaluation:
    """Run ``agent`` on every item (``question``, ``answer``, optional ``aliases``); each
    trace's ``meta`` gets the reference and the verdict."""
    if not items:
        raise ConfigError("nothing to evaluate: the question list is empty")
    traces, outcomes, strict = [], [], []
    for item in tqdm(items, desc="agent", disable=not progress):
        trace = agent.run(item["question"])
        right = answer_matches(trace.answer, item)
        strict.append(answer_matches(trace.answer, item, "strict"))
        trace.meta = {"reference": item["answer"], "correct": right, "strict": strict[-1]}
        traces.append(trace)
        outcomes.append(right)
    steps = [s for t in traces for s in t.steps]
    actions = Counter(s.action or "invalid" for s in steps)
    return AgentEvaluation(
        score(f"react ({agent.layout})", outcomes, seed),
        traces,
        well_formed=sum(s.action is not None for s in steps) / max(1, len(steps)),
        finished=sum(t.stopped == "finish" for t in traces) / len(traces),
        actions=dict(actions.most_common()),
        strict=score(f"react ({agent.layout}), strict", strict, seed),
    )


def answer_directly(
    model: Completer,
    items: Sequence[dict],
    layout: str = "complete",
    max_tokens: int = 24,
    seed: int = 0,
    progress: bool = True,
) -> tuple[Score, list[str]]:
    """The baseline: the model answers each question at once, no tools, after the same
    example questions with their answers. -> (score, the answers)."""
    examples = example_questions()
    header = "Answer the question with a short answer (a name or a number)."
    answers, outcomes = [], []
    for item in tqdm(items, desc="direct", disable=not progress):
        options = {"max_tokens": max_tokens, "temperature": 0.0, "stop": ["\n"], "seed": seed}
        if layout == "chat":
            messages = [{"role": "system", "content": header}]
            for e in examples:
                messages += [
                    {"role": "user", "content": e["question"]},
                    {"role": "assistant", "content": e["answer"]},
                ]
            messages.append({"role": "user", "content": item["question"]})
            reply = model.chat(messages, **options)
        else:
            shots = "".join(
                f"Question: {e['question']}\nAnswer: {e['answer']}\n\n" for e in examples
            )
            prompt = f"{header}\n\n{shots}Question: {item['question']}\nAnswer:"
            reply = model.complete([prompt], **options)[0]
        answer = reply.strip().rstrip(".")
        answers.append(answer)
        outcomes.append(answer_matches(answer, item))
    return score(f"direct ({layout})", outcomes, seed), answers
