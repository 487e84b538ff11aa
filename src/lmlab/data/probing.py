"""Labelled tasks for probing, generated here (no downloads), seeded and deterministic.

A probing task asks whether a label can be read off a model's representation of a word.
Each task is a list of ``LabelledText``: the words of one text, the string written before
each word, and one label per word (None for words the task does not probe)::

    pos                  "The old dogs near a farmer watch the ducks ."
                          DET ADJ NOUN  ADP DET NOUN  VERB  DET NOUN  PUNCT
    number               "The dog near the farmers watched a bird ."   -> "singular" at
                          "watched": the subject's number at the verb; past-tense verbs do
                          not show it and half the subjects carry an "attractor" noun of
                          the other number in a prepositional phrase (Linzen et al. 2016)
    shakespeare-speaker  each character of a Tiny Shakespeare passage: "name" inside a
                          speaker's name line ("ROMEO:"), "speech" elsewhere
    shakespeare-class    each character's class: upper, vowel, consonant, space, punct

The grammar of ``pos`` and ``number`` is small but, as in real text, some words take
several tags: "watch", "book", "plant", "duck", "fish", "light", "park", "walk" are nouns
and verbs ("the ducks duck", "a light light"), "like" is a verb and a preposition, "fast"
an adjective and an adverb. So a probe cannot reach 100% on ``pos`` by word identity alone
(``type_ceiling`` says how far identity goes).

The Shakespeare tasks are for character-level models (one character, one token); they
read the validation split (``split_text(text, 0.1)[1]``), which a model trained on Tiny
Shakespeare never saw. ``shakespeare-class`` is a property of the character type itself,
so a probe that only remembers types solves it: it is there as the easy contrast.
"""

from __future__ import annotations

import random
import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

from lmlab.data.corpus import load_corpus, split_text
from lmlab.errors import ConfigError, closest


@dataclass(frozen=True)
class LabelledText:
    """One text of a probing task: ``"".join(s + w for s, w in zip(seps, words))``."""

    words: tuple[str, ...]
    """The units a label belongs to (words; characters for the Shakespeare tasks)."""
    seps: tuple[str, ...]
    """What is written before each word ("" for the first word and before "." or a character)."""
    labels: tuple[str | None, ...]
    """One label per word; None where the task does not probe the word."""

    @property
    def text(self) -> str:
        return "".join(s + w for s, w in zip(self.seps, self.words, strict=True))


@dataclass(frozen=True)
class ProbingTask:
    name: str
    texts: tuple[LabelledText, ...]
    classes: tuple[str, ...]
    """The labels, in a fixed order (class index = position here)."""
    about: str

    def labelled(self) -> list[tuple[int, int, str, str]]:
        """(text index, word index, word type, label) for every probed word."""
        return [
            (i, j, w, lab)
            for i, t in enumerate(self.texts)
            for j, (w, lab) in enumerate(zip(t.words, t.labels, strict=True))
            if lab is not None
        ]


# ----------------------------------------------------------------------------- the grammar

# nouns: (singular, plural); the first group are also verbs below
NOUNS = (
    [("watch", "watches"), ("book", "books"), ("plant", "plants"), ("duck", "ducks")]
    + [("fish", "fish"), ("light", "lights"), ("park", "parks"), ("walk", "walks")]
    + [("dog", "dogs"), ("cat", "cats"), ("child", "children"), ("man", "men")]
    + [("woman", "women"), ("farmer", "farmers"), ("teacher", "teachers"), ("king", "kings")]
    + [("queen", "queens"), ("bird", "birds"), ("horse", "horses"), ("boy", "boys")]
    + [("girl", "girls"), ("friend", "friends"), ("doctor", "doctors"), ("sailor", "sailors")]
    + [("student", "students"), ("soldier", "soldiers"), ("baker", "bakers"), ("box", "boxes")]
    + [("apple", "apples"), ("house", "houses"), ("letter", "letters"), ("song", "songs")]
    + [("river", "rivers"), ("garden", "gardens"), ("ball", "balls"), ("door", "doors")]
)
ANIMATE = frozenset(
    "dog cat child man woman farmer teacher king queen bird horse boy girl friend doctor "
    "sailor student soldier baker duck fish".split()
)
"""Nouns that may be a subject (singular forms)."""
# verbs: (3rd person singular, base = plural present, past)
TRANSITIVE = (
    [("sees", "see", "saw"), ("watches", "watch", "watched"), ("books", "book", "booked")]
    + [("plants", "plant", "planted"), ("likes", "like", "liked"), ("finds", "find", "found")]
    + [("helps", "help", "helped"), ("visits", "visit", "visited"), ("carries", "carry", "carried")]
    + [("paints", "paint", "painted"), ("opens", "open", "opened"), ("lights", "light", "lit")]
    + [("follows", "follow", "followed"), ("loves", "love", "loved"), ("parks", "park", "parked")]
)
INTRANSITIVE = (
    [("sleeps", "sleep", "slept"), ("runs", "run", "ran"), ("walks", "walk", "walked")]
    + [("sings", "sing", "sang"), ("laughs", "laugh", "laughed"), ("swims", "swim", "swam")]
    + [("fishes", "fish", "fished"), ("ducks", "duck", "ducked"), ("waits", "wait", "waited")]
)
ADJECTIVES = "old young big small happy quiet red green tall brave kind clever light fast".split()
ADVERBS = "quickly slowly quietly often today fast again later".split()
PREPOSITIONS = "near with behind under beside like".split()
DETERMINERS = {"singular": ("the", "a", "this", "that", "every"), "plural": ("the", "these", "those", "some", "many", "two")}  # fmt: skip
PRONOUNS = {"singular": ("he", "she", "it"), "plural": ("they", "we")}
OBJECT_PRONOUNS = ("him", "her", "them", "us")
POS_TAGS = ("DET", "ADJ", "NOUN", "VERB", "ADP", "PRON", "ADV", "PUNCT")


