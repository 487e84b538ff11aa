"""``lmlab score``: the bundled examples or a user's file, scored and drawn; a mistake is
one line."""

import json

from lmlab.cli.main import main


def test_score_writes_the_table_figure_and_json(tmp_path, capsys):
    out = tmp_path / "scores"
    assert main(["score", "--out", str(out)]) == 0
    report = json.loads((out / "scores.json").read_text())
    by_kind = {(r["group"], r["kind"]): r["scores"] for r in report["rows"]}
    assert abs(by_kind["translation", "identical"]["bleu"]["score"] - 100.0) < 1e-9
    assert by_kind["translation", "word salad"]["rouge1"]["f1"] == 1.0
    assert by_kind["translation", "too short"]["bleu"]["bp"] < 0.2
    assert (out / "scores.png").stat().st_size > 10_000
    printed = capsys.readouterr().out
    assert "paraphrase" in printed and "wrote" in printed


def test_score_reads_a_user_file_and_names_a_bad_line(tmp_path, capsys):
    mine = tmp_path / "mine.jsonl"
    mine.write_text('{"candidate": "a b c d", "reference": "a b c d"}\n')
    assert main(["score", "--examples", str(mine), "--out", str(tmp_path / "o")]) == 0
    rows = json.loads((tmp_path / "o" / "scores.json").read_text())["rows"]
    assert rows[0]["kind"] == "row 1" and rows[0]["scores"]["chrf"] == 100.0
    mine.write_text('{"candidate": "a b"}\n')
    capsys.readouterr()
    assert main(["score", "--examples", str(mine), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "mine.jsonl:1" in err and "reference" in err
