"""Entity-level scores of BIO tag sequences (CoNLL-2000's conlleval, as seqeval computes them).

A prediction scores per entity, not per word: an entity counts as found only when its type,
first word and last word all match a true entity. Entities are read from BIO tags the
conlleval way, so malformed sequences still mean something: an ``I-X`` that does not follow
``B-X`` or ``I-X`` opens a new entity, as a ``B-X`` would::

    tags      B-PER I-PER O I-LOC I-LOC B-LOC I-ORG
    entities  (PER, 0, 1)   (LOC, 3, 4)   (LOC, 5, 5) (ORG, 6, 6)

Micro-averaged over all entities of all sentences: precision = found / predicted,
recall = found / true, F1 their harmonic mean (0 when there is nothing to divide).

Parity: tests/eval/test_tagging.py compares ``entities`` and ``entity_scores`` with
seqeval's ``get_entities`` and ``precision_score``/``recall_score``/``f1_score`` on random
tag sequences, malformed ones included.
"""

from __future__ import annotations

from collections.abc import Sequence

from lmlab.errors import DataError


def _split(tag: str) -> tuple[str, str]:
    """ "B-PER" -> ("B", "PER"); "O" -> ("O", "")."""
    if tag == "O":
        return "O", ""
    if len(tag) > 2 and tag[0] in "BI" and tag[1] == "-":
        return tag[0], tag[2:]
    raise DataError(f"tag {tag!r} is not BIO: use O, B-TYPE or I-TYPE")


def entities(tags: Sequence[str]) -> list[tuple[str, int, int]]:
    """(type, first word, last word) of each entity in one sentence's BIO ``tags``.

    ["B-PER", "I-PER", "O", "I-LOC"] -> [("PER", 0, 1), ("LOC", 3, 3)]
    """
    found: list[tuple[str, int, int]] = []
    open_type, open_start = "", -1
    for i, tag in enumerate(tags):
        prefix, kind = _split(tag)
        continues = prefix == "I" and open_start >= 0 and kind == open_type
        if open_start >= 0 and not continues:
            found.append((open_type, open_start, i - 1))
            open_start = -1
        if prefix != "O" and not continues:
            open_type, open_start = kind, i
    if open_start >= 0:
        found.append((open_type, open_start, len(tags) - 1))
    return found


def entity_scores(
    true: Sequence[Sequence[str]], predicted: Sequence[Sequence[str]]
) -> dict[str, float]:
    """Micro precision, recall and F1 over the entities of parallel tag sequences."""
    if len(true) != len(predicted):
        raise DataError(f"{len(true)} true tag sequences but {len(predicted)} predicted ones")
    gold, guess = set(), set()
    for n, (t, p) in enumerate(zip(true, predicted)):
        if len(t) != len(p):
            raise DataError(f"sentence {n}: {len(t)} true tags but {len(p)} predicted ones")
        gold |= {(n, *e) for e in entities(t)}
        guess |= {(n, *e) for e in entities(p)}
    right = len(gold & guess)
    precision = right / len(guess) if guess else 0.0
    recall = right / len(gold) if gold else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"precision": precision, "recall": recall, "f1": f1}
