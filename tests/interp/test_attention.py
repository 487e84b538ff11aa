"""Attention maps, attention rollout and ``lmlab attention`` (``lmlab.interp.attention``)."""

import json

import pytest
import torch

from lmlab.checkpoint.io import save_checkpoint
from lmlab.cli.main import main
from lmlab.data import CharTokenizer
from lmlab.errors import ConfigError
from lmlab.interp.attention import attention_maps, attention_report, attention_rollout
from lmlab.interp.hooks import hooks
from lmlab.models import build_model, get_preset

V = 30
SPECS = {
    "gpt": {**get_preset("gpt-char-tiny"), "n_layers": 3, "d_model": 32, "n_heads": 4},
    "llama": {**get_preset("llama-small"), "n_layers": 3, "d_model": 32, "n_heads": 4},
    "encoder": {"family": "encoder", "d_model": 32, "n_layers": 2, "n_heads": 4, "d_ff": 64},
}


def model_and_ids(name, T=9):
    torch.manual_seed(0)
    model = build_model({**SPECS[name], "vocab_size": V}).eval()
    with torch.no_grad():  # larger weights than the init's, so patterns are far from uniform
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.5)
    ids = torch.randint(0, V, (1, T), generator=torch.Generator().manual_seed(1))
    return model, ids


@pytest.mark.parametrize("name", SPECS)
def test_maps_are_distributions_and_causal_for_decoders(name):
    model, ids = model_and_ids(name)
    maps = attention_maps(model, ids)
    L, H, T = model.config.n_layers, model.config.n_heads, ids.shape[1]
    assert maps.shape == (L, H, T, T)
    torch.testing.assert_close(maps.sum(-1), torch.ones(L, H, T))  # fp32 rounding
    above = maps.triu(diagonal=1)
    if name == "encoder":
        assert above.sum() > 0.1 * L * H  # bidirectional: real weight on later tokens
    else:
        assert torch.equal(above, torch.zeros_like(above))  # no look-ahead, exactly
    assert maps.std() > 0.05  # not uniform: the test would see a wrong pattern


def test_maps_equal_the_explicit_attention_path():
    """The cached pattern is the one the explicit path multiplies v by."""
    model, ids = model_and_ids("llama")
    maps = attention_maps(model, ids)
    seen = []
    model.use_explicit_attention(True)
    with (
        torch.no_grad(),
        hooks(model, edit={"blocks.*.attn.hook_pattern": lambda a, n: seen.append(a)}),
    ):
        model(ids)
    model.use_explicit_attention(False)
    explicit = torch.stack(seen)[:, 0]
    assert torch.equal(maps[0], explicit[0])  # same inputs, same function: same bits
    # later layers read residuals that the fast and explicit paths round differently (fp32)
    torch.testing.assert_close(maps, explicit, rtol=1e-5, atol=1e-5)


def test_rollout_matches_the_hand_computed_two_layer_example():
    """The module docstring's example, worked by hand:
    A_1 = 0.5 [[1, 0], [0.5, 0.5]] + 0.5 I = [[1, 0], [0.25, 0.75]]
    A_2 = 0.5 [[1, 0], [0.2, 0.8]] + 0.5 I = [[1, 0], [0.1, 0.9]]
    R_2 = A_2 A_1 = [[1, 0], [0.1 + 0.9 * 0.25, 0.9 * 0.75]] = [[1, 0], [0.325, 0.675]]
    Without the residual: R_2 = [[1, 0], [0.2 + 0.8 * 0.5, 0.8 * 0.5]] = [[1, 0], [0.6, 0.4]].
    """
    maps = torch.tensor([[[[1.0, 0.0], [0.5, 0.5]]], [[[1.0, 0.0], [0.2, 0.8]]]])  # (L, H, T, T)
    rollout = attention_rollout(maps)
    torch.testing.assert_close(rollout[0], torch.tensor([[1.0, 0.0], [0.25, 0.75]]))
    torch.testing.assert_close(rollout[1], torch.tensor([[1.0, 0.0], [0.325, 0.675]]))
    plain = attention_rollout(maps, residual=False)
    torch.testing.assert_close(plain[1], torch.tensor([[1.0, 0.0], [0.6, 0.4]]))


