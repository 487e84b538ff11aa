"""Byte-pair encoding from scratch, in plain Python, to be read.

BPE (Sennrich et al. 2016, after Gage 1994) builds a vocabulary bottom-up: start from the
characters, count every pair of adjacent symbols in the corpus, merge the most frequent pair
into one new symbol, and repeat until the vocabulary has the size you asked for. Encoding
a new word replays the learned merges in the order they were learned.

A worked example. The corpus "low low low lower newest newest" has the words
low x3, lower x1, newest x2. Split into characters, the pair counts are

    (l, o) 4   (o, w) 4   (w, e) 3   (e, s) 2   (s, t) 2   (n, e) 2   (e, w) 2   (e, r) 1

(l, o) and (o, w) tie at 4; ties go to the pair whose symbols have the smaller ids, and
ids are given in character order (e < l < n < o < r < s < t < w), so (l, o) wins:

    merge 1: l + o -> lo     words: lo w x3, lo w e r x1, n e w e s t x2
    merge 2: lo + w -> low   (count 4)
    merge 3: e + s -> es     (count 2; (n, e), (e, w), (s, t) also have 2, and (e, s) has the smallest ids)
    merge 4: es + t -> est   ...

>>> bpe = BPE.train("low low low lower newest newest", vocab_size=14)
>>> bpe.merges[:3]
[('l', 'o'), ('lo', 'w'), ('e', 's')]
>>> bpe.tokenize("lowest")
['low', 'est']

The trainer follows the Hugging Face ``tokenizers`` library's BPE trainer step for step, so
that both learn the same merges from the same words (tests/data/test_bpe.py checks this
on random corpora): special tokens get the first ids, then the characters seen, sorted by
code point; each merge takes the pair with the highest count, ties broken by the smaller
(left id, right id); a pair is counted once per place it occurs (so "a a a" holds (a, a)
twice) and merged left to right; training stops at ``vocab_size`` symbols, or when the best
pair occurs fewer than ``min_frequency`` times. One detail of ``tokenizers`` is kept too,
because it changes results on some corpora: a merge is applied to the words where its pair
was counted when it entered the queue, and a pair that a later merge creates again in
other words enters the queue again, for those words.

Pre-tokenization splits text into words with the regular expression ``\\w+|[^\\w\\s]+`` (runs
of word characters, runs of other non-space characters), the same split as ``tokenizers``'
``Whitespace`` pre-tokenizer; whitespace itself is dropped, so decoding joins tokens with
nothing and cannot restore spaces (this is a tokenizer to learn from; lmlab's byte-level
BPE, ``lmlab.data.tokenizers.BPETokenizer``, is the one that round-trips any text).
"""

from __future__ import annotations

import heapq
import re
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field

from lmlab.errors import ConfigError

WORD = re.compile(r"\w+|[^\w\s]+")


def pre_tokenize(text: str) -> list[str]:
    """Split text into words: ``"Hi, you!"`` -> ``["Hi", ",", "you", "!"]``."""
    return WORD.findall(text)


def merge_word(symbols: list[int], a: int, b: int, new: int) -> list[tuple[tuple[int, int], int]]:
    """Merge every (a, b) in ``symbols`` left to right, in place, into ``new``.

    Returns the pair-count changes this makes in the word: ``((x, a), -1), ((x, new), +1)``
    for the symbol x before each merge, and the same for the symbol after it.

    >>> w = [1, 1, 1, 2]
    >>> merge_word(w, 1, 1, 9)
    [((1, 1), -1), ((9, 1), 1)]
    >>> w
    [9, 1, 2]
    """
    changes: list[tuple[tuple[int, int], int]] = []
    i = 0
    while i < len(symbols) - 1:
        if symbols[i] == a and symbols[i + 1] == b:
            if i > 0:
                before = symbols[i - 1]
                changes += [((before, a), -1), ((before, new), 1)]
            symbols[i : i + 2] = [new]
            if i < len(symbols) - 1:
                after = symbols[i + 1]
                changes += [((b, after), -1), ((new, after), 1)]
        i += 1
    return changes


