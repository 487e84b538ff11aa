"""Minimal pairs (BLiMP) and social-bias sentence pairs (CrowS-Pairs) for causal LMs.

**Minimal pairs.** BLiMP (Warstadt et al. 2020, "BLiMP: The Benchmark of Linguistic
Minimal Pairs for English", TACL) tests grammatical knowledge with pairs of sentences that
differ in one spot, one acceptable and one not::

    good: "The cats on the mat are asleep."      bad: "The cats on the mat is asleep."

A model "knows" the phenomenon when it gives the good sentence the higher probability. The
paper compares the sentences in two ways, both here:

- ``method="full"`` (the paper's main "simple LM method"): the total log-probability of
  each whole sentence. We score every token of the sentence after one end-of-document
  token when the tokenizer has one (as lm-evaluation-harness's ``blimp`` task does, with an
  empty context); a tokenizer without one (char, byte) cannot condition the first token on
  anything, so the sentence is scored from its *second* token. ``result.start`` says which.
- ``method="prefix"`` (the paper's "one-prefix method"): when the two sentences are the
  same except for one word, compare log p(good word | shared prefix) with
  log p(bad word | shared prefix); whatever follows the word is ignored. The shared prefix
  is found at the word level (words and punctuation marks, see ``split_at_one_word``); a
  pair of another shape (two words differ, a different word count, the first word
  differs) is scored with ``full`` instead, and ``result.fallbacks`` counts those.

A pair is correct when log p(good) > log p(bad) strictly (a tie counts as wrong). Accuracy
is reported overall and per phenomenon (BLiMP's ``UID`` and ``linguistics_term`` fields).

**Social-bias pairs.** CrowS-Pairs (Nangia et al. 2020, "CrowS-Pairs: A Challenge Dataset
for Measuring Social Biases in Masked Language Models", EMNLP) pairs a sentence that is
more stereotyping (``sent_more``) with a minimally different less stereotyping one
(``sent_less``). The bias score is the percentage of pairs where the model prefers
``sent_more``: 50 means no preference either way, higher means the model prefers the
stereotype. The original paper scores masked LMs with a pseudo-log-likelihood over the
tokens the two sentences share; a causal LM has a true sentence probability, so, like later
causal-LM evaluations (lm-evaluation-harness's ``crows_pairs`` tasks), we compare the
full-sentence log-probabilities (``sentence_logprobs``). We report ``pct_stereotype``
overall, per ``bias_type`` and per direction (``stereo``/``antistereo``), and, as the
harness does, ``likelihood_diff``: the mean |log p(sent_more) - log p(sent_less)|.

Bundled data (``src/lmlab/eval/tasks/``): ``minimal_pairs.jsonl`` (48 pairs over six
phenomena: subject-verb, determiner-noun and anaphor agreement, irregular past tense, NPI
licensing, word order) and ``bias_pairs.csv`` (20 mild pairs: gender and occupations, age,
socioeconomic status) were written for lmlab, in the layouts of BLiMP and CrowS-Pairs; no
row is copied from either benchmark. They are for teaching and smoke tests: far too small
to rank models.

Tests (tests/eval/test_pairs.py): the full method equals the sum of the token
log-probabilities computed by hand on a tiny model; the prefix method equals a direct
``score_continuations`` call on (prefix, word).
"""

from __future__ import annotations

import csv
import os
import re
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

from lmlab.data.instructions import read_rows
from lmlab.errors import ConfigError, DataError, DataNotFoundError
from lmlab.eval.scoring import score_continuations, score_token_pairs
from lmlab.lm import LM

TASKS_DIR = Path(__file__).parent / "tasks"
MINIMAL_PAIRS_FILE = TASKS_DIR / "minimal_pairs.jsonl"
BIAS_PAIRS_FILE = TASKS_DIR / "bias_pairs.csv"

BLIMP_EXPECTED = (
    "expected 'sentence_good' and 'sentence_bad' (BLiMP layout), with optional 'field', "
    "'linguistics_term', 'UID', 'pair_id'"
)
CROWS_COLUMNS = ("sent_more", "sent_less", "stereo_antistereo", "bias_type")
DIRECTIONS = ("stereo", "antistereo")
METHODS = ("full", "prefix")
UNKNOWN = "unknown"
"""The phenomenon name of a pair without a ``UID``/``linguistics_term``."""


# ----------------------------------------------------------------------------- reading


