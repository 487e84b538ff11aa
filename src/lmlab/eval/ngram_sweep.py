"""Count-based language models of every order and smoothing on one corpus, side by side
(``lmlab ngrams``; lesson 3).

Each (order, smoothing) pair is one ``NGramLM`` fitted on the training ids and scored on
the validation ids as one stream from BOS (``ngram_perplexity``): every token is predicted
from the n - 1 tokens before it. The sweep records, per model, the perplexity (``inf``
where some validation n-gram has probability 0, as maximum likelihood gives an n-gram it
never counted), how many validation tokens have probability 0, the number of stored
n-grams and the fitting time, and for linear interpolation the weights EM chose.

``stupid_backoff`` is left out: its scores do not sum to 1, so it has no perplexity
(``NGramLM.require_probabilities`` says so), and Kneser-Ney needs bigrams, so its order 1
is skipped (recorded as None).
"""

from __future__ import annotations

import math
import re
import time
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from lmlab.errors import ConfigError, pick_names
from lmlab.generate import SamplingParams, generate
from lmlab.models import build_model
from lmlab.models.ngram import NGramLM, ngram_log_probs

SWEEP_SMOOTHINGS = (
    "mle",
    "add_k",
    "backoff",
    "witten_bell",
    "linear_interpolation",
    "kneser_ney",
    "modified_kneser_ney",
)
"""The smoothings that give probabilities (every fitted one but stupid backoff), roughly
from the crudest to the best."""
NEEDS_BIGRAMS = ("kneser_ney", "modified_kneser_ney")


@dataclass
class NGramScore:
    """One fitted model of the sweep."""

    order: int
    smoothing: str
    perplexity: float
    """exp(mean negative log-likelihood) of the validation ids; inf if one has p = 0."""
    zero_probability: int
    """Validation tokens the model gives probability 0."""
    stored_ngrams: int
    """N-grams in the model's tables, all orders."""
    fit_s: float
    weights: list[float] | None = None
    """linear_interpolation's EM weights lambda_0 (uniform) .. lambda_n; None otherwise."""


def parse_orders(text: str | int | Sequence[int]) -> list[int]:
    """``"1-7"``, ``"2,3,5"``, ``"1-3,6"``, ``5`` or a list -> sorted distinct orders >= 1.

    >>> parse_orders("1-3,6")
    [1, 2, 3, 6]
    """
    if isinstance(text, int):
        items: list[int] = [text]
    elif isinstance(text, str):
        items = []
        for part in [p.strip() for p in text.split(",") if p.strip()]:
            match = re.fullmatch(r"(\d+)\s*-\s*(\d+)|(\d+)", part)
            if not match:
                raise ConfigError(
                    f"orders={text!r} is invalid: {part!r} is not a number or a range; "
                    "valid: '1-7', '2,3,5', '1-3,6'"
                )
            if match[3]:
                items.append(int(match[3]))
            else:
                low, high = int(match[1]), int(match[2])
                if low > high:
                    raise ConfigError(f"orders={text!r} is invalid: the range {part!r} is empty")
                items += range(low, high + 1)
    else:
        items = [int(n) for n in text]
    if not items or min(items) < 1:
        raise ConfigError(f"orders={text!r} is invalid: give orders >= 1, e.g. '1-7'")
    return sorted(set(items))


def parse_smoothings(text: str | Sequence[str]) -> list[str]:
    """A comma-separated string or a list of smoothings -> the list, checked."""
    names = [s.strip() for s in text.split(",")] if isinstance(text, str) else list(text)
    if "stupid_backoff" in names:
        raise ConfigError(
            "smoothings: stupid_backoff gives scores that do not sum to 1, so it has no "
            f"perplexity to compare; valid: {', '.join(SWEEP_SMOOTHINGS)}"
        )
    return pick_names(names, SWEEP_SMOOTHINGS, "smoothings")


def score_ngram(model: NGramLM, val_ids: torch.Tensor) -> tuple[float, int]:
    """(perplexity of ``val_ids`` as one stream from BOS, tokens with probability 0)."""
    log_p = ngram_log_probs(model, val_ids)
    zeros = int(torch.isinf(log_p).sum())
    return (math.inf if zeros else math.exp(-float(log_p.mean()))), zeros


def sweep_ngrams(
    train_ids,
    val_ids,
    vocab_size: int,
    orders: Sequence[int],
    smoothings: Sequence[str] = SWEEP_SMOOTHINGS,
    progress: bool = False,
) -> tuple[list[NGramScore], NGramLM | None]:
    """Fit and score every (smoothing, order) pair.

    Returns (the scores, in smoothing-major order without the skipped pairs; the model with
    the lowest finite perplexity, or None if none is finite).
    """
    train = np.asarray(train_ids, dtype=np.int64)
    val = torch.as_tensor(np.asarray(val_ids, dtype=np.int64))
    if len(train) == 0 or val.numel() == 0:
        raise ConfigError("the n-gram sweep needs non-empty training and validation ids")
    pairs = [(s, n) for s in smoothings for n in orders if not (s in NEEDS_BIGRAMS and n < 2)]
    scores, best, best_ppl = [], None, math.inf
    for smoothing, order in tqdm(pairs, desc="n-grams", unit="model", disable=not progress):
        spec = dict(family="ngram", vocab_size=vocab_size, order=order, smoothing=smoothing)
        start = time.perf_counter()
        model = build_model(spec).fit(train)
        fit_s = time.perf_counter() - start
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ppl, zeros = score_ngram(model, val)
        stored = sum(model.table(m)[0].numel() for m in range(1, order + 1))
        weights = (
            [float(w) for w in model.interpolation_weights.tolist()]
            if smoothing == "linear_interpolation"
            else None
        )
        scores.append(NGramScore(order, smoothing, ppl, zeros, stored, fit_s, weights))
        if ppl < best_ppl:
            best, best_ppl = model, ppl
    return scores, best


def perplexity_table(scores: Sequence[NGramScore]) -> dict[str, dict[int, float]]:
    """smoothing -> {order: perplexity}, from the sweep's scores."""
    table: dict[str, dict[int, float]] = {}
    for s in scores:
        table.setdefault(s.smoothing, {})[s.order] = s.perplexity
    return table


def as_json(scores: Sequence[NGramScore]) -> list[dict[str, Any]]:
    """The scores as JSON-ready dicts (an infinite perplexity as None: JSON has no inf)."""
    rows = []
    for s in scores:
        row = asdict(s)
        row["perplexity"] = s.perplexity if math.isfinite(s.perplexity) else None
        rows.append(row)
    return rows


def sample_lines(model, tokenizer, prompt: str, params: SamplingParams) -> str:
    """``params.max_new_tokens`` sampled tokens after ``prompt``, going on past line ends.

    A word-level model ends each line with ``</s>`` (its eos), so one call stops at the
    first line end ("ROMEO:" is a line of its own: the sample would be empty). Each line
    end becomes a line break and sampling resumes from the text so far (the next seed),
    until the budget is spent. A character model has no eos and samples in one call."""
    text, left, seed = "", params.max_new_tokens, params.seed
    while left > 0:
        step = replace(params, max_new_tokens=left, seed=seed)
        out = generate(model, [prompt + text], step, tokenizer)
        text += out.texts[0]
        left -= len(out.ids[0])
        if out.finish_reasons[0] != "stop" or not out.ids[0]:
            break
        text += "\n"
        seed = None if seed is None else seed + 1
    return text
