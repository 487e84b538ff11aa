"""``finetune`` and ``lmlab finetune`` end to end on a tiny model and a bundled task."""

import pytest
import torch

import lmlab
from lmlab.checkpoint.io import save_checkpoint
from lmlab.cli.main import main
from lmlab.data import BPETokenizer
from lmlab.data.tasks import generate_tasks, write_jsonl
from lmlab.finetune.run import finetune
from lmlab.models import build_model, get_preset
from lmlab.train import TrainConfig


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("ft")
    rows = generate_tasks(["reverse"], 60, seed=0)
    write_jsonl(rows, root / "tasks.jsonl")
    text = "\n".join(f"{r['instruction']} {r['input']} {r['output']}" for r in rows)
    tok = BPETokenizer.train(text + " ### Instruction: Response:", 400)
    torch.manual_seed(0)
    model = build_model(
        {**get_preset("gpt-char-tiny"), "vocab_size": tok.vocab_size, "n_layers": 2}
    )
    save_checkpoint(root / "base", model.eval(), tokenizer=tok)
    return root


def config(root, name, **kw):
    base = dict(
        out_dir=str(root / name),
        max_steps=30,
        batch_size=8,
        lr=3e-3,
        warmup_steps=2,
        eval_interval=15,
        ckpt_interval=1000,
        precision="fp32",
        progress=False,
        seed=0,
    )
    return TrainConfig(**{**base, **kw})


@pytest.mark.parametrize("method", ["full", "kl", "lora", "qlora", "adapter", "bitfit"])
def test_every_method_lowers_the_validation_loss(setup, method):
    result = finetune(
        str(setup / "base"),
        str(setup / "tasks.jsonl"),
        method=method,
        max_len=64,
        config=config(
            setup, method, lr=1e-2 if method in ("lora", "qlora", "adapter", "bitfit") else 3e-3
        ),
    )
    after = result.train.val_losses[-1][1]
    assert after < result.val_loss_before - 0.5, (result.val_loss_before, after)
    assert result.examples["train"] == 54 and result.examples["val"] == 6
    full = sum(p.numel() for p in lmlab.load(str(setup / "base")).model.parameters())
    if method in ("full", "kl"):
        assert result.trainable == result.total == full
    else:
        assert 0 < result.trainable < 0.2 * result.total
    if method == "lora":
        assert (result.adapter_dir / "adapter.safetensors").is_file()
    assert isinstance(result.lm.generate("Reverse", max_new_tokens=3, temperature=0), str)
    if result.model_dir is not None:  # a plain lmlab checkpoint that loads and generates
        lm = lmlab.load(result.model_dir)
        assert isinstance(lm.generate("Reverse", max_new_tokens=3, temperature=0), str)


def test_cli_finetune_prints_a_summary(setup, capsys):
    argv = ["finetune", "--model", str(setup / "base"), "--data", str(setup / "tasks.jsonl")]
    argv += ["--method", "lora", "--max_len", "64", "--train.out_dir", str(setup / "cli")]
    argv += ["--train.max_steps", "4", "--train.eval_interval", "2", "--train.progress", "false"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "lora: trained" in out and "adapter:" in out and "model:" in out


def test_unknown_method_and_bad_data_are_one_line_errors(setup, tmp_path, capsys):
    argv = ["finetune", "--model", str(setup / "base"), "--data", str(setup / "tasks.jsonl")]
    assert main([*argv, "--method", "magic"]) == 2
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "x"}\n')
    argv = ["finetune", "--model", str(setup / "base"), "--data", str(bad)]
    assert main([*argv, "--train.out_dir", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "bad.jsonl:1" in err
