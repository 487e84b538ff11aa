"""``lmlab train``: seeds, resuming with the run's own settings, one-line errors."""

import json

import pytest
import torch
from safetensors.torch import load_file

from builders import tensorboard_scalars
from lmlab.checkpoint.io import latest_checkpoint
from lmlab.cli.main import main
from lmlab.train.metrics import read_metrics

TINY = '{"d_model": 16, "n_layers": 1, "n_heads": 2, "d_ff": 32, "max_seq_len": 16, "dropout": 0.1}'


@pytest.fixture
def corpus(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text("to be or not to be, that is the question. " * 40)
    return path


def train_flags(corpus, out_dir, *extra):
    return [
        "train",
        "--data",
        str(corpus),
        "--model_overrides",
        TINY,
        "--train.out_dir",
        str(out_dir),
        "--train.batch_size",
        "2",
        "--train.seq_len",
        "16",
        "--train.warmup_steps",
        "1",
        "--train.progress",
        "false",
        "--train.precision",
        "fp32",
        *extra,
    ]


def weights(run_dir):
    return load_file(latest_checkpoint(run_dir) / "model.safetensors")


def one_line_error(capsys, *parts):
    err = capsys.readouterr().err
    assert err.startswith("lmlab: error:") and err.count("\n") == 1, err
    assert "Traceback" not in err
    for part in parts:
        assert part in err, err
    return err


# ----------------------------------------------------------------------------- seeds (31)


def test_the_same_seed_gives_bit_identical_weights(corpus, tmp_path):
    """Item 31: initialisation, data order and dropout all follow --train.seed."""
    for name, seed in (("a", "7"), ("b", "7"), ("c", "8")):
        flags = train_flags(corpus, tmp_path / name, "--train.max_steps", "3")
        assert main([*flags, "--train.seed", seed]) == 0
    a, b, c = (weights(tmp_path / name) for name in "abc")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


# ----------------------------------------------------------------------------- one-line errors


def test_an_out_dir_that_is_a_file_or_cannot_be_created_is_one_line(corpus, tmp_path, capsys):
    file = tmp_path / "taken.txt"
    file.write_text("not a folder")
    assert main(train_flags(corpus, file, "--train.max_steps", "1")) == 2
    one_line_error(capsys, "taken.txt", "is a file")
    assert main(train_flags(corpus, file / "run", "--train.max_steps", "1")) == 2
    one_line_error(capsys, "cannot be created")
    assert file.read_text() == "not a folder"


@pytest.mark.parametrize(
    ("name", "content", "problem"),
    [
        ("spec.json", b'{"family": "transformer",', "not valid JSON/YAML"),
        ("spec.yaml", b"family: [transformer\nd_model: 8\n", "not valid JSON/YAML"),
        ("spec.yaml", b"\x00\xff\xfe\x89PNG\r\n\x1a\n" * 8, "not a text file"),
        ("spec.yml", b"- family\n- transformer\n", "must hold a mapping"),
    ],
)
def test_a_malformed_model_spec_file_is_one_line(corpus, tmp_path, capsys, name, content, problem):
    spec = tmp_path / name
    spec.write_bytes(content)
    flags = train_flags(corpus, tmp_path / "run", "--train.max_steps", "1", "--model", str(spec))
    assert main(flags) == 2
    one_line_error(capsys, name, problem)


# ----------------------------------------------------------------------------- resume


@pytest.fixture
def short_run(corpus, tmp_path):
    """A 4-step run with settings far from the defaults (batch 2, lr 0.01, its own data)."""
    out = tmp_path / "run"
    flags = ["--train.max_steps", "4", "--train.ckpt_interval", "2", "--train.lr", "0.01"]
    assert main(train_flags(corpus, out, *flags, "--train.seed", "3")) == 0
    return out


def test_resume_continues_with_the_runs_recorded_settings(short_run, capsys):
    """Regression: a batch-8, 20-step run resumed with only --train.resume auto continued
    at the default batch 32 towards 1,000 steps (and on the default data)."""
    capsys.readouterr()
    code = main(
        ["train", "--train.out_dir", str(short_run), "--train.resume", "auto"]
        + ["--train.max_steps", "6", "--train.progress", "false"]
    )
    out = capsys.readouterr().out
    assert code == 0
    assert "resuming" in out and "recorded settings" in out and "max_steps 4 -> 6" in out
    record = json.loads((short_run / "config.json").read_text())["train"]
    assert (record["batch_size"], record["lr"], record["seed"]) == (2, 0.01, 3)
    assert record["max_steps"] == 6 and record["resume"] == "auto"
    resumed = [e for e in read_metrics(short_run / "metrics.jsonl") if e["event"] == "resume"]
    assert [(e["step"], e["changed"]) for e in resumed] == [(4, {"max_steps": [4, 6]})]
    assert latest_checkpoint(short_run).name == "step-00000006"


def test_resume_accepts_the_same_model_and_data_given_again(short_run, corpus, capsys):
    flags = train_flags(corpus, short_run, "--train.resume", "auto", "--train.max_steps", "5")
    assert main([*flags, "--model", "gpt-char-tiny"]) == 0, capsys.readouterr().err
    assert latest_checkpoint(short_run).name == "step-00000005"


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--data", "other.txt"], "--data 'other.txt' cannot change mid-run"),
        (["--tokenizer", "byte"], "--tokenizer 'byte' cannot change mid-run"),
        (["--model_overrides", '{"d_model": 32}'], "d_model: 16 there, 32 here"),
        (["--model", "bigram-char"], "the model cannot change mid-run"),
        (["--train.seed", "9"], "seed=9 cannot change mid-run (the run has seed=3)"),
        (["--train.seq_len", "8"], "seq_len=8 cannot change mid-run"),
    ],
)
def test_resume_refuses_what_cannot_change_mid_run(short_run, capsys, flags, message):
    before = (short_run / "config.json").read_text()
    capsys.readouterr()
    args = ["train", "--train.out_dir", str(short_run), "--train.resume", "auto", *flags]
    assert main(args) == 2
    one_line_error(capsys, message)
    assert (short_run / "config.json").read_text() == before


