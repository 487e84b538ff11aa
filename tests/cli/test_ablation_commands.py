"""``lmlab positions`` and ``lmlab residual``: tiny runs write their JSON and figures, and
a bad setting is one line."""

import json

from lmlab.cli.main import main


def test_positions_writes_the_report_and_figures(tmp_path, capsys):
    out = tmp_path / "pos"
    args = ["positions", "--steps", "2", "--eval_every", "1", "--eval_rows", "8"]
    assert main([*args, "--d_model", "16", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "chance 0.062" in printed and "sinusoidal" in printed
    report = json.loads((out / "positions.json").read_text())
    assert set(report["final"]) == {"learned", "sinusoidal", "rope", "none"}
    assert report["config"]["steps"] == 2
    assert (out / "encodings.png").stat().st_size > 0 and (out / "curves.png").stat().st_size > 0


def test_residual_writes_the_report_and_figure(tmp_path, capsys):
    corpus = tmp_path / "text.txt"
    corpus.write_text("to be or not to be, that is the question.\n" * 20)
    out = tmp_path / "res"
    args = ["residual", "--steps", "2", "--n_layers", "3", "--record_every", "1"]
    args += ["--seq_len", "16", "--batch_size", "2", "--data", str(corpus), "--out", str(out)]
    assert main(args) == 0
    assert "no residual" in capsys.readouterr().out
    report = json.loads((out / "residual.json").read_text())
    assert [len(norms) for _, norms in report["grad_norms"]["neither"]] == [3, 3, 3]
    assert (out / "residual.png").stat().st_size > 0


def test_bad_settings_are_one_line(tmp_path, capsys):
    assert main(["positions", "--kinds", "[alibi]", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "alibi" in err and "Traceback" not in err
