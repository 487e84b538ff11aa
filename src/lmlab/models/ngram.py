"""Count-based n-gram language models over token ids, with eight smoothing methods.

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
- ``arpa``: log10 probabilities and backoff weights read from an ARPA file (KenLM's lmplz,
  SRILM, or lmlab's own export; ``lmlab.checkpoint.arpa.read_arpa``): nothing to fit.
- ``backoff``: Katz-style backoff (Katz 1987) with an absolute ``discount`` in place of
  Katz's Good-Turing discounts: a seen n-gram gets ``(c - D) / c(ctx)``; the freed mass goes
  to the unseen tokens in proportion to the lower order. Unlike stupid backoff (Brants et
  al. 2007) it is a normalised distribution, so its perplexity means something.
- ``witten_bell``: interpolated Witten-Bell (Witten & Bell 1991; the form of
  ``nltk.lm.WittenBellInterpolated``). A context followed by T = N1+(ctx .) distinct tokens
  in c(ctx) occurrences has seen a new token T times, so it gives the lower order the
  weight T / (c(ctx) + T), the estimated chance that the next token is a new one::

      p(w | ctx) = (c(ctx w) + T p(w | ctx[1:])) / (c(ctx) + T)

- ``stupid_backoff`` (Brants et al. 2007): relative frequency if the n-gram was seen, else
  ``alpha`` (0.4) times the shorter context's score, down to the unigram c(w) / N. These are
  *scores*, not probabilities: they do not sum to 1 over the vocabulary, so
  ``ngram_perplexity``, ``log_prob`` and ``token_nll`` refuse them (``log_scores`` gives
  them; decoding renormalises them with the softmax like any logits). As in the paper and
  nltk's ``StupidBackoff``, each order skipped costs ``alpha``, seen context or not.
- ``linear_interpolation`` (Jelinek & Mercer 1980): a weighted sum of separate maximum-
  likelihood models of every order, with a uniform 0th order so nothing gets 0::

      p(w | ctx) = lambda_0 / V + lambda_1 p1(w) + lambda_2 p2(w | ctx[-1:]) + ...

  The weights (``interpolation_weights``, summing to 1) are tuned by EM on held-out ids:
  ``fit`` holds out the last ``heldout`` share of its ids, counts the rest, runs EM
  (``tune_weights``), then counts everything. An order whose context was never seen has
  no estimate: its weight is shared out over the orders below, in proportion.

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
- Sentences (``sentence_end_id``, e.g. a word tokenizer's ``</s>``): the token after a
  sentence end is predicted from BOS alone, as at the start of the text, and no context
  reaches back across the end. This is KenLM's ``<s> ... </s>``: an n-gram never spans two
  sentences, and lmlab's BOS is ARPA's ``<s>`` (``lmlab.checkpoint.arpa``).

Storage: contexts and n-grams are numbered like a suffix trie. The contexts of length j
seen in training are the sorted table ``contexts_j`` of keys ``id(ctx[1:]) * (V+1) + ctx[0]``
(the shorter context's row number, then the farthest symbol, BOS included); the empty
context is row 0 of level 0. The m-gram (ctx, w) is ``id(ctx) * V + w`` in the sorted
``keys_m``, with its count and (below the top order) continuation count aligned. Keys stay
below (number of contexts) * (V+1), so a 5-gram over 10,000 words fits int64. Fitting is
``torch.unique`` per order; scoring finds each context one level at a time (one
``searchsorted`` per order) and then either gathers the one probability it needs
(``log_prob``, perplexity: n searches per scored token, never a [V] row) or builds whole
rows for decoding (``forward``). Per-context sums (totals, discount mass, backoff weights)
are computed once after fitting, so both paths run the same arithmetic and agree exactly.

Held-out text, fast (``build_index``): scoring a stream (each target is the next id, as in
perplexity) is how KenLM is used, and KenLM answers each query with a hash probe per order.
lmlab's answer, vectorised over all positions at once: per order a perfect-hash index over
the m-grams (``_HashIndex``: hash, displace, compare; no loop, no probe rounds), whose
record holds the m-gram's value and, since the context of length j at position t+1 is the
j-gram scored at t, what the next position needs of it as a context (its weight, its name
in the next order's keys). So one lookup per order and position replaces the two binary
searches, and each order only visits the positions whose context it has seen. The
arithmetic is ``_probabilities``'s: the same numbers, bit for bit (tested).

The same loop in C (``ngram_stream.c``, built once per machine by ``lmlab.native`` and
called through ctypes) is what ``log_prob`` takes on the CPU where a C compiler exists: in
PyTorch each order costs some twenty ops, each a dispatch, an allocation and a pass over
memory, and the stream then runs about as fast as KenLM; the C loop reads each table entry
once, overlapping the cache misses of 64 positions, and runs 1.5-2x faster than KenLM
(``bench/ngram.py``, docs/results.md). Same tables, same numbers bit for bit (tested);
``build_index(native=False)`` keeps to PyTorch.

Parity: ``tests/models/test_ngram.py`` compares perplexities with nltk.lm's MLE, Laplace,
Lidstone and KneserNeyInterpolated on the same n-grams; ``tests/checkpoint/test_arpa.py``
scores lmlab's ARPA export with the ``kenlm`` module.

Shapes: B batch, T tokens per row, Q = B*T scored positions, V vocabulary.
"""

from __future__ import annotations

import ctypes
import functools
import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch import nn

from lmlab import native
from lmlab.errors import ConfigError
from lmlab.models.contract import Abilities
from lmlab.models.registry import register_family

FITTED_SMOOTHINGS = (
    "mle",
    "add_k",
    "kneser_ney",
    "modified_kneser_ney",
    "backoff",
    "witten_bell",
    "stupid_backoff",
    "linear_interpolation",
)
SMOOTHINGS = (*FITTED_SMOOTHINGS, "arpa")
BACKOFF_FORMS = (
    "kneser_ney",
    "modified_kneser_ney",
    "backoff",
    "witten_bell",
    "linear_interpolation",
    "arpa",
)
"""The smoothings an ARPA file can hold: a seen n-gram's probability, and one factor per
context for the shorter context's probability of every other token."""


@dataclass(frozen=True)
class NGramConfig:
    vocab_size: int
    """Number of token ids."""
    order: int = 3
    """n: the model predicts from the previous n-1 tokens (1 = unigram)."""
    smoothing: Literal[
        "mle",
        "add_k",
        "kneser_ney",
        "modified_kneser_ney",
        "backoff",
        "witten_bell",
        "stupid_backoff",
        "linear_interpolation",
        "arpa",
    ] = "kneser_ney"
    """How to give probability to n-grams never seen in training (see the module docstring);
    ``arpa`` is a model read from an ARPA file, not fitted."""
    k: float = 1.0
    """Pseudo-count added to every count by add_k (1 = Laplace, other values = Lidstone)."""
    discount: float = 0.75
    """Absolute discount D of kneser_ney and backoff, in [0, 1] (nltk's default is 0.1);
    modified_kneser_ney also falls back to it where its count-of-counts give no discounts
    in range (``modified_kn_discounts``)."""
    alpha: float = 0.4
    """stupid_backoff's factor per order backed off (Brants et al. 2007 use 0.4), in (0, 1]."""
    heldout: float = 0.1
    """Share of ``fit``'s ids (the last ones) held out to tune linear_interpolation's weights
    by EM, in (0, 1)."""
    uniform_floor: bool = True
    """Interpolate the unigram level of kneser_ney, modified_kneser_ney, backoff and
    witten_bell with the uniform 1/V (stupid_backoff: back off to alpha / V), so unseen
    tokens get a positive probability; False matches nltk.lm."""
    sentence_end_id: int | None = None
    """Token that ends a sentence (a word tokenizer's ``</s>``): the next token is predicted
    from BOS alone, as KenLM does; None: the text is one running sequence."""
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
        if not 0 < self.alpha <= 1:
            bad("alpha", self.alpha, "must be in (0, 1] (Brants et al. use 0.4)")
        if not 0 < self.heldout < 1:
            bad("heldout", self.heldout, "must be in (0, 1), e.g. 0.1")
        if self.smoothing in ("kneser_ney", "modified_kneser_ney") and self.order < 2:
            bad("order", self.order, f"must be >= 2 for {self.smoothing} (it needs bigrams)")
        if self.sentence_end_id is not None and (
            not isinstance(self.sentence_end_id, int)
            or not 0 <= self.sentence_end_id < self.vocab_size
        ):
            bad(
                "sentence_end_id",
                self.sentence_end_id,
                f"must be None or in [0, {self.vocab_size})",
            )
        if self.max_seq_len is not None and (
            not isinstance(self.max_seq_len, int) or self.max_seq_len < 1
        ):
            bad("max_seq_len", self.max_seq_len, "must be a positive integer or None")


