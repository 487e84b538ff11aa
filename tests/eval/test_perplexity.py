import math

import pytest
import torch
import torch.nn.functional as F

from lmlab.errors import ConfigError
from lmlab.eval.perplexity import perplexity, token_nll
from lmlab.models import build_model, get_preset


def tiny_model(max_seq_len=16):
    spec = {**get_preset("gpt-char-tiny"), "vocab_size": 30, "d_model": 32, "n_layers": 2}
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
