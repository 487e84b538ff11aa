import csv
import math

import pytest
import torch
import torch.nn.functional as F

from lmlab.api import LM
from lmlab.data import ByteTokenizer, CharTokenizer, train_tokenizer
from lmlab.errors import ConfigError
from lmlab.eval.perplexity import (
    CSV_COLUMNS,
    Surprisal,
    bits_per_byte,
    bits_per_character,
    perplexity,
    plot_surprisal,
    surprisal,
    token_nll,
)
from lmlab.models import build_model, get_preset


def tiny_model(max_seq_len=16, vocab_size=30):
    spec = {**get_preset("gpt-char-tiny"), "vocab_size": vocab_size, "d_model": 32, "n_layers": 2}
    return build_model({**spec, "n_heads": 2, "d_ff": 64, "max_seq_len": max_seq_len}).eval()


def test_within_context_equals_direct_cross_entropy():
    model = tiny_model()
    ids = torch.randint(0, 30, (12,))
    expected = F.cross_entropy(model(ids[None, :-1])[0], ids[1:], reduction="none")
    torch.testing.assert_close(token_nll(model, ids), expected)
    assert perplexity(model, ids) == pytest.approx(math.exp(expected.mean().item()), rel=1e-6)


@pytest.mark.parametrize("stride", [1, 5, 8, 15, 16])
def test_sliding_window_scores_each_token_once_with_its_window_context(stride):
    """Token i is scored by the window that first reaches it; that window starts at the
    largest listed start s with s + 16 > i, so the context is ids[s : i]."""
    model = tiny_model(max_seq_len=16)
    ids = torch.randint(0, 30, (50,))
    got = token_nll(model, ids, stride=stride)
    starts = list(range(0, 50 - 17 + 1, stride))  # windows of 16 inputs + 1 target
    if starts[-1] + 17 < 50:
        starts.append(50 - 17)
    for i in range(1, 50):
        s = next(s for s in starts if s + 17 > i)
        logits = model(ids[None, s:i])[0, -1]
        expected = F.cross_entropy(logits[None], ids[i : i + 1])
        torch.testing.assert_close(got[i - 1], expected, atol=1e-5, rtol=1e-5)


def test_bad_input_is_a_clear_error():
    model = tiny_model()
    with pytest.raises(ConfigError, match="at least 2 tokens"):
        token_nll(model, [3])
    with pytest.raises(ConfigError, match="stride=20"):
        token_nll(model, list(range(20)), stride=20)


def test_parameter_free_models_are_scored_too():
    from lmlab.models import build_model as build

    ngram = build({"family": "ngram", "vocab_size": 30, "order": 2})
    ids = torch.randint(0, 30, (200,))
    ngram.fit(ids)
    nll = token_nll(ngram, ids[:50])
    assert nll.shape == (49,) and torch.isfinite(nll).all()


def test_context_scores_unbounded_models_in_training_windows():
    """An LSTM has no context limit; with context=8, stride=8 every window of 9 tokens is
    scored alone, exactly like a model whose max_seq_len is 8. Dropout is off while scoring."""
    from lmlab.models import build_model as build

    lstm = build(
        {"family": "recurrent", "vocab_size": 30, "cell": "lstm", "d_model": 16, "dropout": 0.5}
    )
    lstm.train()
    ids = torch.randint(0, 30, (33,))  # windows [0:9], [8:17], [16:25], [24:33]
    got = token_nll(lstm, ids, stride=8, context=8)
    assert lstm.training  # restored
    lstm.eval()
    expected = torch.cat(
        [
            F.cross_entropy(lstm(ids[None, s : s + 8])[0], ids[s + 1 : s + 9], reduction="none")
            for s in (0, 8, 16, 24)
        ]
    )
    torch.testing.assert_close(got, expected)


# ----------------------------------------------------------------------------- text surprisal

TEXT = 'Café "au lait", naïve\nrésumé; déjà vu.'  # 38 characters, 44 UTF-8 bytes


def char_lm(max_seq_len=16):
    tok = CharTokenizer.train(TEXT)
    return LM(tiny_model(max_seq_len, tok.vocab_size), tok)


@pytest.mark.parametrize("stride", [None, 5])
def test_bits_per_byte_and_character_equal_summed_token_nll(stride):
    """Without a prefix the first character "C" is context: the counted span is TEXT[1:],
    37 characters and 43 bytes (é, ï, é, é, à take two bytes each)."""
    lm = char_lm()
    nll = token_nll(lm.model, lm.tokenizer.encode(TEXT), stride)  # [37]; longer than context
    bits = nll.double().sum().item() / math.log(2)
    assert (len(TEXT[1:]), len(TEXT[1:].encode())) == (37, 43)
    assert bits_per_byte(lm, TEXT, stride) == pytest.approx(bits / 43, rel=1e-6)
    assert bits_per_character(lm, TEXT, stride) == pytest.approx(bits / 37, rel=1e-6)
    s = surprisal(lm, TEXT, stride)
    assert (s.scored_from, s.n_bytes, s.n_characters) == (1, 43, 37)
    assert s.perplexity == pytest.approx(perplexity(lm.model, lm.tokenizer.encode(TEXT), stride))


