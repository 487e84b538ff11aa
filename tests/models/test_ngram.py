import copy
import doctest
import gc
import math
import pickle

import nltk.lm
import numpy as np
import pytest
import torch

from lmlab import native
from lmlab.errors import ConfigError
from lmlab.models import build_model, model_spec
from lmlab.models import ngram as ngram_module
from lmlab.models.ngram import NGramConfig, NGramLM, modified_kn_discounts, ngram_perplexity

# Perplexities are exp(mean log p) over a few hundred tokens, both sides in float64;
# they differ only by summation order, so 1e-6 relative is generous yet catches any
# wrong count or formula (those move perplexity by percent).
RTOL = 1e-6
V = 6  # real tokens 0..5


def make_data(order: int, seed: int = 0):
    """Seeded train/test ids over V tokens; the test starts like the training text so its
    BOS-padded first contexts were seen in training (where nltk and lmlab differ, see
    the module docstring)."""
    g = torch.Generator().manual_seed(seed)
    train = torch.randint(0, V, (3000,), generator=g)
    test = torch.cat([train[: order - 1], torch.randint(0, V, (300,), generator=g)])
    return train, test


def nltk_ngrams(ids, order: int) -> list[tuple[str, ...]]:
    """lmlab's n-grams as nltk tuples: left padding with n-1 "<s>", and every m-gram
    (m = 1..n) that ends on a real token (pad_both_ends without the right side)."""
    words = ["<s>"] * (order - 1) + [str(i) for i in ids.tolist()]
    return [
        tuple(words[t + order - m : t + order])
        for t in range(len(ids))
        for m in range(1, order + 1)
    ]


def nltk_perplexity(lm_cls, train, test, order: int, **kw) -> float:
    lm = lm_cls(order=order, **kw)
    lm.fit([nltk_ngrams(train, order)], vocabulary_text=[str(i) for i in range(V)] + ["<s>"])
    # nltk's vocabulary also holds "<s>" and "<UNK>", and Lidstone normalises over all of
    # it: lmlab gets two never-seen ids (V, V+1) so both divide by the same V + 2.
    assert len(lm.vocab) == V + 2
    words = ["<s>"] * (order - 1) + [str(i) for i in test.tolist()]
    return lm.perplexity([tuple(words[t : t + order]) for t in range(len(test))])


def lmlab_perplexity(train, test, **kw) -> float:
    model = NGramLM(NGramConfig(vocab_size=V + 2, **kw)).fit(train)
    return ngram_perplexity(model, test)


@pytest.mark.parametrize("order", [1, 2, 3])
def test_ngram_matches_nltk_mle(order):
    train, test = make_data(order)
    ours = lmlab_perplexity(train, test, order=order, smoothing="mle")
    assert math.isfinite(ours)
    assert ours == pytest.approx(nltk_perplexity(nltk.lm.MLE, train, test, order), rel=RTOL)


@pytest.mark.parametrize("order", [1, 3])
def test_ngram_matches_nltk_laplace(order):
    train, test = make_data(order, seed=1)
    ours = lmlab_perplexity(train, test, order=order, smoothing="add_k", k=1.0)
    assert ours == pytest.approx(nltk_perplexity(nltk.lm.Laplace, train, test, order), rel=RTOL)


@pytest.mark.parametrize("order", [2, 4])
def test_ngram_matches_nltk_lidstone(order):
    train, test = make_data(order, seed=2)
    ours = lmlab_perplexity(train, test, order=order, smoothing="add_k", k=0.3)
    theirs = nltk_perplexity(nltk.lm.Lidstone, train, test, order, gamma=0.3)
    assert ours == pytest.approx(theirs, rel=RTOL)


@pytest.mark.parametrize(("order", "discount"), [(2, 0.1), (3, 0.1), (3, 0.75), (4, 0.5)])
def test_ngram_matches_nltk_kneser_ney(order, discount):
    train, test = make_data(order, seed=3)
    ours = lmlab_perplexity(
        train, test, order=order, smoothing="kneser_ney", discount=discount, uniform_floor=False
    )
    theirs = nltk_perplexity(nltk.lm.KneserNeyInterpolated, train, test, order, discount=discount)
    assert ours == pytest.approx(theirs, rel=RTOL)