def _noun_phrase(rng: random.Random, number: str, animate: bool = False) -> list[tuple[str, str]]:
    """DET (ADJ) NOUN as (word, tag) pairs."""
    nouns = [n for n in NOUNS if n[0] in ANIMATE] if animate else NOUNS
    singular, plural = rng.choice(nouns)
    words = [(rng.choice(DETERMINERS[number]), "DET")]
    if rng.random() < 0.35:
        words.append((rng.choice(ADJECTIVES), "ADJ"))
    words.append((singular if number == "singular" else plural, "NOUN"))
    return words


def _sentence(
    rng: random.Random, tense: str | None, pronouns: bool
) -> tuple[list[tuple[str, str]], int, str]:
    """One sentence as (word, tag) pairs, the verb's index and the subject's number.
    ``tense``: "present" (the verb agrees with the subject), "past" or None (either)."""
    tense = tense or rng.choice(("present", "past"))
    number = rng.choice(("singular", "plural"))
    if pronouns and rng.random() < 0.2:
        words = [(rng.choice(PRONOUNS[number]), "PRON")]
    else:
        words = _noun_phrase(rng, number, animate=True)
        if rng.random() < 0.5:  # a prepositional phrase whose noun may be an attractor
            other = rng.choice(("singular", "plural"))
            words += [(rng.choice(PREPOSITIONS), "ADP"), *_noun_phrase(rng, other)]
    verb_at = len(words)
    transitive = rng.random() < 0.6
    forms = rng.choice(TRANSITIVE if transitive else INTRANSITIVE)
    if tense == "past":
        verb = forms[2]
    else:
        verb = forms[0] if number == "singular" else forms[1]
    words.append((verb, "VERB"))
    if transitive:
        if rng.random() < 0.2:
            words.append((rng.choice(OBJECT_PRONOUNS), "PRON"))
        else:
            words += _noun_phrase(rng, rng.choice(("singular", "plural")))
    tail = rng.random()
    if tail < 0.3:
        words.append((rng.choice(ADVERBS), "ADV"))
    elif tail < 0.55 or not transitive:
        words += [(rng.choice(PREPOSITIONS), "ADP"), *_noun_phrase(rng, rng.choice(("singular", "plural")))]  # fmt: skip
    words.append((".", "PUNCT"))
    words[0] = (words[0][0].capitalize(), words[0][1])
    return words, verb_at, number


def _text(words: list[str], labels: list[str | None]) -> LabelledText:
    seps = tuple("" if i == 0 or w == "." else " " for i, w in enumerate(words))
    return LabelledText(tuple(words), seps, tuple(labels))


def _unique_sentences(rng: random.Random, n: int, tense: str | None, pronouns: bool):
    seen, out = set(), []
    for _ in range(n * 50):
        words, verb_at, number = _sentence(rng, tense, pronouns)
        key = " ".join(w for w, _ in words)
        if key not in seen:
            seen.add(key)
            out.append((words, verb_at, number))
        if len(out) == n:
            return out
    raise ConfigError(f"the grammar gives fewer than {n} distinct sentences; ask for fewer")


def pos_task(n: int = 600, seed: int = 0) -> ProbingTask:
    """Part of speech of every word of ``n`` generated sentences (tenses mixed)."""
    rng = random.Random(f"{seed}:pos")
    texts = [
        _text([w for w, _ in words], [t for _, t in words])
        for words, _, _ in _unique_sentences(rng, n, None, pronouns=True)
    ]
    about = "part of speech (8 tags) of every word of generated sentences"
    return ProbingTask("pos", tuple(texts), POS_TAGS, about)


