"""``lmlab prompt`` and ``lmlab icl`` end to end on a tiny byte-level model."""

import json

import pytest

from lmlab.checkpoint import save_checkpoint
from lmlab.cli.main import main
from prompting.test_models import byte_lm


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    lm = byte_lm(context=2048)  # a four-shot prompt is about 1,000 bytes
    path = tmp_path_factory.mktemp("prompting") / "model"
    save_checkpoint(path, lm.model, tokenizer=lm.tokenizer)
    return path


def test_lmlab_prompt_writes_the_table_in_both_layouts(model_dir, tmp_path, capsys):
    for layout in ("plain", "chat"):
        out = tmp_path / layout
        argv = ["prompt", "--model", str(model_dir), "--n", "2", "--shots", "1"]
        argv += ["--methods", "direct,self-consistency", "--samples", "2", "--max_tokens", "4"]
        assert main([*argv, "--layout", layout, "--out", str(out)]) == 0
        summary = json.loads((out / "methods.json").read_text())
        assert summary["layout"] == layout and summary["n"] == 2
        assert set(summary["methods"]) == {"direct", "self-consistency"}
        assert len(summary["methods"]["self-consistency"]["maj_at_k"]["strict"]) == 2
        assert len((out / "attempts.jsonl").read_text().splitlines()) == 4
        assert (out / "methods.png").is_file()
        printed = capsys.readouterr().out
        assert "self-consistency" in printed and "wrote" in printed


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--methods", "cot,tot"], "unknown method 'tot'"),
        (["--layout", "chatty"], "unknown layout 'chatty'; valid: plain, chat"),
        (["--samples", "0"], "--max_tokens >= 1"),
        (["--methods", "reac"], "unknown method 'reac' (did you mean 'react'?)"),
    ],
)
def test_lmlab_prompt_mistakes_are_one_line_before_loading(flags, message, tmp_path, capsys):
    # the model path does not exist: the check comes before any loading
    assert main(["prompt", "--model", str(tmp_path / "none"), *flags]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


def test_lmlab_icl_writes_accuracy_per_format_and_k(model_dir, tmp_path, capsys):
    out = tmp_path / "icl"
    argv = ["icl", "--model", str(model_dir), "--ks", "0,2", "--formats", "qa,arrow"]
    assert main([*argv, "--seeds", "0,1", "--out", str(out)]) == 0
    table = json.loads((out / "icl.json").read_text())
    cells = {(r["format"], r["k"], r["seed"]) for r in table["rows"]}
    assert cells == {("qa", 0, 0), ("qa", 2, 0), ("qa", 2, 1), ("arrow", 0, 0)} | {
        ("arrow", 2, 0),
        ("arrow", 2, 1),
    }
    assert (out / "icl.png").is_file() and "arrow" in capsys.readouterr().out


def test_lmlab_icl_drops_examples_past_the_context_or_stops(model_dir, tmp_path, capsys):
    """Sentiment lines are 20 to 50 bytes: four of them and the question outgrow 120."""
    argv = ["icl", "--model", str(model_dir), "--ks", "0,4", "--formats", "qa", "--seeds", "0"]
    assert main([*argv, "--context", "120", "--out", str(tmp_path / "drop")]) == 0
    table = json.loads((tmp_path / "drop" / "icl.json").read_text())
    dropped = {r["k"]: r["dropped"] for r in table["rows"]}
    assert dropped[0] == 0 and dropped[4] > 0 and table["context"] == 120
    assert "examples dropped to fit the context" in capsys.readouterr().out
    code = main([*argv, "--context", "120", "--on_overflow", "error", "--out", str(tmp_path / "e")])
    err = capsys.readouterr().err.strip()  # the progress bar, then the one-line error
    assert code == 2 and "more than the model's context of 120" in err.splitlines()[-1]
    assert "Traceback" not in err
