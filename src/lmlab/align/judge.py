"""AI feedback: a judge model picks the better of two replies by a written constitution.

Reinforcement learning from AI feedback replaces the human labeller of ``lmlab rank`` with
a language model (Bai et al. 2022, "Constitutional AI: Harmlessness from AI Feedback",
sec. 4; Lee et al. 2023, "RLAIF: Scaling Reinforcement Learning from Human Feedback with AI
Feedback"). The judge reads a short list of principles (``DEFAULT_CONSTITUTION``, or a text
file), a prompt and two replies labelled A and B, and is asked which reply follows the
principles better. Its choice is read from its next-token distribution, not from text it
generates:

    p(A | x) = exp(l_A) / (exp(l_A) + exp(l_B))

where ``l_A`` and ``l_B`` are the log-probabilities (nats) the judge gives to the label
continuations "A" and "B" after the question ``x`` (scored as lm-evaluation-harness scores
continuations, ``lmlab.eval.scoring``). A judge answering in text may answer neither
letter; the probabilities always answer, and give a soft preference (Lee et al. sec. 2.1
use the same label-probability readout).

LLM judges favour the reply in one position whatever it says (Zheng et al. 2023, "Judging
LLM-as-a-Judge with MT-Bench and Chatbot Arena", sec. 3.3, position bias), and a small
judge does so heavily. So every pair is judged in both orders and the two readings are
averaged:

    P(a > b) = ( p(A | a shown as A, b as B) + p(B | b shown as A, a as B) ) / 2

which makes the judgement exactly antisymmetric, P(b > a) = 1 - P(a > b), whatever the
judge's bias: a bias that adds the same amount to "A" in both orders cancels. Both order
readings are kept in each pair's meta (``p_orders``), so the bias can be measured.

With ``critique=True`` the judge first writes a short critique of the two replies (the
chain-of-thought variant of Constitutional AI), which is put before the question in that
order's prompt and recorded.

``agreement(pairs, programmatic)`` measures a judge against a programmatic one: for the
bundled verifiable tasks (``lmlab.data.tasks``), ``task_judge`` says which reply is right
when exactly one is; pairs where both or neither are right are not comparable.

Tests: ``tests/align/test_judge.py`` (a tiny random model as judge: exact antisymmetry
under swapping, agreement 1.0 for a judge patched to prefer the right answer, files).
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from tqdm.auto import tqdm

from lmlab.align.rank import (
    PromptItem,
    prompt_seed,
    read_prompts,
    render_prompt,
    reply_params,
    sample_replies,
)
from lmlab.data.preferences import PreferenceLog, PreferencePair
from lmlab.data.tasks import check
from lmlab.errors import ConfigError, DataError, DataNotFoundError
from lmlab.eval.scoring import encode_pair, score_token_pairs
from lmlab.generate import SamplingParams, generate_text
from lmlab.lm import load

DEFAULT_CONSTITUTION = """\
1. The answer is correct: every fact, number and step in it is true.
2. The answer does exactly what the question asks, in the format it asks for.
3. The answer is concise: nothing beyond what was asked.
4. The answer is honest and harmless: no made-up claims, nothing dangerous or rude."""
"""The principles the judge applies unless a constitution file is given."""

LABELS = ("A", "B")

TIE = 1e-9
"""|P(a > b) - 0.5| below this is no preference: a judge with a pure position bias gives
exactly 0.5 up to float rounding (p + (1 - p) need not be 1.0 in floating point)."""

_PAIR = """\
Judge two answers to a question by these principles:
{constitution}

Question:
{prompt}

Answer A:
{a}

