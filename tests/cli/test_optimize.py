import json

import pytest

from lmlab.cli.main import main


@pytest.mark.slow  # about 20 s of CPU: four figures
def test_optimize_writes_its_four_figures_and_summary(tmp_path, capsys):
    out = tmp_path / "opt"
    assert main(["optimize", "--out", str(out), "--steps", "40"]) == 0
    for name in ("step_sizes", "optimizer_paths", "mse_vs_ce", "batch_noise"):
        assert (out / f"{name}.png").stat().st_size > 10_000
    summary = json.loads((out / "optimize.json").read_text())
    assert summary["step_sizes"]["diverging"]["x_after_12"] ** 2 > 9
    assert summary["double_well"]["-0.2"] < 0 < summary["double_well"]["0.5"]
    assert (
        summary["mse_vs_ce"]["ce"]["accuracy_at_20"] > summary["mse_vs_ce"]["mse"]["accuracy_at_20"]
    )
    assert "valley, steps to a loss of 0.01" in capsys.readouterr().out