def test_kneser_ney_unseen_token_where_nltk_gives_zero():
    # Token 5 never occurs in training. nltk's KN unigram is a continuation-count ratio,
    # 0 for a token never seen after anything, and nothing lower catches it: probability 0,
    # infinite perplexity. lmlab's uniform floor (Chen & Goodman's 0th order) keeps it > 0.
    train, _ = make_data(3, seed=4)
    train = train[train != 5]
    test = torch.cat([train[:2], torch.tensor([5, 1, 2])])
    lm = nltk.lm.KneserNeyInterpolated(order=3, discount=0.1)
    lm.fit([nltk_ngrams(train, 3)], vocabulary_text=[str(i) for i in range(V)] + ["<s>"])
    assert lm.score("5", ("0", "1")) == 0.0
    assert nltk_perplexity(nltk.lm.KneserNeyInterpolated, train, test, 3) == math.inf

    floored = lmlab_perplexity(train, test, order=3, smoothing="kneser_ney", discount=0.1)
    assert math.isfinite(floored)
    with pytest.warns(UserWarning, match="probability 0"):
        nltk_like = lmlab_perplexity(
            train, test, order=3, smoothing="kneser_ney", discount=0.1, uniform_floor=False
        )
    assert nltk_like == math.inf


def test_mle_unseen_ngram_is_infinite_and_named():
    train = torch.tensor([0, 1, 0, 1, 0, 1])
    model = NGramLM(NGramConfig(vocab_size=3, order=2, smoothing="mle")).fit(train)
    with pytest.warns(UserWarning, match=r"\(1, 1\) at position 2"):
        assert ngram_perplexity(model, torch.tensor([0, 1, 1])) == math.inf
    assert math.isfinite(ngram_perplexity(model, torch.tensor([0, 1, 0])))


def test_modified_kn_discounts_hand_worked():
    # n1..n4 = 10, 5, 3, 2: Y = 10 / (10 + 2*5) = 0.5; D1 = 1 - 2*0.5*5/10 = 0.5;
    # D2 = 2 - 3*0.5*3/5 = 1.1; D3+ = 3 - 4*0.5*2/3 = 5/3. (The 9 counts toward no n_i.)
    counts = torch.tensor([1] * 10 + [2] * 5 + [3] * 3 + [4] * 2 + [9])
    torch.testing.assert_close(
        modified_kn_discounts(counts), torch.tensor([0.5, 1.1, 5 / 3], dtype=torch.float64)
    )


def test_modified_kn_discounts_out_of_range_fall_back():
    # n1, n2, n3 = 1, 1, 5: Y = 1/3, D2 = 2 - 3(1/3)(5/1) = -3 (D1 = 1/3 alone is fine)
    counts = torch.tensor([1, 2, 3, 3, 3, 3, 3])
    assert modified_kn_discounts(counts, 0.6).tolist() == [0.6, 0.6, 0.6]
    # no 3s: D2 would divide by n3 = 0 (KenLM refuses such data without --discount_fallback)
    assert modified_kn_discounts(torch.tensor([1, 1, 2, 5]), 0.4).tolist() == [0.4] * 3


@pytest.mark.parametrize("seed", range(24))
def test_modified_kneser_ney_never_gives_a_token_probability_zero(seed):
    """Small random texts of short sentences, whose count-of-counts can put a discount at
    or below 0: a context whose followers all had that count kept no mass for the shorter
    context, and the tokens never seen after it got probability 0 (before the fallback:
    seeds 11 and 22 here, about 1 in 20)."""
    g = torch.Generator().manual_seed(seed)
    V = int(torch.randint(3, 12, (1,), generator=g))
    train = torch.randint(0, V, (int(torch.randint(20, 300, (1,), generator=g)),), generator=g)
    for order in (3, 4, 5):
        config = NGramConfig(
            vocab_size=V, order=order, smoothing="modified_kneser_ney", sentence_end_id=0
        )
        model = NGramLM(config)
        logp = model.fit(train)(torch.randint(0, V, (4, 30), generator=g))
        assert torch.isfinite(logp).all()
        torch.testing.assert_close(logp.exp().sum(-1), torch.ones(4, 30))


