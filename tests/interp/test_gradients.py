import json

import pytest
import torch

from lmlab import load
from lmlab.cli.main import main
from lmlab.errors import ConfigError, DataError
from lmlab.interp import plot_vanishing_gradients, trained_gradients, vanishing_gradients
from lmlab.models.recurrent import hidden_state_grad_norms


def test_plot_shows_rnn_gradients_vanish_faster_than_lstm(tmp_path):
    png = tmp_path / "grads.png"
    norms = plot_vanishing_gradients(png, seq_len=60, d_model=32, batch_size=2)
    assert png.is_file() and png.stat().st_size > 5_000
    decay = {cell: (n[0] / n[-1]).item() for cell, n in norms.items()}
    assert all(len(n) == 60 for n in norms.values())
    # 60 steps back: the RNN keeps orders of magnitude less of its gradient than the LSTM
    assert decay["rnn"] < 1e-3 * decay["lstm"]


def test_a_forget_bias_below_zero_makes_the_lstm_forget_faster():
    kept = {
        bias: vanishing_gradients(("lstm",), 40, d_model=16, batch_size=2, forget_bias=bias)
        for bias in (1.0, -2.0)
    }
    decay = {bias: (n["lstm"][0] / n["lstm"][-1]).item() for bias, n in kept.items()}
    assert decay[-2.0] < 1e-2 * decay[1.0]


@pytest.fixture(scope="module")
def rnn_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("rnn") / "run"
    argv = ["train", "--model", "rnn-char", "--data", "tinyshakespeare", "--train.max_steps", "1"]
    argv += ["--train.batch_size", "2", "--train.seq_len", "16", "--train.progress", "false"]
    assert main(argv + ["--train.out_dir", str(out)]) == 0
    return out


def test_trained_gradients_score_the_token_after_each_window(rnn_run):
    text = "to be or not to be " * 20
    norms = trained_gradients({"rnn": rnn_run}, text, seq_len=12, batch_size=3, seed=1)
    assert norms["rnn"].shape == (12,) and norms["rnn"].dtype == torch.float64
    # the same windows (the seeded offsets) measured directly
    lm = load(rnn_run, dtype="float32")
    ids = torch.tensor(lm.tokenizer.encode(text))
    starts = torch.randint(0, len(ids) - 12, (3,), generator=torch.Generator().manual_seed(1))
    windows = torch.stack([ids[s : s + 13] for s in starts.tolist()])
    direct = hidden_state_grad_norms(lm.model.double(), windows[:, :-1], windows[:, -1])
    torch.testing.assert_close(norms["rnn"], direct, rtol=0, atol=0)


def test_the_command_writes_the_figure_and_the_ratios(rnn_run, tmp_path, capsys):
    out = tmp_path / "g"
    argv = ["gradients", "--cells", "rnn,lstm", "--seq_len", "30", "--d_model", "16"]
    assert main(argv + ["--out", str(out)]) == 0
    saved = json.loads((out / "grads.json").read_text())
    assert (out / "grads.png").stat().st_size > 5_000
    for cell in ("rnn", "lstm"):
        n = saved["norms"][cell]
        assert len(n) == 30 and saved["first_over_last"][cell] == pytest.approx(n[0] / n[-1])
    assert "||dL/dh_0|| / ||dL/dh_29||" in capsys.readouterr().out
    trained = tmp_path / "t"
    argv = ["gradients", "--models", str(rnn_run), "--seq_len", "20", "--out", str(trained)]
    assert main(argv) == 0
    assert len(json.loads((trained / "grads.json").read_text())["norms"]["run"]) == 20


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--cells", "rnn,transformer"], "cells='rnn,transformer' is invalid: choose from"),
        (["--seq_len", "1"], "seq_len=1 is invalid"),
        (["--batch_size", "0"], "batch_size=0 is invalid: must be an integer >= 1"),
        (["--models", "x", "--seq_len", "0"], "seq_len=0 is invalid"),
    ],
)
def test_bad_settings_are_one_line_errors(argv, message, tmp_path, capsys):
    assert main(["gradients", "--out", str(tmp_path / "x"), *argv]) != 0
    assert message in capsys.readouterr().err


def test_a_model_that_is_not_recurrent_or_a_short_text_is_refused(rnn_run, tmp_path):
    out = tmp_path / "gpt"
    argv = ["train", "--model", "gpt-char-tiny", "--data", "tinyshakespeare"]
    argv += ["--train.max_steps", "1", "--train.batch_size", "2", "--train.seq_len", "16"]
    argv += ["--model_overrides", '{"d_model": 16, "n_layers": 1, "n_heads": 2, "d_ff": 32}']
    assert main(argv + ["--train.progress", "false", "--train.out_dir", str(out)]) == 0
    with pytest.raises(ConfigError, match="gradients measures recurrent models"):
        trained_gradients({"gpt": out}, "some text " * 30, seq_len=10)
    with pytest.raises(DataError, match="need at least seq_len"):
        trained_gradients({"rnn": rnn_run}, "short", seq_len=10)
