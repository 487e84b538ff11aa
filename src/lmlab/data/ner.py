"""Named-entity recognition data: a generated BIO-tagged set, and subword label alignment.

The set (``ner_examples``) is made on the fly from a seed, no download: templated sentences
such as "Ada Lovelace flew from Ouagadougou to New York on 12 March 1999 ." whose slots are
filled from lists of people, places, organisations and dates. Entities span several words
("Grace Hopper", "United Nations") and many names split into several WordPiece or BPE
pieces ("Ouagadougou" -> "o ##ua ##ga ##dou ##gou"), which is what makes alignment matter.
Tags are BIO (IOB2): ``B-X`` opens an entity of type X, ``I-X`` continues it, ``O`` is
outside every entity::

    Grace   Hopper  visited Oslo  .
    B-PER   I-PER   O       B-LOC O

A tokenizer cuts words into subwords, but the labels belong to words (transformers #10263).
Training labels the first subword of each word and gives the others ``IGNORE`` (-100), so
the loss counts each word once (``align_labels``); at prediction time the subwords' scores
become one score per word by one of three strategies (``word_scores``: ``first``,
``average``, ``max``, as transformers' token-classification pipeline names them).
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch

from lmlab.data.mlm import IGNORE
from lmlab.errors import ConfigError, closest

NER_LABELS = ("O", "B-PER", "I-PER", "B-LOC", "I-LOC", "B-ORG", "I-ORG", "B-DATE", "I-DATE")
"""The tag set of the generated NER task, ``O`` first."""
SPLITS = {"train": 600, "validation": 100, "test": 200}
"""Sentences per split of the generated NER task (each split from its own seeds)."""
STRATEGIES = ("first", "average", "max")

_NAMES = {
    "PER": [
        "Ada Lovelace",
        "Grace Hopper",
        "Alan Turing",
        "Chidi Okonkwo",
        "Yuki Nakamura",
        "Siobhan O'Sullivan",
        "Mei",
        "Oluwaseun Adeyemi",
        "Anders Johansson",
        "Priya Raghunathan",
        "Tomasz Wojciechowski",
        "Fatima",
        "Jean-Baptiste Kabila",
        "Ingrid Bergstrom",
        "Mateo",
        "Kwame Nkrumah",
        "Ludmila Petrovna Ivanova",
        "Bjorn",
        "Aiyana Whitehorse",
        "Lin Zhao",
    ],
    "LOC": [
        "Ouagadougou",
        "New York",
        "Oslo",
        "Reykjavik",
        "Buenos Aires",
        "Kathmandu",
        "Lyon",
        "Saskatoon",
        "Thiruvananthapuram",
        "Cape Town",
        "Ulaanbaatar",
        "Rio de Janeiro",
        "Antananarivo",
        "Glasgow",
        "Lake Titicaca",
        "Wroclaw",
        "Kyoto",
        "Nairobi",
    ],
    "ORG": [
        "United Nations",
        "Acme Corporation",
        "the Red Cross",
        "Globex",
        "Initech",
        "Oxford University",
        "the World Health Organization",
        "Umbrella Pharmaceuticals",
        "Banco Nacional",
        "Stark Industries",
        "Wayne Enterprises",
        "Cyberdyne Systems",
        "the Royal Society",
        "Tyrell Corporation",
        "Vandelay Industries",
    ],
}
_MONTHS = (
    "January February March April May June July August September October November December"
).split()
_WEEKDAYS = "Monday Tuesday Wednesday Thursday Friday Saturday Sunday".split()
_TEMPLATES = [
    "{PER} flew from {LOC} to {LOC} on {DATE} .",
    "{PER} joined {ORG} in {DATE} .",
    "On {DATE} , {PER} met {PER} in {LOC} .",
    "{ORG} opened an office in {LOC} .",
    "{PER} works for {ORG} and lives in {LOC} .",
    "The meeting between {ORG} and {ORG} was held in {LOC} on {DATE} .",
    "{PER} said that {ORG} will hire twenty people by {DATE} .",
    "Nobody in {LOC} expected the news .",
    "A spokesperson for {ORG} declined to comment .",
    "{PER} and {PER} wrote a book about {LOC} .",
    "It rained all day in {LOC} .",
    "We bought bread and milk on {DATE} .",
]


@dataclass(frozen=True)
class TaggedSentence:
    """Words and their BIO tags, one tag per word."""

    words: tuple[str, ...]
    tags: tuple[str, ...]


def _date(rng: random.Random) -> str:
    kind = rng.randrange(3)
    if kind == 0:
        return f"{rng.randint(1, 28)} {rng.choice(_MONTHS)} {rng.randint(1950, 2030)}"
    if kind == 1:
        return f"{rng.choice(_MONTHS)} {rng.randint(1950, 2030)}"
    return rng.choice(_WEEKDAYS)


def _sentence(rng: random.Random) -> TaggedSentence:
    words: list[str] = []
    tags: list[str] = []
    for piece in rng.choice(_TEMPLATES).split():
        if piece.startswith("{") and piece.endswith("}"):
            kind = piece[1:-1]
            name = _date(rng) if kind == "DATE" else rng.choice(_NAMES[kind])
            parts = name.split()
            words += parts
            tags += [f"B-{kind}"] + [f"I-{kind}"] * (len(parts) - 1)
        else:
            words.append(piece)
            tags.append("O")
    return TaggedSentence(tuple(words), tuple(tags))


def ner_examples(split: str = "train", n: int | None = None, seed: int = 0) -> list[TaggedSentence]:
    """The generated NER ``split`` (train, validation or test): ``n`` sentences (default
    ``SPLITS[split]``), the same for the same ``(split, seed)``; splits never share a
    random stream."""
    if split not in SPLITS:
        raise ConfigError(
            f"NER split {split!r} is unknown{closest(split, SPLITS)}; valid: {', '.join(SPLITS)}"
        )
    n = SPLITS[split] if n is None else n
    return [_sentence(random.Random(f"ner/{split}/{seed}/{i}")) for i in range(n)]


def align_labels(word_ids: Sequence[int | None], word_labels: Sequence[int]) -> list[int]:
    """Training labels per subword: the word's label on its first subword, ``IGNORE``
    (-100) on its other subwords and on special tokens (``word_ids`` None).

        word_ids [None, 0, 1, 1, 1, 2, None], word_labels [1, 3, 0]
        -> [-100, 1, 3, -100, -100, 0, -100]
    """
    out, previous = [], None
    for w in word_ids:
        if w is None:
            out.append(IGNORE)
        elif w != previous:
            if not 0 <= w < len(word_labels):
                raise ConfigError(f"word id {w} has no label: there are {len(word_labels)} words")
            out.append(int(word_labels[w]))
        else:
            out.append(IGNORE)
        previous = w
    return out


def word_scores(
    logits: torch.Tensor,
    word_ids: Sequence[int | None],
    strategy: Literal["first", "average", "max"] = "first",
) -> torch.Tensor:
    """Per-word label probabilities from per-subword logits: [T, L] -> [n_words, L].

    ``first``: the softmax of the word's first subword; ``average``: the mean of its
    subwords' softmaxes; ``max``: the softmax row of the subword whose best probability
    is highest. A word's label is then the argmax of its row. With two labels and one
    word of three subwords whose probabilities are (0.6, 0.4), (0.1, 0.9), (0.3, 0.7):
    ``first`` -> (0.6, 0.4), label 0; ``average`` -> (0.333, 0.667), label 1;
    ``max`` -> (0.1, 0.9), label 1.
    """
    if strategy not in STRATEGIES:
        raise ConfigError(
            f"strategy={strategy!r} is unknown{closest(str(strategy), STRATEGIES)}; valid: {', '.join(STRATEGIES)}"
        )
    probs = logits.float().softmax(-1)  # (T, L)
    n_words = 1 + max((w for w in word_ids if w is not None), default=-1)
    rows = []
    for word in range(n_words):
        where = [t for t, w in enumerate(word_ids) if w == word]
        if not where:  # a word cut off by truncation
            rows.append(torch.full((probs.shape[-1],), 1.0 / probs.shape[-1]))
            continue
        pieces = probs[where]  # (pieces, L)
        if strategy == "first":
            rows.append(pieces[0])
        elif strategy == "average":
            rows.append(pieces.mean(0))
        else:
            rows.append(pieces[pieces.max(-1).values.argmax()])
    return torch.stack(rows) if rows else probs.new_zeros(0, probs.shape[-1])
