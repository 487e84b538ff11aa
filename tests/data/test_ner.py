"""The generated NER set and subword label alignment (first / average / max)."""

import pytest
import torch

from lmlab.checkpoint.pretrained import pretrained_path
from lmlab.data.mlm import IGNORE
from lmlab.data.ner import NER_LABELS, align_labels, ner_examples, word_scores
from lmlab.data.tokenizers import HFTokenizer
from lmlab.errors import ConfigError
from lmlab.eval.tagging import entities


def test_align_labels_labels_first_subwords_only():
    # [CLS] grace hop ##per visited [SEP]: words 0, 1 (two pieces), 2
    word_ids = [None, 0, 1, 1, 2, None]
    assert align_labels(word_ids, [1, 2, 0]) == [IGNORE, 1, 2, IGNORE, 0, IGNORE]


def test_word_scores_hand_worked_for_each_strategy():
    # word 0: one subword with probabilities (0.2, 0.8); word 1: three subwords with
    # (0.6, 0.4), (0.1, 0.9), (0.3, 0.7) -> first (0.6, 0.4), average (1/3, 2/3), max (0.1, 0.9)
    probs = torch.tensor([[0.5, 0.5], [0.2, 0.8], [0.6, 0.4], [0.1, 0.9], [0.3, 0.7], [0.5, 0.5]])
    logits = probs.log() + 3.0  # any shift: the softmax gives the probabilities back
    word_ids = [None, 0, 1, 1, 1, None]
    first = word_scores(logits, word_ids, "first")
    average = word_scores(logits, word_ids, "average")
    biggest = word_scores(logits, word_ids, "max")
    torch.testing.assert_close(first, torch.tensor([[0.2, 0.8], [0.6, 0.4]]))
    torch.testing.assert_close(average, torch.tensor([[0.2, 0.8], [1 / 3, 2 / 3]]))
    torch.testing.assert_close(biggest, torch.tensor([[0.2, 0.8], [0.1, 0.9]]))
    assert first.argmax(-1).tolist() == [1, 0] and average.argmax(-1).tolist() == [1, 1]


def test_word_scores_rejects_an_unknown_strategy():
    with pytest.raises(ConfigError, match="valid: first, average, max"):
        word_scores(torch.zeros(3, 2), [None, 0, None], "mean")


def test_ner_set_is_seeded_bio_with_multiword_entities_split_into_subwords():
    train = ner_examples("train", n=200)
    assert train == ner_examples("train", n=200)
    assert train != ner_examples("test", n=200)
    kinds, long_entities = set(), 0
    for s in train:
        assert len(s.words) == len(s.tags) and set(s.tags) <= set(NER_LABELS)
        for kind, first, last in entities(s.tags):
            assert s.tags[first] == f"B-{kind}"  # well-formed: every entity opens with B-
            kinds.add(kind)
            long_entities += last > first
    assert kinds == {"PER", "LOC", "ORG", "DATE"} and long_entities > 50
    tok = HFTokenizer.from_file(pretrained_path("minilm") / "tokenizer.json")
    split = sum(len(tok.encode(w)) > 1 for s in train for w, t in zip(s.words, s.tags) if t != "O")
    assert split > 100  # many entity words become several WordPiece pieces


def test_unknown_split_is_a_config_error():
    with pytest.raises(ConfigError, match="valid: train, validation, test"):
        ner_examples("dev")