def test_hand_worked_counts():
    # [1, 2, 1, 2] with n = 2: bigrams (BOS 1), (1 2) x2, (2 1); MLE p(2 | 1) = 2/2,
    # p(1 | 2) = 1/1, p(1 | BOS) = 1; unigram p(1) = 2/4.
    model = NGramLM(NGramConfig(vocab_size=3, order=2, smoothing="mle")).fit([1, 2, 1, 2])
    probs = model(torch.tensor([[1, 2]])).exp()
    torch.testing.assert_close(probs[0, 0], torch.tensor([0.0, 0.0, 1.0]))
    torch.testing.assert_close(probs[0, 1], torch.tensor([0.0, 1.0, 0.0]))
    assert model.counts_1.tolist() == [2, 2]
    # contexts of length 1 (BOS = 3), sorted: (1), (2), (BOS) are rows 0, 1, 2; a bigram's
    # key is row * V + w: (1 2) = 2, (2 1) = 1 * 3 + 1 = 4, (BOS 1) = 2 * 3 + 1 = 7
    assert model.contexts_1.tolist() == [1, 2, 3]
    assert model.keys_2.tolist() == [2, 4, 7] and model.counts_2.tolist() == [2, 1, 1]
    # the context (0,) was never seen: it backs off to the unigram distribution
    torch.testing.assert_close(model(torch.tensor([[0]])).exp()[0, 0], torch.tensor([0, 0.5, 0.5]))


@pytest.mark.parametrize(
    ("smoothing", "order"),
    [
        (s, n)
        for s in ngram_module.FITTED_SMOOTHINGS
        for n in (1, 2, 4)
        if (n > 1 or "kneser" not in s) and s != "stupid_backoff"  # scores: its own test
    ],
)
def test_forward_is_a_distribution(smoothing, order):
    g = torch.Generator().manual_seed(5)
    train = torch.randint(0, 7, (400,), generator=g)  # ids 7..9 never seen
    model = build_model(dict(family="ngram", vocab_size=10, order=order, smoothing=smoothing))
    model.fit(train)
    ids = torch.randint(0, 10, (3, 17), generator=g)  # seen and unseen contexts and tokens
    logp = model(ids)
    assert logp.shape == (3, 17, 10) and logp.dtype == torch.float32
    torch.testing.assert_close(logp.exp().sum(-1), torch.ones(3, 17))
    if smoothing != "mle":
        assert torch.isfinite(logp).all()


def test_batch_rows_and_mask_match_single_rows():
    g = torch.Generator().manual_seed(6)
    model = NGramLM(NGramConfig(vocab_size=5, order=3)).fit(
        torch.randint(0, 5, (500,), generator=g)
    )
    ids = torch.randint(0, 5, (2, 9), generator=g)
    full = model.log_probs(ids)
    for b in range(2):
        torch.testing.assert_close(model.log_probs(ids[b : b + 1])[0], full[b])
    # left padding: masked tokens read as BOS, so the real suffix scores as if alone
    padded = torch.cat([torch.tensor([[4, 4]]), ids[:1]], dim=1)
    mask = torch.tensor([[False, False] + [True] * 9])
    torch.testing.assert_close(model.log_probs(padded, mask)[0, 2:], full[0])


def test_no_parameters_and_save_load_roundtrip():
    g = torch.Generator().manual_seed(7)
    model = NGramLM(NGramConfig(vocab_size=5, order=3, smoothing="modified_kneser_ney"))
    model.fit(torch.randint(0, 5, (300,), generator=g))
    assert list(model.parameters()) == []
    rebuilt = build_model(model_spec(model))
    rebuilt.load_state_dict(model.state_dict())
    ids = torch.randint(0, 5, (2, 8), generator=g)
    assert torch.equal(rebuilt(ids), model(ids))


def test_errors():
    with pytest.raises(ConfigError, match="smoothing='good_turing'.*kneser_ney"):
        NGramConfig(vocab_size=5, smoothing="good_turing")
    with pytest.raises(ConfigError, match="order=1.*>= 2"):
        NGramConfig(vocab_size=5, order=1, smoothing="kneser_ney")
    with pytest.raises(ConfigError, match="discount=1.5"):
        NGramConfig(vocab_size=5, discount=1.5)
    with pytest.raises(ConfigError, match="sentence_end_id=5"):
        NGramConfig(vocab_size=5, sentence_end_id=5)
    model = NGramLM(NGramConfig(vocab_size=5))
    with pytest.raises(ConfigError, match="fit"):
        model(torch.zeros(1, 3, dtype=torch.long))
    with pytest.raises(ConfigError, match=r"\[0, 5\)"):
        model.fit([0, 1, 7])
    with pytest.raises(ConfigError, match="cache"):
        model.fit([0, 1, 2])(torch.zeros(1, 3, dtype=torch.long), cache=object())


