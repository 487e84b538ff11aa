"""The bundled probing tasks (``lmlab.data.probing``): seeded, well-formed, honest labels."""

from collections import Counter

import pytest

from lmlab.data.probing import (
    ADJECTIVES,
    NOUNS,
    POS_TAGS,
    PROBING_TASKS,
    TRANSITIVE,
    char_class,
    probing_task,
    speaker_labels,
    type_ceiling,
)
from lmlab.errors import ConfigError


@pytest.mark.parametrize("name", PROBING_TASKS)
def test_tasks_are_deterministic_well_formed_and_seeded(name):
    task = probing_task(name, 40, seed=3)
    assert task == probing_task(name, 40, seed=3)
    assert task != probing_task(name, 40, seed=4)
    assert len(task.texts) == 40
    for text in task.texts:
        assert len(text.words) == len(text.seps) == len(text.labels)
        assert set(text.labels) - {None} <= set(task.classes)
    labels = Counter(label for *_, label in task.labelled())
    assert len(labels) >= 2  # a task with one label would teach nothing


def test_pos_has_every_tag_and_words_with_several_tags():
    task = probing_task("pos", 300)
    tags_of = {}
    for _, _, word, tag in task.labelled():
        tags_of.setdefault(word.lower(), set()).add(tag)
    assert {t for tags in tags_of.values() for t in tags} == set(POS_TAGS)
    ambiguous = {w for w, tags in tags_of.items() if len(tags) > 1}
    assert {"watch", "plant", "like", "fast"} <= ambiguous
    # ... so word identity alone cannot reach 100%, but goes far, as in real POS tagging
    assert 0.9 < type_ceiling(task) < 1.0
    # the sentences agree: a present-tense verb after "these dogs" has no -s
    for text in task.texts:
        words = [w.lower() for w in text.words]
        if words[:2] == ["these", "dogs"] and text.labels[2] == "VERB":
            assert words[2] in {v[1] for v in TRANSITIVE} | {v[2] for v in TRANSITIVE}


def test_number_labels_the_verb_with_the_subjects_number_and_has_attractors():
    task = probing_task("number", 200)
    attractors = 0
    singular_nouns = {s for s, _ in NOUNS}
    plural_nouns = {p for s, p in NOUNS}
    invariant = singular_nouns & plural_nouns
    for text in task.texts:
        probed = [j for j, label in enumerate(text.labels) if label is not None]
        assert len(probed) == 1
        verb_at, label = probed[0], text.labels[probed[0]]
        words = [w.lower() for w in text.words[:verb_at]]
        nouns = [w for w in words if w in singular_nouns | plural_nouns]
        # the subject is DET (ADJ) NOUN; "light" is an adjective and a noun
        head = words[2] if words[1] in ADJECTIVES and words[2] in nouns else words[1]
        if head not in invariant:  # "fish" is both
            assert label == ("singular" if head in singular_nouns else "plural")
        if (nouns[-1] in singular_nouns) != (head in singular_nouns):
            attractors += 1
        assert text.words[verb_at] not in singular_nouns | set(ADJECTIVES)
    assert attractors > 30  # the nearest noun often has the other number


def test_shakespeare_labels():
    assert speaker_labels("KING:\nNo.\nSay:\nYes") == ["name"] * 6 + ["speech"] * 12
    assert [char_class(c) for c in "Ra m\n,"] == [
        "upper",
        "vowel",
        "space",
        "consonant",
        "space",
        "punct",
    ]
    task = probing_task("shakespeare-speaker", 20)
    for text in task.texts:
        assert text.text.split("\n", 1)[0].endswith(":")  # each passage starts a speech
        assert text.labels[0] == "name" and text.labels[-1] == "speech"
    assert type_ceiling(probing_task("shakespeare-class", 20)) == 1.0


def test_unknown_task_names_the_valid_ones():
    with pytest.raises(ConfigError, match="unknown.*'pos'.*valid: pos, number"):
        probing_task("poss")
