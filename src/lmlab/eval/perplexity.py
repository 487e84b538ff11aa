"""Perplexity and per-token surprisal of any lmlab model on a token sequence.

Texts longer than the context are scored with a sliding window (as in Hugging Face's
perplexity guide): each window holds up to ``max_seq_len`` tokens and moves by ``stride``;
only the tokens not scored by an earlier window count, so every token after the first is
scored exactly once, with up to ``max_seq_len - stride`` tokens of extra left context.
With ``stride == max_seq_len`` the windows do not overlap (fastest, least context).

    nll_i = -log p(x_i | x_<i within its window)      (nats)
    perplexity = exp(mean_i nll_i)

``surprisal(lm, text)`` does the same for a text and a model's tokenizer and keeps every
token's record (id, text, nats, bits, character span) for tables and plots
(``to_csv``, ``to_json``, ``plot_surprisal``). Per-token perplexity depends on the
tokenizer; bits per byte and bits per character do not, so they compare models with
different vocabularies (the "bits_per_byte" of lm-evaluation-harness, Gao et al. 2021,
and of the Pile paper):

    bits_per_byte = sum_i nll_i / ln 2 / (UTF-8 bytes of the scored text)

Parity: ``tests/eval/test_perplexity.py`` checks token_nll against direct cross-entropy of
the whole window, and bits per byte/character against sums of ``token_nll`` by hand.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from collections.abc import Sequence
from dataclasses import asdict, astuple, dataclass, fields
from pathlib import Path
from typing import Any

import torch

from lmlab.errors import ConfigError, DataError
from lmlab.fileio import atomic_write_json, atomic_write_text

# The sliding-window scorer lives with decoding (the LM handle below eval uses it); it is
# re-exported here, where readers of evaluation look for it.
from lmlab.generate.likelihood import perplexity as perplexity
from lmlab.generate.likelihood import token_nll as token_nll
from lmlab.lm import LM

# ----------------------------------------------------------------------------- surprisal of text


@dataclass(frozen=True)
class TokenSurprisal:
    """One scored token: how surprising it was given the tokens before it."""

    position: int
    """Index of the token among the text's tokens (0 is the first token of the text)."""
    id: int
    token: str
    """The token's own text (``decode([id])``; U+FFFD for part of a multi-byte character)."""
    nats: float
    """-ln p(token | context)."""
    bits: float
    """-log2 p(token | context) = nats / ln 2."""
    start: int | None
    """Character offsets of the token in ``Surprisal.text`` (``text[start:end]``); tokens
    that share one multi-byte character share its span. None when the tokenizer decodes
    pieces differently from the whole (e.g. SentencePiece's leading spaces)."""
    end: int | None


