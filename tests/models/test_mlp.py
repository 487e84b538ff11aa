import pytest
import torch

from lmlab.errors import ConfigError
from lmlab.generate import SamplingParams, generate_ids
from lmlab.models import build_model, model_spec
from lmlab.models.mlp import BagConfig, BigramConfig, MLPConfig

V = 23
SPECS = {
    "bigram": dict(family="bigram", vocab_size=V, d_model=16),
    "bigram-table": dict(family="bigram", vocab_size=V),
    "mlp": dict(family="mlp", vocab_size=V, d_model=8, context=3, d_ff=32),
    "mlp-direct": dict(family="mlp", vocab_size=V, d_model=8, context=4, d_ff=32, direct=True),
    "bag-mean": dict(family="bag", vocab_size=V, d_model=16, d_ff=32, reduce="mean"),
    "bag-sum": dict(family="bag", vocab_size=V, d_model=16, d_ff=32, reduce="sum"),
}
ALL = pytest.mark.parametrize("name", list(SPECS))


@ALL
def test_shapes_and_no_fixed_context(name):
    model = build_model(SPECS[name])
    assert model.config.max_seq_len is None
    for T in (1, 2, 37):
        assert model(torch.randint(0, V, (3, T))).shape == (3, T, V)


@ALL
def test_spec_round_trip(name):
    model = build_model(SPECS[name])
    spec = model_spec(model)
    assert {k: spec[k] for k in SPECS[name]} == SPECS[name]
    rebuilt = build_model(spec)
    rebuilt.load_state_dict(model.state_dict())
    ids = torch.randint(0, V, (2, 9))
    torch.testing.assert_close(rebuilt(ids), model(ids), rtol=0, atol=0)


@pytest.mark.parametrize(
    "cls, fields, bad_field",
    [
        (BigramConfig, dict(vocab_size=0), "vocab_size"),
        (BigramConfig, dict(vocab_size=5, d_model=0), "d_model"),
        (MLPConfig, dict(vocab_size=5, context=0), "context"),
        (MLPConfig, dict(vocab_size=5, direct="yes"), "direct"),
        (MLPConfig, dict(vocab_size=5, dropout=1.0), "dropout"),
        (BagConfig, dict(vocab_size=5, reduce="max"), "reduce"),
        (BagConfig, dict(vocab_size=5, d_ff=-1), "d_ff"),
    ],
)
def test_config_errors_name_the_field(cls, fields, bad_field):
    with pytest.raises(ConfigError, match=rf"\.{bad_field}="):
        cls(**fields)


def test_unknown_field_suggests_the_closest():
    with pytest.raises(ConfigError, match="did you mean 'context'"):
        build_model({"family": "mlp", "vocab_size": 5, "contex": 2})


@ALL
def test_left_padded_row_equals_row_alone(name):
    model = build_model(SPECS[name]).eval()
    short, long = torch.randint(1, V, (1, 5)), torch.randint(1, V, (1, 9))
    # Pad with a real token id (not 0) so a model that read the padding would be caught.
    ids = torch.cat([torch.cat([torch.full((1, 4), 7), short], 1), long])  # (2, 9)
    mask = torch.ones(2, 9, dtype=torch.bool)
    mask[0, :4] = False
    with torch.no_grad():
        batched = model(ids, mask=mask)
        torch.testing.assert_close(batched[0, 4:], model(short)[0], rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(batched[1], model(long)[0], rtol=1e-6, atol=1e-6)


def test_mlp_window_reads_only_the_last_context_tokens():
    model = build_model(SPECS["mlp"]).eval()  # context 3
    ids = torch.randint(0, V, (1, 10))
    changed = ids.clone()
    changed[0, 6] = (ids[0, 6] + 1) % V
    with torch.no_grad():
        a, b = model(ids), model(changed)
    torch.testing.assert_close(a[0, :6], b[0, :6])  # before the change: causal
    assert not torch.allclose(a[0, 6:9], b[0, 6:9])  # the change is inside these windows
    torch.testing.assert_close(a[0, 9:], b[0, 9:])  # ...and has slid out of this one


def test_bigram_depends_on_the_current_token_only():
    model = build_model(SPECS["bigram"]).eval()
    ids = torch.tensor([[3, 5, 9, 5]])
    with torch.no_grad():
        logits = model(ids)
    torch.testing.assert_close(logits[0, 1], logits[0, 3])


def test_bag_ignores_order_and_the_lstm_does_not():
    """The point of the bag model: a permuted context gives the same prediction."""
    ids = torch.randint(0, V, (1, 12))
    permuted = torch.cat([ids[:, :-1][:, torch.randperm(11)], ids[:, -1:]], dim=1)
    assert not torch.equal(ids, permuted)
    bag = build_model(SPECS["bag-sum"]).eval()
    lstm = build_model(dict(family="recurrent", cell="lstm", vocab_size=V, d_model=16)).eval()
    with torch.no_grad():
        # float32 sums in a different order differ by rounding only.
        torch.testing.assert_close(bag(permuted)[0, -1], bag(ids)[0, -1], rtol=1e-5, atol=1e-5)
        assert (lstm(permuted)[0, -1] - lstm(ids)[0, -1]).abs().max() > 1e-3


@ALL
def test_trains_on_a_repeating_pattern(name, pattern_loss_drop):
    before, after = pattern_loss_drop(build_model(SPECS[name]))
    assert after < before - 0.3, (before, after)


@ALL
def test_greedy_decoding(name):
    model = build_model(SPECS[name])
    out = generate_ids(model, [[1, 2, 3], [4]], SamplingParams(max_new_tokens=8, temperature=0))
    assert [len(row) for row in out] == [8, 8]
    assert all(0 <= t < V for row in out for t in row)
    # A batch with left padding decodes each prompt as it would alone.
    alone = generate_ids(model, [[4]], SamplingParams(max_new_tokens=8, temperature=0))
    assert out[1] == alone[0]


def test_models_keep_no_cache():
    for name in ("bigram", "mlp", "bag-mean"):
        assert not hasattr(build_model(SPECS[name]), "new_cache")