def test_docstring_examples():
    assert doctest.testmod(ngram_module).failed == 0


def test_fit_takes_a_read_only_token_file_without_warnings(tmp_path):
    """Token files are read-only memmaps (lmlab.data.tokens); fitting copies, silently."""
    import warnings

    np.arange(300, dtype=np.uint16).tofile(tmp_path / "t.bin")
    ids = np.memmap(tmp_path / "t.bin", dtype=np.uint16, mode="r") % 7
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model = NGramLM(NGramConfig(vocab_size=7, order=3)).fit(ids)
    assert int(model.n_tokens) == 300


@pytest.mark.parametrize("smoothing", ngram_module.FITTED_SMOOTHINGS)
@pytest.mark.parametrize("sentences", [False, True])
def test_gathered_scores_equal_the_full_rows_exactly(smoothing, sentences):
    # log_prob computes one probability per position with the same elementwise arithmetic
    # as the full [V] rows of forward: equal bit for bit, on seen and unseen contexts,
    # unseen tokens (7..9), padding masks and sentence ends.
    g = torch.Generator().manual_seed(8)
    end = 3 if sentences else None
    for order in (1, 2, 3, 5) if "kneser" not in smoothing else (2, 3, 5):
        for floor in (True, False):
            config = NGramConfig(
                vocab_size=10,
                order=order,
                smoothing=smoothing,
                uniform_floor=floor,
                sentence_end_id=end,
                discount=0.6,
            )
            model = NGramLM(config).fit(torch.randint(0, 7, (600,), generator=g))
            ids = torch.randint(0, 10, (4, 23), generator=g)
            targets = torch.randint(0, 10, (4, 23), generator=g)
            mask = torch.rand(4, 23, generator=g) > 0.1
            full = model.log_probs(ids, mask).gather(-1, targets[..., None])[..., 0]
            assert torch.equal(model.log_scores(ids, targets, mask), full)


def test_token_nll_gathers_the_same_surprisal_as_the_logits():
    from lmlab.generate.likelihood import token_nll

    g = torch.Generator().manual_seed(9)
    model = NGramLM(NGramConfig(vocab_size=6, order=3)).fit(
        torch.randint(0, 6, (400,), generator=g)
    )
    ids = torch.randint(0, 6, (50,), generator=g)
    x = ids[None]
    by_logits = torch.nn.functional.cross_entropy(model(x[:, :-1])[0], x[0, 1:], reduction="none")
    torch.testing.assert_close(token_nll(model, ids), by_logits)


def test_sentence_end_resets_the_context_as_kenlm_counts():
    # [a b END a] with END = 2, n = 3: the 'a' after END is counted from (BOS, BOS) like the
    # first one, so the trigram (BOS BOS a) is seen twice and no n-gram spans END.
    model = NGramLM(NGramConfig(vocab_size=3, order=3, smoothing="mle", sentence_end_id=2))
    model.fit([0, 1, 2, 0])
    tokens = model.context_tokens(2)  # (U, 2) contexts farthest first, BOS = 3
    assert sorted(map(tuple, tokens.tolist())) == [(0, 1), (3, 0), (3, 3)]
    keys, counts, _ = model.table(3)
    bos_bos = tokens.tolist().index([3, 3])  # the row of (BOS, BOS)
    assert counts[keys == bos_bos * 3 + 0].tolist() == [2]
    # scoring starts afresh after END too: p(a | b END) is p(a | BOS BOS) = 1
    logp = model.log_probs(torch.tensor([[1, 2]]))
    assert logp[0, 1, 0].item() == 0.0


def test_a_word_5gram_over_10000_ids_fits_int64():
    # (V + 1)^4 * V would overflow int64 for V = 10,000; trie numbering keeps keys small
    g = torch.Generator().manual_seed(10)
    ids = torch.randint(0, 10_000, (5_000,), generator=g)
    model = NGramLM(NGramConfig(vocab_size=10_000, order=5)).fit(ids)
    assert int(model.keys_5.max()) < 5_000 * 10_000
    assert torch.isfinite(model.log_prob(ids[None, :-1], ids[None, 1:])).all()


# ----------------------------------------------------------------------------- Witten-Bell,
# stupid backoff, linear interpolation (issue 23)

