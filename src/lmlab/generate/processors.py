"""Logits processors: small pure functions that reshape a next-token distribution.

Each takes logits [B, V] (float) and returns new logits [B, V]; a token a processor rules
out gets logit -inf, i.e. probability 0 after the softmax. ``process_logits`` composes them
in the order Hugging Face's ``generate`` uses: repetition penalty, then temperature, top-k
and top-p. Candidates are ranked by logit and, between equal logits, by lower token id, so
every filter is deterministic even on ties.

References: temperature and top-k (Fan et al. 2018, "Hierarchical Neural Story
Generation"); nucleus / top-p (Holtzman et al. 2020, "The Curious Case of Neural Text
Degeneration"); repetition penalty (Keskar et al. 2019, CTRL).
"""

from __future__ import annotations

import torch

from lmlab.generate.params import SamplingParams

NEG_INF = float("-inf")


def apply_temperature(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """softmax(logits / t): t < 1 sharpens the distribution, t > 1 flattens it.

    Logits log([0.5, 0.25, 0.25]) at t = 0.5 become log([2/3, 1/6, 1/6]) up to a constant
    (each probability squared, then renormalised). t = 0 is greedy decoding and is never
    passed here.
    """
    if temperature == 1.0:
        return logits
    return logits / temperature


def top_k_filter(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Keep exactly the k highest logits of each row (ties: lower token id first).

    Probabilities [0.1, 0.4, 0.2, 0.3] with k = 2 keep tokens 1 and 3 -> [0, 4/7, 0, 3/7].
    Logits [1, 3, 3, 3] with k = 2 keep tokens 1 and 2 (token 3 ties but has a higher id).
    k = 0 or k >= V keeps everything.
    """
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth = torch.topk(logits, k, dim=-1).values[:, -1:]  # (B, 1) the k-th highest logit
    above = logits > kth
    tied = logits == kth
    # The tied tokens fill the places left after the strictly higher ones, lowest id first.
    places = k - above.sum(-1, keepdim=True)  # (B, 1)
    keep = above | (tied & (tied.cumsum(-1) <= places))
    return logits.masked_fill(~keep, NEG_INF)


def top_p_filter(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Nucleus filter: keep the smallest set of most likely tokens whose probability sum >= p.

    Probabilities [0.1, 0.5, 0.3, 0.1]: sorted 0.5, 0.3, 0.1, 0.1 with running sums 0.5,
    0.8, 0.9, 1.0, so p = 0.5 keeps {1}, p = 0.7 keeps {1, 2}, p = 0.85 keeps {1, 2, 0}
    (tokens 0 and 3 tie; the lower id comes first). The most likely token is always kept,
    however small p is; p = 1 keeps every token.
    """
    if p >= 1.0:
        return logits
    # A stable descending sort keeps equal logits in id order: the tie rule above.
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True, stable=True)  # (B, V)
    cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)  # (B, V)
    # Token i (in sorted order) is dropped once the tokens before it already reach p.
    drop_sorted = torch.zeros_like(cumulative, dtype=torch.bool)
    drop_sorted[:, 1:] = cumulative[:, :-1] >= p
    drop = torch.empty_like(drop_sorted).scatter_(-1, order, drop_sorted)  # vocabulary order
    return logits.masked_fill(drop, NEG_INF)


def repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL's repetition penalty on every token in ``seen`` [B, V] bool.

    A seen token's positive logit is divided by ``penalty`` and a negative one multiplied by
    it, so for penalty > 1 it always becomes less likely: logits [2.0, -1.0, 0.5] with
    tokens 0 and 1 seen and penalty 2 become [1.0, -2.0, 0.5].
    """
    if penalty == 1.0:
        return logits
    penalised = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalised, logits)


def seen_tokens(ids: torch.Tensor, vocab_size: int, mask: torch.Tensor | None = None):
    """Which tokens occur in each row: ids [B, T] int64 (mask [B, T] bool, False on padding)
    -> [B, V] bool, the ``seen`` argument of ``repetition_penalty``."""
    # Padding points at an extra column V, dropped afterwards.
    index = ids if mask is None else ids.masked_fill(~mask.bool(), vocab_size)
    seen = torch.zeros(ids.shape[0], vocab_size + 1, dtype=torch.bool, device=ids.device)
    return seen.scatter_(1, index, True)[:, :vocab_size]


def process_logits(
    logits: torch.Tensor, params: SamplingParams, seen: torch.Tensor | None = None
) -> torch.Tensor:
    """The distribution a token is sampled from: logits [B, V] -> processed logits [B, V].

    Applies, in order: repetition penalty (needs ``seen`` [B, V] bool, the tokens of each
    row's prompt and output so far, see ``seen_tokens``), then, when ``params.sample``,
    temperature, top-k and top-p. Greedy and beam search only use the first step, since
    the others never change which token is most likely.
    """
    if params.repetition_penalty != 1.0:
        if seen is None:
            raise ValueError("repetition_penalty needs `seen`, the tokens seen so far")
        logits = repetition_penalty(logits, seen, params.repetition_penalty)
    if params.sample:
        logits = apply_temperature(logits, params.temperature)
        logits = top_k_filter(logits, params.top_k)
        logits = top_p_filter(logits, params.top_p)
    return logits