Answer B:
{b}
"""

QUESTION = (
    _PAIR
    + "{critique}\nWhich answer follows the principles better? Reply with the letter A or B only."
)

CRITIQUE_REQUEST = (
    _PAIR + "\nIn one or two sentences, say where each answer follows or breaks the principles."
)


def read_constitution(path: str | os.PathLike | None) -> str:
    """The principles in a text file (``DEFAULT_CONSTITUTION`` when ``path`` is None)."""
    if path is None:
        return DEFAULT_CONSTITUTION
    path = Path(path)
    if not path.is_file():
        raise DataNotFoundError(f"constitution file {str(path)!r} does not exist")
    text = path.read_text(encoding="utf-8-sig").strip()
    if not text:
        raise DataError(f"{path}: the constitution file is empty; write one principle a line")
    return text


# ----------------------------------------------------------------------------- the maths


def label_probability(logprob_a: float, logprob_b: float) -> float:
    """p(A) from the two labels' log-probabilities: a softmax over the two,
    ``sigmoid(l_A - l_B)``: (-0.1, -2.4) -> 0.909."""
    return 1.0 / (1.0 + math.exp(logprob_b - logprob_a))


def debiased_preference(p_a_first: float, p_a_second: float) -> float:
    """P(a > b) from the two orders: ``p_a_first`` = p(A) with a shown as A, and
    ``p_a_second`` = p(A) with b shown as A (so a is B): (p_a_first + 1 - p_a_second) / 2.

    A judge that always says A with 0.9: (0.9 + 1 - 0.9) / 2 = 0.5, no preference.
    """
    return (p_a_first + (1.0 - p_a_second)) / 2


# ----------------------------------------------------------------------------- the judge


@dataclass(frozen=True)
class Judgement:
    """The judge's reading of one pair (a, b)."""

    p_a: float
    """P(a > b), averaged over both orders; P(b > a) = 1 - p_a."""
    p_orders: tuple[float, float]
    """P(a > b) read in each order: a shown as A, then a shown as B."""
    critiques: tuple[str, ...] = ()
    """The judge's critiques, one per order, when asked for."""


def judge_question(
    prompt: str, a: str, b: str, constitution: str, critique: str | None = None
) -> str:
    """The user message that asks the judge to choose between A (= ``a``) and B (= ``b``)."""
    note = f"\nCritique:\n{critique}\n" if critique else ""
    return QUESTION.format(constitution=constitution, prompt=prompt, a=a, b=b, critique=note)


def label_logprobs(judge: Any, question: str) -> tuple[float, float]:
    """log p("A"), log p("B") (nats) as the judge's reply to ``question``, rendered with
    its chat template."""
    context = render_prompt(judge, [{"role": "user", "content": question}])
    pairs = [encode_pair(judge.tokenizer, context, label) for label in LABELS]
    window = getattr(getattr(judge.model, "config", None), "max_seq_len", None)
    longest = max(len(c) + len(x) for c, x in pairs)
    if window is not None and longest > window + 1:
        raise ConfigError(
            f"the judge's question is {longest} tokens, more than its context of {window}: "
            "shorten the replies (max_new_tokens) or the constitution"
        )
    scores = score_token_pairs(judge.model, pairs, batch_size=2)
    return scores[0].logprob, scores[1].logprob


def write_critique(
    judge: Any, prompt: str, a: str, b: str, constitution: str, params: SamplingParams
) -> str:
    """The judge's short critique of A (= ``a``) and B (= ``b``), generated."""
    request = CRITIQUE_REQUEST.format(constitution=constitution, prompt=prompt, a=a, b=b)
    text = render_prompt(judge, [{"role": "user", "content": request}])
    return generate_text(judge.model, judge.tokenizer, text, reply_params(judge, params)).strip()