# The hand-worked examples share one corpus: "a b a a" with a, b, c = 0, 1, 2 (V = 3) and
# BOS = 3. Counts: unigrams a 3, b 1, c 0 (N = 4); bigrams (BOS a), (a b), (b a), (a a);
# the context a was followed twice (by b and a: T = 2 distinct), b once (by a: T = 1).
CORPUS = [0, 1, 0, 0]


def test_witten_bell_hand_worked():
    model = NGramLM(NGramConfig(vocab_size=3, order=2, smoothing="witten_bell")).fit(CORPUS)
    # unigram, T = 2 distinct tokens in N = 4, interpolated with the uniform 1/3:
    #   p(w) = (c(w) + 2/3) / (4 + 2): a 11/18, b 5/18, c 2/18
    # after a (c = 2, T = 2): p(w | a) = (c(a w) + 2 p(w)) / 4
    #   a (1 + 22/18) / 4 = 10/18, b (1 + 10/18) / 4 = 7/18, c (4/18) / 4 = 1/18
    # after b (c = 1, T = 1): p(w | b) = (c(b w) + p(w)) / 2
    #   a (1 + 11/18) / 2 = 29/36, b (5/18) / 2 = 5/36, c (2/18) / 2 = 2/36
    # after c (never seen as a context): the unigram distribution
    expected = torch.tensor(
        [[10 / 18, 7 / 18, 1 / 18], [29 / 36, 5 / 36, 2 / 36], [11 / 18, 5 / 18, 2 / 18]],
        dtype=torch.float64,
    )
    probs = model.log_probs(torch.tensor([[0, 1, 2]]))[0].exp()
    torch.testing.assert_close(probs, expected, rtol=1e-12, atol=1e-12)


def test_stupid_backoff_hand_worked():
    model = NGramLM(NGramConfig(vocab_size=3, order=3, smoothing="stupid_backoff")).fit(CORPUS)
    # S(w | ctx) = c(ctx w) / c(ctx) if c(ctx w) > 0, else 0.4 * S(w | shorter ctx).
    # unigram: a 3/4, b 1/4; c unseen backs off to the uniform: 0.4 * 1/3 = 2/15
    # bigram, after b: a 1/1 = 1; b 0.4 * 1/4 = 0.1; c 0.4 * 2/15 = 4/75
    # trigrams: (BOS BOS a), (BOS a b), (a b a), (b a a). After (b a) (seen once, by a):
    #   a 1/1 = 1; b 0.4 * S(b | a) = 0.4 * 1/2 = 0.2; c 0.4 * 0.4 * 2/15 = 8/375
    # After (BOS b), a context never seen, each order skipped still costs 0.4:
    #   a 0.4 * 1 = 0.4, b 0.4 * 0.1 = 0.04, c 0.4 * 4/75 = 8/375
    scores = model.log_probs(torch.tensor([[1, 0]]))[0].exp()
    expected = torch.tensor([[0.4, 0.04, 8 / 375], [1.0, 0.2, 8 / 375]], dtype=torch.float64)
    torch.testing.assert_close(scores, expected, rtol=1e-12, atol=1e-12)
    assert scores[0].sum() < 1 < scores[1].sum()  # scores, not probabilities
    # the gathered scores are the same numbers; perplexity is refused, naming why
    gathered = model.log_scores(torch.tensor([[1, 0]]), torch.tensor([[0, 1]])).exp()
    torch.testing.assert_close(gathered[0], torch.tensor([0.4, 0.2], dtype=torch.float64))
    with pytest.raises(ConfigError, match="stupid_backoff.*not sum to 1"):
        ngram_perplexity(model, [0, 1])
    from lmlab.generate.likelihood import token_nll

    with pytest.raises(ConfigError, match="perplexity.*stupid_backoff"):
        token_nll(model, torch.tensor([0, 1, 0]))


def test_katz_backoff_hand_worked():
    config = NGramConfig(vocab_size=3, order=2, smoothing="backoff", discount=0.5)
    model = NGramLM(config).fit(CORPUS)
    # unigram (D = 0.5, floor 1/3): a (3 - .5)/4 = 0.625, b (1 - .5)/4 = 0.125; the freed
    #   0.5 * 2 types / 4 = 0.25 goes to c, the only unseen token: p(c) = 0.25
    # after a (c = 2; a and b seen once): (1 - .5)/2 = 0.25 each; freed 0.5 * 2 / 2 = 0.5,
    #   shared by the unseen c in proportion to p(c) / p(c) -> 0.5
    # after b (c = 1; a seen once): a 0.5; freed 0.5 spread over b and c by their unigram
    #   mass 0.125 : 0.25 -> b 1/6, c 1/3
    expected = torch.tensor(
        [[0.25, 0.25, 0.5], [0.5, 1 / 6, 1 / 3], [0.625, 0.125, 0.25]], dtype=torch.float64
    )
    probs = model.log_probs(torch.tensor([[0, 1, 2]]))[0].exp()
    torch.testing.assert_close(probs, expected, rtol=1e-12, atol=1e-12)


