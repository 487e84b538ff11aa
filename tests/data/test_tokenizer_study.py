"""The tokenizer comparison: its measurements recomputed by hand on a small corpus."""

import pytest

from lmlab.cli.main import main
from lmlab.data.bpe import BPE, pre_tokenize
from lmlab.data.corpus import split_text
from lmlab.data.tokenizer_study import compare_tokenizers
from lmlab.errors import ConfigError

TEXT = "".join(f"the {w} sat on the mat near {w}s and {w}ing\n" for w in ("cat", "dog", "hen") * 30)
TEXT += "a zebra quietly vexed jumpy dogs\n" * 5  # held out: words the training part lacks


def test_the_measurements_are_what_they_say():
    report = compare_tokenizers(TEXT, vocab_sizes=(30, 60), val_fraction=0.1)
    train, held_out = split_text(TEXT, 0.1)
    words = pre_tokenize(held_out)
    assert report["held_out_words"] == len(words)
    assert report["char"]["tokens_per_word"] == pytest.approx(len(held_out) / len(words))
    assert report["byte"]["tokens_per_word"] == pytest.approx(len(held_out.encode()) / len(words))
    scratch = BPE.train(train.splitlines(), 60)
    expected = sum(len(scratch.tokenize_word(w)) for w in words) / len(words)
    assert report["bpe_scratch"][-1]["tokens_per_word"] == pytest.approx(expected)
    # characters the training part never had ("z", "q", "x", "j", ...) are unknown to it
    unseen = {c for c in held_out if c not in train and not c.isspace()}
    assert unseen and report["char"]["unknown"] > 0
    assert report["bpe_scratch"][-1]["unknown"] > 0
    for row in report["bpe_scratch"]:
        assert row["same_merges"] and row["same_encodings"]  # parity with tokenizers
    # a bigger vocabulary never needs more tokens per word; a word vocabulary meets <unk>
    assert (
        report["bpe_scratch"][0]["tokens_per_word"] >= report["bpe_scratch"][1]["tokens_per_word"]
    )
    assert all(r["unknown"] > 0 for r in report["word"])


def test_bad_sizes_are_one_line_errors(tmp_path, capsys):
    with pytest.raises(ConfigError, match="vocab_sizes"):
        compare_tokenizers(TEXT, vocab_sizes=(1,))
    assert main(["tokenize", "--vocab_sizes", "big", "--out", str(tmp_path)]) != 0
    err = capsys.readouterr().err
    assert "--vocab_sizes 'big' is invalid" in err and err.count("\n") == 1


def test_the_command_writes_its_figure_and_report(tmp_path):
    corpus = tmp_path / "c.txt"
    corpus.write_text(TEXT)
    out = tmp_path / "out"
    assert (
        main(["tokenize", "--data", str(corpus), "--vocab_sizes", "30,60", "--out", str(out)]) == 0
    )
    assert (out / "tokenize.png").stat().st_size > 0 and (out / "tokenize.json").exists()
