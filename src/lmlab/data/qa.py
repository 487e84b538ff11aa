"""Extractive question answering data: a generated SQuAD-like set and its windowed features.

The set (``qa_examples``) is made on the fly from a seed, no download: a paragraph of
made-up biographies, a question about one fact in it, and the answer as it appears in
the paragraph with its character offset (SQuAD v1.1's ``answer_start``)::

    context  "... Mira Okafor was born in Lyon . Mira Okafor works for Globex as a pilot . ..."
    question "Who does Mira Okafor work for ?"   answer "Globex", answer_start 61

Paragraphs mix facts about several people with filler sentences, and some are longer than
the encoder's input, so they are cut into windows.

Features (``qa_features``, as in BERT's run_squad and transformers' run_qa): the question
first and a window of the context second, ``[CLS] question [SEP] window [SEP]``, with
token types 0 then 1, no longer than ``max_length``. Consecutive windows overlap by
``doc_stride`` tokens (transformers' ``stride``), so an answer of at most
``doc_stride + 1`` tokens lies whole in some window. Each token of the window keeps its
character span in the context (from the fast tokenizer's offsets), so a predicted span of
tokens maps back to the exact text. The training target is the answer's first and last
token, or the ``[CLS]`` index 0 in both when the answer is not whole in the window.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

from lmlab.errors import ConfigError, closest

SPLITS = {"train": 600, "validation": 100, "test": 200}
"""Questions per split of the generated QA task (each split from its own seeds)."""

_FIRST = (
    "Mira Tomas Aiko Kofi Lena Ravi Nadia Oskar Ines Dmitri Amara Yusuf Hana Pavel Zora".split()
)
_LAST = (
    "Okafor Lindqvist Tanaka Mensah Novak Iyer Haddad Brennan Castillo Volkov Adeyemi Sato".split()
)
_CITIES = (
    "Lyon;Oslo;Nairobi;Kyoto;Glasgow;Cape Town;Buenos Aires;Reykjavik;Antananarivo;"
    "Saskatoon;Ulaanbaatar;Kathmandu;Wroclaw;Rio de Janeiro"
).split(";")
_ORGS = "Globex;Initech;Acme Corporation;Stark Industries;the Royal Society;Banco Nacional;Umbrella Pharmaceuticals;Cyberdyne Systems".split(
    ";"
)
_JOBS = "pilot;baker;chemist;carpenter;librarian;nurse;software engineer;marine biologist;violin teacher".split(
    ";"
)
_PETS = "cat;parrot;tortoise;goldfish;greyhound;hamster;iguana".split(";")
_FILLER = [
    "The weather that year was unusually mild .",
    "Many people in the town still remember the long winter .",
    "A new bridge was built across the river .",
    "The local market sells fruit , bread and cheese every morning .",
    "Trains to the coast leave twice a day .",
    "The museum reopened after a long renovation .",
    "Most houses on the hill have red roofs .",
    "The library lends books , maps and old newspapers .",
]
# (fact sentence, question, answer slot) for each kind of fact about a person {p}
_FACTS = [
    ("{p} was born in {city} .", "Where was {p} born ?", "city"),
    ("{p} works for {org} as a {job} .", "Who does {p} work for ?", "org"),
    ("{p} works for {org} as a {job} .", "What is the job of {p} ?", "job"),
    ("{p} keeps a {pet} named {petname} .", "What is the name of the pet of {p} ?", "petname"),
    ("{p} moved to {city2} in {year} .", "In which year did {p} move to {city2} ?", "year"),
    ("{p} moved to {city2} in {year} .", "Where did {p} move in {year} ?", "city2"),
]


@dataclass(frozen=True)
class QAExample:
    """One question on a context; ``answer`` is ``context[answer_start:][:len(answer)]``."""

    context: str
    question: str
    answer: str
    answer_start: int
    id: str = ""


def _example(rng: random.Random, id_: str) -> QAExample:
    people = rng.sample([f"{f} {s}" for f in _FIRST for s in _LAST], rng.randint(1, 3))
    sentences: list[tuple[str, tuple[str, str] | None]] = []  # (text, (question, answer))
    for person in people:
        slots = {
            "p": person,
            "city": rng.choice(_CITIES),
            "city2": rng.choice(_CITIES),
            "org": rng.choice(_ORGS),
            "job": rng.choice(_JOBS),
            "pet": rng.choice(_PETS),
            "petname": rng.choice(_FIRST),
            "year": str(rng.randint(1960, 2024)),
        }
        for fact, question, slot in rng.sample(_FACTS, rng.randint(2, len(_FACTS))):
            sentences.append((fact.format(**slots), (question.format(**slots), slots[slot])))
    sentences += [(rng.choice(_FILLER), None) for _ in range(rng.randint(0, 14))]
    rng.shuffle(sentences)
    texts = [text for text, _ in sentences]
    asked = rng.choice([i for i, (_, qa) in enumerate(sentences) if qa is not None])
    question, answer = sentences[asked][1]
    # The answer's offset inside the very sentence the question is about (a name can
    # occur in several sentences: the fact sentence is the one to point at).
    before = len(" ".join(texts[:asked])) + (1 if asked else 0)
    start = before + texts[asked].rindex(answer)
    context = " ".join(texts)
    return QAExample(context, question, answer, start, id_)


def qa_examples(split: str = "train", n: int | None = None, seed: int = 0) -> list[QAExample]:
    """The generated QA ``split`` (train, validation or test): ``n`` questions (default
    ``SPLITS[split]``), the same for the same ``(split, seed)``."""
    if split not in SPLITS:
        raise ConfigError(
            f"QA split {split!r} is unknown{closest(split, SPLITS)}; valid: {', '.join(SPLITS)}"
        )
    n = SPLITS[split] if n is None else n
    return [_example(random.Random(f"qa/{split}/{seed}/{i}"), f"{split}-{i}") for i in range(n)]


@dataclass
class QAFeature:
    """One window of one example, ready for the encoder."""

    example: int
    """Index of the example in the list given to ``qa_features``."""
    ids: list[int]
    token_type_ids: list[int]
    offsets: list[tuple[int, int] | None]
    """Each token's (start, end) characters in the context; None outside the context."""
    start: int
    """Training target: the answer's first token, or 0 ([CLS]) when it is not in the window."""
    end: int


