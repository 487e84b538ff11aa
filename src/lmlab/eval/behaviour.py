"""Behavioural tests of a language model, written like unit tests for code (CheckList).

CheckList (Ribeiro et al. 2020, "Beyond Accuracy: Behavioral Testing of NLP Models with
CheckList", ACL) tests what a model does rather than how accurate it is on a test set,
with three kinds of test:

- ``MFT`` (minimum functionality test): input -> expected output, like a unit test
  ("I loved this film." -> positive; "What is 2 + 3?" -> 5).
- ``INV`` (invariance): a harmless edit must not change the prediction (another name, a
  typo, an irrelevant "Note:" line).
- ``DIR`` (directional expectation): after the edit the probability of a label must move
  the stated way ("was good" -> "was not good" lowers P(positive)).

A prediction comes from one of two predictors:

- ``Labels(choices)``: score each choice as a continuation of the prompt with
  ``lmlab.eval.scoring.score_continuations`` and predict the most probable one;
  ``Prediction.probs`` holds P(choice | prompt) renormalised over the choices (a softmax of
  the summed log-probabilities), which DIR tests compare.
- ``Generate(max_new_tokens, stop)``: greedy decoding with ``lm.generate``; the answer is
  the first line of the output, compared after SQuAD's ``normalize_answer`` (an output
  that starts with the expected words, as "5 apples" for "5", passes).

Writing a suite::

    review = "Review: {text}\\nSentiment:".format
    sentiment = Labels((" positive", " negative"))
    suite = Suite("mine", (
        MFT("clear positive", (review(text="I loved it."),), ("positive",), sentiment),
        INV("names", pairs(fill("{name} loved it.", name=NAMES), replace_word("Anna", "Wei")),
            sentiment),
        DIR("negation", pairs(["It was good."], replace_word("was", "was not")), sentiment,
            label="positive", direction="down"),
    ))
    run_suite(lm, suite).to_markdown()

INV and DIR tests hold (original, edited) pairs; ``pairs(texts, edit, template)`` builds
them with an edit function (``replace_word``, ``add_prefix``, ``add_typos``), and
``fill`` expands a template over lists of values. ``default_suite()`` is a small suite
(sentiment by label scoring, name and typo invariance, negation and intensifier
directions, arithmetic by generation) meant for SmolLM2-class models; on a random model it
runs and fails about half its checks, as it should.

Tests: tests/eval/test_behaviour.py checks the pass/fail logic of each kind on stubbed
predictions, and that Labels' probabilities are the softmax of ``score_continuations``.
"""

from __future__ import annotations

import itertools
import math
import random
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal, Protocol

from tqdm.auto import tqdm

from lmlab.errors import ConfigError
from lmlab.eval.scoring import score_continuations
from lmlab.eval.text import normalize_answer
from lmlab.lm import LM

# ----------------------------------------------------------------------------- predictors


@dataclass(frozen=True)
class Prediction:
    """What a model answered for one prompt."""

    text: str
    """The chosen label (stripped) or the first line of the generated text."""
    probs: dict[str, float] | None = None
    """P(label | prompt) renormalised over the labels (keys stripped); None for generation."""


class Predictor(Protocol):
    def predict(self, lm: LM, prompts: Sequence[str], batch_size: int) -> list[Prediction]: ...


@dataclass(frozen=True)
class Labels:
    """Predict the most probable of ``choices`` as a continuation of the prompt."""

    choices: tuple[str, ...]
    """The label strings as they follow the prompt, usually with a leading space."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "choices", tuple(self.choices))
        names = [c.strip() for c in self.choices if isinstance(c, str)]
        if len(names) != len(self.choices) or not all(names) or len(self.choices) < 2:
            raise ConfigError(
                f"Labels.choices={self.choices!r} is invalid: need at least two non-empty strings"
            )
        if len(set(names)) != len(names):
            raise ConfigError(f"Labels.choices={self.choices!r} repeats a label")

    def predict(self, lm: LM, prompts: Sequence[str], batch_size: int = 16) -> list[Prediction]:
        requests = [(p, c) for p in prompts for c in self.choices]
        scores = score_continuations(lm, requests, batch_size)
        k = len(self.choices)
        out = []
        for i in range(len(prompts)):
            logprobs = [s.logprob for s in scores[i * k : (i + 1) * k]]
            probs = softmax(logprobs)
            best = max(range(k), key=lambda j: logprobs[j])  # first of equals
            names = [c.strip() for c in self.choices]
            out.append(Prediction(names[best], dict(zip(names, probs))))
        return out


@dataclass(frozen=True)
class Generate:
    """Predict by greedy decoding; the answer is the output's first line."""

    max_new_tokens: int = 8
    stop: tuple[str, ...] = ("\n",)

    def __post_init__(self) -> None:
        object.__setattr__(self, "stop", tuple(self.stop))
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise ConfigError(
                f"Generate.max_new_tokens={self.max_new_tokens!r} is invalid: must be >= 1"
            )

    def predict(self, lm: LM, prompts: Sequence[str], batch_size: int = 16) -> list[Prediction]:
        out = []
        for b in range(0, len(prompts), batch_size):
            texts = lm.generate(
                list(prompts[b : b + batch_size]),
                max_new_tokens=self.max_new_tokens,
                temperature=0.0,
                stop=self.stop,
            )
            out += [Prediction(first_line(t)) for t in texts]
        return out


