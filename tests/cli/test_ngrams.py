"""``lmlab ngrams``: a small sweep writes its table, figure and sample; bad settings are
one line."""

import json
import math

import pytest
import torch

from lmlab.cli.main import main


def _corpus(tmp_path):
    g = torch.Generator().manual_seed(0)
    words = ["to", "be", "or", "not", "that", "is", "the", "question"]
    picks = torch.randint(0, len(words), (3000,), generator=g).tolist()
    path = tmp_path / "c.txt"
    path.write_text(" ".join(words[i] for i in picks), encoding="utf-8")
    return path


def test_ngrams_writes_table_figure_and_sample(tmp_path, capsys):
    out = tmp_path / "ng"
    args = ["ngrams", "--data", str(_corpus(tmp_path)), "--orders", "1-3"]
    args += ["--smoothings", "mle,add_k,kneser_ney", "--prompt", "to ", "--sample_tokens", "20"]
    assert main([*args, "--progress", "false", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    report = json.loads((out / "ngrams.json").read_text())
    pairs = [(m["smoothing"], m["order"]) for m in report["models"]]
    assert pairs == [("mle", 1), ("mle", 2), ("mle", 3), ("add_k", 1), ("add_k", 2),
                     ("add_k", 3), ("kneser_ney", 2), ("kneser_ney", 3)]  # fmt: skip
    finite = [m for m in report["models"] if m["perplexity"] is not None]
    best = min(finite, key=lambda m: m["perplexity"])
    assert report["best"] == {"order": best["order"], "smoothing": best["smoothing"]}
    assert all(m["perplexity"] > 1 for m in finite)
    # A row per smoothing, a column per order, in the printout and in ngrams.md.
    assert "| order n | 1 | 2 | 3 |" in printed and "| interpolated Kneser-Ney |  |" in printed
    assert "| order n | 1 | 2 | 3 |" in (out / "ngrams.md").read_text()
    sample = report["sample"]["text"]
    assert len(sample) > 0 and ("to " + sample) in printed
    assert (out / "ngrams.png").stat().st_size > 0
    for m in report["models"]:  # an infinite perplexity is null in JSON, with its zeros
        assert (m["perplexity"] is None) == (m["zero_probability"] > 0)
        assert m["perplexity"] is None or math.isfinite(m["perplexity"])


def test_a_word_level_sample_goes_on_past_line_ends(tmp_path):
    """A word model ends each line with its eos (</s>): the sample after a one-line prompt
    is not empty, runs over several lines, and spends its whole token budget."""
    path = tmp_path / "lines.txt"
    g = torch.Generator().manual_seed(1)
    names, words = ["ROMEO:", "JULIET:"], ["to", "be", "or", "not", "that", "is"]
    lines = []
    for _ in range(300):
        lines.append(names[int(torch.randint(0, 2, (1,), generator=g))])
        picks = torch.randint(0, len(words), (5,), generator=g).tolist()
        lines.append(" ".join(words[i] for i in picks))
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    out = tmp_path / "ng"
    args = ["ngrams", "--data", str(path), "--tokenizer", "word", "--orders", "2"]
    args += ["--smoothings", "kneser_ney", "--prompt", "ROMEO:", "--sample_tokens", "30"]
    assert main([*args, "--progress", "false", "--out", str(out)]) == 0
    sample = json.loads((out / "ngrams.json").read_text())["sample"]["text"]
    assert sample.count("\n") >= 3, sample
    # 30 tokens: the words and punctuation printed plus one line end per line break
    pieces = sample.replace(":", " :").split()
    assert len(pieces) + sample.count("\n") == 30, sample


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--orders", "3-1"], "is empty"),
        (["--smoothings", "stupid_backoff"], "no perplexity"),
        (["--smoothings", "laplace"], "unknown 'laplace'"),
        (["--sample_tokens", "-1"], "sample_tokens=-1"),
        (["--temperature", "-1"], "temperature"),
    ],
)
def test_ngrams_bad_settings_are_one_line(tmp_path, capsys, flags, message):
    assert main(["ngrams", *flags, "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err
    assert not (tmp_path / "x").exists()  # refused before any work