def test_rollout_averages_heads_and_stays_causal():
    g = torch.Generator().manual_seed(0)
    scores = torch.randn(4, 3, 6, 6, generator=g)
    maps = scores.masked_fill(~torch.ones(6, 6, dtype=torch.bool).tril(), float("-inf"))
    maps = maps.softmax(-1)
    rollout = attention_rollout(maps)
    torch.testing.assert_close(rollout, attention_rollout(maps.mean(1)))
    torch.testing.assert_close(rollout.sum(-1), torch.ones(4, 6))
    assert torch.equal(rollout.triu(1), torch.zeros_like(rollout))
    # layer l's rollout is layer l's mixed map times the rollout below it
    mixed = 0.5 * maps[2].mean(0) + 0.5 * torch.eye(6)
    torch.testing.assert_close(rollout[2], mixed @ rollout[1])


@pytest.mark.parametrize("name", SPECS)
def test_rollout_of_identity_patterns_is_the_identity(name):
    model, ids = model_and_ids(name)
    T = ids.shape[1]
    with hooks(model, replace={"blocks.*.attn.hook_pattern": torch.eye(T)}):
        maps = attention_maps(model, ids)  # read after the replacement
    assert torch.equal(maps, torch.eye(T).expand_as(maps))
    for residual in (True, False):
        rollout = attention_rollout(maps, residual=residual)
        assert torch.equal(rollout, torch.eye(T).expand_as(rollout))


def test_maps_refuse_a_model_without_attention():
    model = build_model({**get_preset("lstm-char"), "vocab_size": V, "d_model": 8})
    with pytest.raises(ConfigError, match="no attention layers"):
        attention_maps(model, torch.zeros(1, 4, dtype=torch.long))


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    tok = CharTokenizer.train("to be or not to be, that is the question")
    torch.manual_seed(0)
    model = build_model({**SPECS["gpt"], "vocab_size": tok.vocab_size, "n_layers": 2})
    return save_checkpoint(tmp_path_factory.mktemp("att") / "ckpt", model, tokenizer=tok)


def test_command_writes_figures_and_json_on_a_tiny_model(tiny_ckpt, tmp_path, capsys):
    out = tmp_path / "att"
    argv = ["attention", "--model", str(tiny_ckpt), "--prompt", "to be or not"]
    assert main([*argv, "--layer", "1", "--out", str(out), "--dtype", "float32"]) in (0, None)
    for name in ("attention.png", "rollout.png", "attention.json"):
        assert (out / name).stat().st_size > 1000
    result = json.loads((out / "attention.json").read_text())
    assert result["tokens"] == list("to\u2423be\u2423or\u2423not")
    assert torch.tensor(result["maps"]).shape == (2, 4, 12, 12)
    assert result["causal"] and len(result["rollout"]) == 2
    assert str(out / "attention.png") in capsys.readouterr().out


def test_report_names_a_bad_layer_or_head(tiny_ckpt, tmp_path):
    with pytest.raises(ConfigError, match="layer 5 is out of range: the model has layers 0..1"):
        attention_report(str(tiny_ckpt), "to be", tmp_path, layer=5, dtype="float32")
    with pytest.raises(ConfigError, match="head needs --layer"):
        attention_report(str(tiny_ckpt), "to be", tmp_path, head=1, dtype="float32")
    with pytest.raises(ConfigError, match="prompt is empty"):
        attention_report(str(tiny_ckpt), "", tmp_path, dtype="float32")


@pytest.mark.slow
def test_command_on_minilm(tmp_path):
    out = tmp_path / "minilm"
    argv = ["attention", "--model", "minilm", "--prompt", "The cat sat on the mat."]
    assert main([*argv, "--out", str(out), "--dtype", "float32"]) in (0, None)
    result = json.loads((out / "attention.json").read_text())
    assert result["tokens"][0] == "[CLS]" and result["tokens"][-1] == "[SEP]"
    maps = torch.tensor(result["maps"])
    assert maps.shape[:2] == (6, 12) and not result["causal"]
    assert maps.triu(1).sum() > 1.0  # an encoder attends both ways
    assert (out / "rollout.png").stat().st_size > 1000