def softmax(logprobs: Sequence[float]) -> list[float]:
    """Probabilities proportional to exp(logprobs): [0, 0] -> [0.5, 0.5]."""
    top = max(logprobs)
    weights = [math.exp(x - top) for x in logprobs]  # shifted: no overflow
    total = sum(weights)
    return [w / total for w in weights]


def first_line(text: str) -> str:
    """The first non-empty line of ``text``, stripped: "\\n 5\\nQ: ..." -> "5"."""
    return next((line.strip() for line in text.splitlines() if line.strip()), "")


def answer_matches(output: str, expected: str) -> bool:
    """Whether ``output`` gives the ``expected`` answer, after SQuAD normalisation: equal,
    or starting with the expected words ("5 apples." matches "5"; "50" does not)."""
    got, want = normalize_answer(first_line(output)), normalize_answer(expected)
    return got == want or got.startswith(want + " ")


# ----------------------------------------------------------------------------- tests


@dataclass(frozen=True)
class MFT:
    """Minimum functionality: each input must give its expected answer."""

    name: str
    inputs: tuple[str, ...]
    expected: tuple[str, ...]
    """One expected answer per input (a single string applies to all)."""
    predictor: Any
    description: str = ""
    kind: ClassVar[str] = "MFT"

    def __post_init__(self) -> None:
        object.__setattr__(self, "inputs", tuple(self.inputs))
        expected = (self.expected,) if isinstance(self.expected, str) else tuple(self.expected)
        if len(expected) == 1:
            expected = expected * len(self.inputs)
        object.__setattr__(self, "expected", expected)
        _check_test(self, len(self.inputs))
        if len(expected) != len(self.inputs):
            raise ConfigError(
                f"MFT {self.name!r}: {len(self.inputs)} inputs but {len(expected)} expected "
                "answers; give one per input, or one for all"
            )

    def prompts(self) -> list[str]:
        return list(self.inputs)

    def check(self, predictions: dict[str, Prediction]) -> list[dict[str, Any] | None]:
        """None where an input passes, else a description of the failure."""
        out: list[dict[str, Any] | None] = []
        for text, want in zip(self.inputs, self.expected):
            got = predictions[text]
            ok = check_mft(got, want)
            out.append(None if ok else {"input": text, "expected": want, "got": got.text})
        return out


@dataclass(frozen=True)
class INV:
    """Invariance: each (original, edited) pair must get the same answer."""

    name: str
    pairs: tuple[tuple[str, str], ...]
    predictor: Any
    description: str = ""
    kind: ClassVar[str] = "INV"

    def __post_init__(self) -> None:
        object.__setattr__(self, "pairs", _tuple_pairs(self.pairs, self.name))
        _check_test(self, len(self.pairs))

    def prompts(self) -> list[str]:
        return [t for pair in self.pairs for t in pair]

    def check(self, predictions: dict[str, Prediction]) -> list[dict[str, Any] | None]:
        out: list[dict[str, Any] | None] = []
        for a, b in self.pairs:
            pa, pb = predictions[a], predictions[b]
            ok = check_inv(pa, pb)
            out.append(None if ok else {"original": a, "edited": b, "got": [pa.text, pb.text]})
        return out