def test_prefix_id_scores_every_token_and_counts_the_whole_text():
    lm = char_lm(max_seq_len=64)
    ids = lm.tokenizer.encode(TEXT)
    prefix = lm.tokenizer.encode("\n")[0]
    nll = token_nll(lm.model, [prefix, *ids])  # [38]: every character of TEXT
    s = surprisal(lm, TEXT, prefix_id=prefix)
    assert s.scored_from == 0 and [t.position for t in s.tokens] == list(range(38))
    expected = nll.double().sum().item() / math.log(2)
    assert s.bits_per_byte == pytest.approx(expected / 44, rel=1e-6)
    assert bits_per_character(lm, TEXT, prefix_id=prefix) == pytest.approx(expected / 38, rel=1e-6)


def test_byte_tokenizer_keeps_a_split_first_character_as_context():
    """ "é ok" is bytes [195, 169, 32, 111, 107]: both bytes of "é" are context, so the
    scored tokens are " ok" (3 bytes, 3 characters) and token_nll's first value (byte 169
    given 195) is not counted."""
    lm = LM(tiny_model(16, 256), ByteTokenizer())
    s = surprisal(lm, "é ok")
    nll = token_nll(lm.model, [195, 169, 32, 111, 107])
    assert [t.position for t in s.tokens] == [2, 3, 4] and s.scored_from == 1
    assert s.bits_per_byte == pytest.approx(nll[1:].sum().item() / math.log(2) / 3, rel=1e-6)
    # spans: the two bytes of a character share it
    s = surprisal(lm, "aé!")
    assert [(t.id, t.start, t.end) for t in s.tokens] == [(195, 1, 2), (169, 1, 2), (33, 2, 3)]
    assert s.n_bytes == 3 and s.n_characters == 2


def test_bpe_spans_cover_the_text():
    text = "the theory of the thing: thirty three thrones. " * 4
    tok = train_tokenizer("bpe", text, vocab_size=300)
    lm = LM(tiny_model(64, tok.vocab_size), tok)
    s = surprisal(lm, text, prefix_id=tok.eos_id)
    assert len(s.tokens) == len(tok.encode(text)) < len(text)  # merges happened
    assert "".join(text[t.start : t.end] for t in s.tokens) == text
    assert all(text[t.start : t.end] == t.token for t in s.tokens)


def test_surprisal_records_hold_ids_tokens_and_units():
    lm = char_lm(max_seq_len=64)
    s = surprisal(lm, TEXT)
    ids = lm.tokenizer.encode(TEXT)
    nll = token_nll(lm.model, ids)
    assert s.text == TEXT and len(s.tokens) == 37
    for i, t in enumerate(s.tokens, start=1):
        assert (t.position, t.id, t.token) == (i, ids[i], TEXT[i])
        assert (t.start, t.end) == (i, i + 1)
        assert t.nats == pytest.approx(nll[i - 1].item()) and t.bits == t.nats / math.log(2)


def test_surprisal_export_round_trips(tmp_path):
    lm = char_lm(max_seq_len=64)
    s = surprisal(lm, TEXT)
    s.to_json(tmp_path / "s.json")
    assert Surprisal.from_json(tmp_path / "s.json") == s  # floats and text exactly
    s.to_csv(tmp_path / "s.csv")
    with open(tmp_path / "s.csv", newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert tuple(rows[0]) == CSV_COLUMNS
    assert [r["token"] for r in rows] == list(TEXT[1:])  # quotes, commas, newline survive
    assert [float(r["nats"]) for r in rows] == [t.nats for t in s.tokens]
    assert [float(r["bits"]) for r in rows] == [t.bits for t in s.tokens]
    assert [(int(r["id"]), int(r["start"])) for r in rows] == [(t.id, t.start) for t in s.tokens]
    plot_surprisal(s, tmp_path / "s.png")
    assert (tmp_path / "s.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_surprisal_bad_input_is_a_clear_error():
    lm = char_lm()
    with pytest.raises(ConfigError, match="single token"):
        surprisal(lm, "C")
    with pytest.raises(ConfigError, match="empty"):
        surprisal(lm, "")
    with pytest.raises(ConfigError, match="prefix_id=99"):
        surprisal(lm, TEXT, prefix_id=99)
    with pytest.raises(ConfigError, match="all context"):
        surprisal(LM(tiny_model(16, 256), ByteTokenizer()), "é")


def test_scoring_a_long_text_shows_a_bar_when_asked(capsys):
    """A whole validation split takes a while: ``progress=True`` shows a "scoring" bar
    (None: only on a terminal, so not here), and the numbers do not change."""
    model = tiny_model()
    ids = torch.randint(0, 30, (400,), generator=torch.Generator().manual_seed(0))
    quiet = token_nll(model, ids, batch_size=4)
    assert "scoring" not in capsys.readouterr().err
    shown = token_nll(model, ids, batch_size=4, progress=True)
    assert "scoring" in capsys.readouterr().err
    torch.testing.assert_close(shown, quiet, rtol=0, atol=0)
