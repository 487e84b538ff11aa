"""Self-attention by hand (``lmlab.interp.selfattention``) equals the model's own
attention, and ``lmlab attention --by_hand`` draws the steps."""

import json

import pytest
import torch

from lmlab.checkpoint.io import save_checkpoint
from lmlab.cli.main import main
from lmlab.data import CharTokenizer
from lmlab.errors import ConfigError
from lmlab.interp.selfattention import attention_by_hand
from lmlab.models import build_model, get_preset

V = 30
SPECS = {
    "gpt": {**get_preset("gpt-char-tiny"), "n_layers": 2, "d_model": 32, "n_heads": 4},
    # RoPE, RMSNorm, no biases, grouped-query (4 query heads share 2 key/value heads)
    "llama": {**get_preset("llama-small"), "n_layers": 2, "d_model": 32, "n_heads": 4},
    "sinusoidal-mha": {
        **get_preset("gpt-char-tiny"),
        "n_layers": 2,
        "d_model": 24,
        "n_heads": 3,
        "pos": "sinusoidal",
    },  # fmt: skip
}


def random_model(name: str, seed: int):
    torch.manual_seed(seed)
    model = build_model({**SPECS[name], "vocab_size": V}).eval()
    with torch.no_grad():  # weights and biases away from the init, so nothing is trivial
        for p in model.parameters():
            p.normal_(0, 0.3)
    return model


@pytest.mark.parametrize("name", SPECS)
@pytest.mark.parametrize("seed", [0, 1])
def test_hand_attention_equals_the_models(name, seed):
    model = random_model(name, seed)
    T = 7 + seed
    ids = torch.randint(0, V, (1, T), generator=torch.Generator().manual_seed(seed))
    for layer in range(model.config.n_layers):
        steps = attention_by_hand(model, ids, layer)
        H = model.config.n_heads
        assert steps.scores.shape == steps.weights.shape == (H, T, T)
        assert steps.out.dtype == torch.float32
        assert steps.max_abs_diff < 1e-5, (name, layer, steps.max_abs_diff)
        assert steps.max_weight_diff < 1e-5
        # the mask: nothing right of the diagonal, and rows are distributions
        assert torch.all(steps.weights.triu(1) == 0)
        torch.testing.assert_close(steps.weights.sum(-1), torch.ones(H, T))
        future = torch.ones(T, T, dtype=torch.bool).triu(1)
        assert torch.isinf(steps.masked[:, future]).all()
        assert torch.equal(steps.masked[:, ~future], steps.scores[:, ~future])


def test_a_wrong_weight_is_caught():
    # the comparison is not vacuous: change o_proj after the forward would read it
    model = random_model("gpt", 0)
    ids = torch.randint(0, V, (1, 6), generator=torch.Generator().manual_seed(0))
    steps = attention_by_hand(model, ids, 0)
    with torch.no_grad():
        model.blocks[0].attn.o_proj.weight.mul_(1.01)
    changed = attention_by_hand(model, ids, 0)
    assert steps.max_abs_diff < 1e-5 and changed.max_abs_diff < 1e-5
    assert (changed.out - steps.out).abs().max() > 1e-4


def test_bad_layer_and_family_are_one_line_errors():
    model = random_model("gpt", 0)
    ids = torch.zeros(1, 4, dtype=torch.long)
    with pytest.raises(ConfigError, match="layers 0..1"):
        attention_by_hand(model, ids, 5)
    rnn = build_model({**get_preset("lstm-char"), "vocab_size": V, "d_model": 8})
    with pytest.raises(ConfigError, match="not a decoder transformer"):
        attention_by_hand(rnn, ids, 0)


def test_cli_by_hand_writes_the_steps(tmp_path, capsys):
    tok = CharTokenizer.train("ROMEO: but soft, what light")
    model = build_model({**SPECS["gpt"], "vocab_size": tok.vocab_size, "max_seq_len": 32})
    ckpt = save_checkpoint(tmp_path / "ckpt", model, tokenizer=tok)
    out = tmp_path / "out"
    argv = ["attention", "--model", str(ckpt), "--prompt", "ROMEO: but", "--by_hand", "true"]
    assert main(argv + ["--layer", "1", "--device", "cpu", "--out", str(out)]) == 0
    report = json.loads((out / "by_hand.json").read_text())
    assert report["layer"] == 1 and report["max_abs_diff"] < 1e-5
    assert len(report["weights"]) == 4 and len(report["weights"][0]) == len("ROMEO: but")
    for name in ("steps.png", "matrices.png"):
        assert (out / name).stat().st_size > 1000
    assert "max |hand - model|" in capsys.readouterr().out
    assert main(argv + ["--layer", "7", "--out", str(out)]) == 2
