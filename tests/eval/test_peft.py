"""PEFT methods side by side (``lmlab.eval.peft``) and ``lmlab finetune --compare``."""

import json

import pytest
import torch

from lmlab.checkpoint.io import save_checkpoint
from lmlab.cli.main import main
from lmlab.data import BPETokenizer
from lmlab.data.instructions import read_jsonl
from lmlab.data.tasks import generate_splits, write_jsonl
from lmlab.errors import ConfigError
from lmlab.eval.peft import LR_FACTOR, check_methods, compare_methods, generated_data
from lmlab.finetune.mixture import general_text
from lmlab.finetune.run import task_accuracy
from lmlab.lm import load
from lmlab.models import build_model, get_preset
from lmlab.train import TrainConfig


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("peft")
    train, _, test = generate_splits(["reverse"], 40, 0, 6, seed=0)
    write_jsonl(train, root / "train.jsonl")
    write_jsonl(test, root / "test.jsonl")
    text = "\n".join(f"{r['instruction']} {r['input']} {r['output']}" for r in train + test)
    tok = BPETokenizer.train(text + " ### Instruction: Response:", 300)
    torch.manual_seed(0)
    spec = {**get_preset("gpt-char-tiny"), "vocab_size": tok.vocab_size, "n_layers": 1}
    model = build_model({**spec, "d_model": 32, "n_heads": 2, "d_ff": 64, "max_seq_len": 96})
    save_checkpoint(root / "base", model.eval(), tokenizer=tok)
    return root


def config(root, name):
    return TrainConfig(out_dir=str(root / name), max_steps=3, batch_size=4, lr=1e-2,
                       warmup_steps=1, eval_interval=3, ckpt_interval=1000, precision="fp32",
                       progress=False, seed=0)  # fmt: skip


@pytest.mark.slow  # six fine-tunes and their greedy answers: about 10 s
def test_every_method_gets_a_row_with_its_own_trainable_count(setup):
    methods = ["full", "lora", "adapter", "prompt", "prefix", "bitfit"]
    result = compare_methods(str(setup / "base"), str(setup / "train.jsonl"),
                             str(setup / "test.jsonl"), methods, config(setup, "cmp"),
                             max_new_tokens=4, max_len=64, n_virtual=4)  # fmt: skip
    rows = {r["method"]: r for r in result["rows"]}
    assert list(rows) == methods and result["test_rows"] == 6
    total = rows["full"]["total"]
    assert rows["full"]["trainable"] == total
    for method in methods[1:]:  # each trains a small part; soft prompts add parameters
        assert 0 < rows[method]["trainable"] < 0.5 * rows[method]["total"], method
    assert len({rows[m]["trainable"] for m in methods}) == len(methods)
    for row in rows.values():
        assert 0.0 <= row["accuracy"] <= 1.0 and 0.0 <= row["chrf"] <= 100.0
        assert len(row["answers"]) == 6
        assert row["lr"] == pytest.approx(1e-2 * LR_FACTOR.get(row["method"], 1.0))
        assert row["val_loss"] < row["val_loss_before"]  # 3 steps at 1e-2 move every method
        assert (setup / "cmp" / row["method"] / "model").is_dir()


def test_bad_methods_and_test_rows_are_one_line_errors(setup, tmp_path):
    with pytest.raises(ConfigError, match="'lorra' is not one of"):
        check_methods("full,lorra")
    with pytest.raises(ConfigError, match="more than once"):
        check_methods(["lora", "lora"])
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "x"}\n')
    with pytest.raises(ConfigError, match="lack 'task' or 'output'"):
        compare_methods(str(setup / "base"), str(setup / "train.jsonl"), str(bad), ["lora"])


@pytest.mark.slow  # two fine-tunes and the figure: about 10 s
def test_cli_compare_writes_table_figure_and_json(setup, capsys):
    out = setup / "cli"
    argv = ["finetune", "--model", str(setup / "base"), "--data", str(setup / "train.jsonl")]
    argv += ["--test_data", str(setup / "test.jsonl"), "--compare", "lora,bitfit"]
    argv += ["--max_len", "64", "--train.out_dir", str(out), "--train.max_steps", "2"]
    argv += ["--n_virtual", "4"]
    argv += ["--train.batch_size", "4", "--train.progress", "false"]
    assert main(argv) == 0
    report = json.loads((out / "peft.json").read_text())
    assert [r["method"] for r in report["rows"]] == ["lora", "bitfit"]
    assert (out / "peft.png").stat().st_size > 10_000
    assert "bitfit" in capsys.readouterr().out
    assert main(argv[:5] + ["--compare", "lora"]) == 2  # no --test_data
    assert "--test_data" in capsys.readouterr().err


