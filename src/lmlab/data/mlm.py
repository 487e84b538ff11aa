"""BERT's pretraining data: masked-language-model inputs and next-sentence pairs.

**Masking** (Devlin et al. 2019, section 3.1): each ordinary token is chosen with
probability ``rate`` (15%); of the chosen, 80% become ``[MASK]``, 10% a random token and
10% stay as they are, so the model cannot learn that only ``[MASK]`` needs predicting. The
labels are the original ids at the chosen positions and ``IGNORE`` (-100) everywhere else:
the loss sees the chosen positions and nothing else (two of BERT reimplementations'
well-known bugs are a loss over every position and the special tokens left maskable).
Special tokens ([CLS], [SEP], padding) are never chosen.

**Whole-word masking** chooses words rather than tokens: every sub-word piece of a chosen
word is chosen with it (``word_ids``: the word each position belongs to, -1 for none).

**Next-sentence pairs**: ``[CLS] A [SEP] B [SEP]`` with segment ids 0 then 1; B is the
sentence that follows A in its document (label ``IS_NEXT`` = 0) half the time and a sentence
of another document otherwise (``IS_RANDOM`` = 1), the labels transformers'
``BertForPreTraining`` uses. The NSP label is never masked: it is a separate target.
``sentence_pairs`` pairs single sentences; ``segment_pairs`` pairs *segments* of
consecutive sentences, as BERT's data does (``create_pretraining_data.py``: A is a run of
sentences, B the run that follows it or one from a random other document), which gives
the classifier far more to go on than two lines.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from lmlab.errors import ConfigError

IGNORE = -100
IS_NEXT, IS_RANDOM = 0, 1


def mask_tokens(
    ids: torch.Tensor,
    mask_id: int,
    vocab_size: int,
    special: torch.Tensor,
    rate: float = 0.15,
    generator: torch.Generator | None = None,
    word_ids: torch.Tensor | None = None,
    random_low: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs, labels) for masked-LM training from ``ids`` [B, T] (see the module doc).

    ``special`` [B, T] bool marks positions never chosen; ``word_ids`` [B, T] (optional)
    makes the choice per word; random replacements are drawn from ``[random_low,
    vocab_size)`` (so special ids below ``random_low`` are never inserted).
    """
    if not 0 < rate < 1:
        raise ConfigError(f"mask rate {rate} is invalid: must be in (0, 1)")
    if ids.shape != special.shape:
        raise ConfigError(
            f"special mask {tuple(special.shape)} does not match ids {tuple(ids.shape)}"
        )
    if word_ids is None:
        chosen = torch.rand(ids.shape, generator=generator) < rate
    else:
        if word_ids.shape != ids.shape:
            raise ConfigError(
                f"word_ids {tuple(word_ids.shape)} does not match ids {tuple(ids.shape)}"
            )
        n_words = int(word_ids.max().item()) + 1 if word_ids.numel() else 0
        pick = torch.rand(ids.shape[0], max(n_words, 1), generator=generator) < rate  # (B, W)
        chosen = (word_ids >= 0) & pick.gather(1, word_ids.clamp(min=0))
    chosen &= ~special
    labels = torch.where(chosen, ids, torch.full_like(ids, IGNORE))
    draw = torch.rand(ids.shape, generator=generator)
    to_mask = chosen & (draw < 0.8)
    to_random = chosen & (draw >= 0.8) & (draw < 0.9)
    random_ids = torch.randint(random_low, vocab_size, ids.shape, generator=generator)
    inputs = torch.where(to_mask, torch.full_like(ids, mask_id), ids)
    inputs = torch.where(to_random, random_ids, inputs)
    return inputs, labels


@dataclass
class PairBatch:
    """A batch of next-sentence pairs, right-padded."""

    ids: torch.Tensor  # [B, T] int64
    token_type_ids: torch.Tensor  # [B, T] int64: 0 for [CLS] A [SEP], 1 for B [SEP]
    attention_mask: torch.Tensor  # [B, T] bool
    special: torch.Tensor  # [B, T] bool: [CLS], [SEP] and padding
    nsp_labels: torch.Tensor  # [B] int64: IS_NEXT or IS_RANDOM


def _usable(documents: Sequence[Sequence[Sequence[int]]]) -> list[int]:
    """The documents a pair can start in (two sentences or more); there must be another."""
    usable = [d for d, doc in enumerate(documents) if len(doc) >= 2]
    if not usable or len(documents) < 2:
        raise ConfigError(
            "next-sentence pairs need at least two documents, one of them with two or more sentences"
        )
    return usable


