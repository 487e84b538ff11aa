"""Three feed-forward language models that come before attention: bigram, Bengio MLP, bag.

- ``bigram``: the next token depends on the current token only. ``logits = W emb(x_t)``;
  with ``d_model=None`` the embedding *is* the V x V table of logits (the count-based
  bigram model's learned twin).
- ``mlp``: the fixed-window neural language model of Bengio, Ducharme, Vincent & Jauvin
  (2003), "A Neural Probabilistic Language Model", eq. 1:
  ``y = b + W x + U tanh(d + H x)`` where ``x`` concatenates the embeddings of the last
  ``context`` tokens (``W x``, the direct connections, is optional).
- ``bag``: a bag of words. It sums (or averages) the embeddings of every token so far,
  the current one included, and feeds that through one hidden layer. The sum forgets the
  order, so the model cannot tell "dog bites man" from "man bites dog": the permutation
  test in ``tests/models/test_mlp.py`` shows it, and shows that an LSTM can.

None of them keeps a cache: they are cheap enough to recompute while decoding. None has a
fixed context (``config.max_seq_len`` is None): the MLP reads a window of ``context``
tokens wherever it is, and the bag reads everything.

Left padding (``mask`` False) never changes the outputs at real positions, so a padded row
equals the row alone: the bigram ignores other positions anyway; the MLP reads a padded
slot as the *pad embedding*, the same learned vector it reads before the start of the
sequence; the bag leaves padded slots out of its sum and its count.

There is no reference implementation to compare with; the tests check invariants instead.

Shapes: B batch, T tokens, V vocabulary, D d_model (embedding size), K context, F d_ff.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from lmlab.errors import ConfigError
from lmlab.models.contract import Abilities
from lmlab.models.layers import HookPoint
from lmlab.models.registry import register_family


def _check(name: str, config, positive: tuple[str, ...], optional: tuple[str, ...] = ()):
    """Raise ConfigError naming the field, its value and what is allowed."""

    def bad(field: str, value, allowed: str):
        raise ConfigError(f"{name}.{field}={value!r} is invalid: {allowed}")

    for field in positive + optional:
        value = getattr(config, field)
        if value is None and field in optional:
            continue
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            bad(field, value, "must be a positive integer" + (" or None" * (field in optional)))
    dropout = getattr(config, "dropout", 0.0)
    if not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
        bad("dropout", dropout, "must be in [0, 1)")
    return bad


# ----------------------------------------------------------------------------- configs


@dataclass(frozen=True)
class BigramConfig:
    vocab_size: int
    """Number of token ids."""
    d_model: int | None = None
    """Embedding size; None means no factorisation: the embedding table is the V x V table
    of next-token logits."""

    def __post_init__(self):
        _check("BigramConfig", self, ("vocab_size",), optional=("d_model",))

    @property
    def max_seq_len(self) -> None:
        return None  # no fixed context: any T works


@dataclass(frozen=True)
class MLPConfig:
    vocab_size: int
    """Number of token ids."""
    d_model: int = 64
    """Embedding size of each token in the window (Bengio et al.'s m)."""
    context: int = 3
    """Window size K: the model sees the current token and the K - 1 before it (Bengio et
    al.'s n - 1)."""
    d_ff: int = 256
    """Width of the tanh hidden layer (Bengio et al.'s h)."""
    dropout: float = 0.0
    """Dropout on the hidden layer while training."""
    direct: bool = False
    """Direct connections from the concatenated embeddings to the output (the W x term of
    eq. 1); Bengio et al. found they sped up training without improving perplexity much."""

    def __post_init__(self):
        bad = _check("MLPConfig", self, ("vocab_size", "d_model", "context", "d_ff"))
        if not isinstance(self.direct, bool):
            bad("direct", self.direct, "must be true or false")

    @property
    def max_seq_len(self) -> None:
        return None  # the window slides: any T works


@dataclass(frozen=True)
class BagConfig:
    vocab_size: int
    """Number of token ids."""
    d_model: int = 64
    """Embedding size."""
    d_ff: int = 256
    """Width of the tanh hidden layer."""
    dropout: float = 0.0
    """Dropout on the hidden layer while training."""
    reduce: Literal["sum", "mean"] = "mean"
    """Sum the embeddings so far, or average them (the sum's scale grows with position)."""

    def __post_init__(self):
        bad = _check("BagConfig", self, ("vocab_size", "d_model", "d_ff"))
        if self.reduce not in ("sum", "mean"):
            bad("reduce", self.reduce, "choose one of sum, mean")

    @property
    def max_seq_len(self) -> None:
        return None  # the bag grows with the sequence: any T works


# ----------------------------------------------------------------------------- models


class Bigram(nn.Module):
    """Token ids [B, T] -> next-token logits [B, T, V] from the current token alone."""

    abilities = Abilities("causal_lm", hooks=True)

    def __init__(self, config: BigramConfig):
        super().__init__()
        self.config = config
        V, D = config.vocab_size, config.d_model
        self.tok_emb = nn.Embedding(V, D or V)
        self.lm_head = nn.Linear(D, V) if D is not None else nn.Identity()
        if D is None:  # a table of logits starts uniform, like an empty (smoothed) count table
            nn.init.zeros_(self.tok_emb.weight)
        self.hook_embed = HookPoint()  # (B, T, D), or (B, T, V) when the table is the logits

    def forward(self, ids: torch.Tensor, cache=None, mask: torch.Tensor | None = None):
        """ids: [B, T] int64 -> logits [B, T, V]. ``mask`` changes nothing: no position
        reads another, so padding cannot leak into a real one."""
        if cache is not None:
            raise ConfigError("the bigram model keeps no cache; decode by recomputing")
        return self.lm_head(self.hook_embed(self.tok_emb(ids)))  # (B, T, V)


class MLP(nn.Module):
    """Bengio et al. (2003): y = b + W x + U tanh(d + H x), x = the window's embeddings."""

    abilities = Abilities("causal_lm", hooks=True)

    def __init__(self, config: MLPConfig):
        super().__init__()
        self.config = config
        V, D, K, Fh = config.vocab_size, config.d_model, config.context, config.d_ff
        # Row V is the pad embedding, read for slots before the start of the sequence and for
        # left padding. It is learned (it tells the model "the sentence starts here"), where
        # Bengio et al. instead padded with a start-of-sentence word.
        self.pad_id = V
        self.tok_emb = nn.Embedding(V + 1, D)  # C in the paper
        self.hidden = nn.Linear(K * D, Fh)  # H and d
        self.lm_head = nn.Linear(Fh, V)  # U and b
        self.direct = nn.Linear(K * D, V, bias=False) if config.direct else None  # W
        self.dropout = nn.Dropout(config.dropout)
        self.hook_embed = HookPoint()  # (B, T, K*D) concatenated window embeddings
        self.hook_hidden = HookPoint()  # (B, T, F) after tanh

    def forward(self, ids: torch.Tensor, cache=None, mask: torch.Tensor | None = None):
        """ids: [B, T] int64; mask: [B, T] bool, False on left padding -> logits [B, T, V]."""
        if cache is not None:
            raise ConfigError("the mlp model keeps no cache; decode by recomputing")
        B, T = ids.shape
        K = self.config.context
        if mask is not None:
            ids = ids.masked_fill(~mask.bool(), self.pad_id)  # padding reads as the pad slot
        before = ids.new_full((B, K - 1), self.pad_id)
        padded = torch.cat([before, ids], dim=1)  # (B, K-1+T)
        # Window t holds padded[t : t+K] = ids[t-K+1 .. t]: the current token is last.
        windows = padded.unfold(1, K, 1)  # (B, T, K)
        x = self.hook_embed(self.tok_emb(windows).reshape(B, T, -1))  # (B, T, K*D)
        h = self.hook_hidden(torch.tanh(self.hidden(x)))  # (B, T, F)
        logits = self.lm_head(self.dropout(h))  # (B, T, V)
        if self.direct is not None:
            logits = logits + self.direct(x)
        return logits


class Bag(nn.Module):
    """Token ids [B, T] -> logits [B, T, V] from the sum or mean of embeddings so far."""

    abilities = Abilities("causal_lm", hooks=True)

    def __init__(self, config: BagConfig):
        super().__init__()
        self.config = config
        self.tok_emb = nn.Embedding(config.vocab_size, config.d_model)
        self.hidden = nn.Linear(config.d_model, config.d_ff)
        self.lm_head = nn.Linear(config.d_ff, config.vocab_size)
        self.dropout = nn.Dropout(config.dropout)
        self.hook_embed = HookPoint()  # (B, T, D) token embeddings
        self.hook_bag = HookPoint()  # (B, T, D) the running sum or mean
        self.hook_hidden = HookPoint()  # (B, T, F) after tanh

    def forward(self, ids: torch.Tensor, cache=None, mask: torch.Tensor | None = None):
        """ids: [B, T] int64; mask: [B, T] bool, False on left padding -> logits [B, T, V]."""
        if cache is not None:
            raise ConfigError("the bag model keeps no cache; decode by recomputing")
        e = self.hook_embed(self.tok_emb(ids))  # (B, T, D)
        keep = torch.ones_like(ids, dtype=e.dtype) if mask is None else mask.to(e.dtype)
        # A prefix sum gives every position its bag in one pass: bag_t = sum_{s<=t} e_s.
        bag = (e * keep[..., None]).cumsum(dim=1)  # (B, T, D)
        if self.config.reduce == "mean":
            # Padded positions have count 0 (their outputs are meaningless); clamp avoids 0/0.
            bag = bag / keep.cumsum(dim=1).clamp(min=1)[..., None]
        h = self.hook_hidden(torch.tanh(self.hidden(self.hook_bag(bag))))  # (B, T, F)
        return self.lm_head(self.dropout(h))  # (B, T, V)


register_family("bigram", BigramConfig, Bigram)
register_family("mlp", MLPConfig, MLP)
register_family("bag", BagConfig, Bag)