@dataclass(frozen=True)
class Surprisal:
    """Per-token surprisal of a text, with its totals per token, byte and character.

    Which text is counted: a token is scored only when something comes before it. With
    ``prefix_id`` (e.g. GPT-2's ``<|endoftext|>``, as lm-evaluation-harness prepends its
    end-of-text token), every token of the text is scored and the whole text counts
    (``scored_from == 0``). Without one, the first token is context only: the counted
    span is ``text[scored_from:]``, from the end of the first token (for a byte tokenizer
    and a text opening with a multi-byte character, from the end of that character; the
    tokens completing it are context too). Totals, bytes and characters all cover that span
    and nothing else, so

        bits_per_byte = sum(bits of scored tokens) / len(text[scored_from:].encode("utf-8"))

    which is lm-evaluation-harness's ``bits_per_byte`` (-sum loglik / ln 2 / bytes).
    """

    text: str
    """The scored text as the tokens spell it (``decode(ids)``: the input itself for a
    lossless tokenizer)."""
    tokens: tuple[TokenSurprisal, ...]
    """The scored tokens, in order."""
    scored_from: int
    """Character offset where the counted span starts."""
    prefix_id: int | None = None
    """The token prepended as context, if any."""

    @property
    def total_nats(self) -> float:
        return math.fsum(t.nats for t in self.tokens)

    @property
    def total_bits(self) -> float:
        return self.total_nats / math.log(2)

    @property
    def n_bytes(self) -> int:
        """UTF-8 bytes of the counted span ``text[scored_from:]``."""
        return len(self.text[self.scored_from :].encode("utf-8"))

    @property
    def n_characters(self) -> int:
        """Characters (Unicode code points) of the counted span ``text[scored_from:]``."""
        return len(self.text) - self.scored_from

    @property
    def mean_nats(self) -> float:
        """Mean surprisal per scored token (its exp is the perplexity)."""
        return self.total_nats / len(self.tokens)

    @property
    def perplexity(self) -> float:
        return math.exp(self.mean_nats)

    @property
    def bits_per_byte(self) -> float:
        return self.total_bits / self.n_bytes

    @property
    def bits_per_character(self) -> float:
        return self.total_bits / self.n_characters

    def summary(self) -> dict[str, Any]:
        """The totals as a JSON-ready dict."""
        return {
            "n_tokens": len(self.tokens),
            "n_bytes": self.n_bytes,
            "n_characters": self.n_characters,
            "total_nats": self.total_nats,
            "total_bits": self.total_bits,
            "perplexity": self.perplexity,
            "bits_per_byte": self.bits_per_byte,
            "bits_per_character": self.bits_per_character,
        }

    def to_dict(self) -> dict[str, Any]:
        return {
            "text": self.text,
            "scored_from": self.scored_from,
            "prefix_id": self.prefix_id,
            "summary": self.summary(),
            "tokens": [asdict(t) for t in self.tokens],
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Surprisal:
        tokens = tuple(TokenSurprisal(**t) for t in data["tokens"])
        return cls(data["text"], tokens, data["scored_from"], data.get("prefix_id"))

    def to_json(self, path: str | os.PathLike) -> None:
        """Write ``to_dict()`` as JSON (atomically); ``Surprisal.from_json`` reads it back."""
        atomic_write_json(path, self.to_dict())

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> Surprisal:
        return cls.from_dict(json.loads(Path(path).read_text(encoding="utf-8")))

    def to_csv(self, path: str | os.PathLike) -> None:
        """One row per scored token: position, id, token, nats, bits, start, end (floats
        written with ``repr``, so they read back exactly; empty offsets mean None)."""
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(CSV_COLUMNS)
        for t in self.tokens:
            writer.writerow(
                ["" if v is None else repr(v) if isinstance(v, float) else v for v in astuple(t)]
            )
        atomic_write_text(path, buffer.getvalue())


CSV_COLUMNS = tuple(f.name for f in fields(TokenSurprisal))


def surprisal(
    lm: LM,
    text: str,
    stride: int | None = None,
    prefix_id: int | None = None,
    context: int | None = None,
) -> Surprisal:
    """Per-token surprisal of ``text`` under ``lm`` (an ``lmlab.LM``: model + tokenizer).

    Scoring is ``token_nll`` (sliding window: ``stride``, ``context``). ``prefix_id``, when
    given, is prepended so that the first token of the text is scored too; see
    ``Surprisal`` for exactly which span the per-byte and per-character totals count.

        "hello" with a char tokenizer, no prefix: "h" is context, "e l l o" are scored,
        scored_from = 1, n_bytes = 4
    """
    if hasattr(lm, "_need_decoder"):
        lm._need_decoder("surprisal")
    tok = lm.tokenizer
    ids = list(tok.encode(text))
    if not ids:
        raise ConfigError("text is empty: there is nothing to score")
    if prefix_id is not None:
        vocab = lm.model.config.vocab_size
        if not isinstance(prefix_id, int) or not 0 <= prefix_id < vocab:
            raise ConfigError(
                f"prefix_id={prefix_id!r} is invalid: must be a token id in [0, {vocab})"
            )
        nll = token_nll(lm.model, [prefix_id, *ids], stride, context=context)  # [N]
        first, scored_from = 0, 0
    else:
        if len(ids) < 2:
            raise ConfigError(
                f"text {text!r} is a single token: without prefix_id the first token is only "
                "context, so nothing would be scored; give a longer text or prefix_id"
            )
        nll = torch.cat([torch.zeros(1), token_nll(lm.model, ids, stride, context=context)])
        first, scored_from = _context_end(tok, ids)  # nll[i] scores ids[i]; nll[0] is unused
    decoded = tok.decode(ids)
    spans = _token_spans(tok, ids, decoded)
    records = []
    for i in range(first, len(ids)):
        nats = float(nll[i])
        start, end = spans[i] if spans is not None else (None, None)
        token = tok.decode([ids[i]])
        records.append(TokenSurprisal(i, ids[i], token, nats, nats / math.log(2), start, end))
    if not records:
        raise ConfigError(
            f"text {text!r} is all context: its first character takes every token; give a "
            "longer text or prefix_id"
        )
    return Surprisal(decoded, tuple(records), scored_from, prefix_id)


def bits_per_byte(
    lm: LM,
    text: str,
    stride: int | None = None,
    prefix_id: int | None = None,
    context: int | None = None,
) -> float:
    """Total surprisal in bits / UTF-8 bytes of the scored span (see ``Surprisal``)."""
    return surprisal(lm, text, stride, prefix_id, context).bits_per_byte


def bits_per_character(
    lm: LM,
    text: str,
    stride: int | None = None,
    prefix_id: int | None = None,
    context: int | None = None,
) -> float:
    """Total surprisal in bits / characters of the scored span (see ``Surprisal``)."""
    return surprisal(lm, text, stride, prefix_id, context).bits_per_character


def _context_end(tokenizer: Any, ids: Sequence[int]) -> tuple[int, int]:
    """(tokens, characters) of the context before the first scored token: the first token,
    extended to the end of its character when it holds only part of one.

        char tokenizer, "hello"  ->  (1, 1);   byte tokenizer, "é!" = [195, 169, 33] -> (2, 1)
    """
    decoded = tokenizer.decode(ids)
    for m in range(1, min(len(ids), 8) + 1):  # a character has at most 4 UTF-8 bytes
        head = tokenizer.decode(ids[:m])
        if not head.endswith("\ufffd") and decoded.startswith(head):
            return m, len(head)
    raise DataError(
        "cannot tell where the first token ends in the decoded text (the tokenizer decodes "
        "a prefix differently from the whole); give prefix_id to score every token"
    )


def _token_spans(tokenizer: Any, ids: Sequence[int], text: str) -> list[tuple[int, int]] | None:
    """Character span of each token in ``text`` (= ``decode(ids)``), or None when pieces
    decoded alone do not line up with the whole.

    Tokens are decoded in runs that end on a whole character, so the work is linear: a run
    is one token except where a multi-byte character is split across tokens, and then every
    token of the run gets that character's span.

        byte tokenizer, "aé" = [97, 195, 169]  ->  [(0, 1), (1, 2), (1, 2)]
    """
    spans: list[tuple[int, int]] = []
    pos = run_start = 0
    for k in range(len(ids)):
        piece = tokenizer.decode(ids[run_start : k + 1])
        if piece.endswith("\ufffd") and k + 1 < len(ids) and not text.startswith(piece, pos):
            continue  # an incomplete character: wait for the token that completes it
        if not text.startswith(piece, pos):
            return None
        spans += [(pos, pos + len(piece))] * (k + 1 - run_start)
        pos += len(piece)
        run_start = k + 1
    return spans if pos == len(text) else None


def plot_surprisal(
    result: Surprisal, path: str | os.PathLike, title: str | None = None, max_tokens: int = 200
) -> None:
    """Bar chart of the bits of each scored token (the first ``max_tokens``), labelled with
    the tokens, with the mean as a dashed line; saved as a PNG."""
    # A bare Figure renders with Agg and leaves pyplot's global backend alone.
    from matplotlib.figure import Figure  # deferred: slow to import, only for plots

    shown = result.tokens[:max_tokens]
    bits = [t.bits for t in shown]
    fig = Figure(figsize=(min(2 + 0.25 * len(shown), 40), 4), dpi=100)
    ax = fig.add_subplot()
    ax.bar(range(len(shown)), bits, width=0.8)
    mean = result.total_bits / len(result.tokens)
    ax.axhline(mean, linestyle="--", linewidth=1, color="black", label=f"mean {mean:.2f} bits")
    ax.set_xticks(range(len(shown)))
    ax.set_xticklabels([repr(t.token)[1:-1] for t in shown], rotation=90, fontsize=7)
    ax.set_ylabel("surprisal (bits)")
    ax.set_title(title or f"{result.bits_per_byte:.3f} bits/byte, {len(result.tokens)} tokens")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
