"""Entity-level precision, recall and F1 equal seqeval's on random BIO sequences."""

import random

import pytest
import seqeval.metrics
from seqeval.metrics.sequence_labeling import get_entities

from lmlab.errors import DataError
from lmlab.eval.tagging import entities, entity_scores

TAGS = ["O", "B-PER", "I-PER", "B-LOC", "I-LOC", "I-ORG"]  # I-ORG never has a B-ORG


def random_tags(rng, n):
    return [[rng.choice(TAGS) for _ in range(rng.randint(1, 12))] for _ in range(n)]


def test_entities_hand_worked_with_malformed_tags():
    tags = ["B-PER", "I-PER", "O", "I-LOC", "I-LOC", "B-LOC", "I-ORG"]
    assert entities(tags) == [("PER", 0, 1), ("LOC", 3, 4), ("LOC", 5, 5), ("ORG", 6, 6)]


@pytest.mark.parametrize("seed", range(5))
def test_entities_match_seqeval(seed):
    rng = random.Random(seed)
    for tags in random_tags(rng, 50):
        assert entities(tags) == get_entities(tags)


@pytest.mark.parametrize("seed", range(5))
def test_entity_scores_match_seqeval(seed):
    rng = random.Random(100 + seed)
    true = random_tags(rng, 40)
    # predictions: the truth with about a third of the tags changed at random
    predicted = [[rng.choice(TAGS) if rng.random() < 0.3 else t for t in s] for s in true]
    ours = entity_scores(true, predicted)
    assert ours["precision"] == pytest.approx(seqeval.metrics.precision_score(true, predicted))
    assert ours["recall"] == pytest.approx(seqeval.metrics.recall_score(true, predicted))
    assert ours["f1"] == pytest.approx(seqeval.metrics.f1_score(true, predicted))


def test_no_entities_scores_zero_as_seqeval_does():
    with pytest.warns(Warning):
        want = seqeval.metrics.f1_score([["O"]], [["O"]])
    assert entity_scores([["O"]], [["O"]])["f1"] == want == 0.0


def test_bad_tags_and_lengths_are_data_errors():
    with pytest.raises(DataError, match="not BIO"):
        entities(["B-PER", "E-PER"])
    with pytest.raises(DataError, match="sentence 0: 2 true tags but 1 predicted"):
        entity_scores([["O", "O"]], [["O"]])
