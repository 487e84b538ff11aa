"""In-context learning: k-shot prompts, how their examples are chosen and ordered, and what
that does to accuracy.

A k-shot prompt puts k solved examples before the question (Brown et al. 2020). Which k,
which examples and in what order all move the score, often more than one would like
(Zhao et al. 2021; Lu et al. 2022 on order), so each is a setting here:

- ``selection``: ``random`` (seeded), ``nearest`` (the examples whose questions are most
  similar to this one by sentence embedding, e.g. MiniLM: Liu et al. 2022) or
  ``balanced`` (the same number of each answer, so the majority label is not taught);
- ``order``: ``given`` (as selected), ``random``, or ``nearest_last`` (the most similar
  example right before the question);
- ``layout``: ``plain`` text, or ``chat`` (each example a user turn and an assistant
  turn, rendered by the model's chat template);
- ``fmt``: the wording around each example (``FORMATS``), to measure format sensitivity.

A prompt that would outgrow the model's context drops examples, farthest from the question
first, and says how many (``on_overflow="drop"``), or stops with an error ("error").
Scoring is the multiple-choice rule of lm-evaluation-harness: each answer choice's summed
log-probability after the prompt, the highest wins.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from lmlab.errors import ConfigError, closest
from lmlab.eval.scoring import encode_pair, score_token_pairs
from lmlab.eval.tasks import ChoiceItem, ChoiceTask
from lmlab.lm import LM

SELECTIONS = ("random", "nearest", "balanced")
ORDERS = ("given", "random", "nearest_last")
LAYOUTS = ("plain", "chat")
OVERFLOW = ("drop", "error")
Embed = Callable[[list[str]], torch.Tensor]
"""texts -> unit-norm embeddings [N, D] (``lmlab.load("minilm").embed``)."""


@dataclass(frozen=True)
class ShotFormat:
    """The words around one example: ``template`` holds ``{query}``; the answer follows
    after ``delimiter``; examples are joined by ``separator``."""

    template: str
    delimiter: str = " "
    separator: str = "\n\n"

    def shot(self, query: str, answer: str) -> str:
        return self.template.format(query=query) + self.delimiter + answer


FORMATS: dict[str, ShotFormat] = {
    "qa": ShotFormat("Question: {query}\nAnswer:"),
    "qa-short": ShotFormat("Q: {query}\nA:"),
    "io": ShotFormat("Input: {query}\nOutput:"),
    "arrow": ShotFormat("{query} ->", separator="\n"),
}


def shot_format(task: ChoiceTask, fmt: str) -> ShotFormat:
    """``FORMATS[fmt]``, or the task's own wording for ``"task"`` (as ``lmlab eval`` uses)."""
    if fmt == "task":
        if task.prompt.choice != "{choice}" or "{options}" in task.prompt.template:
            raise ConfigError(
                f"task {task.name!r} lists its options in the prompt: pick a format from {', '.join(FORMATS)}"
            )
        return ShotFormat(task.prompt.template.replace("{subject}", ""), task.prompt.delimiter)
    _check("format", fmt, [*FORMATS, "task"])
    return FORMATS[fmt]


def _check(name: str, value: str, valid: Sequence[str]) -> None:
    if value not in valid:
        raise ConfigError(
            f"unknown {name} {value!r}{closest(value, list(valid))}; valid: {', '.join(valid)}"
        )


def answer_of(item: ChoiceItem) -> str:
    return item.choices[item.gold]


def select_examples(
    pool: Sequence[ChoiceItem],
    item: ChoiceItem,
    k: int,
    selection: str = "random",
    seed: int = 0,
    embed: Embed | None = None,
) -> list[ChoiceItem]:
    """``k`` examples for ``item`` from ``pool`` (never ``item`` itself)."""
    _check("selection", selection, SELECTIONS)
    pool = [ex for ex in pool if ex.query != item.query]
    if not 0 <= k <= len(pool):
        raise ConfigError(
            f"k={k} is invalid: must be between 0 and the pool's {len(pool)} examples"
        )
    rng = random.Random(f"{seed}:{item.query}")
    if selection == "random":
        return rng.sample(pool, k)
    if selection == "nearest":
        if embed is None:
            raise ConfigError(
                "selection 'nearest' needs an embed function, e.g. lmlab.load('minilm').embed"
            )
        vectors = embed([item.query] + [ex.query for ex in pool])
        similarity = vectors[1:] @ vectors[0]
        ranked = similarity.argsort(descending=True, stable=True).tolist()
        return [pool[i] for i in ranked[:k]]  # most similar first
    by_answer: dict[str, list[ChoiceItem]] = {}
    for ex in rng.sample(pool, len(pool)):
        by_answer.setdefault(answer_of(ex), []).append(ex)
    groups, chosen = sorted(by_answer.values(), key=lambda g: answer_of(g[0])), []
    while len(chosen) < k:
        for group in groups:
            if group and len(chosen) < k:
                chosen.append(group.pop())
    return chosen


