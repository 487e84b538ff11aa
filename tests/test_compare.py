import json
import math

import pytest
import torch

from lmlab.cli.main import main
from lmlab.compare import Budget, compare, parse_budget, resolve_model, resolve_models, train_config
from lmlab.errors import ConfigError

WORDS = "to be or not that is the question whether tis nobler in the mind to suffer".split()


@pytest.fixture
def corpus(tmp_path):
    gen = torch.Generator().manual_seed(0)
    picks = torch.randint(len(WORDS), (2000,), generator=gen).tolist()
    path = tmp_path / "c.txt"
    path.write_text(" ".join(WORDS[i] for i in picks), encoding="utf-8")
    return path


@pytest.mark.parametrize(
    "text, expected",
    [
        ("3m", Budget("time", 180.0)),
        ("90s", Budget("time", 90.0)),
        ("1h", Budget("time", 3600.0)),
        ("1.5m", Budget("time", 90.0)),
        ("2M tok", Budget("tokens", 2_000_000)),
        ("2m tok", Budget("tokens", 2_000_000)),
        ("500k", Budget("tokens", 500_000)),
        ("2k tok", Budget("tokens", 2000)),
        ("20000 tokens", Budget("tokens", 20000)),
    ],
)
def test_parse_budget(text, expected):
    assert parse_budget(text) == expected


@pytest.mark.parametrize("text", ["", "3", "3x", "0s", "-1m", "m", "2 steps", "0 tok"])
def test_parse_budget_rejects(text):
    with pytest.raises(ConfigError, match="valid forms"):
        parse_budget(text)


def test_resolve_model_names():
    assert resolve_model("ngram") == (
        "ngram",
        {"family": "ngram", "vocab_size": None, "order": 5, "smoothing": "kneser_ney"},
    )
    assert resolve_model("lstm")[1]["cell"] == "lstm"
    assert resolve_model("gpt")[1]["d_model"] == 192
    assert resolve_model("mlp-char")[0] == "mlp-char"
    with pytest.raises(ConfigError, match="did you mean 'lstm'"):
        resolve_model("lstn")


def test_resolve_models_and_the_training_settings_of_a_budget(tmp_path):
    assert list(resolve_models(" ngram, lstm ,")) == ["ngram", "lstm"]
    with pytest.raises(ConfigError, match="models is empty"):
        resolve_models(" , ")
    # 2M tokens in batches of 32 x 128 = 4096 tokens: 488 steps, evaluated every 48.
    tokens = train_config(parse_budget("2M tok"), tmp_path, 32, 128, 2e-3, 0, None, False)
    assert (tokens.max_steps, tokens.eval_interval, tokens.lr_schedule) == (488, 48, "cosine")
    assert tokens.min_lr == pytest.approx(2e-4) and tokens.time_budget_s is None
    timed = train_config(parse_budget("90s"), tmp_path, 32, 128, 2e-3, 0, 7, False)
    assert (timed.time_budget_s, timed.eval_interval, timed.lr_schedule) == (90.0, 7, "constant")