@dataclass(frozen=True)
class DIR:
    """Directional expectation: the edit must move P(label) ``direction`` ("up"/"down")
    by more than ``-tolerance`` (0: it must strictly move that way)."""

    name: str
    pairs: tuple[tuple[str, str], ...]
    predictor: Any
    label: str
    direction: Literal["up", "down"]
    tolerance: float = 0.0
    description: str = ""
    kind: ClassVar[str] = "DIR"

    def __post_init__(self) -> None:
        object.__setattr__(self, "pairs", _tuple_pairs(self.pairs, self.name))
        _check_test(self, len(self.pairs))
        if self.direction not in ("up", "down"):
            raise ConfigError(
                f"DIR {self.name!r}: direction={self.direction!r} is invalid; valid: up, down"
            )
        if not self.tolerance >= 0:
            raise ConfigError(f"DIR {self.name!r}: tolerance={self.tolerance!r} must be >= 0")
        choices = getattr(self.predictor, "choices", None)
        if choices is not None and self.label.strip() not in [c.strip() for c in choices]:
            raise ConfigError(
                f"DIR {self.name!r}: label={self.label!r} is not one of the predictor's "
                f"choices {list(choices)}"
            )

    def prompts(self) -> list[str]:
        return [t for pair in self.pairs for t in pair]

    def check(self, predictions: dict[str, Prediction]) -> list[dict[str, Any] | None]:
        out: list[dict[str, Any] | None] = []
        label = self.label.strip()
        for a, b in self.pairs:
            pa, pb = predictions[a], predictions[b]
            if pa.probs is None or pb.probs is None:
                raise ConfigError(
                    f"DIR {self.name!r} needs label probabilities: use a Labels predictor"
                )
            ok = check_dir(pa, pb, label, self.direction, self.tolerance)
            before, after = pa.probs[label], pb.probs[label]
            out.append(None if ok else {"original": a, "edited": b, "p": [before, after]})
        return out


def check_mft(prediction: Prediction, expected: str) -> bool:
    """An MFT case passes when the answer matches (``answer_matches``)."""
    return answer_matches(prediction.text, expected)


def check_inv(original: Prediction, edited: Prediction) -> bool:
    """An INV case passes when both answers are the same after normalisation."""
    return normalize_answer(original.text) == normalize_answer(edited.text)


def check_dir(
    original: Prediction,
    edited: Prediction,
    label: str,
    direction: Literal["up", "down"],
    tolerance: float = 0.0,
) -> bool:
    """A DIR case passes when P(label) moves ``direction`` by more than ``-tolerance``:

    up, 0.4 -> 0.6: pass      up, 0.4 -> 0.4: fail      up, tol 0.1, 0.4 -> 0.35: pass
    """
    assert original.probs is not None and edited.probs is not None
    change = edited.probs[label] - original.probs[label]
    return (change if direction == "up" else -change) > -tolerance


def _check_test(test: Any, n: int) -> None:
    if not isinstance(test.name, str) or not test.name:
        raise ConfigError(f"a {test.kind} test needs a non-empty name, got {test.name!r}")
    if n == 0:
        raise ConfigError(f"{test.kind} {test.name!r} has no cases")
    if not callable(getattr(test.predictor, "predict", None)):
        raise ConfigError(
            f"{test.kind} {test.name!r}: predictor={test.predictor!r} is invalid; use "
            "Labels(choices) or Generate(...)"
        )


def _tuple_pairs(pairs: Iterable[Sequence[str]], name: str) -> tuple[tuple[str, str], ...]:
    out = tuple(tuple(p) for p in pairs)
    for p in out:
        if len(p) != 2 or not all(isinstance(t, str) for t in p):
            raise ConfigError(f"test {name!r}: each case must be (original, edited), got {p!r}")
    return out  # type: ignore[return-value]


# ----------------------------------------------------------------------------- templates


def fill(template: str, **values: Sequence[str]) -> list[str]:
    """Every filling of ``template``'s ``{fields}`` from the lists, in product order.

    fill("{name} is {age}.", name=["Ann", "Bo"], age=["9"]) -> ["Ann is 9.", "Bo is 9."]
    """
    keys = list(values)
    return [
        template.format(**dict(zip(keys, combo)))
        for combo in itertools.product(*(values[k] for k in keys))
    ]


def replace_word(old: str, new: str) -> Callable[[str], str]:
    """An edit replacing the whole word(s) ``old`` by ``new``: ("was", "was not")."""
    pattern = re.compile(rf"\b{re.escape(old)}\b")
    return lambda text: pattern.sub(new, text)


def add_prefix(prefix: str) -> Callable[[str], str]:
    """An edit putting ``prefix`` first: add_prefix("Note: be brief.\\n")."""
    return lambda text: prefix + text