@dataclass(frozen=True)
class MinimalPair:
    """One BLiMP-style pair: an acceptable sentence and a minimally different bad one."""

    good: str
    bad: str
    uid: str = UNKNOWN
    """The phenomenon (BLiMP's ``UID``, e.g. ``"regular_plural_subject_verb_agreement_1"``)."""
    linguistics_term: str = UNKNOWN
    """The broader phenomenon (e.g. ``"subject_verb_agreement"``)."""
    field: str = ""
    """The area of linguistics (``"morphology"``, ``"syntax"``, ``"semantics"``)."""
    pair_id: Any = None
    source: str = ""
    """Where it was read (``"file.jsonl:12"``), for messages."""

    def __post_init__(self) -> None:
        where = self.source or "minimal pair"
        for name in ("good", "bad"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value.strip():
                raise DataError(
                    f"{where}: sentence_{name} must be a non-empty string, got {value!r}; "
                    f"{BLIMP_EXPECTED}"
                )


def read_minimal_pairs(path: str | os.PathLike | None = None) -> list[MinimalPair]:
    """The pairs of a BLiMP-layout JSONL file (default: the bundled ``minimal_pairs.jsonl``).

        {"sentence_good": "The dog barks.", "sentence_bad": "The dog bark.",
         "field": "morphology", "linguistics_term": "subject_verb_agreement",
         "UID": "sv_agreement_simple", "pair_id": 0}

    Other keys (BLiMP's ``one_prefix_method``, ``lexically_identical``, ...) are ignored.
    A missing file, a bad line or a missing sentence is an error naming ``file:line``.
    """
    rows = read_rows(path or MINIMAL_PAIRS_FILE, what="minimal-pairs file", expected=BLIMP_EXPECTED)
    pairs = []
    for where, row in rows:
        missing = [k for k in ("sentence_good", "sentence_bad") if k not in row]
        if missing:
            raise DataError(
                f"{where}: missing {' and '.join(map(repr, missing))}; {BLIMP_EXPECTED}; "
                f"the line has keys {sorted(row)}"
            )
        pairs.append(
            MinimalPair(
                good=row["sentence_good"],
                bad=row["sentence_bad"],
                uid=str(row.get("UID") or row.get("linguistics_term") or UNKNOWN),
                linguistics_term=str(row.get("linguistics_term") or row.get("UID") or UNKNOWN),
                field=str(row.get("field") or ""),
                pair_id=row.get("pair_id"),
                source=where,
            )
        )
    return pairs


@dataclass(frozen=True)
class BiasPair:
    """One CrowS-Pairs-style pair: a more and a less stereotyping sentence."""

    sent_more: str
    sent_less: str
    direction: Literal["stereo", "antistereo"]
    """``stereo``: ``sent_more`` states a stereotype about a disadvantaged group;
    ``antistereo``: ``sent_less`` goes against such a stereotype (so ``sent_more``, about
    the contrasting group, is still the more stereotypical of the two)."""
    bias_type: str
    source: str = ""

    def __post_init__(self) -> None:
        where = self.source or "bias pair"
        for name in ("sent_more", "sent_less", "bias_type"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value.strip():
                raise DataError(f"{where}: {name} must be a non-empty string, got {value!r}")
        if self.direction not in DIRECTIONS:
            raise DataError(
                f"{where}: stereo_antistereo={self.direction!r} is invalid; valid: "
                f"{', '.join(DIRECTIONS)}"
            )


def read_bias_pairs(path: str | os.PathLike | None = None) -> list[BiasPair]:
    """The pairs of a CSV in CrowS-Pairs' published layout (default: the bundled
    ``bias_pairs.csv``): a header row with at least ``sent_more``, ``sent_less``,
    ``stereo_antistereo`` and ``bias_type`` (other columns, such as the unnamed index and
    ``annotations``, are ignored). Fields are parsed with the csv module, so quoted fields
    may hold commas, doubled quotes and newlines. Errors name ``file:line``.
    """
    path = Path(path or BIAS_PAIRS_FILE)
    if not path.is_file():
        raise DataNotFoundError(f"bias-pairs file {str(path)!r} does not exist")
    expected = f"expected columns {', '.join(CROWS_COLUMNS)} (CrowS-Pairs layout)"
    pairs = []
    with path.open(encoding="utf-8-sig", newline="") as f:
        reader = csv.reader(f)
        try:
            header = next(reader, None)
            if header is None:
                raise DataError(f"{path}: the file is empty; {expected}")
            missing = [c for c in CROWS_COLUMNS if c not in header]
            if missing:
                raise DataError(
                    f"{path}:1: missing column(s) {', '.join(map(repr, missing))}; {expected}; "
                    f"the header has {header}"
                )
            column = {name: header.index(name) for name in CROWS_COLUMNS}
            while True:
                line = reader.line_num + 1  # where the next record starts
                row = next(reader, None)
                if row is None:
                    break
                where = f"{path}:{line}"
                if not row:
                    continue  # a blank line
                if len(row) != len(header):
                    raise DataError(
                        f"{where}: {len(row)} fields where the header has {len(header)}; "
                        "quote fields that hold commas"
                    )
                get = {name: row[i] for name, i in column.items()}
                pairs.append(
                    BiasPair(
                        get["sent_more"],
                        get["sent_less"],
                        get["stereo_antistereo"].strip(),  # type: ignore[arg-type]
                        get["bias_type"].strip(),
                        source=where,
                    )
                )
        except csv.Error as e:
            raise DataError(f"{path}:{reader.line_num}: malformed CSV: {e}") from e
        except UnicodeDecodeError as e:
            raise DataError(f"{path}: not valid UTF-8 ({e.reason} at byte {e.start})") from e
    if not pairs:
        raise DataError(f"{path}: no pairs under the header; {expected}")
    return pairs


# ----------------------------------------------------------------------------- scoring


_WORD = re.compile(r"\w+(?:['’]\w+)*|[^\w\s]")
"""A word (letters/digits, with inner apostrophes: "don't") or one punctuation mark."""


def split_at_one_word(good: str, bad: str) -> tuple[str, str, str] | None:
    """(shared prefix, good word, bad word) when the sentences differ in exactly one word
    after a non-empty shared prefix, else None (the one-prefix method cannot score them).

        ("The cats are here.", "The cats is here.") -> ("The cats ", "are", "is")
        ("She ate.", "She eated.")                  -> ("She ", "ate", "eated")
        ("He left.", "Left he.")                    -> None    (first and second differ)
    """
    g = [(m.group(), m.start(), m.end()) for m in _WORD.finditer(good)]
    b = [(m.group(), m.start(), m.end()) for m in _WORD.finditer(bad)]
    if len(g) != len(b):
        return None
    differ = [i for i in range(len(g)) if g[i][0] != b[i][0]]
    if len(differ) != 1 or differ[0] == 0:
        return None
    (gw, gs, ge), (bw, bs, be) = g[differ[0]], b[differ[0]]
    if good[:gs] != bad[:bs] or good[ge:] != bad[be:]:  # same words, other spacing
        return None
    return good[:gs], gw, bw


def sentence_logprobs(
    lm: LM, sentences: Sequence[str], batch_size: int = 16, progress: bool = False
) -> tuple[list[float], str]:
    """Total log-probability (nats) of each sentence, and what it was conditioned on.

    After the end-of-document token when ``lm.tokenizer`` has one (``"eos"``: every token
    is scored), else from the second token (``"second token"``: the first token is the
    context, and its own probability is left out).
    """
    tok = lm.tokenizer
    eos = getattr(tok, "eos_id", None)
    pairs = []
    for i, sentence in enumerate(sentences):
        ids = tok.encode(sentence)
        if eos is not None:
            pairs.append(([eos], ids))
        elif len(ids) >= 2:
            pairs.append((ids[:1], ids[1:]))
        else:
            raise DataError(
                f"sentence {i} ({sentence!r}) is a single token and the tokenizer has no "
                "end-of-document token to score it after: nothing to compare"
            )
    scores = score_token_pairs(lm.model, pairs, batch_size, progress)
    return [s.logprob for s in scores], "eos" if eos is not None else "second token"


@dataclass(frozen=True)
class PairScore:
    """The scores of one minimal pair."""

    good_logprob: float
    bad_logprob: float
    method: Literal["full", "prefix"]
    """How this pair was scored (``full`` for a fallback of the prefix method)."""
    uid: str
    linguistics_term: str
    pair_id: Any = None
    source: str = ""

    @property
    def diff(self) -> float:
        """log p(good) - log p(bad): positive when the model prefers the good sentence."""
        return self.good_logprob - self.bad_logprob

    @property
    def correct(self) -> bool:
        return self.diff > 0


def _share_by(
    items: Sequence[Any], key: str, hit: str, name: str, scale: float = 1.0
) -> dict[str, dict[str, float]]:
    """``{group: {name: scale * share of items whose ``hit`` is true, "n": count}}``, the
    items grouped by their attribute ``key``, groups in sorted order."""
    groups: dict[str, list[Any]] = defaultdict(list)
    for item in items:
        groups[getattr(item, key)].append(item)
    return {
        group: {name: scale * sum(getattr(i, hit) for i in g) / len(g), "n": len(g)}
        for group, g in sorted(groups.items())
    }


def _accuracy_by(items: Sequence[PairScore], key: str) -> dict[str, dict[str, float]]:
    return _share_by(items, key, "correct", "accuracy")


@dataclass(frozen=True)
class MinimalPairsResult:
    """Accuracy of an LM on minimal pairs (see the module docstring)."""

    method: str
    accuracy: float
    n: int
    by_uid: dict[str, dict[str, float]]
    """``{UID: {"accuracy", "n"}}``."""
    by_term: dict[str, dict[str, float]]
    """``{linguistics_term: {"accuracy", "n"}}``."""
    fallbacks: int
    """Pairs the prefix method could not score (not one differing word): scored ``full``."""
    start: str | None
    """What whole sentences were conditioned on: ``"eos"`` or ``"second token"`` (None when
    the prefix method scored every pair)."""
    items: tuple[PairScore, ...]
    skipped: tuple[str, ...] = ()
    """Pairs the tokenizer cannot encode ("source: reason"); they count in no score."""

    def to_dict(self) -> dict[str, Any]:
        out = {k: v for k, v in asdict(self).items() if k != "items"}
        out["items"] = [{**asdict(i), "diff": i.diff, "correct": i.correct} for i in self.items]
        return out

    def summary(self) -> str:
        extra = f", {self.fallbacks} scored in full" if self.method == "prefix" else ""
        return (
            f"minimal pairs ({self.method}): accuracy {100 * self.accuracy:.1f}% "
            f"on {self.n} pairs{extra}"
            + (f" ({len(self.skipped)} skipped: not encodable)" if self.skipped else "")
        )

    def rows(self) -> list[tuple[str, float, int]]:
        """(linguistics_term, accuracy, n) per phenomenon, for a report table."""
        return [(k, v["accuracy"], int(v["n"])) for k, v in self.by_term.items()]


def encodable(lm: LM, pairs: Sequence, texts: Any, what: str) -> tuple[list, tuple[str, ...]]:
    """(the pairs whose sentences ``lm.tokenizer`` encodes, "source: reason" of the others).

    A character vocabulary may lack a quote mark or a digit: such a pair is skipped and
    counted rather than ending the evaluation; DataError if no pair is left.
    """
    encode = getattr(getattr(lm, "tokenizer", None), "encode", len)  # len: nothing to check
    kept, skipped = [], []
    for p in pairs:
        try:
            for text in texts(p):
                encode(text)
        except DataError as e:
            skipped.append(f"{p.source}: {e}")
            continue
        kept.append(p)
    if not kept:
        raise DataError(f"the tokenizer encodes none of the {len(pairs)} {what}; {skipped[0]}")
    return kept, tuple(skipped)


def evaluate_minimal_pairs(
    lm: LM,
    pairs: Sequence[MinimalPair] | str | os.PathLike | None = None,
    method: Literal["full", "prefix"] = "full",
    batch_size: int = 16,
    progress: bool = False,
) -> MinimalPairsResult:
    """Score ``pairs`` (a list, a BLiMP-layout JSONL path, or None for the bundled file)
    with ``lm`` and count how often the good sentence is the more probable one."""
    if method not in METHODS:
        raise ConfigError(f"method={method!r} is invalid; valid: {', '.join(METHODS)}")
    if pairs is None or isinstance(pairs, (str, os.PathLike)):
        pairs = read_minimal_pairs(pairs)
    if not pairs:
        raise DataError("no minimal pairs to evaluate")
    pairs, skipped = encodable(lm, pairs, lambda p: (p.good, p.bad), "minimal pairs")
    split = [split_at_one_word(p.good, p.bad) if method == "prefix" else None for p in pairs]
    whole = [i for i, s in enumerate(split) if s is None]
    scores: dict[int, tuple[float, float, str]] = {}
    start = None
    if whole:
        sentences = [s for i in whole for s in (pairs[i].good, pairs[i].bad)]
        logprobs, start = sentence_logprobs(lm, sentences, batch_size, progress)
        for k, i in enumerate(whole):
            scores[i] = (logprobs[2 * k], logprobs[2 * k + 1], "full")
    one_word = [i for i, s in enumerate(split) if s is not None]
    if one_word:
        requests = [(split[i][0], w) for i in one_word for w in split[i][1:]]  # type: ignore[index]
        got = score_continuations(lm, requests, batch_size, progress)
        for k, i in enumerate(one_word):
            scores[i] = (got[2 * k].logprob, got[2 * k + 1].logprob, "prefix")
    items = tuple(
        PairScore(*scores[i], p.uid, p.linguistics_term, p.pair_id, p.source)  # type: ignore[arg-type]
        for i, p in enumerate(pairs)
    )
    return MinimalPairsResult(
        method=method,
        accuracy=sum(i.correct for i in items) / len(items),
        n=len(items),
        by_uid=_accuracy_by(items, "uid"),
        by_term=_accuracy_by(items, "linguistics_term"),
        fallbacks=len(whole) if method == "prefix" else 0,
        start=start,
        items=items,
        skipped=skipped,
    )


# ----------------------------------------------------------------------------- bias


@dataclass(frozen=True)
class BiasItem:
    """The scores of one bias pair."""

    more_logprob: float
    less_logprob: float
    direction: str
    bias_type: str
    source: str = ""

    @property
    def prefers_more(self) -> bool:
        """The model gives the more stereotyping sentence the higher probability (a tie
        counts as no, as in the harness)."""
        return self.more_logprob > self.less_logprob


def _pct_by(items: Sequence[BiasItem], key: str) -> dict[str, dict[str, float]]:
    return _share_by(items, key, "prefers_more", "pct_stereotype", scale=100)


@dataclass(frozen=True)
class BiasResult:
    """How often an LM prefers the more stereotyping sentence (50 = no preference)."""

    pct_stereotype: float
    """Percentage of pairs with log p(sent_more) > log p(sent_less)."""
    n: int
    likelihood_diff: float
    """Mean |log p(sent_more) - log p(sent_less)| in nats (the harness's metric)."""
    by_bias_type: dict[str, dict[str, float]]
    by_direction: dict[str, dict[str, float]]
    ties: int
    start: str
    """What sentences were conditioned on: ``"eos"`` or ``"second token"``."""
    items: tuple[BiasItem, ...]
    skipped: tuple[str, ...] = ()
    """Pairs the tokenizer cannot encode ("source: reason"); they count in no score."""

    def to_dict(self) -> dict[str, Any]:
        out = {k: v for k, v in asdict(self).items() if k != "items"}
        out["items"] = [{**asdict(i), "prefers_more": i.prefers_more} for i in self.items]
        return out

    def summary(self) -> str:
        return (
            f"bias pairs: prefers the more stereotyping sentence in "
            f"{self.pct_stereotype:.1f}% of {self.n} pairs (50 = no preference)"
            + (f" ({len(self.skipped)} skipped: not encodable)" if self.skipped else "")
        )

    def rows(self) -> list[tuple[str, float, int]]:
        """(bias_type, pct_stereotype, n), for a report table."""
        return [(k, v["pct_stereotype"], int(v["n"])) for k, v in self.by_bias_type.items()]


def bias_score(
    lm: LM,
    pairs: Sequence[BiasPair] | str | os.PathLike | None = None,
    batch_size: int = 16,
    progress: bool = False,
) -> BiasResult:
    """The CrowS-Pairs bias score of ``lm`` on ``pairs`` (a list, a CSV path, or None for
    the bundled file), from full-sentence log-probabilities (see the module docstring)."""
    if pairs is None or isinstance(pairs, (str, os.PathLike)):
        pairs = read_bias_pairs(pairs)
    if not pairs:
        raise DataError("no bias pairs to evaluate")
    pairs, skipped = encodable(lm, pairs, lambda p: (p.sent_more, p.sent_less), "bias pairs")
    sentences = [s for p in pairs for s in (p.sent_more, p.sent_less)]
    logprobs, start = sentence_logprobs(lm, sentences, batch_size, progress)
    items = tuple(
        BiasItem(logprobs[2 * k], logprobs[2 * k + 1], p.direction, p.bias_type, p.source)
        for k, p in enumerate(pairs)
    )
    return BiasResult(
        pct_stereotype=100 * sum(i.prefers_more for i in items) / len(items),
        n=len(items),
        likelihood_diff=sum(abs(i.more_logprob - i.less_logprob) for i in items) / len(items),
        by_bias_type=_pct_by(items, "bias_type"),
        by_direction=_pct_by(items, "direction"),
        ties=sum(i.more_logprob == i.less_logprob for i in items),
        start=start,
        items=items,
        skipped=skipped,
    )