def nltk_lm(lm_cls, train, order: int, **kw):
    lm = lm_cls(order=order, **kw)
    lm.fit([nltk_ngrams(train, order)], vocabulary_text=[str(i) for i in range(V)] + ["<s>"])
    return lm


@pytest.mark.parametrize("order", [2, 3])
def test_ngram_matches_nltk_witten_bell(order):
    train, test = make_data(order, seed=11)
    ours = lmlab_perplexity(train, test, order=order, smoothing="witten_bell", uniform_floor=False)
    theirs = nltk_perplexity(nltk.lm.WittenBellInterpolated, train, test, order)
    assert ours == pytest.approx(theirs, rel=RTOL)


@pytest.mark.parametrize("order", [2, 3])
def test_ngram_matches_nltk_stupid_backoff(order):
    # scores, not perplexities: each position's score from the same n-gram contexts,
    # with unseen tokens 6, 7 and contexts never seen in training among the queries
    g = torch.Generator().manual_seed(12)
    train = torch.randint(0, V, (400,), generator=g)
    config = NGramConfig(
        vocab_size=V + 2, order=order, smoothing="stupid_backoff", uniform_floor=False
    )
    model = NGramLM(config).fit(train)
    lm = nltk_lm(nltk.lm.StupidBackoff, train, order, alpha=0.4)
    test = torch.randint(0, V + 2, (60,), generator=g)
    ours = model.log_scores(*ngram_module._from_bos(test))[0].exp()
    words = ["<s>"] * (order - 1) + [str(i) for i in test.tolist()]
    theirs = [lm.score(words[t + order - 1], words[t : t + order - 1]) for t in range(60)]
    torch.testing.assert_close(ours, torch.tensor(theirs, dtype=torch.float64), rtol=1e-12, atol=0)


def test_linear_interpolation_em_worked_example():
    # the tune_weights docstring: unigrams (1/2, 1/2, 0, 0), held-out [0, 0, 2] -> 1/3
    config = NGramConfig(vocab_size=4, order=1, smoothing="linear_interpolation")
    model = NGramLM(config).fit([0, 1])  # two ids: too few to hold any out
    assert model.interpolation_weights.tolist() == [0.5, 0.5]
    weights = model.tune_weights([0, 0, 2], max_iters=2000, tol=0)
    assert weights == pytest.approx([2 / 3, 1 / 3], abs=1e-6)


def test_linear_interpolation_em_beats_every_weight_on_a_grid():
    # EM climbs to the held-out likelihood's maximum: no point of a 0.05 grid over the
    # simplex of (lambda_0, .., lambda_3) scores the held-out text better.
    g = torch.Generator().manual_seed(13)
    train, heldout = (
        torch.randint(0, 5, (300,), generator=g),
        torch.randint(0, 5, (80,), generator=g),
    )
    config = NGramConfig(vocab_size=7, order=3, smoothing="linear_interpolation")
    model = NGramLM(config)
    model._count(train)
    tuned = torch.tensor(model.tune_weights(heldout, max_iters=500, tol=0))
    assert tuned.sum().item() == pytest.approx(1.0, abs=1e-12)

    def heldout_logp(weights):
        model.interpolation_weights = weights.double()
        model._stats = None
        return model.log_prob(*ngram_module._from_bos(heldout)).sum().item()

    best = heldout_logp(tuned)
    steps = torch.arange(0, 21) / 20
    for l1 in steps:
        for l2 in steps:
            for l3 in steps:
                if l1 + l2 + l3 < 1:
                    grid = torch.stack([1 - l1 - l2 - l3, l1, l2, l3])
                    assert heldout_logp(grid) <= best + 1e-9
    # and the model it gives is the weighted sum over orders, by hand: over the orders
    # whose context was seen (all but the held-out's BOS contexts), weights renormalised
    model.interpolation_weights = tuned.double()
    model._stats = None
    probs, seen = model.order_probabilities(heldout)
    assert 0 < (~seen).sum() < 5
    weights = tuned.double()[:, None] * seen  # (n+1, Q)
    by_hand = (weights * probs).sum(0) / weights.sum(0)
    torch.testing.assert_close(model.log_prob(*ngram_module._from_bos(heldout))[0].exp(), by_hand)