def add_typos(text: str, n: int = 1, seed: int = 0) -> str:
    """``text`` with ``n`` typos: each swaps two adjacent letters inside a word of 3+
    letters, chosen with ``random.Random(seed)`` (the same text and seed, the same typos).

        add_typos("The food was great.", seed=0) -> e.g. "The food was graet."
    """
    rng = random.Random(seed)
    chars = list(text)
    for _ in range(n):
        spots = [
            i
            for m in re.finditer(r"[A-Za-z]{3,}", "".join(chars))
            for i in range(m.start(), m.end() - 1)
            if chars[i] != chars[i + 1]
        ]
        if not spots:
            break
        i = rng.choice(spots)
        chars[i], chars[i + 1] = chars[i + 1], chars[i]
    return "".join(chars)


def pairs(
    texts: Iterable[str], edit: Callable[[str], str], template: str = "{text}"
) -> list[tuple[str, str]]:
    """(original, edited) prompts for INV and DIR tests: ``edit`` is applied to each text,
    then both go into ``template``; texts the edit leaves unchanged are dropped.

        pairs(["It was good."], replace_word("was", "was not"), "Review: {text}")
            -> [("Review: It was good.", "Review: It was not good.")]
    """
    out = []
    for text in texts:
        edited = edit(text)
        if edited != text:
            out.append((template.format(text=text), template.format(text=edited)))
    return out


# ----------------------------------------------------------------------------- running


@dataclass(frozen=True)
class Suite:
    """A named list of MFT, INV and DIR tests."""

    name: str
    tests: tuple[Any, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "tests", tuple(self.tests))
        names = [t.name for t in self.tests]
        if len(set(names)) != len(names):
            repeated = sorted({n for n in names if names.count(n) > 1})
            raise ConfigError(f"suite {self.name!r} repeats test names {repeated}")


@dataclass(frozen=True)
class TestResult:
    """How one test went."""

    __test__ = False  # not a pytest class

    name: str
    kind: str
    n: int
    failures: int
    examples: tuple[dict[str, Any], ...]
    """Up to ``max_examples`` failed cases."""
    description: str = ""

    @property
    def failure_rate(self) -> float:
        return self.failures / self.n


@dataclass(frozen=True)
class SuiteResult:
    """Failure rate per test of a suite, with examples of failures."""

    name: str
    tests: tuple[TestResult, ...] = field(default_factory=tuple)

    @property
    def failure_rate(self) -> float:
        """Failed cases / all cases, over every test."""
        return sum(t.failures for t in self.tests) / sum(t.n for t in self.tests)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "failure_rate": self.failure_rate,
            "tests": [
                {
                    "name": t.name,
                    "kind": t.kind,
                    "description": t.description,
                    "n": t.n,
                    "failures": t.failures,
                    "failure_rate": t.failure_rate,
                    "examples": list(t.examples),
                }
                for t in self.tests
            ],
        }

    def summary(self) -> str:
        failed = sum(t.failures > 0 for t in self.tests)
        return (
            f"suite {self.name}: {failed} of {len(self.tests)} tests failed some case; "
            f"overall failure rate {100 * self.failure_rate:.1f}%"
        )

    def to_markdown(self) -> str:
        """A Markdown table: test, kind, cases, failures, failure rate, one failed case."""
        lines = [
            "| test | kind | cases | failed | failure rate | example failure |",
            "|---|---|---:|---:|---:|---|",
        ]
        for t in self.tests:
            example = _short(t.examples[0]) if t.examples else ""
            lines.append(
                f"| {t.name} | {t.kind} | {t.n} | {t.failures} | "
                f"{100 * t.failure_rate:.1f}% | {example} |"
            )
        return "\n".join(lines)


def _short(example: dict[str, Any], width: int = 80) -> str:
    text = "; ".join(
        f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v!r}" for k, v in example.items()
    )
    text = text.replace("|", "\\|").replace("\n", "\\n")
    return text if len(text) <= width else text[: width - 1] + "…"


def run_suite(
    lm: LM,
    suite: Suite | Sequence[Any],
    batch_size: int = 16,
    max_examples: int = 3,
    progress: bool = False,
) -> SuiteResult:
    """Run every test of ``suite`` on ``lm``: each distinct prompt is predicted once per
    predictor, then each test checks its cases."""
    if not isinstance(suite, Suite):
        suite = Suite("suite", tuple(suite))
    if not suite.tests:
        raise ConfigError(f"suite {suite.name!r} has no tests")
    wanted: dict[Any, list[str]] = {}  # predictor -> its distinct prompts, in order
    for test in suite.tests:
        prompts = wanted.setdefault(test.predictor, [])
        prompts += [p for p in dict.fromkeys(test.prompts()) if p not in prompts]
    predicted: dict[Any, dict[str, Prediction]] = {}
    for predictor, prompts in tqdm(
        wanted.items(), desc="predicting", unit="predictor", disable=not progress, leave=False
    ):
        predicted[predictor] = dict(zip(prompts, predictor.predict(lm, prompts, batch_size)))
    results = []
    for test in suite.tests:
        cases = test.check(predicted[test.predictor])
        failed = [c for c in cases if c is not None]
        results.append(
            TestResult(
                test.name,
                test.kind,
                len(cases),
                len(failed),
                tuple(failed[:max_examples]),
                test.description,
            )
        )
    return SuiteResult(suite.name, tuple(results))