def judge_pair(
    judge: Any,
    prompt: str,
    a: str,
    b: str,
    constitution: str = DEFAULT_CONSTITUTION,
    critique_params: SamplingParams | None = None,
) -> Judgement:
    """Read the judge's preference between replies ``a`` and ``b`` to ``prompt`` in both
    orders (see the module doc); with ``critique_params``, a critique is generated first
    in each order and shown to the judge before its choice."""
    readings, critiques = [], []
    for first, second in ((a, b), (b, a)):
        critique = None
        if critique_params is not None:
            critique = write_critique(judge, prompt, first, second, constitution, critique_params)
            critiques.append(critique)
        question = judge_question(prompt, first, second, constitution, critique)
        readings.append(label_probability(*label_logprobs(judge, question)))
    p_a = debiased_preference(readings[0], readings[1])
    return Judgement(p_a, (readings[0], 1.0 - readings[1]), tuple(critiques))


# ----------------------------------------------------------------------------- collecting


@dataclass(frozen=True)
class JudgeSummary:
    """What a judging run did."""

    prompts: int
    """Prompts judged in this run (those already in ``out`` are skipped)."""
    pairs: int
    """Pairs written in this run."""
    ties: int
    """Pairs left out: identical replies, or a judge undecided (P within ``TIE`` of 0.5)."""
    out: Path


def judge_prompts(
    judge: Any,
    policy: Any,
    items: Sequence[PromptItem],
    out: str | os.PathLike,
    judge_name: str = "judge",
    samples: int = 2,
    seed: int = 0,
    params: SamplingParams | None = None,
    constitution: str = DEFAULT_CONSTITUTION,
    critique: bool = False,
    progress: bool = False,
) -> JudgeSummary:
    """For each prompt, sample ``samples`` replies from ``policy``, let ``judge`` compare
    every pair of them, and append the pairs (chosen = the reply the judge prefers) to
    ``out`` through ``PreferenceLog``. A prompt whose pairs are already in ``out`` is not
    judged again, so an interrupted run resumes.

    Each pair's meta: ``prompt_id``, ``seed``, ``judge`` (``judge_name``), ``p_chosen``
    (P(chosen > rejected), both orders averaged), ``p_orders`` (that probability read with
    the chosen reply shown as A, then as B), ``critiques`` when asked for, and the item's
    meta (``task`` and ``reference`` for task rows).
    """
    if isinstance(samples, bool) or not isinstance(samples, int) or samples < 2:
        raise ConfigError(f"samples={samples!r} is invalid: must be an integer >= 2")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ConfigError(f"seed={seed!r} is invalid: must be an integer >= 0")
    params = params or SamplingParams()
    log = PreferenceLog(out)
    done = {str(p.meta.get("prompt_id")) for p in log.pairs}
    todo = [item for item in items if item.prompt_id not in done]
    critique_params = dataclasses.replace(params, temperature=0, seed=None) if critique else None
    n_pairs = ties = 0
    for item in tqdm(todo, desc="judging", unit="prompt", disable=not progress):
        item_seed = prompt_seed(seed, item.prompt_id)
        replies = sample_replies(
            policy, item.messages, samples, dataclasses.replace(params, seed=item_seed)
        )
        prompt = item.text if len(item.messages) == 1 else item.messages
        for i in range(len(replies)):
            for j in range(i + 1, len(replies)):
                a, b = replies[i], replies[j]
                if a == b:
                    ties += 1
                    continue
                verdict = judge_pair(judge, item.text, a, b, constitution, critique_params)
                if abs(verdict.p_a - 0.5) < TIE:
                    ties += 1
                    continue
                a_wins = verdict.p_a > 0.5
                chosen, rejected = (a, b) if a_wins else (b, a)
                p_orders = (
                    verdict.p_orders if a_wins else tuple(1.0 - p for p in verdict.p_orders[::-1])
                )
                meta: dict[str, Any] = {
                    **item.meta,
                    "prompt_id": item.prompt_id,
                    "seed": item_seed,
                    "judge": judge_name,
                    "p_chosen": max(verdict.p_a, 1.0 - verdict.p_a),
                    "p_orders": list(p_orders),
                }
                if verdict.critiques:
                    meta["critiques"] = list(verdict.critiques)
                log.append(PreferencePair(prompt, chosen, rejected, meta))
                n_pairs += 1
    return JudgeSummary(len(todo), n_pairs, ties, log.path)


