"""Hooks by name and the activation cache (``lmlab.interp.hooks``) on every hooked family."""

import pytest
import torch

from lmlab.errors import ConfigError
from lmlab.interp.hooks import ActivationCache, hook_points, hooks, match_names, run_with_cache
from lmlab.models import build_model, get_preset

V = 40
SPECS = {
    "gpt": {**get_preset("gpt-char-tiny"), "n_layers": 2, "d_model": 32, "n_heads": 4},
    "llama": {**get_preset("llama-small"), "n_layers": 2, "d_model": 32, "n_heads": 4},
    "bigram": {"family": "bigram"},
    "mlp": {**get_preset("mlp-char"), "d_model": 8, "d_ff": 16},
    "bag": {**get_preset("bag-char"), "d_model": 8, "d_ff": 16},
    "lstm": {**get_preset("lstm-char"), "d_model": 16, "n_layers": 2},
    "gru": {**get_preset("gru-char"), "d_model": 16, "n_layers": 2},
    "encoder": {"family": "encoder", "d_model": 32, "n_layers": 2, "n_heads": 4, "d_ff": 64},
}


def model_and_ids(name, seed=0):
    torch.manual_seed(seed)
    model = build_model({**SPECS[name], "vocab_size": V}).eval()
    ids = torch.randint(0, V, (2, 12), generator=torch.Generator().manual_seed(seed + 1))
    return model, ids


def output(out):
    return out if isinstance(out, torch.Tensor) else out.last_hidden_state


@pytest.mark.parametrize("name", SPECS)
def test_reading_every_hook_changes_no_bit_of_the_output(name):
    model, ids = model_and_ids(name)
    with torch.no_grad():
        plain = output(model(ids))
        out, cache = run_with_cache(model, ids)
    assert torch.equal(output(out), plain)  # exact, fp32
    points = hook_points(model)
    unreached = {"hook_pos_embed"} if name == "llama" else set()
    assert set(cache) == set(points) - unreached and len(cache) > 0
    # the hooks are gone afterwards: no hook left on any point
    assert all(not p._forward_hooks and p.readers == 0 for p in hook_points(model).values())


@pytest.mark.parametrize("name", SPECS)
def test_replacing_each_activation_by_its_own_value_keeps_the_output(name):
    model, ids = model_and_ids(name)
    with torch.no_grad():
        plain = output(model(ids))
        _, cache = run_with_cache(model, ids)
        with hooks(model, replace=dict(cache.items())):
            again = output(model(ids))
    # Editing the pattern moves attention to its explicit path: float rounding only.
    torch.testing.assert_close(again, plain, rtol=1e-5, atol=1e-5)


def test_replace_and_add_change_what_follows():
    model, ids = model_and_ids("gpt")
    with torch.no_grad():
        plain = model(ids)
        _, cache = run_with_cache(model, ids, names="blocks.*.hook_resid_post")
        # replacing the last block's output replaces everything that reads it
        other = torch.randn_like(cache["blocks.1.hook_resid_post"])
        with hooks(model, replace={"blocks.1.hook_resid_post": other}):
            replaced = model(ids)
        expected = model.lm_head(model.norm(other))
        torch.testing.assert_close(replaced, expected, rtol=1e-5, atol=1e-5)
        shift = torch.randn(32)
        with hooks(model, add={"blocks.1.hook_resid_post": shift}):
            added = model(ids)
        expected = model.lm_head(model.norm(cache["blocks.1.hook_resid_post"] + shift))
        torch.testing.assert_close(added, expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(added, plain)


def test_editing_the_attention_pattern_reaches_the_output():
    model, ids = model_and_ids("llama")
    T = ids.shape[1]
    # attend only to oneself: every head of every layer copies its own value vector
    own = torch.eye(T)

    seen = []
    with (
        torch.no_grad(),
        hooks(
            model,
            replace={"blocks.*.attn.hook_pattern": own},
            read={"blocks.0.attn.hook_z": lambda z, name: seen.append(z)},
        ),
    ):
        model(ids)
    _, cache = run_with_cache(model, ids, names=["blocks.0.attn.hook_v"])
    v = cache["blocks.0.attn.hook_v"]  # (B, Hkv, T, Dh)
    groups = 4 // v.shape[1]
    expected = v.repeat_interleave(groups, dim=1).transpose(1, 2)  # (B, T, H, Dh)
    torch.testing.assert_close(seen[0], expected)


def test_patterns_match_one_dotted_part_or_many():
    model, _ = model_and_ids("gpt")
    assert match_names(model, "blocks.*.attn.hook_pattern") == [
        "blocks.0.attn.hook_pattern",
        "blocks.1.attn.hook_pattern",
    ]
    assert match_names(model, "**.hook_resid_post") == [
        "blocks.0.hook_resid_post",
        "blocks.1.hook_resid_post",
    ]
    with pytest.raises(ConfigError, match=r"no hook point matches '\*.hook_resid_post'"):
        match_names(model, "*.hook_resid_post")  # '*' is one part: blocks.0 is two
    with pytest.raises(ConfigError, match="matches 'blocks.0.hook_resid_pots'.*did you mean"):
        match_names(model, "blocks.0.hook_resid_pots")


def test_stacked_cache_and_a_gradient_through_it():
    model, ids = model_and_ids("llama")
    logits, cache = run_with_cache(model, ids, names="blocks.*.hook_resid_post", detach=False)
    assert isinstance(cache, ActivationCache)
    assert cache.stack("blocks.*.hook_resid_post").shape == (2, 2, 12, 32)
    assert cache.layers("blocks.*.hook_resid_post") == [0, 1]
    logits[0, -1, 3].backward()
    assert cache["blocks.0.hook_resid_post"].requires_grad
    with pytest.raises(KeyError, match="not in the cache"):
        cache["blocks.0.hook_mlp_out"]


def test_hooks_are_removed_after_an_error():
    model, ids = model_and_ids("gpt")

    def boom(act, name):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"), hooks(model, read={"hook_embed": boom}):
        model(ids)
    assert all(not p._forward_hooks for p in hook_points(model).values())


def test_a_wrong_shape_and_a_table_model_get_one_line():
    model, ids = model_and_ids("gpt")
    with pytest.raises(ConfigError, match=r"shape \(3, 3\).*\(2, 12, 32\)"):
        with hooks(model, replace={"blocks.0.hook_resid_pre": torch.zeros(3, 3)}):
            model(ids)
    ngram = build_model({**get_preset("ngram-char"), "order": 2, "vocab_size": V})
    with pytest.raises(ConfigError, match="no hook points"):
        run_with_cache(ngram, ids)


def test_a_recurrent_cache_continues_the_same_with_a_lower_layer_hooked():
    model, ids = model_and_ids("lstm")
    with torch.no_grad():
        cache = model.new_cache(2)
        model(ids[:, :5], cache=cache)
        plain = model(ids[:, 5:], cache=cache)
        cache = model.new_cache(2)
        with hooks(model, read={"layers.0.hook_hidden": lambda act, name: None}):
            model(ids[:, :5], cache=cache)
            hooked = model(ids[:, 5:], cache=cache)
    assert torch.equal(hooked, plain)
