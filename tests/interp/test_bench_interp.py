"""``bench/interp.py``: its no-hook-points baseline computes the same model, and it runs."""

import importlib.util
from pathlib import Path

import pytest
import torch

from lmlab.interp.hooks import hook_points, run_with_cache
from lmlab.models import build_model, get_preset
from lmlab.models.layers import HookPoint

BENCH = Path(__file__).resolve().parents[2] / "bench" / "interp.py"


def bench():
    spec = importlib.util.spec_from_file_location("bench_interp", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("preset", ["gpt-char-tiny", "llama-small"])
def test_baseline_without_hook_points_is_the_same_model_and_is_restored(preset):
    torch.manual_seed(0)
    spec = {**get_preset(preset), "vocab_size": 50, "n_layers": 2, "d_model": 32, "n_heads": 4}
    model = build_model(spec).eval()
    ids = torch.randint(0, 50, (2, 10))
    names = list(hook_points(model))
    with torch.no_grad():
        plain = model(ids)
        with bench().no_hook_points(model):
            assert not any(isinstance(m, HookPoint) for m in model.modules())
            bare = model(ids)
        _, cache = run_with_cache(model, ids)  # hook points are back and work
    assert torch.equal(bare, plain)
    assert list(hook_points(model)) == names and "blocks.1.attn.hook_pattern" in cache


@pytest.mark.slow
def test_bench_runs_quick(capsys):
    results = bench().main(quick=True)
    cost = results["hook_cost"]["gpt2-small shape"]
    assert cost["hook_points"] == 23 and cost["ratio"] > 0
    assert "CPU:" in capsys.readouterr().out  # bench/machine.py's line