def judge(
    model: str,
    prompts: str,
    policy: str,
    out: str = "prefs.jsonl",
    samples: int = 2,
    seed: int = 0,
    constitution: str | None = None,
    critique: bool = False,
    limit: int | None = None,
    dtype: Literal["float32", "bfloat16", "auto"] | None = None,
    device: str = "auto",
    params: SamplingParams | None = None,
    progress: bool = True,
) -> JudgeSummary:
    """Collect AI-feedback preferences: ``model`` judges pairs of ``policy``'s replies.

    Args:
        model: the judge, anything ``lmlab.load`` takes (e.g. ``"smollm2"``).
        prompts: a ``.jsonl`` file of ``{"prompt"}`` or instruction-task rows, or a text
            file with one prompt a line (``lmlab.align.rank.read_prompts``).
        policy: the model whose replies are judged (``lmlab.load``); may equal ``model``.
        out: the preference JSONL file (appended to; prompts already in it are skipped).
        samples: replies per prompt; every pair of them is judged.
        seed: base seed; each prompt samples with ``prompt_seed(seed, prompt_id)``.
        constitution: a text file of principles (default: ``DEFAULT_CONSTITUTION``).
        critique: let the judge write a short critique before choosing (slower).
        limit: judge only the first ``limit`` prompts of the file.
        dtype: dtype of both models (``lmlab.load``).
        device: where the model runs: auto (CUDA, then MPS, then the CPU), cpu, cuda, cuda:N, mps.
        params: the policy's decoding settings (temperature, max_new_tokens, ...).
        progress: show a progress bar.
    """
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ConfigError(f"limit={limit!r} is invalid: must be None or an integer >= 1")
    principles = read_constitution(constitution)
    items = read_prompts(prompts)[:limit]
    judge_lm = load(model, dtype=dtype, device=device)
    policy_lm = judge_lm if policy == model else load(policy, dtype=dtype, device=device)
    return judge_prompts(
        judge_lm,
        policy_lm,
        items,
        out,
        str(model),
        samples,
        seed,
        params,
        principles,
        critique,
        progress,
    )


# ----------------------------------------------------------------------------- agreement


def task_judge(pair: PreferencePair) -> bool | None:
    """The programmatic verdict on a pair of task replies: True when only ``chosen`` is
    right, False when only ``rejected`` is, None when both or neither are (or the pair has
    no ``task`` and ``reference`` in its meta). Graded by ``lmlab.data.tasks.check``."""
    task, reference = pair.meta.get("task"), pair.meta.get("reference")
    if task is None or reference is None:
        return None
    chosen_right = check(task, pair.chosen, reference)
    rejected_right = check(task, pair.rejected, reference)
    return chosen_right if chosen_right != rejected_right else None


@dataclass(frozen=True)
class Agreement:
    """How often a judge's choices match a programmatic judge's."""

    rate: float | None
    """Agreeing pairs / comparable pairs (None when no pair is comparable)."""
    comparable: int
    """Pairs on which the programmatic judge has a verdict."""
    total: int


def agreement(
    judge_pairs: Iterable[PreferencePair],
    programmatic: Callable[[PreferencePair], bool | None] = task_judge,
) -> Agreement:
    """The fraction of comparable pairs where ``programmatic`` agrees with the judge's choice.

    ``programmatic(pair)`` is True when ``chosen`` is the better reply, False when
    ``rejected`` is, None when it cannot tell (default: ``task_judge``). Three pairs with
    verdicts True, False, None -> Agreement(rate=0.5, comparable=2, total=3).
    """
    verdicts = [programmatic(pair) for pair in judge_pairs]
    comparable = [v for v in verdicts if v is not None]
    rate = sum(comparable) / len(comparable) if comparable else None
    return Agreement(rate, len(comparable), len(verdicts))