def order_examples(
    examples: Sequence[ChoiceItem], order: str = "given", seed: int = 0
) -> list[ChoiceItem]:
    """Examples in prompt order (the last one is right before the question). ``nearest_last``
    expects them most similar first, as ``select_examples(selection="nearest")`` gives."""
    _check("order", order, ORDERS)
    examples = list(examples)
    if order == "random":
        random.Random(seed).shuffle(examples)
    elif order == "nearest_last":
        examples.reverse()
    return examples


def render_prompt(
    item: ChoiceItem,
    examples: Sequence[ChoiceItem],
    fmt: ShotFormat = FORMATS["qa"],
    layout: str = "plain",
    lm: LM | None = None,
    description: str = "",
) -> tuple[str, list[str]]:
    """(prompt, one continuation per choice) for ``item`` after ``examples``."""
    _check("layout", layout, LAYOUTS)
    if layout == "plain":
        shots = [fmt.shot(ex.query, answer_of(ex)) for ex in examples]
        prompt = description + fmt.separator.join([*shots, fmt.template.format(query=item.query)])
        return prompt, [fmt.delimiter + c for c in item.choices]
    template = getattr(lm, "chat_template", None)
    if template is None:
        raise ConfigError(
            "layout 'chat' needs a model with a chat template (an instruction-tuned model)"
        )
    messages = [{"role": "system", "content": description.strip()}] if description.strip() else []
    for ex in examples:
        messages += [
            {"role": "user", "content": fmt.template.format(query=ex.query)},
            {"role": "assistant", "content": answer_of(ex)},
        ]
    messages.append({"role": "user", "content": fmt.template.format(query=item.query)})
    return template.render(messages, add_generation_prompt=True), list(item.choices)


@dataclass
class FittedPrompt:
    prompt: str
    continuations: list[str]
    examples: list[ChoiceItem]
    dropped: int
    """Examples left out so that the prompt fits the model's context."""


def fit_prompt(
    lm: LM,
    item: ChoiceItem,
    examples: Sequence[ChoiceItem],
    fmt: ShotFormat = FORMATS["qa"],
    layout: str = "plain",
    max_tokens: int | None = None,
    on_overflow: str = "drop",
    description: str = "",
) -> FittedPrompt:
    """The prompt with as many of ``examples`` as fit ``max_tokens`` (default: the model's
    context), dropping the first ones (farthest from the question) first."""
    _check("on_overflow", on_overflow, OVERFLOW)
    limit = max_tokens or getattr(getattr(lm.model, "config", None), "max_seq_len", None)
    kept = list(examples)
    while True:
        prompt, conts = render_prompt(item, kept, fmt, layout, lm, description)
        if limit is None:
            break
        longest = max(len(lm.tokenizer.encode(prompt + c)) for c in conts)
        if longest <= limit:
            break
        if on_overflow == "error" or not kept:
            raise ConfigError(
                f"the {len(kept)}-shot prompt takes {longest} tokens, more than the model's "
                f"context of {limit}: use fewer examples (k), shorter ones, or on_overflow='drop'"
            )
        kept.pop(0)
    return FittedPrompt(prompt, conts, kept, len(examples) - len(kept))


@dataclass
class ICLResult:
    """Accuracy of one in-context-learning setting on a task."""

    k: int
    selection: str
    order: str
    layout: str
    fmt: str
    seed: int
    accuracy: float
    n: int
    dropped: int
    """Examples dropped over all items to fit the context."""
    correct: list[bool] = field(repr=False, default_factory=list)

    def to_dict(self) -> dict:
        return {
            "k": self.k,
            "selection": self.selection,
            "order": self.order,
            "layout": self.layout,
            "format": self.fmt,
            "seed": self.seed,
            "accuracy": self.accuracy,
            "n": self.n,
            "dropped": self.dropped,
        }


def evaluate_icl(
    lm: LM,
    task: ChoiceTask,
    k: int,
    selection: str = "random",
    order: str = "given",
    layout: str = "plain",
    fmt: str = "qa",
    seed: int = 0,
    embed: Embed | None = None,
    max_tokens: int | None = None,
    on_overflow: str = "drop",
    batch_size: int = 16,
) -> ICLResult:
    """Accuracy of ``lm`` on ``task`` with k-shot prompts built as the settings say."""
    shape = shot_format(task, fmt)
    pool = list(task.fewshot) or list(task.items)
    pairs, spans, dropped = [], [], 0
    for item in task.items:
        examples = select_examples(pool, item, k, selection, seed, embed)
        examples = order_examples(examples, order, seed)
        fitted = fit_prompt(
            lm, item, examples, shape, layout, max_tokens, on_overflow, task.description
        )
        dropped += fitted.dropped
        start = len(pairs)
        pairs += [encode_pair(lm.tokenizer, fitted.prompt, c) for c in fitted.continuations]
        spans.append((start, len(pairs)))
    scores = score_token_pairs(lm.model, pairs, batch_size)
    correct = []
    for item, (a, b) in zip(task.items, spans):
        logprobs = [s.logprob for s in scores[a:b]]
        correct.append(max(range(len(logprobs)), key=logprobs.__getitem__) == item.gold)
    accuracy = sum(correct) / len(correct)
    return ICLResult(
        k, selection, order, layout, fmt, seed, accuracy, len(correct), dropped, correct
    )
