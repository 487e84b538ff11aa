"""lmlab.sweep: the grid runs resumably through lmlab's trainer, and its fits."""

import json
import math

import numpy as np
import pytest

from lmlab import sweep
from lmlab.errors import ConfigError
from lmlab.scaling.fits import EPOCH
from lmlab.sweep import RunPoint, fit_sweep, parse_sizes, parse_tokens, scaling

# 6 runs of a few hundred steps' worth of nothing: seconds each.
TINY = {"sizes": "1x8,1x16", "tokens": "512,1k,2k", "batch_size": 2, "seq_len": 8,
        "precision": "fp32", "bootstrap": 2, "progress": False}  # fmt: skip


def synthetic_runs(noise: float, seed: int = 0) -> list[RunPoint]:
    rng = np.random.default_rng(seed)
    runs = []
    for n in (4e7, 1.2e8, 4e8, 1.2e9):
        for d in (1e9, 4e9, 1.6e10):
            loss = float(EPOCH(n, d) * math.exp(rng.normal(0, noise)))
            runs.append(RunPoint(name=f"{n:.0e}-{d:.0e}", n_layers=1, d_model=int(n // 1e6),
                                 n_heads=1, params=int(n), params_non_embedding=int(0.9 * n),
                                 tokens=int(d), steps=1, lr=1e-3, flops=6 * n * d,
                                 flops_kaplan=6 * 0.9 * n * d, val_loss=loss, cpu_s=1.0,
                                 wall_s=1.0))  # fmt: skip
    return runs


def test_fit_sweep_predicts_the_held_out_largest_run():
    fits = fit_sweep(synthetic_runs(noise=0.002), bootstrap=0)
    held = fits["holdout"]
    assert held["run"] == "1e+09-2e+10"  # most compute
    assert abs(held["error"]) < 0.01
    assert held["actual"] == pytest.approx(EPOCH(1.2e9, 1.6e10), rel=0.01)
    assert abs(fits["chinchilla"]["alpha"] - EPOCH.alpha) < 0.05
    plans = fits["chinchilla"]["compute_optimal"]
    assert [p["compute"] for p in plans] == pytest.approx(
        [6 * 1.2e9 * 1.6e10 * k for k in (1, 10, 100)]
    )
    assert fits["kaplan"]["L(C)"]["exponent"] > 0
    assert fits["chinchilla_non_embedding"]["N"].startswith("non-embedding")


def test_too_few_runs_fit_only_kaplan():
    fits = fit_sweep(synthetic_runs(0.0)[:4], bootstrap=0)
    assert fits["chinchilla"] is None and "too few" in fits["note"]


@pytest.mark.parametrize("bad", ["", "2x", "0x16", "2x48x5", "2x16,2x16"])
def test_bad_sizes_are_one_line_errors(bad):
    with pytest.raises(ConfigError, match="size"):
        parse_sizes(bad)


@pytest.mark.parametrize("bad", ["", "1M,1M", "-3", "lots"])
def test_bad_token_budgets_are_one_line_errors(bad):
    with pytest.raises(ConfigError, match="tokens|token budget"):
        parse_tokens(bad)


@pytest.mark.slow  # three small sweeps, about 30 s of CPU
def test_a_killed_sweep_resumes_exactly_and_a_finished_one_is_skipped(tmp_path, monkeypatch):
    real_train = sweep.train

    def killed_in_one_run(model, train_ids, val_ids, config, **kwargs):
        if config.out_dir.endswith("1x16-1k"):

            def stop(event):
                if event.get("event") == "train" and event["step"] >= 4:
                    raise KeyboardInterrupt

            kwargs["callbacks"] = [stop]
        return real_train(model, train_ids, val_ids, config, **kwargs)

    monkeypatch.setattr(sweep, "train", killed_in_one_run)
    with pytest.raises(KeyboardInterrupt):
        scaling(**TINY, out_dir=str(tmp_path / "sweep"))
    monkeypatch.setattr(sweep, "train", real_train)
    result = scaling(**TINY, out_dir=str(tmp_path / "sweep"))
    assert len(result.runs) == 6
    resumed = next(r for r in result.runs if r.name == "1x16-1k")
    assert resumed.resumed and not any(r.resumed for r in result.runs if r is not resumed)
    alone = scaling(**{**TINY, "sizes": "1x16", "tokens": "1k"}, out_dir=str(tmp_path / "one"))
    assert alone.runs[0].val_loss == resumed.val_loss  # exact resume: the same final loss
    assert alone.fits["chinchilla"] is None

    saved = json.loads(result.files["json"].read_text())
    assert [r["name"] for r in saved["runs"]] == [r.name for r in result.runs]
    assert saved["fits"]["holdout"]["run"] == "1x16-2k"
    assert result.files["plot"].stat().st_size > 10_000

    def never(*args, **kwargs):
        raise AssertionError("a finished run trained again")

    monkeypatch.setattr(sweep, "train", never)
    again = scaling(**TINY, out_dir=str(tmp_path / "sweep"))
    assert [r.val_loss for r in again.runs] == [r.val_loss for r in result.runs]
    with pytest.raises(ConfigError, match="other settings.*lr"):
        scaling(**{**TINY, "lr": 1e-2}, out_dir=str(tmp_path / "sweep"))
