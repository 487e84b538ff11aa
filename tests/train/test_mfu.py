"""FLOPs, tokens/s and MFU in the trainer's log; the matmul ceiling is measured once and
cached."""

import json

import pytest
import torch

from lmlab.models import build_model
from lmlab.models.flops import chinchilla_flops_per_token
from lmlab.train import TrainConfig, mfu, train
from lmlab.train.metrics import read_metrics


def test_matmul_ceiling_is_measured_once_and_cached(tmp_path, monkeypatch):
    path = tmp_path / "ceiling.json"
    monkeypatch.setattr(mfu, "cache_file", lambda: path)
    mfu.forget_ceilings()
    first = mfu.matmul_ceiling(torch.device("cpu"), torch.float32)
    assert first > 0
    key = mfu.machine_key(torch.device("cpu"), torch.float32)
    assert json.loads(path.read_text()) == {key: first}

    def never(*args, **kwargs):
        raise AssertionError("measured again")

    monkeypatch.setattr(mfu, "measure_matmul_flops", never)
    mfu.forget_ceilings()  # a new process: read from the file
    assert mfu.matmul_ceiling(torch.device("cpu"), torch.float32) == first
    mfu.forget_ceilings()


def test_measuring_leaves_the_global_rng_alone(tmp_path, monkeypatch):
    """Regression: the measurement drew its matrices from torch's global RNG, so a run that
    measured (the first in a process) got other dropout masks than its resumed copy."""
    monkeypatch.setattr(mfu, "cache_file", lambda: tmp_path / "ceiling.json")
    mfu.forget_ceilings()
    before = torch.get_rng_state()
    mfu.matmul_ceiling(torch.device("cpu"), torch.float32)
    assert torch.equal(torch.get_rng_state(), before)
    mfu.forget_ceilings()


def test_train_lines_carry_cumulative_flops_and_mfu(tmp_path):
    spec = {"family": "transformer", "vocab_size": 11, "d_model": 16, "n_layers": 1,
            "n_heads": 2, "d_ff": 32, "max_seq_len": 8}  # fmt: skip
    model = build_model(spec)
    tokens = torch.randint(0, 11, (500,))
    config = TrainConfig(out_dir=str(tmp_path / "run"), max_steps=4, batch_size=3, seq_len=8,
                         log_interval=2, precision="fp32", progress=False)  # fmt: skip
    result = train(model, tokens, None, config)
    per_token = chinchilla_flops_per_token(model.config, 8)
    lines = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if r["event"] == "train"]
    assert [r["step"] for r in lines] == [2, 4]
    for r in lines:
        assert r["flops"] == pytest.approx(r["tokens"] * per_token)
        assert r["tokens"] == r["step"] * 3 * 8
        assert 0 < r["mfu"] < 10 and r["tokens_per_s"] > 0
    assert result.flops == pytest.approx(4 * 3 * 8 * per_token)
    recorded = json.loads((tmp_path / "run" / "config.json").read_text())
    assert recorded["resolved"]["flops_per_token"] == per_token


def test_families_without_a_count_log_no_flops(tmp_path):
    model = build_model({"family": "recurrent", "vocab_size": 11, "cell": "gru", "d_model": 8})
    config = TrainConfig(out_dir=str(tmp_path / "run"), max_steps=2, batch_size=2, seq_len=8,
                         log_interval=1, progress=False)  # fmt: skip
    result = train(model, torch.randint(0, 11, (200,)), None, config)
    lines = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if r["event"] == "train"]
    assert lines and all("flops" not in r and "mfu" not in r for r in lines)
    assert result.flops is None


def test_remeasuring_keeps_the_higher_ceiling(tmp_path, monkeypatch):
    path = tmp_path / "ceiling.json"
    monkeypatch.setattr(mfu, "cache_file", lambda: path)
    key = mfu.machine_key(torch.device("cpu"), torch.float32)
    monkeypatch.setattr(mfu, "measure_matmul_flops", lambda *a, **k: 5e9)
    for cached, expected in ((1e9, 5e9), (8e9, 8e9)):  # a low value is replaced, a high kept
        path.write_text(json.dumps({key: cached, "other": 3.0}))
        mfu.forget_ceilings()
        assert mfu.matmul_ceiling(torch.device("cpu"), torch.float32) == cached
        assert mfu.matmul_ceiling(torch.device("cpu"), torch.float32, remeasure=True) == expected
        assert json.loads(path.read_text()) == {key: expected, "other": 3.0}
        assert mfu.matmul_ceiling(torch.device("cpu"), torch.float32) == expected
    mfu.forget_ceilings()


def test_an_mfu_above_one_measures_the_ceiling_again(tmp_path, monkeypatch):
    """A ceiling cached while the machine was busy (here absurdly low: 1 FLOP/s) would
    give an MFU in the billions; the run measures again once and logs a sane one."""
    path = tmp_path / "ceiling.json"
    monkeypatch.setattr(mfu, "cache_file", lambda: path)
    key = mfu.machine_key(torch.device("cpu"), torch.float32)
    path.write_text(json.dumps({key: 1.0}))
    mfu.forget_ceilings()
    spec = {"family": "transformer", "vocab_size": 11, "d_model": 16, "n_layers": 1,
            "n_heads": 2, "d_ff": 32, "max_seq_len": 8}  # fmt: skip
    config = TrainConfig(out_dir=str(tmp_path / "run"), max_steps=4, batch_size=3, seq_len=8,
                         log_interval=2, precision="fp32", progress=False)  # fmt: skip
    train(build_model(spec), torch.randint(0, 11, (500,)), None, config)
    lines = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if r["event"] == "train"]
    assert lines and all(0 < r["mfu"] < 10 for r in lines)
    assert json.loads(path.read_text())[key] > 1e6  # the measured ceiling replaced 1 FLOP/s
    mfu.forget_ceilings()