def sentence_pairs(
    documents: Sequence[Sequence[Sequence[int]]],
    n: int,
    rng: random.Random,
) -> list[tuple[list[int], list[int], int]]:
    """``n`` (A, B, label) pairs from documents given as lists of tokenized sentences."""
    usable = _usable(documents)
    pairs = []
    for _ in range(n):
        d = rng.choice(usable)
        i = rng.randrange(len(documents[d]) - 1)
        a = list(documents[d][i])
        if rng.random() < 0.5:
            pairs.append((a, list(documents[d][i + 1]), IS_NEXT))
        else:
            other = rng.choice([j for j in range(len(documents)) if j != d and documents[j]])
            pairs.append((a, list(rng.choice(documents[other])), IS_RANDOM))
    return pairs


def _run(sentences: Sequence[Sequence[int]], start: int, budget: int) -> list[int]:
    """Sentences from ``start`` on, concatenated while they fit ``budget`` tokens (at least
    the first one, cut to the budget)."""
    out: list[int] = []
    for sentence in sentences[start:]:
        if out and len(out) + len(sentence) > budget:
            break
        out.extend(sentence)
    return out[:budget]


def segment_pairs(
    documents: Sequence[Sequence[Sequence[int]]],
    n: int,
    rng: random.Random,
    max_tokens: int,
) -> list[tuple[list[int], list[int], int]]:
    """``n`` (A, B, label) pairs of segments that together hold at most ``max_tokens``.

    A junction is drawn inside a document (between sentences j-1 and j); A is the run of
    whole sentences that ends there, going back while A holds at most half the tokens (at
    least sentence j-1, keeping its last tokens); B is the run that starts at sentence j
    (``IS_NEXT``) or at a random sentence of another document (``IS_RANDOM``), filling the
    rest. Both segments keep the junction, so the pair never needs truncating there::

        document [[1, 2], [3], [4, 5, 6], [7]], junction 2, max_tokens 6
        -> A = [1, 2, 3] (sentences 0-1), B = [4, 5, 6] (sentences 2-), IS_NEXT
    """
    if max_tokens < 2:
        raise ConfigError(f"max_tokens {max_tokens} is too small for two segments")
    usable = _usable(documents)
    pairs = []
    for _ in range(n):
        d = rng.choice(usable)
        j = rng.randrange(1, len(documents[d]))
        # A: sentences j-1, j-2, ... read backwards, so its budget cuts it at the front
        reversed_doc = [list(s)[::-1] for s in documents[d][:j][::-1]]
        a = _run(reversed_doc, 0, max_tokens // 2)[::-1]
        budget = max_tokens - len(a)
        if rng.random() < 0.5:
            pairs.append((a, _run(documents[d], j, budget), IS_NEXT))
        else:
            other = documents[
                rng.choice([k for k in range(len(documents)) if k != d and documents[k]])
            ]
            pairs.append((a, _run(other, rng.randrange(len(other)), budget), IS_RANDOM))
    return pairs


def pack_pairs(
    pairs: Sequence[tuple[list[int], list[int], int]],
    cls_id: int,
    sep_id: int,
    pad_id: int,
    max_len: int,
) -> PairBatch:
    """``[CLS] A [SEP] B [SEP]`` rows; the longer of A and B loses its last tokens until the
    row fits ``max_len`` (as BERT's ``truncate_seq_pair``)."""
    if max_len < 5:
        raise ConfigError(f"max_len {max_len} is too short for [CLS] A [SEP] B [SEP]")
    rows, types = [], []
    for a, b, _ in pairs:
        a, b = list(a), list(b)
        while len(a) + len(b) > max_len - 3:
            (a if len(a) > len(b) else b).pop()  # a tie shortens B, as BERT does
        rows.append([cls_id, *a, sep_id, *b, sep_id])
        types.append([0] * (len(a) + 2) + [1] * (len(b) + 1))
    T = max(len(r) for r in rows)
    ids = torch.full((len(rows), T), pad_id, dtype=torch.long)
    token_types = torch.zeros((len(rows), T), dtype=torch.long)
    mask = torch.zeros((len(rows), T), dtype=torch.bool)
    for i, (row, ty) in enumerate(zip(rows, types)):
        ids[i, : len(row)] = torch.tensor(row)
        token_types[i, : len(ty)] = torch.tensor(ty)
        mask[i, : len(row)] = True
    special = ~mask | (ids == cls_id) | (ids == sep_id)
    labels = torch.tensor([label for _, _, label in pairs], dtype=torch.long)
    return PairBatch(ids, token_types, mask, special, labels)