def histories(
    ids: torch.Tensor, order: int, vocab_size: int, sentence_end_id: int | None = None
) -> list[torch.Tensor]:
    """The n-1 tokens ending at each position, nearest first; BOS = V where there are none.

    ids: [B, T] int64 -> ``order - 1`` tensors [B, T]; entry j-1 holds the token j-1 places
    before each position (entry 0 is the position's own token). A token at or before a
    sentence end (``sentence_end_id``) is hidden behind BOS: the context starts afresh.

    >>> [h.tolist() for h in histories(torch.tensor([[1, 2, 0, 2]]), 3, vocab_size=3)]
    [[[1, 2, 0, 2]], [[3, 1, 2, 0]]]
    >>> [h.tolist() for h in histories(torch.tensor([[1, 2, 0, 2]]), 3, 3, sentence_end_id=2)]
    [[[1, 3, 0, 3]], [[3, 3, 3, 3]]]
    """
    B, T = ids.shape
    padded = torch.cat([ids.new_full((B, order - 1), vocab_size), ids], dim=1)  # (B, T+n-1)
    if sentence_end_id is not None:
        ends = (padded == sentence_end_id).cumsum(1)  # (B, T+n-1) ends up to each place
    out = []
    for j in range(1, order):
        p = order - j  # padded index of the token j-1 places back from position 0
        back = padded[:, p : p + T]  # (B, T)
        if sentence_end_id is not None:
            # hidden when an end lies between it (inclusive) and the position (inclusive)
            crossed = ends[:, order - 1 :] - ends[:, p - 1 : p - 1 + T]  # (B, T)
            back = torch.where(crossed > 0, vocab_size, back)
        out.append(back)
    return out


def modified_kn_discounts(counts: torch.Tensor, fallback: float = 0.75) -> torch.Tensor:
    """Chen & Goodman's (1998) discounts [D1, D2, D3+] from the counts of one order.

    With n_i the number of n-grams seen exactly i times and Y = n1 / (n1 + 2 n2):
    D1 = 1 - 2Y n2/n1, D2 = 2 - 3Y n3/n2, D3+ = 3 - 4Y n4/n3. Where a formula divides by
    zero or gives a D_i outside (0, i] (tiny or artificial data, which KenLM's lmplz refuses
    unless told ``--discount_fallback``), all three are ``fallback``: a discount of 0 would
    leave a context whose followers all have that count nothing to pass to the shorter
    context, and every token unseen after it would get probability 0.

    Worked example: n1, n2, n3, n4 = 10, 5, 3, 2, so Y = 10 / 20 = 0.5 and
    D1 = 1 - 2(0.5)(5/10) = 0.5, D2 = 2 - 3(0.5)(3/5) = 1.1, D3+ = 3 - 4(0.5)(2/3) = 5/3.

    >>> counts = torch.tensor([1] * 10 + [2] * 5 + [3] * 3 + [4] * 2 + [9])
    >>> [round(d, 4) for d in modified_kn_discounts(counts).tolist()]
    [0.5, 1.1, 1.6667]

    With n3 = 20 instead, D2 = 2 - 3(0.5)(20/5) = -4: out of range, so all three fall back.

    >>> modified_kn_discounts(torch.tensor([1] * 10 + [2] * 5 + [3] * 20 + [4] * 2)).tolist()
    [0.75, 0.75, 0.75]
    """
    n1, n2, n3, n4 = (float((counts == i).sum()) for i in (1, 2, 3, 4))
    if n1 == 0 or n2 == 0 or n3 == 0:
        return torch.full((3,), fallback, dtype=torch.float64)
    y = n1 / (n1 + 2 * n2)
    ds = [1 - 2 * y * n2 / n1, 2 - 3 * y * n3 / n2, 3 - 4 * y * n4 / n3]
    if not all(0 < d <= i + 1 for i, d in enumerate(ds)):
        ds = [fallback] * 3
    return torch.tensor(ds, dtype=torch.float64)


