import math

import numpy as np
import pytest

from lmlab.errors import ConfigError
from lmlab.eval.ngram_sweep import (
    SWEEP_SMOOTHINGS,
    parse_orders,
    parse_smoothings,
    perplexity_table,
    sweep_ngrams,
)
from lmlab.models import build_model
from lmlab.models.ngram import FITTED_SMOOTHINGS, ngram_perplexity


def ids(seed: int, n: int, vocab: int = 6) -> np.ndarray:
    # A Markov chain with a few strong transitions, so orders differ and some bigrams are rare.
    rng = np.random.default_rng(seed)
    out = [int(rng.integers(vocab))]
    for _ in range(n - 1):
        out.append((out[-1] + 1) % vocab if rng.random() < 0.7 else int(rng.integers(vocab)))
    return np.asarray(out, dtype=np.int64)


def test_parse_orders():
    assert parse_orders("1-3,6") == [1, 2, 3, 6]
    assert parse_orders("5, 2,2") == [2, 5]
    assert parse_orders(4) == [4]
    assert parse_orders([3, 1]) == [1, 3]
    for bad in ["", "0-3", "3-1", "a", "1..3"]:
        with pytest.raises(ConfigError, match="orders="):
            parse_orders(bad)


def test_parse_smoothings():
    assert set(SWEEP_SMOOTHINGS) == set(FITTED_SMOOTHINGS) - {"stupid_backoff"}
    assert parse_smoothings(" add_k, kneser_ney ") == ["add_k", "kneser_ney"]
    with pytest.raises(ConfigError, match="no perplexity"):
        parse_smoothings("add_k,stupid_backoff")
    with pytest.raises(ConfigError, match="unknown 'laplace'; valid: mle"):
        parse_smoothings("laplace")
    with pytest.raises(ConfigError, match="twice"):
        parse_smoothings("mle,mle")
    with pytest.raises(ConfigError, match="empty"):
        parse_smoothings(" , ")


def test_sweep_scores_each_model_as_ngram_perplexity_does():
    train, val = ids(0, 3000), ids(1, 400)
    scores, best = sweep_ngrams(train, val, 6, [1, 2, 3], ["add_k", "kneser_ney", "witten_bell"])
    # Kneser-Ney has no order 1; the others have every order.
    assert [(s.smoothing, s.order) for s in scores] == [
        ("add_k", 1), ("add_k", 2), ("add_k", 3), ("kneser_ney", 2), ("kneser_ney", 3),
        ("witten_bell", 1), ("witten_bell", 2), ("witten_bell", 3),
    ]  # fmt: skip
    for s in scores:
        spec = dict(family="ngram", vocab_size=6, order=s.order, smoothing=s.smoothing)
        expected = ngram_perplexity(build_model(spec).fit(train), val)
        assert s.perplexity == pytest.approx(expected, rel=1e-9)
        assert s.zero_probability == 0 and s.weights is None
    lowest = min(scores, key=lambda s: s.perplexity)
    assert best.config.order == lowest.order and best.config.smoothing == lowest.smoothing
    table = perplexity_table(scores)
    assert table["kneser_ney"].keys() == {2, 3} and table["add_k"][2] == scores[1].perplexity


def test_sweep_counts_the_zero_probability_tokens_of_mle():
    train, val = ids(2, 200, vocab=8), ids(3, 300, vocab=8)
    scores, _ = sweep_ngrams(train, val, 8, [2], ["mle", "linear_interpolation"])
    mle, interpolated = scores
    seen = set(zip(train[:-1].tolist(), train[1:].tolist()))
    # val[0] follows the begin of text, which the training text's first token followed.
    unseen = int(val[0] != train[0]) + sum(
        (a, b) not in seen for a, b in zip(val[:-1].tolist(), val[1:].tolist())
    )
    assert unseen > 0 and mle.zero_probability == unseen and math.isinf(mle.perplexity)
    assert interpolated.zero_probability == 0 and math.isfinite(interpolated.perplexity)
    assert len(interpolated.weights) == 3 and sum(interpolated.weights) == pytest.approx(1)
    # The distinct bigrams of training (plus the one from the begin of text), and unigrams.
    assert mle.stored_ngrams >= len(seen) + len(set(train.tolist()))


def test_sweep_rejects_empty_ids():
    with pytest.raises(ConfigError, match="non-empty"):
        sweep_ngrams(np.zeros(0, dtype=np.int64), ids(0, 10), 6, [2])