# ----------------------------------------------------------------------------- default


SENTIMENT_PROMPT = "Review: {text}\nSentiment (positive or negative):"
SENTIMENT = Labels((" positive", " negative"))
ARITHMETIC = Generate(max_new_tokens=6, stop=("\n",))
NAMES = ("Anna", "Mohammed", "Wei", "Olga", "Carlos", "Aisha")

_POSITIVE = (
    "The food was delicious and the staff were friendly.",
    "I loved this film from start to finish.",
    "What a wonderful day at the beach.",
    "The book was a joy to read.",
)
_NEGATIVE = (
    "The food was cold and the waiter was rude.",
    "I hated this film; it was boring.",
    "The hotel room was dirty and noisy.",
    "The phone broke after one day.",
)
_GOOD = (
    "The movie was good.",
    "The meal was tasty.",
    "The staff was helpful.",
    "The trip was fun.",
)
_SUMS = ((2, 3), (4, 4), (10, 5), (7, 1), (6, 3), (12, 8))


def default_suite() -> Suite:
    """A small suite for SmolLM2-class models (base-model prompts, no chat template):
    sentiment by label scoring (MFT, name and typo INV, negation and intensifier DIR) and
    sums by greedy generation after one worked example (MFT, and INV under an added
    "Note:" line). The longest prompt is 71 bytes, so a model needs a context of about 80
    tokens to generate its answers; the text needs digits, letters and "+?:()" in the
    vocabulary (a byte or BPE tokenizer, or a char one that knows them)."""

    def review(text: str) -> str:
        return SENTIMENT_PROMPT.format(text=text)

    def question(a: int, b: int) -> str:  # one worked example shows the answer format
        return f"Q: What is 1 + 1?\nA: 2\nQ: What is {a} + {b}?\nA:"

    named = fill("{name} said the concert was great.", name=NAMES[:1]) + fill(
        "{name} said the hotel was awful.", name=NAMES[:1]
    )
    name_pairs = [p for other in NAMES[1:] for p in pairs(named, replace_word(NAMES[0], other))]
    return Suite(
        "default",
        (
            MFT(
                "sentiment: clear reviews",
                tuple(review(t) for t in _POSITIVE + _NEGATIVE),
                ("positive",) * len(_POSITIVE) + ("negative",) * len(_NEGATIVE),
                SENTIMENT,
                "obvious positive and negative reviews get their label",
            ),
            INV(
                "sentiment: change the name",
                tuple((review(a), review(b)) for a, b in name_pairs),
                SENTIMENT,
                "who wrote the review does not change its sentiment",
            ),
            INV(
                "sentiment: add a typo",
                tuple(pairs(_POSITIVE + _NEGATIVE, add_typos, SENTIMENT_PROMPT)),
                SENTIMENT,
                "one swapped pair of letters does not change the sentiment",
            ),
            DIR(
                "sentiment: negation",
                tuple(pairs(_GOOD, replace_word("was", "was not"), SENTIMENT_PROMPT)),
                SENTIMENT,
                label="positive",
                direction="down",
                description="adding 'not' lowers P(positive)",
            ),
            DIR(
                "sentiment: intensifier",
                tuple(pairs(_GOOD, replace_word("was", "was very"), SENTIMENT_PROMPT)),
                SENTIMENT,
                label="positive",
                direction="up",
                description="adding 'very' raises P(positive)",
            ),
            MFT(
                "arithmetic: small sums",
                tuple(question(a, b) for a, b in _SUMS),
                tuple(str(a + b) for a, b in _SUMS),
                ARITHMETIC,
                "greedy answer to 'What is a + b?' is the sum",
            ),
            INV(
                "arithmetic: add a note",
                tuple(
                    pairs(
                        [question(a, b) for a, b in _SUMS],
                        add_prefix("Note: answer with a number.\n"),
                    )
                ),
                ARITHMETIC,
                "an instruction line before the question does not change the answer",
            ),
        ),
    )