def _count(codes: torch.Tensor, space: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The distinct values of ``codes`` (in [0, space)), sorted, and how often each occurs.

    ``[5, 2, 5]`` -> ``([2, 5], [1, 2])``. A small code space is counted with one
    ``bincount`` (linear time); a large one by sorting (``unique``).
    """
    if space <= max(1 << 22, 4 * codes.numel()):
        counts = torch.bincount(codes, minlength=0)
        keys = counts.nonzero().squeeze(1)
        return keys, counts[keys]
    return torch.unique(codes, return_counts=True)


def _find(
    keys: torch.Tensor, query: torch.Tensor, grouped: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Row of each ``query`` value in the sorted ``keys`` (clamped) and whether it is there.

    Many queries in no order are sorted first: a binary search per random query misses
    the cache at nearly every step of a table of megabytes, while sorted queries walk it
    in order (~30x faster for 26k queries into 250k keys). ``grouped``: the caller has
    ordered them already (``NGramLM.log_prob``).
    """
    if keys.numel() == 0:
        return torch.zeros_like(query), torch.zeros_like(query, dtype=torch.bool)
    if grouped or query.numel() < 4096:
        pos = torch.searchsorted(keys, query)
    else:
        ordered, order = query.sort()
        pos = torch.empty_like(query)
        pos[order] = torch.searchsorted(keys, ordered)
    pos.clamp_(max=keys.numel() - 1)
    return pos, keys.index_select(0, pos) == query  # index_select: the fastest gather


# Odd 64-bit multipliers (the golden ratio's and splitmix64's), as int64: products wrap
# modulo 2^64 and their top bits are the hash (Knuth's multiplicative hashing).
_GOLDEN, _MIX1, _MIX2 = -7046029254386353131, -4658895280553007687, -7723592293110705685
_EMPTY = torch.iinfo(torch.int64).min  # marks a free slot: never a key (keys are >= 0)


class _HashIndex:
    """Where each key of a table sits, found in O(1): hash, displace, compare.

    ``_find`` binary-searches: ~20 dependent steps per query, each a cache miss in a table
    of megabytes. Here every query costs the same few vectorised ops, with no loop over
    queries or probe rounds (hash and displace; Belazzougui et al. 2009, "CHD"):

    - a key k is hashed by P = k * GOLDEN (wrapped modulo 2^64; one to one, so P stands
      for k): its group g is the top bits of P (about one key per group), its home f the
      next bits (S > 1.25 G slots), its side x the bit after them;
    - each group has a displacement d_g, chosen at build time so that the slots
      f XOR d_g of all keys are distinct (keys of one group keep distinct slots under any
      d_g: XOR by a constant is one-to-one);
    - so key k, if stored, is in slot f XOR d_g. ``slots`` returns 2 * slot + x: each slot
      has two 16-byte records side by side (``NGramLM._stream_tables``), the key's own at
      its side x and one more at x XOR 1, both in one cache line.

    Build: groups of the same size try pseudo-random displacements in rounds, all at once,
    biggest groups first; a group takes one when every key of it lands on a free slot that
    no other key claims in that round. With S > 1.25 G most groups settle in their first
    rounds, and each round only works on the groups still unplaced. Two keys of one group
    with one home can never part; then P is multiplied once more (``mixer``) and the
    build starts over.
    """

    def __init__(self, keys: torch.Tensor):
        G = keys.numel()
        self.group_bits = max(1, (G - 1).bit_length())  # M = 2^group_bits >= G groups
        for extra in range(3):  # a wider table if no mixer works
            # S = 2^bits > 1.25 G slots, at most 80% taken: a table that still builds in a
            # few rounds, about half the size of S >= 2G (Tiny Shakespeare's word 5-gram
            # indexes: 37 MB instead of 66), and each lookup is a cache miss
            self.bits = max(1, (G + G // 4).bit_length() + extra)
            self.side_bit = 63 - self.group_bits - self.bits  # x's bit in P
            for self.mixer in (1, _MIX1, _MIX2):
                if self.side_bit > self.bits + 2 and self._place(keys, self.hash(keys)):
                    return
        raise ConfigError(f"cannot build a hash index over {G} keys (too many)")

    def hash(self, keys: torch.Tensor) -> torch.Tensor:
        """P [Q] int64 of each key (see the class docstring): what ``slots`` takes and what
        the records store to be compared with."""
        return self.mix(keys * _GOLDEN)  # wraps modulo 2^64

    def mix(self, product: torch.Tensor) -> torch.Tensor:
        """P from k * GOLDEN (which a caller may build from parts: the arithmetic wraps)."""
        return product if self.mixer == 1 else product * self.mixer

    def _split(self, product: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(group, home, side) of each P."""
        top = product >> self.side_bit  # (Q,) group, home, side
        group = (top >> (self.bits + 1)) & ((1 << self.group_bits) - 1)
        return group, (top >> 1) & ((1 << self.bits) - 1), top & 1

    def _place(self, keys: torch.Tensor, product: torch.Tensor) -> bool:
        """Choose the groups' displacements and fill the slots; False if rounds run out."""
        group, home, side = self._split(product)
        S, M, dev = 1 << self.bits, 1 << self.group_bits, keys.device
        self.keys = torch.full((S,), _EMPTY, dtype=torch.long, device=dev)  # (S,)
        self.rows = torch.zeros(S, dtype=torch.long, device=dev)  # (S,) row in the table
        self.displacement = torch.zeros(M, dtype=torch.long, device=dev)  # (M,) see ``slots``
        claim = torch.full((S,), -1, dtype=torch.long, device=dev)  # scratch, reset each round
        failed = torch.zeros(M, dtype=torch.bool, device=dev)  # scratch, reset each round
        # Biggest groups first, while the table is emptiest (as CHD does): a group of k keys
        # needs k free slots at once. The groups of one size try together, round by round.
        size = torch.bincount(group, minlength=M).index_select(0, group)  # (G,) keys per group
        for k in range(int(size.max()) if size.numel() else 0, 0, -1):
            pending = (size == k).nonzero().squeeze(1)  # (P,) rows not placed yet
            for attempt in range(1, 1000):
                if pending.numel() == 0:
                    break
                g = group.index_select(0, pending)  # (P,)
                x = g * _GOLDEN + attempt  # a fresh pseudo-random displacement per group
                d = (((x ^ (x >> 29)) * _MIX2) >> (64 - self.bits)) & (S - 1)  # (P,)
                slot = home.index_select(0, pending) ^ d  # (P,)
                mine = torch.arange(slot.numel(), device=dev)
                claim.scatter_reduce_(0, slot, mine, "amax")  # one claimant per slot wins
                winner = claim.index_select(0, slot)  # (P,)
                if attempt == 1 and k > 1:  # two keys of one group share a home: no d works
                    if ((winner != mine) & (g.index_select(0, winner) == g)).any():
                        return False
                lost = (winner != mine) | (self.keys.index_select(0, slot) != _EMPTY)
                claim.index_fill_(0, slot, -1)
                failed.index_fill_(0, g[lost], True)  # a group settles if all its keys do
                ok = ~failed.index_select(0, g)
                failed.index_fill_(0, g[lost], False)
                placed = ok.nonzero().squeeze(1)
                at = slot.index_select(0, placed)
                rows = pending.index_select(0, placed)
                self.keys.index_copy_(0, at, keys.index_select(0, rows))
                self.rows.index_copy_(0, at, rows)
                self.displacement.index_copy_(0, g.index_select(0, placed), d[placed])
                pending = pending[~ok]
            if pending.numel():
                return False
        self.taken = self.keys != _EMPTY  # (S,)
        self.sides = torch.zeros(S, dtype=torch.long, device=dev)  # (S,) x of each key
        self.sides[self.taken] = self._split(self.hash(self.keys[self.taken]))[2]
        # Stored as (d_g XOR the group's top bits as a signed number) shifted past the side
        # bit, so that ``slots`` XORs it onto the group, home and side bits at once.
        signed = torch.arange(M, device=dev)
        signed = torch.where(signed >= M // 2, signed - M, signed)  # (M,)
        self.displacement = ((signed << self.bits) ^ self.displacement) << 1
        return True

    def release(self) -> None:
        """Drop what only building needs (the per-slot ``keys``, ``rows``, ``sides``,
        ``taken``): lookups need the displacements alone, once the caller has laid out its
        records."""
        del self.keys, self.rows, self.sides, self.taken

    def slots(self, product: torch.Tensor) -> torch.Tensor:
        """2 * slot + side [Q] int64 of each P (``hash``, ``mix``): where its record would be,
        if the key is stored."""
        top = product >> self.side_bit  # (Q,) group, home, side
        group = (top >> (self.bits + 1)) & ((1 << self.group_bits) - 1)
        return top ^ self.displacement.index_select(0, group)


def _read(records: torch.Tensor, slot: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The two int64 halves of the 16-byte records (complex128 [R]) at ``slot`` [Q]."""
    return _columns(records.index_select(0, slot))


def _columns(pairs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The two int64 columns of complex128 ``pairs`` [Q] (``_Stream.records``)."""
    both = torch.view_as_real(pairs).view(torch.long)  # (Q, 2)
    return both[:, 0], both[:, 1]


def _wrap(x: int) -> int:
    """``x`` modulo 2^64 as a signed int64 (what int64 tensor arithmetic wraps to)."""
    return (x + (1 << 63)) % (1 << 64) - (1 << 63)


def _rows(
    keys: torch.Tensor, tables: list[torch.Tensor], contexts: torch.Tensor, vocab_size: int
) -> list[torch.Tensor]:
    """Dense rows [Q, V] float64 of each table in ``tables`` for the context ids [Q] (-1:
    none, an all-zero row).

    The m-grams of one context have keys ctx*V .. ctx*V + V-1, a contiguous run of the
    sorted ``keys``: two binary searches per context find it, and only the n-grams
    actually seen are copied (no search per (context, token) pair).
    """
    V, Q = vocab_size, contexts.numel()
    lo = torch.searchsorted(keys, contexts * V)  # (Q,)
    hi = torch.searchsorted(keys, contexts * V + V)  # (Q,)
    lengths = (hi - lo).clamp(min=0)
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


@dataclass
class _Level:
    """What scoring gathers at one order (see ``NGramLM._probabilities``).

    value: [G] the probability share of each stored m-gram (its discounted count over the
    context's total, or the ARPA file's probability); listed: [G] ones, for the dense rows;
    weight: [U+1] per context, what multiplies the level below (gamma for Kneser-Ney, the
    backoff weight otherwise), and 1 in an extra last row that unseen contexts read (they
    pass the level below on unchanged); base: [U+1] add_k's probability of an unseen token.
    """

    value: torch.Tensor
    listed: torch.Tensor
    weight: torch.Tensor
    base: torch.Tensor | None = None
    interpolated: bool = False
    direct: tuple[torch.Tensor, torch.Tensor] | None = None
    """Order 1 only: (value, listed) [V] by token, so that unigrams need no search."""
    first_rows: torch.Tensor | None = None
    """Order 1 only: [V+1] the row of each one-token context, -1 where never seen."""
    stream: list | None = None
    """Order 1 only: what ``NGramLM._score_stream`` gathers, once derived ([]: cannot)."""
    native: _NativeStream | None = None
    """Order 1 only: the C kernel over ``stream`` (``build_index(native=True)``), if built."""
    bos_rows: list[int] | None = None
    """Order 1 only: the row of the all-BOS context of each length (``_stream_tables``)."""
    searched: int = 0
    """Order 1 only: positions scored by binary search so far (``NGramLM._streamed``)."""


@dataclass
class _Stream:
    """What ``NGramLM._score_stream`` gathers at one order m >= 2 (see ``_stream_tables``)."""

    index: _HashIndex
    """The m-grams, keyed ``name(ctx) * V + w``."""
    records: torch.Tensor
    """[2S] complex128 (16-byte pairs of int64), at ``index.slots``: the m-gram's P and
    value; at that XOR 1, the m-gram read as the context of the next position: its name
    (``none`` if it is none; the key's side in bit ``index.side_bit``) and its weight
    (add_k: its base)."""
    bos: int
    """The name of the all-BOS context of length m-1 (a number no m-1-gram's slot has)."""
    none: int
    """The name (and mask) of no context: 2^side_bit - 1."""
    starts: tuple[torch.Tensor, torch.Tensor] | None = None
    """m >= 3: (name, weight) [V+1] by symbol s of the context (BOS m-2 times, s) of length
    m-1, a row's first position's (-1 and the unseen weight where never seen)."""
    restart: tuple[torch.Tensor, torch.Tensor] | None = None
    """m >= 3: (name, weight) [1] of the all-BOS context of length m-1 (a sentence start)."""


class _Order(ctypes.Structure):
    """``ngram_order`` of ``ngram_stream.c``: one order m >= 2 of the stream tables."""

    _fields_ = [
        ("displacement", ctypes.c_void_p),
        ("records", ctypes.c_void_p),
        ("next_name", ctypes.c_void_p),
        ("next_weight", ctypes.c_void_p),
        ("restart_name", ctypes.c_int64),
        ("restart_weight", ctypes.c_double),
        ("mixer", ctypes.c_int64),
        ("side_bit", ctypes.c_int64),
        ("bits", ctypes.c_int64),
        ("group_mask", ctypes.c_int64),
        ("none", ctypes.c_int64),
        ("kind", ctypes.c_int64),
    ]


def _address(table: torch.Tensor, dtype: torch.dtype) -> int:
    """The address of ``table``'s first element, for C; refused unless it is laid out as
    the kernel reads it (CPU, ``dtype``, contiguous)."""
    if table.device.type != "cpu" or table.dtype != dtype or not table.is_contiguous():
        raise ValueError(f"a stream table is not a contiguous CPU {dtype} tensor")
    return table.data_ptr()


class _NativeStream:
    """``_score_stream`` through the C kernel ``ngram_score_stream`` (``ngram_stream.c``):
    the same tables (``_stream_tables``), read by address. It holds them, so they live as
    long as it does; a copy (``copy.deepcopy``, pickle) takes the addresses of its own
    copies of the tables, never the original's."""

    def __init__(self, kernel, tables: list, kinds: list[int], vocab_size: int) -> None:
        self.kernel, self.tables, self.kinds, self.V = kernel, tables, kinds, vocab_size
        self.unigram = _address(tables[0], torch.float64)
        self.name1 = _address(tables[1][0], torch.long)
        self.weight1 = _address(tables[1][1], torch.float64)
        n = len(tables) - 1
        self.orders = (_Order * (n - 1))()
        for m in range(2, n + 1):
            table, order = tables[m], self.orders[m - 2]
            order.displacement = _address(table.index.displacement, torch.long)
            order.records = _address(table.records, torch.complex128)
            if m < n:  # the next order's contexts at a row's or a sentence's start
                following = tables[m + 1]
                order.next_name = _address(following.starts[0], torch.long)
                order.next_weight = _address(following.starts[1], torch.float64)
                order.restart_name = int(following.restart[0])
                order.restart_weight = float(following.restart[1])
            order.mixer, order.side_bit = table.index.mixer, table.index.side_bit
            order.bits, order.group_mask = table.index.bits, (1 << table.index.group_bits) - 1
            order.none, order.kind = table.none, kinds[m - 2]

    @classmethod
    def build(cls, tables: list, levels: list[_Level], vocab_size: int) -> _NativeStream | None:
        """The kernel over ``tables``, or None where it cannot run: tables not on the CPU,
        or no kernel (``lmlab.native``)."""
        kernel = _stream_kernel()
        if kernel is None or tables[0].device.type != "cpu":
            return None
        # per order m >= 2: 0 interpolated, 1 add_k, 2 backoff form (``_probabilities``)
        kinds = [
            0 if level.interpolated else 1 if level.base is not None else 2 for level in levels[1:]
        ]
        return cls(kernel, tables, kinds, vocab_size)

    def __reduce__(self):
        return _NativeStream._restore, (self.tables, self.kinds, self.V)

    @staticmethod
    def _restore(tables: list, kinds: list[int], vocab_size: int) -> _NativeStream | None:
        kernel = _stream_kernel()  # None where the copy lands without a compiler: PyTorch
        return None if kernel is None else _NativeStream(kernel, tables, kinds, vocab_size)

    def __call__(self, ids: torch.Tensor, targets: torch.Tensor, end: int | None) -> torch.Tensor:
        """p [Q] float64 for ``ids`` [B, T] (BOS where contexts restart, and after the
        sentence end ``end``) and ``targets``."""
        near = ids.reshape(-1).to(torch.long).contiguous()
        targets = targets.reshape(-1).to(torch.long).contiguous()
        Q, T = near.numel(), ids.shape[1]
        p, weight = torch.empty(2, Q, dtype=torch.float64)
        name, top = torch.empty(2, Q, dtype=torch.long)  # scratch
        self.kernel(
            Q,
            T,
            self.V,
            len(self.tables) - 1,
            -1 if end is None else end,
            near.data_ptr(),
            targets.data_ptr(),
            self.unigram,
            self.name1,
            self.weight1,
            self.orders,
            _wrap(self.V * _GOLDEN),
            _GOLDEN,
            p.data_ptr(),
            name.data_ptr(),
            weight.data_ptr(),
            top.data_ptr(),
        )
        return p


@functools.cache
def _stream_kernel():
    """``ngram_score_stream`` of ``ngram_stream.c``, built and typed once; None without it."""
    library = native.load(Path(__file__).with_name("ngram_stream.c"))
    if library is None:
        return None
    kernel = library.ngram_score_stream
    kernel.restype = None
    kernel.argtypes = (
        [ctypes.c_int64] * 5
        + [ctypes.c_void_p] * 5
        + [ctypes.POINTER(_Order), ctypes.c_int64, ctypes.c_int64]
        + [ctypes.c_void_p] * 4
    )
    return kernel


class NGramLM(nn.Module):
    """Token ids [B, T] -> next-token log-probabilities [B, T, V]; ``fit`` before use."""

    abilities = Abilities("causal_lm", gradients=False)

    def __init__(self, config: NGramConfig):
        super().__init__()
        self.config = config
        self.register_buffer("n_tokens", torch.zeros((), dtype=torch.long))
        for j in range(1, config.order):
            # keys id(ctx[1:]) * (V+1) + ctx[0] of the contexts of length j (sorted)
            self.register_buffer(f"contexts_{j}", torch.zeros(0, dtype=torch.long))
            if config.smoothing == "arpa":  # log10 backoff weight of each context
                self.register_buffer(f"backoffs_{j}", torch.zeros(0, dtype=torch.float64))
        for m in range(1, config.order + 1):
            # m-gram keys id(ctx) * V + w (sorted) and, aligned with them, their counts and
            # (for orders below n) continuation counts N1+(. g), or an ARPA file's log10 p
            self.register_buffer(f"keys_{m}", torch.zeros(0, dtype=torch.long))
            if config.smoothing == "arpa":
                self.register_buffer(f"log10_probs_{m}", torch.zeros(0, dtype=torch.float64))
            else:
                self.register_buffer(f"counts_{m}", torch.zeros(0, dtype=torch.long))
                self.register_buffer(f"continuations_{m}", torch.zeros(0, dtype=torch.long))
        if config.smoothing == "linear_interpolation":
            # lambda_0 (uniform), lambda_1 .. lambda_n: equal until tuned (tune_weights)
            n = config.order
            self.register_buffer(
                "interpolation_weights", torch.full((n + 1,), 1.0 / (n + 1), dtype=torch.float64)
            )
        self._stats: list[_Level] | None = None

    @property
    def variable_shape_buffers(self) -> list[str]:
        """Buffers sized by the data, for checkpoint loading (lmlab.checkpoint.io)."""
        return [name for name, _ in self.named_buffers(recurse=False)]

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # The count tables' lengths depend on the data: take the stored shapes.
        for name, buf in self.named_buffers(recurse=False):
            if prefix + name in state_dict:
                self._buffers[name] = torch.empty_like(state_dict[prefix + name], device=buf.device)
        self._stats = None
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def _apply(self, fn, recurse=True):
        self._stats = None  # moved or cast: derive the per-context sums again
        return super()._apply(fn, recurse)

    def table(self, m: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(keys, counts, continuation counts) of the m-grams, each [G_m] int64."""
        return (
            getattr(self, f"keys_{m}"),
            getattr(self, f"counts_{m}"),
            getattr(self, f"continuations_{m}"),
        )

    def load_tables(
        self,
        contexts: list[torch.Tensor],
        keys: list[torch.Tensor],
        values: list[torch.Tensor],
        backoffs: list[torch.Tensor] | None = None,
    ) -> NGramLM:
        """Install tables built elsewhere (``lmlab.checkpoint.arpa``): context keys for
        lengths 1..n-1, m-gram keys and their log10 probabilities for m = 1..n, and the
        contexts' log10 backoff weights; every key tensor sorted, as ``fit`` leaves them."""
        n = self.config.order
        if self.config.smoothing != "arpa" or len(contexts) != n - 1 or len(keys) != n:
            raise ConfigError("load_tables takes an arpa model's n-1 context and n m-gram tables")
        for j in range(1, n):
            setattr(self, f"contexts_{j}", contexts[j - 1])
            setattr(self, f"backoffs_{j}", backoffs[j - 1])
        for m in range(1, n + 1):
            setattr(self, f"keys_{m}", keys[m - 1])
            setattr(self, f"log10_probs_{m}", values[m - 1])
        self._stats = None
        return self

    @torch.no_grad()
    def fit(self, ids) -> NGramLM:
        """Count every m-gram (m = 1..n) of ``ids`` (1-D token ids, one stream); returns self.

        Replaces earlier counts. ``[1, 2, 1, 2]`` with n = 2 counts the bigrams
        (BOS 1), (1 2) x2, (2 1) and the unigrams 1 x2, 2 x2. ``linear_interpolation``
        first counts all but the last ``heldout`` share, tunes its weights on that share
        (``tune_weights``), then counts everything.
        """
        if self.config.smoothing == "arpa":
            raise ConfigError("an arpa model is read from a file (read_arpa), not fitted")
        ids = self._as_ids(ids, "fit")
        if self.config.smoothing == "linear_interpolation":
            cut = int(round(ids.numel() * (1 - self.config.heldout)))
            if 0 < cut < ids.numel():  # (a text of one token keeps the equal weights)
                self._count(ids[:cut]).tune_weights(ids[cut:])
        return self._count(ids)

    def _as_ids(self, ids, what: str) -> torch.Tensor:
        """``ids`` as a checked non-empty 1-D int64 tensor on the model's device."""
        if not isinstance(ids, torch.Tensor):  # a copy: token files are read-only memmaps
            ids = torch.from_numpy(np.array(ids, dtype=np.int64))
        ids = ids.to(device=self.n_tokens.device, dtype=torch.long)
        if ids.dim() != 1 or ids.numel() == 0:
            raise ConfigError(
                f"{what} takes a non-empty 1-D sequence of ids, got {tuple(ids.shape)}"
            )
        _check_ids(ids, self.config.vocab_size)
        return ids

    def _count(self, ids: torch.Tensor) -> NGramLM:
        """The counting of ``fit``, on checked ids [N]."""
        cfg = self.config
        V, n = cfg.vocab_size, cfg.order
        # The context of ids[t] ends at t-1: histories of the stream shifted right by one.
        shifted = torch.cat([ids.new_full((1,), V), ids[:-1]])[None]  # (1, N)
        back = [h[0] for h in histories(shifted, n, V, cfg.sentence_end_id)]
        context_ids = [torch.zeros_like(ids)]  # (N,) per length: row in that length's table
        for j in range(1, n):
            table, inverse = torch.unique(
                context_ids[-1] * (V + 1) + back[j - 1], return_inverse=True
            )
            setattr(self, f"contexts_{j}", table)
            context_ids.append(inverse)
        for m in range(1, n + 1):
            space = (getattr(self, f"contexts_{m - 1}").numel() if m > 1 else 1) * V
            keys, counts = _count(context_ids[m - 1] * V + ids, space)  # sorted
            setattr(self, f"keys_{m}", keys)
            setattr(self, f"counts_{m}", counts)
        for m in range(1, n):
            # Continuation count of an m-gram (ctx, w): distinct (m+1)-grams (x ctx, w). The
            # longer context's key holds the shorter one's row: key // (V+1).
            higher = getattr(self, f"keys_{m + 1}")
            longer, w = higher // V, higher % V
            shorter = getattr(self, f"contexts_{m}")[longer] // (V + 1)
            keys, cont = _count(shorter * V + w, higher.numel() * V + V)
            # BOS padding gives every m-gram (m < n) a left neighbour: same sets.
            assert torch.equal(keys, getattr(self, f"keys_{m}"))
            setattr(self, f"continuations_{m}", cont)
        self.n_tokens = torch.tensor(ids.numel(), device=ids.device)
        self._stats = None
        return self

    @torch.no_grad()
    def tune_weights(self, ids, max_iters: int = 100, tol: float = 1e-7) -> list[float]:
        """Set linear_interpolation's weights [lambda_0, .., lambda_n] to maximise the
        likelihood of held-out ``ids`` (1-D, scored from BOS) by EM; returns them.

        EM treats each token as drawn by one order, chosen top-down: the deepest order
        whose context was seen is picked with probability mu_k = lambda_k / Lambda_k
        (Lambda_k = lambda_0 + .. + lambda_k), else the next one down, ..., else the
        uniform 0th order. E-step: the posterior r_tm that order m drew token t. M-step:
        mu_m = (sum_t r_tm) / (sum_t of the posterior that t reached order m). Each step
        cannot lower the held-out likelihood; it stops when the mean log-likelihood gains
        less than ``tol`` nats.

        Worked example (n = 1, V = 4): unigrams p1 = (1/2, 1/2, 0, 0), held-out [0, 0, 2].
        A 0 has p = lambda_1 / 2 + lambda_0 / 4 = (1 + lambda_1) / 4, the 2 only
        lambda_0 / 4 = (1 - lambda_1) / 4; the likelihood (1 + l)^2 (1 - l) / 64 peaks at
        lambda_1 = 1/3. EM settles there: each 0 is then drawn by the unigram with posterior
        (1/6) / (1/3) = 1/2, the 2 with 0, and lambda_1 = mean posterior = 1/3.
        """
        cfg = self.config
        if cfg.smoothing != "linear_interpolation":
            raise ConfigError(
                f"tune_weights tunes linear_interpolation's weights; smoothing={cfg.smoothing!r}"
                " has none"
            )
        if self.keys_1.numel() == 0:
            raise ConfigError("this NGramLM has no counts yet: call model.fit(ids) first")
        probs, seen = self.order_probabilities(self._as_ids(ids, "tune_weights"))  # (n+1, Q)
        lam = self.interpolation_weights.clone()
        mu = lam / lam.cumsum(0)  # (n+1,) mu_0 = 1
        best = -math.inf
        for _ in range(max_iters):
            # chance of passing each order on the way down: 1 - mu_i where seen, else 1
            passing = torch.where(seen, 1 - mu[:, None], 1.0)  # (n+1, Q)
            above = passing.flip(0).cumprod(0).flip(0)  # prod over i >= m
            above = torch.cat([above[1:], torch.ones_like(above[:1])])  # prod over i > m
            joint = mu[:, None] * seen * above * probs  # (n+1, Q) P(order m drew t, t)
            likelihood = joint.sum(0)  # (Q,)
            score = float(likelihood.log().mean())
            posterior = joint / likelihood  # (n+1, Q) r_tm
            reached = posterior.cumsum(0) * seen  # P(t reached m) = sum_{i <= m} r_ti
            drawn, visits = posterior.sum(1), reached.sum(1)
            mu = torch.where(visits > 0, drawn / visits.clamp(min=1e-300), mu)
            mu[0] = 1.0
            if score - best < tol:
                break
            best = score
        # back from mu to lambda: Lambda_n = 1, lambda_m = mu_m Lambda_m
        upto, weights = 1.0, torch.empty_like(lam)
        for m in range(cfg.order, -1, -1):
            weights[m] = mu[m] * upto
            upto -= float(weights[m])
        self.interpolation_weights = weights / weights.sum()
        self._stats = None
        return self.interpolation_weights.tolist()

    def order_probabilities(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Each order's maximum-likelihood probability of every token of 1-D ``ids`` [Q],
        scored from BOS: probs [n+1, Q] float64 (row 0 the uniform 1/V, row m the m-gram's
        c(ctx w) / c(ctx)) and seen [n+1, Q] bool (whether row m's context was counted)."""
        V = self.config.vocab_size
        row, targets, mask = _from_bos(ids)
        rows = self.find_contexts(self._histories(row, mask), ids.numel())
        targets = targets.reshape(-1)
        probs, seen = [torch.full_like(targets, 1.0 / V, dtype=torch.float64)], [targets >= 0]
        for m, ctx in enumerate(rows, start=1):
            keys, counts, _ = self.table(m)
            U = getattr(self, f"contexts_{m - 1}").numel() if m > 1 else 1
            totals = torch.bincount(keys // V, weights=counts.double(), minlength=U)  # (U,)
            at = ctx.clamp(min=0)
            pos, hit = _find(keys, at * V + targets)
            hit &= ctx >= 0
            probs.append(torch.where(hit, counts[pos] / totals[at], 0.0))
            seen.append(ctx >= 0)
        return torch.stack(probs), torch.stack(seen)

    def forward(
        self,
        ids: torch.Tensor,
        cache: None = None,
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """ids: [B, T] int64; mask: [B, T] bool, False on left padding -> log-probs [B, T, V].

        Position t holds log p(next token | ids[:, :t+1]) from the last n-1 tokens (BOS
        before the row's start, and in place of masked-out tokens). float32; see
        ``log_probs`` for float64 and ``log_prob`` to score given next tokens.
        """
        if cache is not None:
            raise ConfigError("the ngram family has no cache; call it on the whole prefix")
        return self.log_probs(ids, mask).float()

    @torch.no_grad()
    def log_probs(self, ids: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Like ``forward``, in float64, predicting the token AFTER each position.

        ids: [B, T] int64 -> [B, T, V] float64.
        """
        V = self.config.vocab_size
        found = self._context_rows(ids, mask)  # per length: (Q,) rows, -1 where unseen
        # Positions sharing their longest seen context share a distribution: one row each.
        deepest = (torch.stack(found) >= 0).sum(0) - 1  # (Q,) its length
        sizes = [1] + [getattr(self, f"contexts_{j}").numel() for j in range(1, len(found))]
        offsets = torch.tensor([0, *sizes[:-1]], device=ids.device).cumsum(0)  # (n,)
        key = torch.stack(found).gather(0, deepest[None])[0] + offsets[deepest]  # (Q,)
        unique, first, inverse = _unique_first(key)
        rows = [f[first] for f in found]  # (U,) per length
        out = torch.empty(unique.numel(), V, dtype=torch.float64, device=ids.device)
        step = max(1, (1 << 21) // V)  # contexts per chunk: bounds the [rows, V] temporaries
        for start in range(0, unique.numel(), step):
            chunk = [r[start : start + step] for r in rows]
            out[start : start + step] = self._probabilities(chunk, None).log()
        return out[inverse].view(*ids.shape, V)

    @torch.no_grad()
    def log_prob(
        self, ids: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """log p(targets[:, t] | ids[:, :t+1]): [B, T] float64, without building [V] rows.

        ids, targets: [B, T] int64 (targets is usually ids shifted left by one); equal to
        ``log_probs(ids, mask).gather(-1, targets[..., None])`` (tested exactly). Refused
        for stupid_backoff, whose scores are not probabilities (see ``log_scores``).
        """
        self.require_probabilities("perplexity (log_prob)")
        return self.log_scores(ids, targets, mask)

    def require_probabilities(self, what: str) -> None:
        """Raise a ConfigError if this model's scores are not probabilities (stupid_backoff)."""
        if self.config.smoothing == "stupid_backoff":
            raise ConfigError(
                f"{what} needs probabilities, and smoothing='stupid_backoff' gives scores that "
                "do not sum to 1 (Brants et al. 2007): a perplexity from them would mean "
                "nothing. Rank with log_scores, or use witten_bell, kneser_ney, "
                "modified_kneser_ney, backoff or linear_interpolation"
            )

    @torch.no_grad()
    def log_scores(
        self, ids: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``log_prob`` for every smoothing, stupid_backoff's log scores included: [B, T]."""
        cfg = self.config
        V, n = cfg.vocab_size, cfg.order
        _check_ids(targets, V)
        self._check_rows(ids)
        if n > 1 and self._streamed(ids, targets, mask):
            return self._score_stream(ids, targets, mask).log().view(ids.shape)
        back = self._histories(ids, mask)
        targets = targets.reshape(-1)
        if n > 1 and targets.numel() >= 4096:
            # Visit positions sorted by their contexts, nearest token first (as many tokens
            # as an int64 key holds): the binary searches of every level then walk each
            # table in order instead of missing the cache at nearly every step (random
            # queries into a table of megabytes are ~30x slower on the same CPU).
            near = torch.zeros_like(targets)
            for b in back[: max(1, int(62 * math.log(2) / math.log(V + 1)))]:
                near = near * (V + 1) + b  # (Q,)
            order = near.argsort()
            back = [b.index_select(0, order) for b in back]
            targets = targets.index_select(0, order)
            rows = self.find_contexts(back, targets.numel(), grouped=True)
            p = self._probabilities(rows, targets, grouped=True)
            out = torch.empty_like(p)
            out[order] = p
        else:
            out = self._probabilities(self.find_contexts(back, targets.numel()), targets)
        return out.log().view(ids.shape)

    def build_index(self, native: bool = True) -> NGramLM:
        """Build the hash indexes that score a stream of held-out text with one O(1) lookup
        per order and position (``_score_stream``; kept until the model is refitted,
        loaded or moved); returns self.

        ``native``: score through the C kernel (``ngram_stream.c``, built once per machine
        by ``lmlab.native``; same numbers bit for bit) where it can run: a C compiler, CPU
        tensors. False: PyTorch alone (``_score_stream_torch``).

        ``log_prob`` (and so perplexity) builds them by itself once it has scored, by binary
        search, four positions per key of the tables: building costs about what the index
        then saves on that many positions (measured on word 3- and 5-grams), so by then the
        searches have cost what building would have (the ski-rental rule), and a one-off
        score of a short text never pays for a build it would not use. Call this to score
        fast from the start.
        """
        if self.config.order > 1:
            levels = self._levels()
            tables = self._stream_tables(levels)
            levels[0].native = (
                _NativeStream.build(tables, levels, self.config.vocab_size)
                if native and tables
                else None
            )
        return self

    def _streamed(
        self, ids: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor | None
    ) -> bool:
        """Whether to score through ``_score_stream``: the targets are the next ids (a mask
        hides at most each row's first id) and the indexes exist, or the positions searched
        since the tables changed reach four times their number of keys (``build_index``)."""
        if self.config.smoothing == "stupid_backoff":  # an unseen context costs alpha there
            return False
        if ids.shape != targets.shape or ids.dim() != 2 or ids.numel() == 0:
            return False
        if not torch.equal(targets[:, :-1], ids[:, 1:]):
            return False
        if mask is not None and not bool(mask[:, 1:].all()):
            return False
        levels = self._levels()
        if levels[0].stream is None:
            levels[0].searched += ids.numel()
            n = self.config.order
            keys = sum(getattr(self, f"keys_{m}").numel() for m in range(2, n + 1))
            if levels[0].searched < 4 * keys:
                return False
            self.build_index()
        return bool(levels[0].stream)

    def _score_stream(
        self, ids: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor | None
    ) -> torch.Tensor:
        """p(targets | contexts) [Q] of a stream (``targets[:, t] == ids[:, t+1]``), equal bit
        for bit to ``_probabilities(find_contexts(histories), targets)``: through the C
        kernel where ``build_index`` built it and the tensors are on the CPU, else
        ``_score_stream_torch``."""
        V, end = self.config.vocab_size, self.config.sentence_end_id
        if mask is not None:
            ids = torch.where(mask.to(torch.bool), ids, V)  # padding reads as BOS
        native = self._levels()[0].native
        if native is not None and ids.device.type == "cpu":
            return native(ids, targets, end)  # which reads a sentence end as BOS itself
        if end is not None:
            ids = torch.where(ids == end, V, ids)  # after a sentence end: BOS
        return self._score_stream_torch(ids, targets, end is not None or mask is not None)

    def _score_stream_torch(
        self, ids: torch.Tensor, targets: torch.Tensor, restarts: bool
    ) -> torch.Tensor:
        """``_score_stream`` in PyTorch ops; ``ids`` [B, T] with BOS (V) where a sentence or
        the padding restarts the contexts (``restarts``: there may be some). One hash
        lookup (``_HashIndex``) per order and position instead of two binary searches.

        The context of length j+1 at position t+1 is the (j+1)-gram scored at position t
        (its context, then its target), so that m-gram's record also says what scoring
        needs of it as a context (``_stream_tables``): its name in the keys of the next
        order and its weight. Only a row's first position (BOS, then its first token) and
        the start of a sentence (all BOS) get their contexts apart. An unseen context
        passes the order below on unchanged, so each order only visits the positions whose
        context it has seen (``active``): fewer at every order. The arithmetic repeats
        ``_probabilities`` line by line.
        """
        cfg = self.config
        V, n = cfg.vocab_size, cfg.order
        levels = self._levels()
        tables = self._stream_tables(levels)
        near = ids.reshape(-1)  # (Q,) each position's nearest context symbol
        targets = targets.reshape(-1)
        Q, dev = near.numel(), near.device
        starts = torch.arange(0, Q, ids.shape[1], device=dev)  # (B,) each row's first
        fresh = near == V  # (Q,) all its contexts are all BOS
        chained = ~fresh  # (Q,) its contexts continue the position before's m-grams
        chained[starts] = False
        chained = torch.cat([chained[1:], chained.new_zeros(1)])  # (Q,) ... at position + 1
        restart = fresh.nonzero().squeeze(1) if restarts else starts[:0]
        first = starts.index_select(0, (~fresh.index_select(0, starts)).nonzero().squeeze(1))
        first_symbol = near.index_select(0, first)  # (B',) rows starting with a real token
        # key * GOLDEN = name * (V * GOLDEN) + target * GOLDEN, wrapped; ``slots`` takes it
        per_name, per_target = _wrap(V * _GOLDEN), targets * _GOLDEN
        p = tables[0].index_select(0, targets)  # (Q,) from the empty context
        # one-token contexts by symbol; every position goes on (``active`` None: all)
        name, b = (x.index_select(0, near) for x in tables[1])  # (Q,) each
        active = None
        for j in range(1, n):
            level, table = levels[j], tables[j + 1]
            c = None if level.base is None else b  # add_k's column is its base
            lower = p if active is None else p.index_select(0, active)
            part = per_target if active is None else per_target.index_select(0, active)
            product = table.index.mix(name * per_name + part)  # (A,) P of (context, target)
            slot = table.index.slots(product)
            stored, value = _read(table.records, slot)
            listed = stored == product
            v = value.view(torch.float64) * listed
            if level.interpolated:
                q = v + b * lower
            elif c is not None:
                q = torch.where(listed > 0, v, c)
                q = torch.where(name >= 0, q, lower)  # an unseen context passes p on
            else:
                q = torch.where(listed > 0, v, b * lower)
            p = q if active is None else p.index_copy_(0, active, q)
            if j == n - 1:
                break
            # The contexts of length j+1: continued from the position before where its
            # (j+1)-gram is listed and is a context; row and sentence starts by symbol (an
            # unseen one is harmless: weight 1, and its keys match nothing).
            pairs = table.records.index_select(0, slot ^ 1)  # (A,) name, weight
            follow = _columns(pairs)[0] & table.none
            going = listed & (follow != table.none)
            going = going & (chained if active is None else chained.index_select(0, active))
            going = going.nonzero().squeeze(1)
            follow, column = (
                follow.index_select(0, going),
                _columns(pairs.index_select(0, going))[1],
            )
            at = going if active is None else active.index_select(0, going)
            head, again = tables[j + 2].starts, tables[j + 2].restart
            active = torch.cat([at + 1, first, restart])
            name = torch.cat(
                [follow, head[0].index_select(0, first_symbol), again[0].expand(restart.shape)]
            )
            b = torch.cat(
                [
                    column.view(torch.float64),
                    head[1].index_select(0, first_symbol),
                    again[1].expand(restart.shape),
                ]
            )
        return p

    def _stream_tables(self, levels: list[_Level]) -> list | None:
        """What ``_score_stream`` gathers: [p(w) [V] from the empty context, (name, weight)
        [V+1] by symbol of the one-token contexts, then a ``_Stream`` per order m = 2..n];
        None if some context is not itself a listed m-gram (a hand-written ARPA file may
        skip one), so the stream cannot name it. Derived once per ``_levels`` (after
        fitting, loading, re-weighting).

        Names: a one-token context is named by its symbol (BOS: V); a longer context by
        the slot of its m-gram in the m-gram index (all-BOS: a number past the slots). The
        m-grams of the next order are keyed ``name(ctx) * V + w``.
        """
        if levels[0].stream is not None:
            return levels[0].stream or None
        cfg = self.config
        V, n = cfg.vocab_size, cfg.order
        first = levels[0].first_rows  # (V+1,) row of each one-token context, -1 if unseen
        level = levels[1]
        at = torch.where(first >= 0, first, level.weight.numel() - 1)
        column = level.weight if level.base is None else level.base
        symbols = torch.arange(V + 1, device=first.device)
        unigrams = self._probabilities([symbols[:V] * 0], symbols[:V], levels[:1])  # (V,)
        tables: list = [unigrams, (torch.where(first >= 0, symbols, -1), column[at])]
        name = self.contexts_1  # (U_1,) a one-token context's key is its symbol
        bos_rows = [None, int(first[V])]  # row of the all-BOS context of each length
        bos = V
        for m in range(2, n + 1):
            keys = getattr(self, f"keys_{m}")
            index = _HashIndex(name[keys // V] * V + keys % V)
            rows, taken = index.rows, index.taken  # (S,) per slot
            G = keys.numel()
            context = torch.full_like(keys, -1)  # (G,) row of the m-gram as a context
            follow = torch.full_like(keys, -1)  # (G,) its name as the next context
            weight = torch.zeros(G, dtype=torch.float64, device=keys.device)
            if m < n:
                tokens = self.context_tokens(m)  # (U, m) farthest first
                real = tokens[:, -1] < V  # all-BOS contexts end in BOS; no other does
                prefix = self.find_contexts(list(tokens[:, :-1].flip(1).T), len(tokens))[-1]
                pos, hit = _find(keys, prefix * V + tokens[:, -1].clamp(max=V - 1))
                if bool((real & ~hit).any()):
                    levels[0].stream = []
                    return None
                context[pos[real]] = real.nonzero().squeeze(1)
                slot_of = torch.empty_like(keys)  # (G,) each m-gram's 2 * slot + side
                slot_of[rows[taken]] = taken.nonzero().squeeze(1) * 2 + index.sides[taken]
                here = 2 << index.bits  # the name of the all-BOS context of length m
                name = torch.where(real, slot_of.index_select(0, pos), here)  # (U,) by row
                bos_row = int((~real).nonzero()[0]) if bool((~real).any()) else -1
                bos_rows.append(bos_row)
                level = levels[m]
                column = level.weight if level.base is None else level.base
                unseen = level.weight.numel() - 1
                weight = column.index_select(0, torch.where(context >= 0, context, unseen))
                follow = torch.where(context >= 0, slot_of, -1)
            # Two records per slot: at the key's side (P, value), at the other side (the
            # name as the next context, its weight). The name is < 2^side_bit and carries
            # the key's side in bit side_bit, which a query reaching the other side has
            # not: so it can never equal that query's P. Free slots: (EMPTY, 0) twice.
            none = (1 << index.side_bit) - 1  # the name of no context
            follow = torch.where(follow >= 0, follow, none)
            slot = taken.nonzero().squeeze(1)  # (G,) the taken slots, and their m-grams:
            gram = rows.index_select(0, slot)
            side = index.sides.index_select(0, slot)
            records = torch.full((2 << index.bits, 2), _EMPTY, device=keys.device)
            value = levels[m - 1].value.index_select(0, gram).view(torch.long)
            product = index.hash(index.keys.index_select(0, slot))
            records.index_copy_(0, 2 * slot + side, torch.stack([product, value], 1))
            follow = follow.index_select(0, gram) | (side << index.side_bit)
            weight = weight.index_select(0, gram).view(torch.long)
            records.index_copy_(0, 2 * slot + 1 - side, torch.stack([follow, weight], 1))
            index.release()
            table = _Stream(index, records.view(torch.complex128).view(-1), bos, none)
            if m >= 3:  # the contexts of length m-1 at a row's or a sentence's start
                level, dev = levels[m - 1], keys.device
                previous = tables[m - 1]
                symbols = torch.arange(V + 1, device=dev).clamp(max=V - 1)
                product = previous.index.hash(previous.bos * V + symbols)  # (V+1,) BOS.., s
                slot = previous.index.slots(product)
                listed = _read(previous.records, slot)[0] == product
                follow, column = _read(previous.records, slot ^ 1)
                follow = follow & previous.none
                listed &= follow != previous.none
                unseen = level.weight[-1:]
                table.starts = (
                    torch.where(listed, follow, -1),
                    torch.where(listed, column.view(torch.float64), unseen),
                )
                row = bos_rows[m - 1]
                column = level.weight if level.base is None else level.base
                table.restart = (
                    torch.tensor([bos if row >= 0 else -1], device=dev),
                    column[row : row + 1] if row >= 0 else unseen,
                )
            tables.append(table)
            bos = 2 << index.bits
        levels[0].stream, levels[0].bos_rows = tables, bos_rows
        return tables

    def _context_rows(self, ids: torch.Tensor, mask: torch.Tensor | None) -> list[torch.Tensor]:
        """For every position of ``ids`` [B, T], the row of its context of each length
        0..n-1 in that length's table, -1 where it was never seen: n tensors [Q]."""
        return self.find_contexts(self._histories(ids, mask), ids.numel())

    def _histories(self, ids: torch.Tensor, mask: torch.Tensor | None) -> list[torch.Tensor]:
        """The checked ``histories`` of ``ids`` [B, T], flattened: n-1 tensors [Q]."""
        cfg = self.config
        V, n = cfg.vocab_size, cfg.order
        self._check_rows(ids)
        if mask is not None:
            ids = torch.where(mask.to(torch.bool), ids, V)  # padding reads as BOS
        return [h.reshape(-1) for h in histories(ids, n, V, cfg.sentence_end_id)]

    def _check_rows(self, ids: torch.Tensor) -> None:
        """Refuse an unfitted model, rows longer than ``max_seq_len`` and ids out of range."""
        cfg = self.config
        if self.keys_1.numel() == 0:
            raise ConfigError("this NGramLM has no counts yet: call model.fit(ids) first")
        T = ids.shape[1]
        if cfg.max_seq_len is not None and T > cfg.max_seq_len:
            raise ConfigError(f"sequence of {T} tokens exceeds max_seq_len {cfg.max_seq_len}")
        _check_ids(ids, cfg.vocab_size)

    def find_contexts(
        self, back: list[torch.Tensor], size: int, grouped: bool = False
    ) -> list[torch.Tensor]:
        """Rows [Q] of the contexts made of ``back`` (up to n-1 tensors [Q], nearest token
        first, BOS = V), per length 0..len(back); -1 where never seen. Q = ``size``;
        ``grouped``: the queries come sorted by context already (see ``_find``)."""
        V = self.config.vocab_size
        rows = [torch.zeros(size, dtype=torch.long, device=self.keys_1.device)]
        for j, token in enumerate(back, start=1):
            if j == 1:  # one-token contexts: a table over the V+1 symbols, no search
                rows.append(self._levels()[0].first_rows.index_select(0, token))
                continue
            key = rows[-1] * (V + 1) + token
            pos, hit = _find(getattr(self, f"contexts_{j}"), key, grouped)
            rows.append(torch.where(hit & (rows[-1] >= 0), pos, -1))
        return rows

    def _probabilities(
        self,
        rows: list[torch.Tensor],
        targets: torch.Tensor | None,
        levels: list[_Level] | None = None,
        grouped: bool = False,
    ) -> torch.Tensor:
        """p(target | context) [Q] for given targets, or whole rows [Q, V] when None.

        ``rows``: the context rows of each length (``find_contexts``). Lowest order first,
        each level mixes its own evidence with the level below (``_levels``); a context
        never seen (row -1) keeps the shorter context's answer. Both shapes run the same
        elementwise arithmetic, so a gathered value equals its row's entry bit for bit.
        """
        V = self.config.vocab_size
        levels = self._levels() if levels is None else levels
        p = None
        for j, row in enumerate(rows):
            level = levels[j]
            seen = row >= 0  # (Q,)
            # an unseen context reads the extra last row: weight 1, nothing listed
            at = torch.where(seen, row, level.weight.numel() - 1)
            if targets is None:
                keys = getattr(self, f"keys_{j + 1}")
                v, listed = _rows(keys, [level.value, level.listed], row, V)  # (Q, V)
                b = level.weight[at][:, None]  # (Q, 1)
                c = None if level.base is None else level.base[at][:, None]
                seen = seen[:, None]
            else:
                if level.direct is not None:  # unigrams: a table by token, no search
                    v = level.direct[0].index_select(0, targets)
                    listed = level.direct[1].index_select(0, targets)
                else:
                    keys = getattr(self, f"keys_{j + 1}")
                    pos, hit = _find(keys, at * V + targets, grouped)
                    hit &= seen
                    v, listed = level.value.index_select(0, pos) * hit, hit  # (Q,)
                b = level.weight.index_select(0, at)
                c = None if level.base is None else level.base.index_select(0, at)
            lower = torch.full_like(v, 1.0 / V) if p is None else p  # 0th order: uniform
            if level.interpolated:  # every token: its own share plus b of the level below
                q = v + b * lower
            elif c is not None:  # add_k: an unseen token's share depends on the context only
                q = torch.where(listed > 0, v, c)
                q = q if p is None else torch.where(seen, q, p)
            else:  # backoff form: a seen token has its own value, the others b * lower
                q = torch.where(listed > 0, v, b * lower)
            p = q
        return p

    def _levels(self) -> list[_Level]:
        """Per order, the values the scoring loop gathers, derived once from the tables
        after fitting or loading (see ``_Level``)."""
        if self._stats is not None:
            return self._stats
        cfg = self.config
        V, n, d, s = cfg.vocab_size, cfg.order, cfg.discount, cfg.smoothing
        levels: list[_Level] = []
        for j in range(n):
            keys = getattr(self, f"keys_{j + 1}")
            U = getattr(self, f"contexts_{j}").numel() if j else 1
            owner = keys // V  # (G,) the context row of each m-gram
            ones = torch.ones(keys.numel(), dtype=torch.float64, device=keys.device)
            if s == "arpa":
                log_b = getattr(self, f"backoffs_{j}") if j else ones.new_zeros(1)
                value = 10.0 ** getattr(self, f"log10_probs_{j + 1}")
                levels.append(_Level(value, ones, 10.0**log_b))
                continue
            _, counts, cont = self.table(j + 1)
            kn = s in ("kneser_ney", "modified_kneser_ney")
            a = (cont if kn and j < n - 1 else counts).double()  # (G,) counts or N1+(. g)
            total = torch.bincount(owner, weights=a, minlength=U)  # (U,)
            per_gram_total = total[owner]
            zero = torch.zeros(U, dtype=torch.float64, device=keys.device)
            if s == "mle" or (
                j == 0 and not cfg.uniform_floor and s not in ("add_k", "linear_interpolation")
            ):
                # nltk's KN unigram too: continuation counts, no discount
                levels.append(_Level(a / per_gram_total, ones, zero))
            elif s == "add_k":
                base = cfg.k / (total + V * cfg.k)
                levels.append(_Level((a + cfg.k) / (per_gram_total + V * cfg.k), ones, zero, base))
            elif s == "witten_bell":
                # T = N1+(ctx .) distinct followers: (a + T lower) / (total + T), so the lower
                # order gets T / (total + T), the share of occurrences that were a first sight
                types = torch.bincount(owner, minlength=U).double()  # (U,)
                value = a / (per_gram_total + types[owner])
                levels.append(_Level(value, ones, types / (total + types), interpolated=True))
            elif s == "stupid_backoff":
                # a / total if seen, else alpha * the shorter context's score (no renormalising)
                levels.append(_Level(a / per_gram_total, ones, torch.full_like(total, cfg.alpha)))
            elif s == "linear_interpolation":
                # Order m = j + 1 of sum_m lambda_m p_m(w) / Lambda over the orders whose
                # context was seen, built bottom-up: with Lambda_m = lambda_0 + .. + lambda_m,
                # P_m = lambda_m / Lambda_m * p_m + Lambda_{m-1} / Lambda_m * P_{m-1}.
                lam = self.interpolation_weights.to(keys.device)
                upto = float(lam[: j + 2].sum())
                value = float(lam[j + 1]) / upto * a / per_gram_total
                below = torch.full_like(total, float(lam[: j + 1].sum()) / upto)
                levels.append(_Level(value, ones, below, interpolated=True))
            elif kn:
                # Interpolated absolute discounting: (a - D(a))^+ / total + gamma * lower, where
                # gamma = sum_w D(a_w) / total is exactly the mass the discounts removed.
                if s == "modified_kneser_ney":
                    disc = modified_kn_discounts(counts if j == n - 1 else cont, d)
                    removed = torch.cat([disc.new_zeros(1), disc]).to(a.device)[
                        a.long().clamp(max=3)
                    ]
                else:
                    removed = torch.full_like(a, d)
                alpha = (a - removed).clamp(min=0) / per_gram_total
                gamma = torch.bincount(owner, weights=removed, minlength=U) / total
                levels.append(_Level(alpha, ones, gamma, interpolated=True))
            else:
                # Katz: seen tokens get (a - d) / total; unseen ones share the freed mass
                # d N1+(ctx .) / total in proportion to the lower order. A context followed
                # by every token (or by every token the lower order allows) keeps its MLE.
                types = torch.bincount(owner, minlength=U).double()
                if j == 0:
                    lower = torch.full_like(a, 1.0 / V)
                else:
                    rows = self._ancestors(j, owner)
                    lower = self._probabilities(rows, keys % V, levels)  # (G,) p(w | ctx[1:])
                unseen = 1.0 - torch.bincount(owner, weights=lower, minlength=U)
                full = (types == V) | (unseen < 1e-12)  # (U,)
                value = torch.where(full[owner], a / per_gram_total, (a - d) / per_gram_total)
                weight = torch.where(full, 0.0, d * types / total / unseen)
                levels.append(_Level(value, ones, weight))
        # (set last: the backoff sums above score through the levels built so far, whose
        # contexts are all seen)
        # An unseen context passes the shorter context's answer on unchanged; stupid backoff
        # charges alpha for it like for any order skipped (Brants et al., nltk).
        unseen_weight = cfg.alpha if s == "stupid_backoff" else 1.0
        for level in levels:  # the extra row of unseen contexts
            level.weight = torch.cat([level.weight, level.weight.new_full((1,), unseen_weight)])
            if level.base is not None:
                level.base = torch.cat([level.base, level.base.new_zeros(1)])
        unigrams = levels[0]
        keys = self.keys_1
        value = torch.zeros(V, dtype=torch.float64, device=keys.device)
        value[keys] = unigrams.value
        unigrams.direct = (value, torch.zeros_like(value).index_fill_(0, keys, 1.0))
        if n > 1:
            first = torch.full((V + 1,), -1, dtype=torch.long, device=keys.device)
            first[self.contexts_1] = torch.arange(self.contexts_1.numel(), device=keys.device)
            unigrams.first_rows = first
        self._stats = levels
        return levels

    def _ancestors(self, j: int, rows: torch.Tensor) -> list[torch.Tensor]:
        """Rows of the suffixes of length 0..j-1 of the length-j contexts ``rows``."""
        V = self.config.vocab_size
        out = [rows]
        for i in range(j, 1, -1):
            out.append(getattr(self, f"contexts_{i}")[out[-1]] // (V + 1))
        out.append(torch.zeros_like(rows))
        return out[::-1][:j]

    def context_tokens(self, j: int) -> torch.Tensor:
        """The tokens of every length-j context, farthest first: [U_j, j] int64 (BOS = V)."""
        V = self.config.vocab_size
        if j == 0:
            return self.keys_1.new_zeros(1, 0)
        keys = getattr(self, f"contexts_{j}")
        columns = []
        for i in range(j, 0, -1):
            columns.append(keys % (V + 1))
            if i > 1:
                keys = getattr(self, f"contexts_{i - 1}")[keys // (V + 1)]
        return torch.stack(columns, 1)

    def level_probabilities(self, m: int) -> torch.Tensor:
        """p(w | ctx) [G_m] float64 of every stored m-gram at its own level (the value the
        model uses when (ctx, w) is the longest context it has seen)."""
        keys = getattr(self, f"keys_{m}")
        V = self.config.vocab_size
        rows = self._ancestors(m - 1, keys // V) + [keys // V] if m > 1 else [keys * 0]
        return self._probabilities(rows[:m], keys % V)

    def unigram_probabilities(self) -> torch.Tensor:
        """p(w) [V] float64 of every token from the empty context, seen or not."""
        V = self.config.vocab_size
        tokens = torch.arange(V, device=self.keys_1.device)
        return self._probabilities([torch.zeros_like(tokens)], tokens)

    def backoff_weights(self, j: int) -> torch.Tensor:
        """The factor [U_j] each length-j context gives the shorter context's probability of
        a token it was never seen with: gamma (Kneser-Ney), freed / unseen mass (backoff),
        the file's backoff (arpa)."""
        s = self.config.smoothing
        if s not in BACKOFF_FORMS:
            raise ConfigError(
                f"smoothing={s!r} has no backoff form (every unseen n-gram gets its own "
                f"value, or its scores are not probabilities); ARPA files hold "
                f"{', '.join(BACKOFF_FORMS)} models"
            )
        weight = self._levels()[j].weight[:-1]  # without the row of unseen contexts
        if s == "backoff":  # a context that saw every token backs off nothing: any factor
            return torch.where(weight > 0, weight, 1.0)
        return weight


def _unique_first(key: torch.Tensor):
    """Sorted distinct values of ``key``, the first index of each, and the inverse map."""
    unique, inverse = torch.unique(key, return_inverse=True)
    first = torch.full((unique.numel(),), key.numel(), dtype=torch.long, device=key.device)
    first.scatter_reduce_(0, inverse, torch.arange(key.numel(), device=key.device), "amin")
    return unique, first, inverse


def _check_ids(ids: torch.Tensor, vocab_size: int) -> None:
    if ids.numel() == 0:
        return
    low, high = (int(x) for x in torch.aminmax(ids))  # one pass over the ids
    if low < 0 or high >= vocab_size:
        raise ConfigError(f"token ids must be in [0, {vocab_size}), got [{low}, {high}]")


@torch.no_grad()
def ngram_perplexity(model: NGramLM, ids) -> float:
    """Perplexity exp(-mean log p) of a 1-D id sequence, scored as one row from BOS.

    Each token is predicted from the n-1 before it (so ids[0] from the BOS context). With
    ``smoothing='mle'`` (or nltk-style Kneser-Ney with ``uniform_floor=False``) a single
    unseen n-gram has probability 0: the result is ``math.inf`` and a warning names the
    first such n-gram.
    """
    model.require_probabilities("ngram_perplexity")
    ids = torch.as_tensor(np.asarray(ids), dtype=torch.long, device=model.n_tokens.device)
    target = ngram_log_probs(model, ids)
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


def ngram_log_probs(model: NGramLM, ids) -> torch.Tensor:
    """log p(ids[t] | the n-1 ids before it) for every t of a 1-D id sequence [N] scored as
    one row from BOS (ids[0] from the BOS context); -inf where the probability is 0."""
    model.require_probabilities("ngram_log_probs")
    ids = torch.as_tensor(np.asarray(ids), dtype=torch.long, device=model.n_tokens.device)
    if ids.dim() != 1 or ids.numel() == 0:
        raise ConfigError(f"n-gram scoring takes a non-empty 1-D sequence, got {ids.shape}")
    return model.log_prob(*_from_bos(ids))[0]  # (N,) gathered


def _from_bos(ids: torch.Tensor):
    """(row [1, N], targets [1, N], mask [1, N]) that score 1-D ``ids`` [N] as one stream
    from BOS: log p(ids[t] | ids[:t]) sits at position t, the dummy token before ids[0]
    read as BOS through the mask."""
    row = torch.cat([ids.new_zeros(1), ids[:-1]])[None]  # (1, N)
    mask = torch.ones_like(row, dtype=torch.bool)
    mask[0, 0] = False
    return row, ids[None], mask


register_family("ngram", NGramConfig, NGramLM)