def test_compare_rejects_bad_names_before_work(tmp_path, corpus):
    with pytest.raises(ConfigError, match="did you mean 'gpt'"):
        compare(["ngram", "gtp"], data=str(corpus), out_dir=str(tmp_path / "out"))
    with pytest.raises(ConfigError, match="twice"):
        compare("lstm,lstm", data=str(corpus), out_dir=str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_compare_runs_every_family(tmp_path, corpus):
    out = tmp_path / "out"
    result = compare(
        ["ngram", "bigram", "lstm"],
        data=str(corpus),
        budget="2k tok",  # 2000 // (4 * 32) = 15 steps each
        out_dir=str(out),
        batch_size=4,
        seq_len=32,
        prompt="to be",
        sample_tokens=20,
        progress=False,
    )
    saved = json.loads((out / "compare.json").read_text())
    assert [m["name"] for m in saved["models"]] == ["ngram", "bigram", "lstm"]
    vocab = saved["vocab_size"]
    for m in saved["models"]:
        assert math.isfinite(m["val_perplexity"]) and m["val_perplexity"] > 1
        assert m["sample"]
    ngram, bigram, lstm = saved["models"]
    assert ngram["val_perplexity"] < vocab
    assert ngram["size_unit"] == "n-grams" and ngram["steps"] == 0
    assert len(ngram["curve"]) == 1
    assert bigram["steps"] == lstm["steps"] == 15
    assert lstm["curve"] and lstm["size_unit"] == "parameters"
    for name in ("compare.md", "compare.png", "ngram/checkpoint", "lstm/metrics.jsonl"):
        assert (out / name).exists(), name
    assert result.table in (out / "compare.md").read_text()


def test_cli_compare(tmp_path, corpus, capsys):
    out = tmp_path / "out"
    args = ["compare", "--models", "ngram,bigram", "--data", str(corpus), "--budget", "1k tok"]
    args += ["--out_dir", str(out), "--batch-size", "4", "--seq_len", "16", "--prompt", "to"]
    code = main([*args, "--sample_tokens", "10", "--progress", "false"])
    printed = capsys.readouterr().out
    assert code == 0
    assert "| ngram | ngram |" in printed and "| bigram | bigram |" in printed
    assert "compare.md" in printed
    assert (out / "compare.json").is_file()


def test_cli_compare_user_errors(capsys):
    assert main(["compare", "--models", "ngram,lstn"]) == 2
    assert "did you mean 'lstm'" in capsys.readouterr().err
    assert main(["compare", "--budget", "3 parsecs"]) == 2
    assert "valid forms" in capsys.readouterr().err


def test_compare_time_budget_and_spec_file(tmp_path, corpus):
    spec = tmp_path / "tiny-gru.yaml"
    spec.write_text("family: recurrent\ncell: gru\nd_model: 16\nn_layers: 1\n")
    result = compare(
        [str(spec)],
        data=str(corpus),
        budget="0.5s",
        out_dir=str(tmp_path / "out"),
        batch_size=2,
        seq_len=16,
        prompt="to",
        sample_tokens=5,
        progress=False,
    )
    (gru,) = result.models
    assert gru.name == "tiny-gru" and gru.spec["cell"] == "gru"
    assert gru.steps >= 1 and math.isfinite(gru.val_loss) and gru.curve


def test_compare_objectives_exposure_and_step_plot(tmp_path, corpus):
    out = tmp_path / "out"
    result = compare(
        "ngram,bigram",
        data=str(corpus),
        budget="1k tok",  # 1000 // (4 * 16) = 15 steps
        out_dir=str(out),
        batch_size=4,
        seq_len=16,
        sample_tokens=4,
        prompt="to",
        objectives="teacher_forcing,free_running",
        exposure="1,0.5,0",
        x_axis="step",
        title="objectives",
        progress=False,
    )
    names = [m.name for m in result.models]
    # The fitted n-gram runs once; the trained bigram once per objective.
    assert names == ["ngram", "bigram-teacher_forcing", "bigram-free_running"]
    for m in result.models[1:]:
        config = json.loads((out / m.name / "config.json").read_text())
        assert config["train"]["objective"] == m.objective == m.name.split("-", 1)[1]
        assert [s for s, _ in m.step_curve] == sorted({s for s, _ in m.step_curve})
        assert m.step_curve[-1][0] == m.steps == 15
        assert [v for _, v in m.step_curve] == [v for _, v in m.curve]  # the same evaluations
        assert list(m.exposure) == ["1", "0.5", "0"]
        assert all(math.isfinite(v) for v in m.exposure.values())
    assert result.models[0].exposure == {} and result.models[0].step_curve == []
    saved = json.loads((out / "compare.json").read_text())
    assert saved["objectives"] == ["teacher_forcing", "free_running"]
    assert saved["exposure"] == [1.0, 0.5, 0.0]
    assert (out / "exposure.png").stat().st_size > 0 and (out / "compare.png").stat().st_size > 0
    assert result.files["exposure"] == out / "exposure.png"


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"objectives": "teacher_forcing,linaer"}, "did you mean 'linear'"),
        ({"objectives": "linear,linear"}, "twice"),
        ({"objectives": "exponential"}, "ss_k"),  # the exponential schedule needs k < 1
        ({"exposure": "1,1.5"}, "in \\[0, 1\\]"),
        ({"exposure": "1,half"}, "'half'"),
        ({"x_axis": "tokens"}, "valid: time, step"),
    ],
)
def test_compare_rejects_bad_objectives_and_exposure_before_work(
    tmp_path, corpus, settings, message
):
    with pytest.raises(ConfigError, match=message):
        compare("bigram", data=str(corpus), out_dir=str(tmp_path / "out"), **settings)
    assert not (tmp_path / "out").exists()


def test_cli_compare_objectives_errors_are_one_line(capsys):
    assert main(["compare", "--models", "bigram", "--objectives", "linaer"]) == 2
    err = capsys.readouterr().err
    assert "did you mean 'linear'" in err and err.count("\n") == 1
