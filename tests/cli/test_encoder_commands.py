"""``lmlab pretrain`` and ``lmlab seq2seq`` run end to end on tiny budgets."""

import json

from lmlab.cli.main import main


def test_lmlab_seq2seq_trains_scores_and_writes_its_json(tmp_path, capsys):
    out = tmp_path / "s2s"
    argv = ["seq2seq", "--task", "copy", "--eval_n", "3", "--train.max_steps", "2",
            "--train.eval_interval", "2", "--train.eval_batches", "1", "--train.batch_size", "4",
            "--train.progress", "false", "--train.out_dir", str(out)]  # fmt: skip
    assert main(argv) == 0
    scores = json.loads((out / "seq2seq.json").read_text())
    assert (
        scores["steps"] == 2 and scores["n"] == 3 and "teacher forcing" in capsys.readouterr().out
    )


def test_lmlab_pretrain_trains_an_encoder_with_tensorboard_off(tmp_path, capsys):
    corpus = tmp_path / "t.txt"
    corpus.write_text("\n\n".join(f"A{i}:\nline one {i}\nline two {i}" for i in range(30)))
    out = tmp_path / "bert"
    argv = ["pretrain", "--data", str(corpus), "--vocab_size", "300", "--max_len", "32",
            "--train.max_steps", "2", "--train.eval_interval", "2", "--train.eval_batches", "1",
            "--train.batch_size", "4", "--train.progress", "false", "--train.out_dir", str(out)]  # fmt: skip
    assert main(argv) == 0
    assert (out / "pretraining.png").is_file() and "trained 2 steps" in capsys.readouterr().out