def test_new_smoothings_errors():
    with pytest.raises(ConfigError, match="alpha=0.*\\(0, 1\\]"):
        NGramConfig(vocab_size=5, smoothing="stupid_backoff", alpha=0.0)
    with pytest.raises(ConfigError, match="heldout=1"):
        NGramConfig(vocab_size=5, smoothing="linear_interpolation", heldout=1.0)
    with pytest.raises(ConfigError, match="tune_weights.*'kneser_ney'"):
        NGramLM(NGramConfig(vocab_size=5)).fit([0, 1, 2]).tune_weights([0, 1])


# ----------------------------------------------------------------------------- held-out text
# through the hash indexes (issue 21): ``_score_stream`` must give the dense rows' numbers
# bit for bit, wherever it is taken, and step aside where it cannot be.

STREAMED = [s for s in ngram_module.FITTED_SMOOTHINGS if s != "stupid_backoff"]


def stream_case(seed: int, smoothing: str, order: int, end: int | None, floor: bool = True):
    """A model over V ids fitted on fewer (so some ids are unseen), and a batch of streams:
    (model, ids [B, T], targets = ids shifted by one, mask hiding each row's first id)."""
    g = torch.Generator().manual_seed(seed)
    V = int(torch.randint(6, 30, (1,), generator=g))
    config = NGramConfig(
        vocab_size=V,
        order=order,
        smoothing=smoothing,
        sentence_end_id=end,
        discount=float(torch.rand(1, generator=g)) * 0.8 + 0.1,
        uniform_floor=floor,
    )
    train = torch.randint(
        0, V - 2, (int(torch.randint(200, 3000, (1,), generator=g)),), generator=g
    )
    model = NGramLM(config).fit(train)
    B, T = (
        int(torch.randint(1, 5, (1,), generator=g)),
        int(torch.randint(1, 400, (1,), generator=g)),
    )
    stream = torch.randint(0, V, (B, T + 1), generator=g)
    if end is not None:  # sentence ends more often than by chance, to restart contexts
        stream = torch.where(torch.rand(B, T + 1, generator=g) < 0.1, end, stream)
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[:, 0] = torch.rand(B, generator=g) < 0.5
    return model, stream[:, :-1], stream[:, 1:], mask


# The stream is scored by the C kernel (ngram_stream.c) where one can be built, else in
# PyTorch (``_score_stream_torch``): both must give the full rows' numbers bit for bit.
BACKENDS = [
    pytest.param(
        True,
        id="c",
        marks=pytest.mark.skipif(native.compiler() is None, reason="no C compiler here"),
    ),
    pytest.param(False, id="torch"),
]


@pytest.mark.parametrize("smoothing", STREAMED)
@pytest.mark.parametrize("order", [2, 3, 5])
@pytest.mark.parametrize("use_c", BACKENDS)
def test_stream_scores_equal_the_full_rows_exactly(smoothing, order, use_c):
    # random vocabularies, texts and batch shapes; unseen ids; sentence ends; each row's
    # first id masked or not; seeded per case
    for seed in range(4):
        end = 2 if seed % 2 else None
        model, ids, targets, mask = stream_case(100 * order + seed, smoothing, order, end, seed < 2)
        full = model.log_probs(ids, mask).gather(-1, targets[..., None])[..., 0]
        model.build_index(native=use_c)
        assert (model._levels()[0].native is not None) == use_c  # the path under test
        assert model._streamed(ids, targets, mask)  # the stream path is the one taken
        assert torch.equal(model.log_scores(ids, targets, mask), full)
        assert torch.equal(
            model.log_scores(ids, targets, None),
            model.log_probs(ids).gather(-1, targets[..., None])[..., 0],
        )