def test_generated_data_writes_disjoint_train_and_test_rows(tmp_path):
    train_path, test_path = generated_data("reverse,arithmetic", 12, 5, 3, tmp_path / "data")
    train, test = read_jsonl(train_path), read_jsonl(test_path)
    assert (len(train), len(test)) == (12, 5)
    assert {r["task"] for r in train} == {"reverse", "arithmetic"}
    prompts = {(r["instruction"], r["input"]) for r in train}
    assert not prompts & {(r["instruction"], r["input"]) for r in test}
    again = generated_data(["reverse", "arithmetic"], 12, 5, 3, tmp_path / "again")
    assert read_jsonl(again[1]) == test  # the seed fixes the rows
    with pytest.raises(ConfigError, match="n_test=0 is invalid"):
        generated_data("reverse", 12, 0, 3, tmp_path)
    with pytest.raises(ConfigError, match="not one of|valid tasks"):
        generated_data("revers", 12, 5, 3, tmp_path)


def test_general_text_perplexity_and_lr_factor(setup):
    result = compare_methods(str(setup / "base"), str(setup / "train.jsonl"),
                             str(setup / "test.jsonl"), ["bitfit"], config(setup, "ppl"),
                             max_new_tokens=2, max_len=64, general_chars=300,
                             lr_factor={"bitfit": 7.0})  # fmt: skip
    row = result["rows"][0]
    assert row["lr"] == pytest.approx(7e-2)
    general = general_text(300)
    before = load(str(setup / "base"), dtype="float32").perplexity(general)
    assert result["before"]["perplexity"] == pytest.approx(before, rel=1e-5)
    tuned = load(str(setup / "ppl" / "bitfit" / "model"), dtype="float32").perplexity(general)
    assert row["perplexity"] == pytest.approx(tuned, rel=1e-4)
    assert row["perplexity"] != pytest.approx(before, rel=1e-6)  # 3 steps at 7e-2 moved it
    assert row["cpu_time_s"] > 0


def test_bad_lr_factor_and_general_chars_are_one_line_errors(setup):
    args = (str(setup / "base"), str(setup / "train.jsonl"), str(setup / "test.jsonl"))
    with pytest.raises(ConfigError, match="'lorra' is not one of"):
        compare_methods(*args, ["lora"], lr_factor={"lorra": 2.0})
    with pytest.raises(ConfigError, match=r"lr_factor\['lora'\]=0 is invalid"):
        compare_methods(*args, ["lora"], lr_factor={"lora": 0})
    with pytest.raises(ConfigError, match="general_chars=-1 is invalid"):
        compare_methods(*args, ["lora"], general_chars=-1)


@pytest.mark.slow  # one fine-tune on generated rows: about 5 s
def test_cli_compare_generates_its_rows(setup, tmp_path, capsys):
    out = tmp_path / "gen"
    argv = ["finetune", "--model", str(setup / "base"), "--compare", "bitfit"]
    argv += ["--generate", "reverse", "--n_train", "10", "--n_test", "3", "--max_len", "64"]
    argv += ["--general_chars", "200", "--max_new_tokens", "2", "--train.out_dir", str(out)]
    argv += ["--train.max_steps", "1", "--train.batch_size", "4", "--train.progress", "false"]
    assert main(argv) == 0
    report = json.loads((out / "peft.json").read_text())
    assert report["test_rows"] == 3 and len(read_jsonl(out / "data" / "train.jsonl")) == 10
    assert report["data"] == str(out / "data" / "train.jsonl")
    assert report["before"]["perplexity"] > 1 and report["rows"][0]["perplexity"] > 1
    assert "| bitfit |" in capsys.readouterr().out
    assert main(argv + ["--data", "mine.jsonl"]) == 2  # --generate makes the data itself
    assert "drop --data" in capsys.readouterr().err
    assert main(["finetune", "--model", str(setup / "base"), "--generate", "reverse"]) == 2
    assert "with --compare only" in capsys.readouterr().err


def test_task_accuracy_answers_the_same_in_batches(setup):
    lm = load(str(setup / "base"), dtype="float32")
    rows = read_jsonl(setup / "test.jsonl")
    one = task_accuracy(lm, rows, max_new_tokens=5)
    batched = task_accuracy(lm, rows, max_new_tokens=5, batch_size=4)  # 4 + 2, left-padded
    assert batched == one and len(one[1]) == len(rows)
    with pytest.raises(ConfigError, match="batch_size=0 is invalid"):
        task_accuracy(lm, rows, batch_size=0)
