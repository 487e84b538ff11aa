"""``lmlab pretrain``, ``lmlab seq2seq`` and ``lmlab architectures`` run end to end on tiny
budgets."""

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
    assert [c["step"] for c in scores["curve"]] == [2] and (out / "seq2seq.png").is_file()


def test_lmlab_pretrain_trains_an_encoder_with_tensorboard_off(tmp_path, capsys):
    corpus = tmp_path / "t.txt"
    corpus.write_text("\n\n".join(f"A{i}:\nline one {i}\nline two {i}" for i in range(30)))
    out = tmp_path / "bert"
    argv = ["pretrain", "--data", str(corpus), "--vocab_size", "300", "--max_len", "32",
            "--train.max_steps", "2", "--train.eval_interval", "2", "--train.eval_batches", "1",
            "--train.batch_size", "4", "--train.progress", "false", "--train.out_dir", str(out)]  # fmt: skip
    assert main(argv) == 0
    assert (out / "pretraining.png").is_file() and "trained 2 steps" in capsys.readouterr().out
    assert main(argv[:-2] + ["--nsp_pairs", "lines", "--train.out_dir", str(tmp_path / "b2")]) == 2
    err = capsys.readouterr().err
    assert "nsp_pairs" in err and "segments" in err


def test_lmlab_architectures_prints_the_table_and_saves_the_figure(tmp_path, capsys):
    out = tmp_path / "arch"
    argv = ["architectures", "--task", "copy", "--steps", "2", "--classify_steps", "1",
            "--folds", "2", "--eval_n", "2", "--d_model", "16", "--d_ff", "32", "--n_heads", "2",
            "--n_layers", "2", "--progress", "false", "--out_dir", str(out)]  # fmt: skip
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "| copy | encoder-decoder |" in printed and "| sentiment | decoder |" in printed
    assert (out / "architectures.png").is_file() and (out / "architectures.json").is_file()
    assert main(["architectures", "--task", "revers", "--out_dir", str(out)]) == 2
    assert "task='revers' is invalid" in capsys.readouterr().err


def test_lmlab_finetune_task_fine_tunes_a_head_and_scores_it_before_and_after(tmp_path, capsys):
    out = tmp_path / "head"
    argv = ["finetune", "--model", "bert-tiny", "--task", "sequence", "--method", "lora",
            "--train.max_steps", "2", "--train.eval_interval", "2", "--train.eval_batches", "1",
            "--train.batch_size", "4", "--train.progress", "false", "--train.out_dir", str(out)]  # fmt: skip
    assert main(argv) == 0
    printed = capsys.readouterr().out
    scores = json.loads((out / "heads.json").read_text())
    assert scores["steps"] == 2 and scores["method"] == "lora" and scores["task"] == "sequence"
    assert f"test accuracy: {100 * scores['before']['accuracy']:.1f} before" in printed
    assert (out / "heads.png").is_file() and (out / "model" / "config.json").is_file()


def test_lmlab_finetune_task_bad_input_is_one_line(tmp_path, capsys):
    for argv, message in [
        (["--model", "bert-tiny", "--task", "spam"], "task='spam' is not one of sequence, token, span (did you mean 'span'?)"),
        (["--model", "bert-tiny", "--task", "token", "--method", "prefix"], "method='prefix' is not one of full, lora"),
        (["--model", "bert-tiny", "--task", "token", "--strategy", "mean"], "strategy='mean' is not one of first, average, max"),
        (["--model", "gpt-char-tiny", "--task", "span"], "the span head needs an encoder"),
        (["--model", "bert-tiny", "--task", "span", "--data", "x.jsonl"], "reads no --data"),
    ]:  # fmt: skip
        assert main(["finetune", *argv, "--train.out_dir", str(tmp_path / "x")]) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1