@pytest.mark.parametrize("use_c", BACKENDS)
def test_stream_of_a_word_sized_model_equals_the_searched_scores(use_c):
    # hash tables of 2^16 to 2^17 slots (a vocabulary of 3,000, 5-grams of 60,000 random
    # tokens with repeats), three rows of 4,000 positions: the stream equals the binary
    # searches' scores bit for bit
    g = torch.Generator().manual_seed(11)
    V = 3000
    words = torch.randint(0, V, (200,), generator=g)
    train = words[torch.randint(0, 200, (60_000,), generator=g)]  # many repeated n-grams
    train = torch.where(
        torch.rand(60_000, generator=g) < 0.3, torch.randint(0, V, (60_000,), generator=g), train
    )
    model = NGramLM(
        NGramConfig(vocab_size=V, order=5, smoothing="modified_kneser_ney", sentence_end_id=7)
    )
    model.fit(train)
    stream = train[torch.randint(0, 55_000, (3,), generator=g)[:, None] + torch.arange(4001)]
    ids, targets = stream[:, :-1], stream[:, 1:]
    searched = model.log_prob(ids, targets)  # not indexed yet: binary searches
    assert model._levels()[0].stream is None
    model.build_index(native=use_c)
    assert torch.equal(model.log_prob(ids, targets), searched)


@pytest.mark.skipif(native.compiler() is None, reason="no C compiler here")
def test_a_copy_of_an_indexed_model_reads_its_own_tables():
    # the kernel reads the tables by address: a copy must take its copies' addresses
    model, ids, targets, mask = stream_case(5, "modified_kneser_ney", 4, 2)
    model.build_index()
    expected = model.log_scores(ids, targets, mask)
    copies = [copy.deepcopy(model), pickle.loads(pickle.dumps(model))]
    del model
    gc.collect()  # the original's tables are gone
    for other in copies:
        kernel = other._levels()[0].native
        assert kernel is not None and kernel.tables is other._levels()[0].stream
        assert torch.equal(other.log_scores(ids, targets, mask), expected)


def test_stream_steps_aside_where_it_does_not_apply():
    model, ids, targets, mask = stream_case(7, "kneser_ney", 3, 2)
    model.build_index()
    other = torch.roll(targets, 1, dims=1)  # targets that are not the next ids
    holes = torch.rand(ids.shape, generator=torch.Generator().manual_seed(1)) > 0.2
    for t, m in [(other, mask), (targets, holes)]:
        assert not model._streamed(ids, t, m)
        full = model.log_probs(ids, m).gather(-1, t[..., None])[..., 0]
        assert torch.equal(model.log_scores(ids, t, m), full)
    scores = NGramLM(NGramConfig(vocab_size=9, order=3, smoothing="stupid_backoff"))
    scores.fit(torch.arange(90) % 7).build_index()
    assert not scores._streamed(ids[:, :5] % 9, targets[:, :5] % 9, None)


def test_index_follows_refits_and_builds_itself_when_it_pays():
    g = torch.Generator().manual_seed(3)
    model = NGramLM(NGramConfig(vocab_size=12, order=4, smoothing="modified_kneser_ney"))
    stream = torch.randint(0, 12, (1, 301), generator=g)
    ids, targets = stream[:, :-1], stream[:, 1:]
    model.fit(torch.randint(0, 12, (2000,), generator=g)).build_index()
    model.fit(torch.randint(0, 6, (500,), generator=g))  # new tables: the index is dropped
    assert model._levels()[0].stream is None
    keys = sum(getattr(model, f"keys_{m}").numel() for m in range(2, 5))
    calls = 0
    while model._levels()[0].stream is None:  # ski rental: after 4 positions per key
        model.log_prob(ids, targets)
        calls += 1
    assert calls == -(-4 * keys // 300)
    full = model.log_probs(ids).gather(-1, targets[..., None])[..., 0]
    assert torch.equal(model.log_prob(ids, targets), full)


def test_hash_index_finds_every_key_and_nothing_else():
    g = torch.Generator().manual_seed(4)
    for size in (1, 2, 7, 1000, 30_000):
        keys = torch.unique(torch.randint(0, 50 * size, (size,), generator=g))
        index = ngram_module._HashIndex(keys)
        slot = index.slots(index.hash(keys)) >> 1
        assert torch.equal(index.keys[slot], keys) and torch.equal(
            index.rows[slot], torch.arange(keys.numel())
        )
        others = torch.randint(-100, 60 * size, (5000,), generator=g)
        others = others[~torch.isin(others, keys)]
        assert not (index.keys[index.slots(index.hash(others)) >> 1] == others).any()