@dataclass
class BPE:
    """A trained BPE model: its vocabulary (symbol -> id) and its merges in order."""

    vocab: dict[str, int]
    merges: list[tuple[str, str]]
    special_tokens: list[str] = field(default_factory=list)

    @classmethod
    def train(
        cls,
        text: str | Iterable[str],
        vocab_size: int,
        min_frequency: int = 0,
        special_tokens: Iterable[str] = (),
    ) -> BPE:
        """Learn merges from ``text`` (a string, or an iterable of strings such as lines)."""
        if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < 1:
            raise ConfigError(f"vocab_size={vocab_size!r} is invalid: must be a positive integer")
        if (
            isinstance(min_frequency, bool)
            or not isinstance(min_frequency, int)
            or min_frequency < 0
        ):
            raise ConfigError(
                f"min_frequency={min_frequency!r} is invalid: must be an integer >= 0"
            )
        pieces = [text] if isinstance(text, str) else list(text)
        word_counts = Counter(word for piece in pieces for word in pre_tokenize(piece))

        # 1. The first ids: special tokens, then every character seen, by code point.
        names: list[str] = []
        ids: dict[str, int] = {}

        def add(symbol: str) -> int:
            if symbol not in ids:
                ids[symbol] = len(names)
                names.append(symbol)
            return ids[symbol]

        specials = list(special_tokens)
        for token in specials:
            add(token)
        for char in sorted({c for word in word_counts for c in word}):
            add(char)

        # 2. Every word as a list of symbol ids, with how often it occurs.
        words = [[ids[c] for c in word] for word in word_counts]
        counts = list(word_counts.values())

        # 3. Count the pairs, and remember in which words each occurs.
        pair_count: Counter[tuple[int, int]] = Counter()
        where: dict[tuple[int, int], set[int]] = {}
        for w, symbols in enumerate(words):
            for pair in zip(symbols, symbols[1:]):
                pair_count[pair] += counts[w]
                where.setdefault(pair, set()).add(w)

        # The queue: highest count first, then the smaller pair. Counts in the queue may be
        # stale (a merge lowered them); a stale entry is corrected and put back when popped.
        queue: list[tuple[int, tuple[int, int], int]] = []
        places: list[set[int]] = []

        def push(pair: tuple[int, int], words_with_it: set[int]) -> None:
            places.append(words_with_it)
            heapq.heappush(queue, (-pair_count[pair], pair, len(places) - 1))

        for pair, words_with_it in where.items():
            if pair_count[pair] > 0:
                push(pair, words_with_it)

        # 4. Merge until the vocabulary is big enough.
        merges: list[tuple[str, str]] = []
        while len(ids) < vocab_size and queue:
            negative, pair, entry = heapq.heappop(queue)
            if -negative != pair_count[pair]:
                heapq.heappush(queue, (-pair_count[pair], pair, entry))
                continue
            if -negative < 1 or -negative < min_frequency:
                break
            a, b = pair
            new = add(names[a] + names[b])
            merges.append((names[a], names[b]))
            created: dict[tuple[int, int], set[int]] = {}
            for w in sorted(places[entry]):
                for changed, sign in merge_word(words[w], a, b, new):
                    pair_count[changed] += sign * counts[w]
                    if sign > 0:
                        created.setdefault(changed, set()).add(w)
            for changed, words_with_it in created.items():
                if pair_count[changed] > 0:
                    push(changed, words_with_it)
        return cls(vocab=ids, merges=merges, special_tokens=specials)

    def _ranks(self) -> dict[tuple[str, str], int]:
        # A pair learned twice keeps its later rank, as tokenizers' merge table does.
        return {pair: rank for rank, pair in enumerate(self.merges)}

    def tokenize_word(
        self, word: str, ranks: dict[tuple[str, str], int] | None = None
    ) -> list[str]:
        """Split one word into symbols by replaying the merges: repeatedly merge the adjacent
        pair that was learned first (the leftmost, when it occurs twice). Characters outside
        the vocabulary are dropped, as ``tokenizers`` does for a BPE without an unknown token."""
        ranks = self._ranks() if ranks is None else ranks
        symbols = [c for c in word if c in self.vocab]
        while len(symbols) > 1:
            best = min(
                range(len(symbols) - 1),
                key=lambda i: (ranks.get((symbols[i], symbols[i + 1]), len(ranks)), i),
            )
            if (symbols[best], symbols[best + 1]) not in ranks:
                break
            symbols[best : best + 2] = [symbols[best] + symbols[best + 1]]
        return symbols

    def tokenize(self, text: str) -> list[str]:
        ranks = self._ranks()
        return [s for word in pre_tokenize(text) for s in self.tokenize_word(word, ranks)]

    def encode(self, text: str) -> list[int]:
        return [self.vocab[s] for s in self.tokenize(text)]

    def decode(self, ids: Iterable[int]) -> str:
        """The symbols joined with nothing (pre-tokenization dropped the spaces)."""
        names = {i: s for s, i in self.vocab.items()}
        out = []
        for i in ids:
            if i not in names:
                raise ConfigError(
                    f"token id {i} is out of range: valid ids are 0..{len(names) - 1}"
                )
            out.append(names[i])
        return "".join(out)