def special_ids(tokenizer: Any) -> tuple[int, int, int]:
    """(cls, sep, pad) ids of a tokenizer with BERT's special tokens."""
    found = [tokenizer.tokenizer.token_to_id(t) for t in ("[CLS]", "[SEP]", "[PAD]")]
    if None in found:
        raise ConfigError(
            "the encoder's tokenizer has no [CLS], [SEP] and [PAD] tokens; give a BERT "
            "tokenizer (minilm) or a `lmlab pretrain` checkpoint"
        )
    return found[0], found[1], found[2]


def qa_features(
    examples: list[QAExample], tokenizer: Any, max_length: int = 128, doc_stride: int = 32
) -> list[QAFeature]:
    """Windows over each example's context (see the module docstring).

    ``tokenizer`` wraps a fast ``tokenizers.Tokenizer`` (``.tokenizer``) whose offsets give
    each token's characters. A context of C tokens under a question of Q makes windows of
    ``W = max_length - Q - 3`` tokens starting every ``W - doc_stride`` tokens, until one
    reaches the end.
    """
    cls, sep, _ = special_ids(tokenizer)
    features = []
    for index, ex in enumerate(examples):
        question = tokenizer.tokenizer.encode(ex.question, add_special_tokens=False).ids
        context = tokenizer.tokenizer.encode(ex.context, add_special_tokens=False)
        width = max_length - len(question) - 3
        if width < 1 or doc_stride >= width:
            raise ConfigError(
                f"max_length={max_length} leaves {width} context tokens per window after a "
                f"question of {len(question)} tokens; doc_stride={doc_stride} must be smaller: "
                "raise max_length or lower doc_stride"
            )
        answer_end = ex.answer_start + len(ex.answer)
        offsets = context.offsets
        begin = 0
        while True:
            stop = min(begin + width, len(context.ids))
            first = last = 0
            inside = [
                t for t in range(begin, stop) if _overlaps(offsets[t], ex.answer_start, answer_end)
            ]
            if (
                inside
                and offsets[inside[0]][0] <= ex.answer_start
                and offsets[inside[-1]][1] >= answer_end
            ):
                base = len(question) + 2  # [CLS] question [SEP]
                first, last = base + inside[0] - begin, base + inside[-1] - begin
            features.append(
                QAFeature(
                    example=index,
                    ids=[cls, *question, sep, *context.ids[begin:stop], sep],
                    token_type_ids=[0] * (len(question) + 2) + [1] * (stop - begin + 1),
                    offsets=[None] * (len(question) + 2)
                    + [tuple(o) for o in offsets[begin:stop]]
                    + [None],
                    start=first,
                    end=last,
                )
            )
            if stop >= len(context.ids):
                break
            begin += width - doc_stride
    return features


def _overlaps(span: tuple[int, int], start: int, end: int) -> bool:
    return span[1] > start and span[0] < end
