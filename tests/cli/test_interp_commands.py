"""``lmlab lens``, ``lens-train``, ``patch`` and ``trace`` on a tiny character-level model:
each writes its figures and a JSON of the numbers, and a mistake is one line."""

import json

import pytest
import torch

from lmlab.checkpoint.io import save_checkpoint
from lmlab.cli.main import main
from lmlab.data import CharTokenizer, load_corpus
from lmlab.models import build_model, get_preset


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    tok = CharTokenizer.train(load_corpus("tinyshakespeare")[:20_000])
    torch.manual_seed(0)
    spec = {**get_preset("gpt-char-tiny"), "vocab_size": tok.vocab_size, "d_model": 32}
    model = build_model({**spec, "n_layers": 2, "n_heads": 2, "d_ff": 64, "max_seq_len": 64})
    return str(save_checkpoint(tmp_path_factory.mktemp("interp") / "ckpt", model, tokenizer=tok))


def flags(ckpt, out):
    return ["--model", ckpt, "--dtype", "float32", "--device", "cpu", "--out", str(out)]


def test_lens_and_lens_train_write_figures_and_json(ckpt, tmp_path, capsys):
    lens_file = tmp_path / "tuned.safetensors"
    argv = ["lens-train", *flags(ckpt, lens_file), "--steps", "2", "--seq_len", "16"]
    assert main(argv + ["--chars", "5000", "--progress", "false"]) == 0
    trained = json.loads(lens_file.with_suffix(".json").read_text())
    assert len(trained["held_out_kl_tuned_lens"]) == 3 and lens_file.with_suffix(".png").is_file()
    out = tmp_path / "lens"
    argv = ["lens", *flags(ckpt, out), "--prompt", "ROMEO: to be", "--tuned", str(lens_file)]
    assert main(argv + ["--target", "e"]) == 0
    for name in ("lens.png", "tuned_lens.png", "lens_kl.png"):
        assert (out / name).stat().st_size > 1000
    report = json.loads((out / "lens.json").read_text())
    assert report["tokens"] == list("ROMEO: to be")
    assert len(report["logit_lens"]["kl"]) == 3 and len(report["tuned_lens"]["kl"][0]) == 12
    assert "wrote" in capsys.readouterr().out


def test_patch_and_trace_write_figures_and_json(ckpt, tmp_path):
    out = tmp_path / "patch"
    argv = ["patch", *flags(ckpt, out), "--clean", "to be or", "--corrupt", "to me or"]
    assert main(argv + ["--answer", " ", "--wrong", "e", "--progress", "false"]) == 0
    report = json.loads((out / "patch.json").read_text())
    assert len(report["resid"]["effect"]) == 2 and len(report["resid"]["effect"][0]) == 8
    assert len(report["heads"]["effect"][0]) == 2
    assert (out / "patch_resid.png").is_file() and (out / "patch_heads.png").is_file()
    out = tmp_path / "trace"
    argv = ["trace", *flags(ckpt, out), "--prompt", "ROMEO: to be", "--subject", "ROMEO"]
    assert main(argv + ["--kind", "all", "--samples", "2", "--progress", "false"]) == 0
    report = json.loads((out / "trace.json").read_text())
    assert report["resid"]["subject_positions"] == [0, 1, 2, 3, 4]
    assert all((out / f"trace_{k}.png").is_file() for k in ("resid", "mlp", "attn"))


def test_mistakes_are_one_line(ckpt, tmp_path, capsys):
    argv = [
        "patch",
        *flags(ckpt, tmp_path),
        "--clean",
        "to be or",
        "--corrupt",
        "to me",
        "--answer",
        " ",
    ]
    assert main(argv + ["--wrong", "e"]) == 2
    assert "same number of tokens" in capsys.readouterr().err
    assert main(["patch", *flags(ckpt, tmp_path), "--task", "ioi"]) == 2
    assert "vocabulary" in capsys.readouterr().err  # the names are not even characters of it
    assert main(["patch", *flags(ckpt, tmp_path), "--clean", "to be"]) == 2
    assert "--corrupt" in capsys.readouterr().err
    argv = ["trace", *flags(ckpt, tmp_path), "--prompt", "to be", "--subject", "JULIET"]
    assert main(argv) == 2
    assert "not in the prompt" in capsys.readouterr().err
