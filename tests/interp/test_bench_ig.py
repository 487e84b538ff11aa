"""bench/interp_ig.py runs in its quick mode (a tiny random model) and its two
attributions agree: the benchmark compares like with like."""

import importlib.util
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench" / "interp_ig.py"


@pytest.mark.slow  # about 10 s of CPU: a model built and both methods run several times
def test_bench_quick_mode_runs_and_agrees(capsys):
    spec = importlib.util.spec_from_file_location("interp_ig", BENCH)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    result = bench.main(quick=True)
    assert result["max_abs_difference"] < 1e-5  # float32, same nodes and weights
    assert abs(result["completeness_delta"]) < 1e-3
    assert result["lmlab_s"] > 0 and result["captum_s"] > 0
    assert "ratio" in capsys.readouterr().out