def test_resume_from_another_runs_checkpoint_takes_its_settings(short_run, tmp_path, capsys):
    """--train.resume PATH into a new out_dir: the checkpoint's recorded settings apply."""
    ckpt = latest_checkpoint(short_run)
    out = tmp_path / "continued"
    args = ["train", "--data", str(tmp_path / "corpus.txt"), "--train.out_dir", str(out)]
    assert main([*args, "--train.resume", str(ckpt), "--train.max_steps", "5"]) == 0
    record = json.loads((out / "config.json").read_text())
    assert (record["train"]["batch_size"], record["train"]["seed"]) == (2, 3)
    assert record["model"]["d_model"] == 16
    assert latest_checkpoint(out).name == "step-00000005"


def test_log_flags_write_tensorboard_events_beside_metrics(corpus, tmp_path):
    """``--log.tensorboard true`` on the command line: the event file holds train/loss at
    the steps of metrics.jsonl."""
    out = tmp_path / "run"
    flags = train_flags(corpus, out, "--train.max_steps", "2", "--train.log_interval", "1")
    assert main([*flags, "--log.tensorboard", "true"]) == 0
    logged = [r["step"] for r in read_metrics(out / "metrics.jsonl") if r["event"] == "train"]
    assert [step for step, _ in tensorboard_scalars(out / "tensorboard")["train/loss"]] == logged
    assert logged == [1, 2]
    assert json.loads((out / "config.json").read_text())["train"]["log"]["tensorboard"] is True


def test_a_one_step_run_says_step_not_steps(tmp_path, capsys):
    argv = ["train", "--model", "gpt-char-tiny", "--data", "tinyshakespeare"]
    argv += ["--train.max_steps", "1", "--train.batch_size", "2", "--train.seq_len", "16"]
    argv += ["--model_overrides", '{"d_model": 16, "n_layers": 1, "n_heads": 2, "d_ff": 32}']
    assert main(argv + ["--train.progress", "false", "--train.out_dir", str(tmp_path / "r")]) == 0
    assert "trained 1 step in " in capsys.readouterr().out
