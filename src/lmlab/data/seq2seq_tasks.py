"""Sequence-to-sequence tasks generated on the fly (no download), for the encoder-decoder.

Each task maps a random source string to its target; every pair is drawn from a seeded
``random.Random``, so a (seed, index) pair always gives the same example:

- ``reverse``: ``"kqzf"`` -> ``"fzqk"`` (letters, length 3 to 12);
- ``copy``: the source itself (the sanity check);
- ``dates``: ``"March 5, 2021"`` or ``"5 Mar 2021"`` -> ``"2021-03-05"`` (normalisation);
- ``number-words``: ``"347"`` -> ``"three hundred forty-seven"`` (0 to 999);
- ``toy-translation``: a made-up language with its own words and noun-adjective order
  (``"the red cat sees a small dog"`` -> ``"le cat-o rud vida un dog-o smal"``), so the
  model must reorder as well as translate.

Characters are the tokens (``Seq2SeqVocab``): ids 0, 1, 2 are padding, begin and end.
"""

from __future__ import annotations

import calendar
import random
from collections.abc import Callable

from lmlab.errors import ConfigError, closest

PAD, BOS, EOS = 0, 1, 2
_LETTERS = "abcdefghijklmnopqrstuvwxyz"
_ONES = "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen seventeen eighteen nineteen".split()
_TENS = "_ _ twenty thirty forty fifty sixty seventy eighty ninety".split()


def _reverse(rng: random.Random) -> tuple[str, str]:
    s = "".join(rng.choice(_LETTERS) for _ in range(rng.randint(3, 12)))
    return s, s[::-1]


def _copy(rng: random.Random) -> tuple[str, str]:
    s = "".join(rng.choice(_LETTERS) for _ in range(rng.randint(3, 12)))
    return s, s


def _dates(rng: random.Random) -> tuple[str, str]:
    year, month = rng.randint(1950, 2049), rng.randint(1, 12)
    day = rng.randint(1, calendar.monthrange(year, month)[1])
    name = calendar.month_name[month]
    source = rng.choice(
        [f"{name} {day}, {year}", f"{day} {name[:3]} {year}", f"{day}/{month}/{year}"]
    )
    return source, f"{year:04d}-{month:02d}-{day:02d}"


def number_words(n: int) -> str:
    """0 <= n <= 999 in English words: 347 -> "three hundred forty-seven"."""
    if n < 20:
        return _ONES[n]
    if n < 100:
        tens, ones = divmod(n, 10)
        return _TENS[tens] + (f"-{_ONES[ones]}" if ones else "")
    hundreds, rest = divmod(n, 100)
    return f"{_ONES[hundreds]} hundred" + (f" {number_words(rest)}" if rest else "")


def _number_words(rng: random.Random) -> tuple[str, str]:
    n = rng.randint(0, 999)
    return str(n), number_words(n)


_NOUNS = {"cat": "cat-o", "dog": "dog-o", "bird": "birdo", "fish": "fisko", "horse": "hors"}
_ADJS = {"red": "rud", "small": "smal", "big": "grot", "old": "vek", "happy": "glad"}
_VERBS = {"sees": "vida", "likes": "ama", "follows": "sigu", "finds": "trova"}
_DETS = {"the": "le", "a": "un"}


def _phrase(rng: random.Random) -> tuple[list[str], list[str]]:
    det, noun = rng.choice(list(_DETS)), rng.choice(list(_NOUNS))
    if rng.random() < 0.6:
        adj = rng.choice(list(_ADJS))
        return [det, adj, noun], [_DETS[det], _NOUNS[noun], _ADJS[adj]]  # noun before adjective
    return [det, noun], [_DETS[det], _NOUNS[noun]]


def _toy_translation(rng: random.Random) -> tuple[str, str]:
    subj_en, subj_xx = _phrase(rng)
    verb = rng.choice(list(_VERBS))
    obj_en, obj_xx = _phrase(rng)
    return " ".join([*subj_en, verb, *obj_en]), " ".join([*subj_xx, _VERBS[verb], *obj_xx])


TASKS: dict[str, Callable[[random.Random], tuple[str, str]]] = {
    "reverse": _reverse,
    "copy": _copy,
    "dates": _dates,
    "number-words": _number_words,
    "toy-translation": _toy_translation,
}


def seq2seq_pairs(task: str, n: int, seed: int) -> list[tuple[str, str]]:
    """``n`` (source, target) pairs of ``task``, drawn from ``seed``."""
    if task not in TASKS:
        raise ConfigError(
            f"unknown seq2seq task {task!r}{closest(task, list(TASKS))}; valid: {', '.join(TASKS)}"
        )
    rng = random.Random(f"{task}:{seed}")
    return [TASKS[task](rng) for _ in range(n)]


class Seq2SeqVocab:
    """Characters as tokens, with padding, begin and end at ids 0, 1, 2 (``encode`` adds
    neither begin nor end; ``decode`` drops all three)."""

    def __init__(self, chars: str):
        self.chars = "".join(sorted(set(chars)))
        self.index = {c: i + 3 for i, c in enumerate(self.chars)}
        self.vocab_size = len(self.chars) + 3
        self.eos_id, self.bos_id, self.pad_id = EOS, BOS, PAD

    @classmethod
    def for_task(cls, task: str) -> Seq2SeqVocab:
        """Every character the task can produce (from many draws; the alphabets are small)."""
        pairs = seq2seq_pairs(task, 4000, seed=-1)
        return cls("".join(s + t for s, t in pairs) + _LETTERS + "0123456789 -,/")

    def encode(self, text: str) -> list[int]:
        try:
            return [self.index[c] for c in text]
        except KeyError as e:
            raise ConfigError(f"character {e.args[0]!r} is not in this task's vocabulary") from None

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return "".join(self.chars[i - 3] for i in ids if i >= 3)
