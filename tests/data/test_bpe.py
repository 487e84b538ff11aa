"""The from-scratch BPE trainer against the tokenizers library, and by hand."""

import json
import random

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers, trainers

from lmlab.data import load_corpus
from lmlab.data.bpe import BPE, merge_word, pre_tokenize
from lmlab.errors import ConfigError


def reference(lines, vocab_size, min_frequency=0, special_tokens=()):
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(special_tokens),
        show_progress=False,
    )
    tok.train_from_iterator(lines, trainer)
    merges = json.loads(tok.to_str())["model"]["merges"]
    return tok, [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in merges]


def test_worked_example_by_hand():
    bpe = BPE.train("low low low lower newest newest", vocab_size=14)
    # characters e l n o r s t w get ids 0..7, in code-point order
    assert list(bpe.vocab)[:8] == ["e", "l", "n", "o", "r", "s", "t", "w"]
    # (l, o) and (o, w) both occur 4 times: the smaller ids win; then lo + w (4 times)
    assert bpe.merges[:2] == [("l", "o"), ("lo", "w")]
    # four pairs occur twice; (e, s) has the smallest ids
    assert bpe.merges[2] == ("e", "s")
    assert len(bpe.vocab) == 14 and len(bpe.merges) == 6
    assert bpe.tokenize("lowest") == ["low", "est"]


def test_merge_word_is_left_to_right_and_reports_changes():
    word = [1, 1, 1, 1, 2]
    changes = merge_word(word, 1, 1, 9)
    assert word == [9, 9, 2]
    assert changes == [
        ((1, 1), -1),
        ((9, 1), 1),
        ((9, 1), -1),
        ((9, 9), 1),
        ((1, 2), -1),
        ((9, 2), 1),
    ]


@pytest.mark.parametrize("seed", range(40))
def test_same_merges_vocab_and_encodings_as_tokenizers(seed):
    r = random.Random(seed)
    alphabet = r.choice(["ab", "abc", "abcd e", "xyz.,!", "héllo wörld", "aaab  ", "0123 a_"])
    lines = [
        "".join(r.choice(alphabet + " ") for _ in range(r.randint(0, 40)))
        for _ in range(r.randint(1, 30))
    ]
    vocab_size, min_frequency = r.randint(1, 80), r.choice([0, 1, 2, 3])
    special = r.choice([[], ["<unk>"], ["<s>", "</s>"]])
    tok, merges = reference(lines, vocab_size, min_frequency, special)
    ours = BPE.train(lines, vocab_size, min_frequency, special)
    assert ours.vocab == tok.get_vocab()
    assert ours.merges == merges
    text = "".join(r.choice(alphabet + " ") for _ in range(60))
    assert ours.tokenize(text) == tok.encode(text).tokens
    assert ours.encode(text) == tok.encode(text).ids


def test_same_as_tokenizers_on_shakespeare():
    lines = load_corpus("tinyshakespeare")[:40000].splitlines()
    tok, merges = reference(lines, 400, 2, ["<s>"])
    ours = BPE.train(lines, 400, 2, ["<s>"])
    assert ours.vocab == tok.get_vocab() and ours.merges == merges
    held_out = " ".join(load_corpus("tinyshakespeare")[-3000:].splitlines())
    assert ours.tokenize(held_out) == tok.encode(held_out).tokens


def test_pre_tokenize_and_decode():
    assert pre_tokenize("Hi, you!  ok?!") == ["Hi", ",", "you", "!", "ok", "?!"]
    bpe = BPE.train("abab abab", 5)
    assert bpe.decode(bpe.encode("abab")) == "abab"
    with pytest.raises(ConfigError, match="out of range"):
        bpe.decode([99])


@pytest.mark.parametrize(
    "kwargs, message",
    [({"vocab_size": 0}, "vocab_size"), ({"vocab_size": 10, "min_frequency": -1}, "min_frequency")],
)
def test_bad_settings_are_one_line_errors(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        BPE.train("some text", **kwargs)


def test_docstring_examples_hold():
    import doctest

    import lmlab.data.bpe

    result = doctest.testmod(lmlab.data.bpe)
    assert result.attempted >= 5 and result.failed == 0