def number_task(n: int = 1000, seed: int = 0) -> ProbingTask:
    """The subject's number at the (past-tense, uninflected) verb of ``n`` sentences."""
    rng = random.Random(f"{seed}:number")
    texts = []
    for words, verb_at, number in _unique_sentences(rng, n, "past", pronouns=False):
        labels = [number if i == verb_at else None for i in range(len(words))]
        texts.append(_text([w for w, _ in words], labels))
    about = "the subject's number at the past-tense verb (half with an attractor noun)"
    return ProbingTask("number", tuple(texts), ("singular", "plural"), about)


# ----------------------------------------------------------------------------- Shakespeare

SPEAKER_LINE = re.compile(r"^[A-Z][A-Za-z' ]*:$")
CHAR_CLASSES = ("upper", "vowel", "consonant", "space", "punct")


def char_class(c: str) -> str:
    """``"R" -> "upper"``, ``"e" -> "vowel"``, ``"m" -> "consonant"``, ``"\\n" -> "space"``."""
    if c.isupper():
        return "upper"
    if c in "aeiou":
        return "vowel"
    if c.isalpha():
        return "consonant"
    return "space" if c.isspace() else "punct"


def _passages(n: int, length: int, seed: int, what: str) -> list[str]:
    """``n`` passages of at most ``length`` characters, each the start of one speech
    ("NAME:\\nwords..."), drawn (seeded) from the validation split."""
    val = split_text(load_corpus("tinyshakespeare"), 0.1)[1]
    blocks = [
        b
        for b in val.split("\n\n")
        if "\n" in b.strip() and SPEAKER_LINE.match(b.split("\n", 1)[0])
    ]
    rng = random.Random(f"{seed}:{what}")
    picked = rng.sample(range(len(blocks)), min(n, len(blocks)))
    return [blocks[i][:length] for i in sorted(picked)]


def speaker_labels(passage: str) -> list[str]:
    """ "name" for each character of a speech's first line, the speaker's name (its newline
    included), "speech" for the rest: ``"KING:\nNo." -> 6 x name, 3 x speech``. (A line of
    speech may end in ":" too, so only the first line of a speech is its speaker's.)"""
    first = passage.find("\n") + 1 or len(passage)
    return ["name"] * first + ["speech"] * (len(passage) - first)


def _char_task(name: str, n: int, seed: int, length: int, label: Callable) -> list[LabelledText]:
    out = []
    for p in _passages(n, length, seed, name):
        out.append(LabelledText(tuple(p), ("",) * len(p), tuple(label(p))))
    return out


def shakespeare_speaker_task(n: int = 200, seed: int = 0, length: int = 96) -> ProbingTask:
    texts = _char_task("shakespeare-speaker", n, seed, length, speaker_labels)
    about = "each character: inside a speaker's name line or in the speech"
    return ProbingTask("shakespeare-speaker", tuple(texts), ("name", "speech"), about)


def shakespeare_class_task(n: int = 200, seed: int = 0, length: int = 96) -> ProbingTask:
    texts = _char_task("shakespeare-class", n, seed, length, lambda p: [char_class(c) for c in p])
    about = "each character's class (a property of the character type itself)"
    return ProbingTask("shakespeare-class", tuple(texts), CHAR_CLASSES, about)


PROBING_TASKS: dict[str, Callable[..., ProbingTask]] = {
    "pos": pos_task,
    "number": number_task,
    "shakespeare-speaker": shakespeare_speaker_task,
    "shakespeare-class": shakespeare_class_task,
}


def probing_task(name: str, n: int | None = None, seed: int = 0) -> ProbingTask:
    """A bundled task by name (``PROBING_TASKS``), with ``n`` texts (None: its default)."""
    if name not in PROBING_TASKS:
        raise ConfigError(
            f"probing task {name!r} is unknown{closest(name, list(PROBING_TASKS))}; valid: "
            + ", ".join(PROBING_TASKS)
        )
    if n is not None and n < 2:
        raise ConfigError(f"a probing task needs at least 2 texts, got n={n}")
    return PROBING_TASKS[name](seed=seed) if n is None else PROBING_TASKS[name](n, seed=seed)


def type_ceiling(task: ProbingTask) -> float:
    """The accuracy of predicting each word type's most frequent label: how far word
    identity alone goes on this task (1.0 when every type has one label)."""
    by_type: dict[str, Counter] = {}
    for _, _, word, label in task.labelled():
        by_type.setdefault(word, Counter())[label] += 1
    total = sum(sum(c.values()) for c in by_type.values())
    return sum(c.most_common(1)[0][1] for c in by_type.values()) / total
