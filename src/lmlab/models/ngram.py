"""Count-based n-gram language models over token ids, with five smoothing methods.

An order-n model predicts token ``w`` from the n-1 tokens before it, using counts
``c(ctx w)`` of every m-gram (m = 1..n) in the training ids. Smoothing decides what to do
with n-grams that were never seen:

- ``mle``: maximum likelihood, ``c(ctx w) / c(ctx)``. Unseen n-grams get probability 0, so
  the perplexity of any text holding one is infinite (``ngram_perplexity`` warns which).
- ``add_k``: add ``k`` to every count (Laplace when k = 1, Lidstone otherwise),
  ``(c(ctx w) + k) / (c(ctx) + V k)``.
- ``kneser_ney``: interpolated Kneser-Ney with one fixed ``discount`` D (Kneser & Ney 1995;
  the form of ``nltk.lm.KneserNeyInterpolated``). The top order uses counts, lower orders use
  continuation counts N1+(. ctx w), the number of distinct tokens seen before ``ctx w``::

      p(w | ctx) = max(c(ctx w) - D, 0) / c(ctx) + D N1+(ctx .) / c(ctx) * p(w | ctx[1:])

- ``modified_kneser_ney``: the same with three discounts D1, D2, D3+ for n-grams seen once,
  twice and three or more times, estimated per order from count-of-counts (Chen & Goodman
  1998, eq. 26; see ``modified_kn_discounts``).
- ``backoff``: Katz-style backoff (Katz 1987) with an absolute ``discount`` in place of
  Katz's Good-Turing discounts: a seen n-gram gets ``(c - D) / c(ctx)``; the freed mass goes
  to the unseen tokens in proportion to the lower order. Unlike stupid backoff (Brants et
  al. 2007) it is a normalised distribution, so its perplexity means something.

Conventions (shared by ``fit`` and ``forward``, and by the nltk parity test):

- Context padding: each sequence is left-padded with n-1 BOS symbols, so the first token is
  predicted from ``(BOS, ..., BOS)``. BOS is an internal id (``vocab_size``) that appears
  only in contexts, never as a prediction, so the output stays ``[..., V]``. There is no
  end padding: a tokenizer's end-of-text token, if any, is an ordinary token. In nltk terms
  this is ``pad_both_ends`` with the left side only, keeping the everygrams that end on a
  real token. With this padding every lower-order m-gram has a token (real or BOS) to its
  left, so its continuation count is positive exactly when its count is, and every
  distribution below sums to 1.
- Unseen contexts (``c(ctx) = 0``) carry no evidence: every method then uses the next
  shorter context, down to the unigram level (nltk does this for Kneser-Ney only; its MLE
  gives 0 and its Lidstone gives 1/V there).
- Unseen tokens: with ``uniform_floor`` (the default) the unigram level of Kneser-Ney,
  modified Kneser-Ney and backoff is discounted too and interpolated with the uniform 1/V
  (Chen & Goodman's 0th order), so every token has a positive probability and perplexity
  is finite. ``uniform_floor=False`` reproduces nltk, whose Kneser-Ney gives a token never
  seen in training probability 0.

Storage: the counts of each order are a sorted int64 tensor of n-gram codes plus a count
tensor, kept as buffers (no parameters, nothing to train: lmlab's trainer refuses a model
without trainable parameters). A context (s_1, ..., s_j) over the V+1 symbols (BOS included)
is the base-(V+1) number ``s_1 (V+1)^(j-1) + ... + s_j``; the m-gram (ctx, w) is
``code(ctx) * V + w``. Fitting is np.unique-style counting (``torch.unique``) and scoring is
``torch.searchsorted`` (two searches per context): no Python loop over tokens.

Parity: ``tests/models/test_ngram.py`` compares perplexities with nltk.lm's MLE, Laplace,
Lidstone and KneserNeyInterpolated on the same n-grams.

Shapes: B batch, T tokens per row, Q = B*T scored positions, V vocabulary.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from torch import nn

from lmlab.errors import ConfigError
from lmlab.models.contract import Abilities
from lmlab.models.registry import register_family

SMOOTHINGS = ("mle", "add_k", "kneser_ney", "modified_kneser_ney", "backoff")


@dataclass(frozen=True)
class NGramConfig:
    vocab_size: int
    """Number of token ids."""
    order: int = 3
    """n: the model predicts from the previous n-1 tokens (1 = unigram)."""
    smoothing: Literal["mle", "add_k", "kneser_ney", "modified_kneser_ney", "backoff"] = (
        "kneser_ney"
    )
    """How to give probability to n-grams never seen in training (see the module docstring)."""
    k: float = 1.0
    """Pseudo-count added to every count by add_k (1 = Laplace, other values = Lidstone)."""
    discount: float = 0.75
    """Absolute discount D of kneser_ney and backoff, in [0, 1] (nltk's default is 0.1);
    modified_kneser_ney also falls back to it where its count-of-counts are zero."""
    uniform_floor: bool = True
    """Interpolate the unigram level of kneser_ney, modified_kneser_ney and backoff with the
    uniform 1/V, so unseen tokens get a positive probability; False matches nltk.lm."""
    max_seq_len: int | None = None
    """Longest row ``forward`` accepts; None means no limit (the model only looks back n-1)."""

    def __post_init__(self):
        def bad(field: str, value, allowed: str):
            raise ConfigError(f"NGramConfig.{field}={value!r} is invalid: {allowed}")

        if not isinstance(self.vocab_size, int) or self.vocab_size < 1:
            bad("vocab_size", self.vocab_size, "must be a positive integer")
        if not isinstance(self.order, int) or self.order < 1:
            bad("order", self.order, "must be a positive integer")
        if self.smoothing not in SMOOTHINGS:
            bad("smoothing", self.smoothing, f"must be one of {', '.join(SMOOTHINGS)}")
        if not self.k > 0:
            bad("k", self.k, "must be > 0 (k = 0 is smoothing='mle')")
        if not 0 <= self.discount <= 1:
            bad("discount", self.discount, "must be in [0, 1] (counts are >= 1)")
        if self.smoothing in ("kneser_ney", "modified_kneser_ney") and self.order < 2:
            bad("order", self.order, f"must be >= 2 for {self.smoothing} (it needs bigrams)")
        if (self.vocab_size + 1) ** self.order >= 2**63:
            bad("order", self.order, "(vocab_size + 1) ** order must fit in int64; lower it")
        if self.max_seq_len is not None and (
            not isinstance(self.max_seq_len, int) or self.max_seq_len < 1
        ):
            bad("max_seq_len", self.max_seq_len, "must be a positive integer or None")


def context_codes(ids: torch.Tensor, order: int, vocab_size: int) -> list[torch.Tensor]:
    """Codes of the 0..order-1 tokens before each position, left-padded with BOS = V.

    ids: [B, T] int64 -> ``order`` tensors [B, T] int64; entry j encodes the j previous
    tokens in base V+1, the nearest token least significant.

    >>> [c.tolist() for c in context_codes(torch.tensor([[1, 2, 0]]), 3, vocab_size=3)]
    [[[0, 0, 0]], [[3, 1, 2]], [[15, 13, 6]]]

    (V = 3, base 4, BOS = 3: the third token's context (1, 2) is 1 * 4 + 2 = 6, the
    second's (BOS, 1) is 3 * 4 + 1 = 13, the first's (BOS, BOS) is 3 * 4 + 3 = 15.)
    """
    B, T = ids.shape
    base = vocab_size + 1
    padded = torch.cat([ids.new_full((B, order - 1), vocab_size), ids], dim=1)  # (B, T+n-1)
    codes = [torch.zeros_like(ids)]
    for j in range(1, order):
        # the token j places back of each position, at weight base^(j-1)
        back = padded[:, order - 1 - j : order - 1 - j + T]  # (B, T)
        codes.append(back * base ** (j - 1) + codes[-1])
    return codes


def modified_kn_discounts(counts: torch.Tensor, fallback: float = 0.75) -> torch.Tensor:
    """Chen & Goodman's (1998) discounts [D1, D2, D3+] from the counts of one order.

    With n_i the number of n-grams seen exactly i times and Y = n1 / (n1 + 2 n2):
    D1 = 1 - 2Y n2/n1, D2 = 2 - 3Y n3/n2, D3+ = 3 - 4Y n4/n3. A D whose formula divides by
    zero (tiny data) is ``fallback``; each D_i is clamped to [0, i].

    Worked example: n1, n2, n3, n4 = 10, 5, 3, 2, so Y = 10 / 20 = 0.5 and
    D1 = 1 - 2(0.5)(5/10) = 0.5, D2 = 2 - 3(0.5)(3/5) = 1.1, D3+ = 3 - 4(0.5)(2/3) = 5/3.

    >>> counts = torch.tensor([1] * 10 + [2] * 5 + [3] * 3 + [4] * 2 + [9])
    >>> [round(d, 4) for d in modified_kn_discounts(counts).tolist()]
    [0.5, 1.1, 1.6667]
    """
    n1, n2, n3, n4 = (float((counts == i).sum()) for i in (1, 2, 3, 4))
    y = n1 / (n1 + 2 * n2) if n1 + 2 * n2 > 0 else 0.0
    ds = [
        1 - 2 * y * n2 / n1 if n1 > 0 else fallback,
        2 - 3 * y * n3 / n2 if n2 > 0 else fallback,
        3 - 4 * y * n4 / n3 if n3 > 0 else fallback,
    ]
    if n2 == 0 or n1 == 0:  # Y is undefined or degenerate: every discount falls back
        ds = [fallback] * 3
    return torch.tensor([min(max(d, 0.0), i + 1.0) for i, d in enumerate(ds)], dtype=torch.float64)


def _count(codes: torch.Tensor, space: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The distinct values of ``codes`` (in [0, space)), sorted, and how often each occurs.

    ``[5, 2, 5]`` -> ``([2, 5], [1, 2])``. A small code space is counted with one
    ``bincount`` (linear time: a character 3-gram has at most 67^2 * 66 codes); a large
    one by sorting (``unique``).
    """
    if space <= max(1 << 22, 4 * codes.numel()):
        counts = torch.bincount(codes, minlength=0)
        keys = counts.nonzero().squeeze(1)
        return keys, counts[keys]
    return torch.unique(codes, return_counts=True)


def _rows(
    keys: torch.Tensor, tables: list[torch.Tensor], contexts: torch.Tensor, vocab_size: int
) -> list[torch.Tensor]:
    """Dense rows [Q, V] float64 of each table in ``tables`` for the given contexts [Q].

    The m-grams of one context ``ctx`` have codes ctx*V .. ctx*V + V-1, a contiguous run of
    the sorted ``keys``: two binary searches per context find it, and only the n-grams
    actually seen are copied (no search per (context, token) pair).
    """
    V, Q = vocab_size, contexts.numel()
    lo = torch.searchsorted(keys, contexts * V)  # (Q,)
    hi = torch.searchsorted(keys, contexts * V + V)  # (Q,)
    lengths = hi - lo
    rows = torch.repeat_interleave(torch.arange(Q, device=keys.device), lengths)  # (E,)
    first = torch.repeat_interleave(lengths.cumsum(0) - lengths, lengths)  # (E,)
    idx = lo[rows] + torch.arange(rows.numel(), device=keys.device) - first  # (E,) into keys
    words = keys[idx] % V
    out = []
    for values in tables:
        dense = torch.zeros(Q * V, dtype=torch.float64, device=keys.device)
        dense[rows * V + words] = values[idx].double()
        out.append(dense.view(Q, V))
    return out


class NGramLM(nn.Module):
    """Token ids [B, T] -> next-token log-probabilities [B, T, V]; ``fit`` before use."""

    abilities = Abilities("causal_lm", gradients=False)

    def __init__(self, config: NGramConfig):
        super().__init__()
        self.config = config
        self.register_buffer("n_tokens", torch.zeros((), dtype=torch.long))
        for m in range(1, config.order + 1):
            # m-gram codes (sorted), their counts, and (for orders below n) their
            # continuation counts N1+(. g): same length, aligned with the codes.
            self.register_buffer(f"keys_{m}", torch.zeros(0, dtype=torch.long))
            self.register_buffer(f"counts_{m}", torch.zeros(0, dtype=torch.long))
            self.register_buffer(f"continuations_{m}", torch.zeros(0, dtype=torch.long))

    @property
    def variable_shape_buffers(self) -> list[str]:
        """Buffers sized by the data, for checkpoint loading (lmlab.checkpoint.io)."""
        return [name for name, _ in self.named_buffers(recurse=False)]

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # The count tables' lengths depend on the data: take the stored shapes.
        for name, buf in self.named_buffers(recurse=False):
            if prefix + name in state_dict:
                self._buffers[name] = torch.empty_like(state_dict[prefix + name], device=buf.device)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def table(self, m: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(codes, counts, continuation counts) of the m-grams, each [G_m] int64."""
        return (
            getattr(self, f"keys_{m}"),
            getattr(self, f"counts_{m}"),
            getattr(self, f"continuations_{m}"),
        )

    @torch.no_grad()
    def fit(self, ids) -> NGramLM:
        """Count every m-gram (m = 1..n) of ``ids`` (1-D token ids, one stream); returns self.

        Replaces earlier counts. ``[1, 2, 1, 2]`` with n = 2 counts the bigrams
        (BOS 1), (1 2) x2, (2 1) and the unigrams 1 x2, 2 x2.
        """
        V, n = self.config.vocab_size, self.config.order
        if not isinstance(ids, torch.Tensor):  # a copy: token files are read-only memmaps
            ids = torch.from_numpy(np.array(ids, dtype=np.int64))
        ids = ids.to(device=self.n_tokens.device, dtype=torch.long)
        if ids.dim() != 1 or ids.numel() == 0:
            raise ConfigError(f"fit takes a non-empty 1-D sequence of ids, got {tuple(ids.shape)}")
        _check_ids(ids, V)
        contexts = context_codes(ids[None], n, V)
        for m in range(1, n + 1):
            codes = contexts[m - 1][0] * V + ids  # (N,) m-gram codes
            keys, counts = _count(codes, (V + 1) ** (m - 1) * V)  # sorted
            setattr(self, f"keys_{m}", keys)
            setattr(self, f"counts_{m}", counts)
        for m in range(1, n):
            # Continuation count of an m-gram g: distinct (m+1)-grams (x g). Drop the first
            # (most significant) context symbol of each distinct (m+1)-gram code.
            higher = getattr(self, f"keys_{m + 1}")
            ctx, w = higher // V, higher % V
            suffix = (ctx % (V + 1) ** (m - 1)) * V + w
            keys, cont = _count(suffix, (V + 1) ** (m - 1) * V)
            # BOS padding gives every m-gram (m < n) a left neighbour: same sets.
            assert torch.equal(keys, getattr(self, f"keys_{m}"))
            setattr(self, f"continuations_{m}", cont)
        self.n_tokens = torch.tensor(ids.numel(), device=ids.device)
        return self

    def forward(
        self,
        ids: torch.Tensor,
        cache: None = None,
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """ids: [B, T] int64; mask: [B, T] bool, False on left padding -> log-probs [B, T, V].

        Position t holds log p(next token | ids[:, :t+1]) from the last n-1 tokens (BOS
        before the row's start, and in place of masked-out tokens). float32; see
        ``log_probs`` for float64.
        """
        if cache is not None:
            raise ConfigError("the ngram family has no cache; call it on the whole prefix")
        return self.log_probs(ids, mask).float()

    @torch.no_grad()
    def log_probs(self, ids: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Like ``forward``, in float64, predicting the token AFTER each position.

        ids: [B, T] int64 -> [B, T, V] float64.
        """
        table, inverse = self._context_log_probs(ids, mask)
        return table[inverse].view(*ids.shape, -1)

    def _context_log_probs(
        self, ids: torch.Tensor, mask: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Log-probs [U, V] of the U distinct contexts in ``ids``, and for each of the B*T
        positions the row that is its context: ``log_probs`` is ``table[inverse]``."""
        if int(self.n_tokens) == 0:
            raise ConfigError("this NGramLM has no counts yet: call model.fit(ids) first")
        V, n = self.config.vocab_size, self.config.order
        B, T = ids.shape
        limit = self.config.max_seq_len
        if limit is not None and T > limit:
            raise ConfigError(f"sequence of {T} tokens exceeds max_seq_len {limit}")
        _check_ids(ids, V)
        if mask is not None:
            ids = torch.where(mask.to(torch.bool), ids, V)  # padding reads as BOS
        # Predicting the token after position t means the context ends AT t: shift by one.
        shifted = torch.cat([ids, ids.new_full((B, 1), 0)], dim=1)  # last col is a dummy
        top = context_codes(shifted, n, V)[-1][:, 1:].reshape(-1)  # (Q,) full contexts
        # Positions sharing a context share a distribution: compute each one once. The
        # shorter contexts are suffixes, i.e. the low base-(V+1) digits of the full one.
        unique, inverse = torch.unique(top, return_inverse=True)  # (U,), (Q,)
        out = torch.empty(unique.numel(), V, dtype=torch.float64, device=ids.device)
        step = max(1, (1 << 21) // V)  # contexts per chunk: bounds the [rows, V] temporaries
        for start in range(0, unique.numel(), step):
            chunk = unique[start : start + step]
            contexts = [chunk % (V + 1) ** j for j in range(n)]  # lengths 0..n-1
            out[start : start + step] = self._distributions(contexts).log()
        return out, inverse

    def _distributions(self, contexts: list[torch.Tensor]) -> torch.Tensor:
        """Next-token probabilities [Q, V] float64 for context codes (one [Q] per length)."""
        cfg = self.config
        V, n, d = cfg.vocab_size, cfg.order, cfg.discount
        kn = cfg.smoothing in ("kneser_ney", "modified_kneser_ney")
        p = None
        for j in range(n):  # context length j, m-gram order j + 1, lowest order first
            keys, counts, cont = self.table(j + 1)
            # Kneser-Ney below the top order counts distinct left neighbours instead.
            use_cont = kn and j < n - 1
            c, *rest = _rows(keys, [counts, cont] if use_cont else [counts], contexts[j], V)
            a = rest[0] if use_cont else c  # (Q, V) counts c(ctx w) or N1+(. ctx w)
            seen = c.sum(-1, keepdim=True) > 0  # (Q, 1) context seen in training
            total = a.sum(-1, keepdim=True).clamp(min=1)  # (Q, 1); 0 only when unseen
            if cfg.smoothing == "mle":
                q = a / total
            elif cfg.smoothing == "add_k":
                q = (a + cfg.k) / (total * seen + V * cfg.k)
            elif j == 0 and not cfg.uniform_floor:
                q = a / total  # nltk's KN unigram: continuation counts, no discount
            else:
                lower = torch.full_like(a, 1.0 / V) if j == 0 else p  # 0th order: uniform
                if cfg.smoothing == "backoff":
                    q = _katz_step(a, total, lower, d)
                else:
                    disc = self._discounts(j + 1) if cfg.smoothing == "modified_kneser_ney" else d
                    q = _interpolate(a, total, lower, disc)
            p = q if p is None else torch.where(seen, q, p)  # unseen context: shorter one
        return p

    def _discounts(self, m: int) -> torch.Tensor:
        """Modified-KN [D1, D2, D3+] for order m, from the counts it interpolates with."""
        _, counts, cont = self.table(m)
        return modified_kn_discounts(
            counts if m == self.config.order else cont, self.config.discount
        )


def _interpolate(a: torch.Tensor, total: torch.Tensor, lower: torch.Tensor, disc) -> torch.Tensor:
    """Interpolated absolute discounting: (a - D(a))^+ / total + gamma * lower.

    a: [Q, V] (continuation) counts, total: [Q, 1]; ``disc`` a float D or the modified-KN
    tensor [D1, D2, D3+] indexed by min(a, 3). gamma = sum_w D(a_w) / total is exactly the
    mass the discounts removed, so the result sums to 1 when ``lower`` does.
    """
    if isinstance(disc, torch.Tensor):
        table = torch.cat([disc.new_zeros(1), disc.to(a.device)])  # D(0) = 0
        D = table[a.clamp(max=3).long()]  # (Q, V)
    else:
        D = torch.where(a > 0, disc, 0.0)
    alpha = (a - D).clamp(min=0) / total
    gamma = D.sum(-1, keepdim=True) / total
    return alpha + gamma * lower


def _katz_step(a: torch.Tensor, total: torch.Tensor, lower: torch.Tensor, d: float):
    """Backoff: seen tokens get (a - d) / total; unseen ones share the freed mass d N1+ /
    total in proportion to ``lower``. A context followed by every token keeps its MLE."""
    seen = a > 0
    freed = d * seen.sum(-1, keepdim=True) / total  # (Q, 1)
    unseen_lower = (lower * ~seen).sum(-1, keepdim=True)  # (Q, 1)
    backoff = torch.where(seen, (a - d) / total, freed * lower / unseen_lower.clamp(min=1e-300))
    return torch.where(unseen_lower > 0, backoff, a / total)


def _check_ids(ids: torch.Tensor, vocab_size: int) -> None:
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= vocab_size):
        raise ConfigError(
            f"token ids must be in [0, {vocab_size}), got [{int(ids.min())}, {int(ids.max())}]"
        )


@torch.no_grad()
def ngram_perplexity(model: NGramLM, ids) -> float:
    """Perplexity exp(-mean log p) of a 1-D id sequence, scored as one row from BOS.

    Each token is predicted from the n-1 before it (so ids[0] from the BOS context). With
    ``smoothing='mle'`` (or nltk-style Kneser-Ney with ``uniform_floor=False``) a single
    unseen n-gram has probability 0: the result is ``math.inf`` and a warning names the
    first such n-gram.
    """
    ids = torch.as_tensor(np.asarray(ids), dtype=torch.long, device=model.n_tokens.device)
    if ids.dim() != 1 or ids.numel() == 0:
        raise ConfigError(f"ngram_perplexity takes a non-empty 1-D sequence, got {ids.shape}")
    # log p(ids[t] | ids[:t]) sits at position t-1; prepend a dummy token so that the
    # prediction for ids[0] (from the BOS context) is at position 0 via the mask.
    row = torch.cat([ids.new_zeros(1), ids])[None]  # (1, N+1)
    mask = torch.ones_like(row, dtype=torch.bool)
    mask[0, 0] = False  # the dummy reads as BOS
    # Gather from the distinct contexts' rows: no [N, V] array for a long text.
    table, inverse = model._context_log_probs(row[:, :-1], mask[:, :-1])  # (U, V), (N,)
    target = table[inverse, ids]  # (N,)
    zero = torch.isinf(target).nonzero()
    if zero.numel():
        t = int(zero[0])
        n = model.config.order
        ctx = ["BOS"] * max(0, n - 1 - t) + ids[max(0, t - n + 1) : t].tolist()
        warnings.warn(
            f"perplexity is infinite: the n-gram {(*ctx, int(ids[t]))} at position {t} has "
            f"probability 0 under smoothing={model.config.smoothing!r}; use add_k, "
            "kneser_ney, modified_kneser_ney or backoff",
            stacklevel=2,
        )
        return math.inf
    return math.exp(-float(target.mean()))


register_family("ngram", NGramConfig, NGramLM)
