"""Log-likelihood of a continuation given a context, for any lmlab model: the one
primitive behind multiple-choice tasks, minimal pairs and calibration.

It follows lm-evaluation-harness's ``loglikelihood`` request (v0.4), so that scores agree
with the numbers researchers cite:

- the context's trailing whitespace moves to the continuation ("Q: 2+2 = " + "4" is
  scored as "Q: 2+2 =" + " 4"), because tokenizers glue a space to the following word;
- the continuation's tokens are those of ``encode(context + continuation)`` after the
  first ``len(encode(context))``, so a token that straddles the boundary is not split;
- an empty context is replaced by one end-of-document token (the harness's prefix token);
- only the last ``max_seq_len + 1`` tokens are kept when a request is longer than the
  context window (the continuation is never cut unless it alone is longer).

For each request: the summed log-probability of the continuation tokens (nats), how many
there are, and whether greedy decoding would have produced exactly them.

    >>> score_continuations(lm, [("The capital of France is", " Paris")])
    [Continuation(logprob=-1.91, n_tokens=1, is_greedy=True)]

Parity: tests/eval/test_scoring.py compares with a direct transformers computation on a
tiny random Llama.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from tqdm.auto import tqdm

from lmlab.errors import ConfigError
from lmlab.lm import LM
from lmlab.models.contract import require_causal_lm


@dataclass(frozen=True)
class Continuation:
    """The score of one (context, continuation) request."""

    logprob: float
    """Sum of log p(token | everything before it) over the continuation's tokens, in nats."""
    n_tokens: int
    is_greedy: bool
    """Whether every continuation token is the model's most likely next token."""


def encode_pair(tokenizer: Any, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """(context ids, continuation ids) as the harness splits them (see the module doc).

    ("Answer: ", "yes") -> encode("Answer:"), encode("Answer: yes")[len(...):]
    """
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    if not context:
        if tokenizer.eos_id is None:
            raise ConfigError(
                "scoring a continuation with an empty context needs a tokenizer with an "
                "end-of-document token (eos_id) to stand for the start; give a context"
            )
        return [tokenizer.eos_id], tokenizer.encode(continuation)
    whole = tokenizer.encode(context + continuation)
    context_ids = tokenizer.encode(context)
    return context_ids, whole[len(context_ids) :]


def score_continuations(
    lm: LM,
    requests: Sequence[tuple[str, str]],
    batch_size: int = 16,
    progress: bool = False,
) -> list[Continuation]:
    """Score each ``(context, continuation)`` with ``lm`` (``.model`` and ``.tokenizer``).

    Requests are batched longest first (right padding; the models are causal, so padding
    never changes a real position's logits) and returned in the given order.
    """
    pairs = [encode_pair(lm.tokenizer, c, x) for c, x in requests]
    return score_token_pairs(lm.model, pairs, batch_size, progress)


@torch.inference_mode()
def score_token_pairs(
    model: torch.nn.Module,
    pairs: Sequence[tuple[Sequence[int], Sequence[int]]],
    batch_size: int = 16,
    progress: bool = False,
) -> list[Continuation]:
    """``score_continuations`` on already tokenized (context ids, continuation ids)."""
    require_causal_lm(model, "scoring continuations")
    if batch_size < 1:
        raise ConfigError(f"batch_size={batch_size} is invalid: must be >= 1")
    window = getattr(getattr(model, "config", None), "max_seq_len", None)
    rows = []  # (input ids, number of continuation tokens)
    for i, (context, continuation) in enumerate(pairs):
        if not continuation:
            raise ConfigError(f"request {i} has an empty continuation: nothing to score")
        whole = list(context) + list(continuation)
        if window is not None:
            whole = whole[-(window + 1) :]
        if len(whole) < 2 or len(continuation) > len(whole) - 1:
            raise ConfigError(
                f"request {i}: a continuation of {len(continuation)} tokens does not fit "
                f"the context window of {window} tokens after its context"
            )
        rows.append((whole[:-1], list(continuation)))
    device = next(itertools.chain(model.parameters(), model.buffers())).device
    order = sorted(range(len(rows)), key=lambda i: -len(rows[i][0]))
    out: list[Continuation | None] = [None] * len(rows)
    was_training = model.training
    model.eval()
    try:
        batches = range(0, len(order), batch_size)
        for b in tqdm(batches, desc="scoring", unit="batch", disable=not progress, leave=False):
            chunk = order[b : b + batch_size]
            T = len(rows[chunk[0]][0])
            x = torch.zeros(len(chunk), T, dtype=torch.long)  # (B, T), right padded
            for r, i in enumerate(chunk):
                x[r, : len(rows[i][0])] = torch.tensor(rows[i][0])
            logp = model(x.to(device)).float().log_softmax(-1).cpu()  # (B, T, V)
            for r, i in enumerate(chunk):
                inputs, target = rows[i]
                k = len(target)
                at = logp[r, len(inputs) - k : len(inputs)]  # (k, V): predicts each target
                target = torch.tensor(target)
                logprob = at.gather(-1, target[:, None]).sum().item()
                out[i] = Continuation(logprob, k, bool((at.argmax(-1) == target).all()))
    finally:
        model.train(was_training)
    return out  # type: ignore[return-value]
