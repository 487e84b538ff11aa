"""``lmlab train --tokenizer word`` for n-grams, ``lmlab export --format arpa`` and loading
the ARPA file back: the word-level n-gram round trip through the command line."""

import math

import pytest
import torch

import lmlab
from lmlab.checkpoint.io import latest_checkpoint
from lmlab.cli.main import main


@pytest.fixture
def word_run(tmp_path, capsys):
    corpus = tmp_path / "corpus.txt"
    g = torch.Generator().manual_seed(0)
    words = ["to", "be", "or", "not", "that", "is", "the", "question", ",", "."]
    lines = [
        " ".join(words[i] for i in torch.randint(0, 10, (int(n),), generator=g).tolist())
        for n in torch.randint(1, 12, (300,), generator=g)
    ]
    corpus.write_text("\n".join(lines) + "\n")
    run_dir = tmp_path / "run"
    flags = ["--data", str(corpus), "--tokenizer", "word", "--vocab_size", "8"]
    assert main(["train", "--model", "ngram-word", *flags, "--train.out_dir", str(run_dir)]) == 0
    out = capsys.readouterr().out
    assert "fitted in" in out and "validation loss" in out
    return run_dir


def test_train_word_ngram_then_export_arpa_and_load_it(word_run, tmp_path, capsys):
    lm = lmlab.load(word_run)
    assert lm.tokenizer.kind == "word" and lm.tokenizer.vocab_size == 8  # 6 words + 2
    assert lm.model.config.sentence_end_id == lm.tokenizer.eos_id
    assert latest_checkpoint(word_run) is not None

    arpa = tmp_path / "lm.arpa"
    assert main(["export", "--model", str(word_run), "--format", "arpa", "--out", str(arpa)]) == 0
    assert f"wrote {arpa}" in capsys.readouterr().out
    from_arpa = lmlab.load(arpa)
    assert from_arpa.model.config.smoothing == "arpa"
    assert from_arpa.tokenizer.words == lm.tokenizer.words
    text = "to be or not to be , that is the question .\nthe question is this .\n"
    assert from_arpa.perplexity(text) == pytest.approx(lm.perplexity(text), rel=1e-7)
    assert math.isfinite(lm.perplexity(text))


def test_export_arpa_of_a_model_that_is_not_an_ngram_is_one_line(tmp_path, capsys):
    from lmlab.checkpoint.io import save_checkpoint
    from lmlab.models import build_model

    spec = dict(family="bigram", vocab_size=5)
    save_checkpoint(tmp_path / "ckpt", build_model(spec))
    flags = ["--format", "arpa", "--out", str(tmp_path / "x.arpa")]
    assert main(["export", "--model", str(tmp_path / "ckpt"), *flags]) == 2
    err = capsys.readouterr().err
    assert err.startswith("lmlab: error:") and err.count("\n") == 1 and "not an n-gram" in err


def test_train_stupid_backoff_reports_no_perplexity(tmp_path, capsys):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("to be or not to be\nthat is the question\n" * 20)
    overrides = '{"smoothing": "stupid_backoff"}'
    args = ["train", "--model", "ngram-word", "--model_overrides", overrides]
    args += ["--data", str(corpus), "--tokenizer", "word", "--train.out_dir", str(tmp_path / "r")]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "fitted in" in out and "scores, not probabilities" in out and "perplexity" not in out
    assert lmlab.load(tmp_path / "r").model.config.smoothing == "stupid_backoff"
