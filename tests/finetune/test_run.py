"""``finetune`` and ``lmlab finetune`` end to end on a tiny model and a bundled task."""

import json

import pytest
import torch

import lmlab
from lmlab.checkpoint.io import read_safetensors_header, save_checkpoint
from lmlab.cli.main import main
from lmlab.data import BPETokenizer
from lmlab.data.tasks import generate_tasks, write_jsonl
from lmlab.errors import ConfigError
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


# Full fine-tuning moves every weight: small steps. Soft prompts move a few vectors that
# the whole frozen model must react to: large steps, as in Lester et al. (0.3 there).
LR = {"full": 3e-3, "kl": 3e-3, "prompt": 3e-2, "prefix": 3e-2}
# A soft prompt, a prefix or the norms alone steer a random frozen model only so far
# (0.3-0.4 nats in 30 steps here).
DROP = {"prompt": 0.2, "prefix": 0.2, "selective": 0.2}


@pytest.mark.parametrize(
    "method", ["full", "kl", "lora", "qlora", "adapter", "prompt", "prefix", "bitfit", "selective"]
)
def test_every_method_lowers_the_validation_loss(setup, method):
    result = finetune(
        str(setup / "base"),
        str(setup / "tasks.jsonl"),
        method=method,
        max_len=64,
        config=config(setup, method, lr=LR.get(method, 1e-2)),
    )
    after = result.train.val_losses[-1][1]
    assert after < result.val_loss_before - DROP.get(method, 0.5), (result.val_loss_before, after)
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
    argv += ["--lora.r", "4", "--lora.targets", "[q_proj,k_proj]"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "lora: trained" in out and "adapter:" in out and "model:" in out
    adapter = json.loads((setup / "cli" / "adapter" / "adapter_config.json").read_text())
    names = {target.rsplit(".", 1)[-1] for target in adapter["targets"]}
    assert adapter["r"] == 4 and names == {"q_proj", "k_proj"}


def test_unknown_method_and_bad_data_are_one_line_errors(setup, tmp_path, capsys):
    argv = ["finetune", "--model", str(setup / "base"), "--data", str(setup / "tasks.jsonl")]
    assert main([*argv, "--method", "magic"]) == 2
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "x"}\n')
    argv = ["finetune", "--model", str(setup / "base"), "--data", str(bad)]
    assert main([*argv, "--train.out_dir", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "bad.jsonl:1" in err


def test_checkpoints_under_peft_load_with_lmlab_load(setup):
    """A trainer checkpoint of a model under LoRA (or a soft prompt) records its PEFT
    structure and holds only the trained tensors, so lmlab.load rebuilds it over the base
    and computes the same logits."""
    for method in ("lora", "prompt"):
        result = finetune(
            str(setup / "base"),
            str(setup / "tasks.jsonl"),
            method=method,
            max_len=64,
            config=config(setup, f"peft-{method}", max_steps=4, ckpt_interval=4, lr=1e-2),
        )
        ckpt = result.out_dir / "checkpoints"
        loaded = lmlab.load(str(result.out_dir))  # the newest checkpoint of the run
        assert any(ckpt.iterdir())
        ids = torch.tensor([loaded.tokenizer.encode("Reverse the word")])
        stored = read_safetensors_header(result.train.checkpoint / "model.safetensors")
        part = "lora_" if method == "lora" else "prompt"
        assert stored and all(part in name for name in stored), sorted(stored)
        reference = result.lm.model  # LoRA: merged, as lmlab.load merges it
        torch.testing.assert_close(loaded.model(ids), reference.eval()(ids), rtol=1e-4, atol=1e-4)


def test_packed_finetuning_trains_on_fewer_rows(setup):
    result = finetune(
        str(setup / "base"),
        str(setup / "tasks.jsonl"),
        method="full",
        max_len=128,  # the model's whole context: room for several examples a row
        pack=True,
        config=config(setup, "packed", max_steps=10, eval_interval=10),
    )
    assert result.examples["train"] < 54  # packed rows, several examples each
    assert result.train.val_losses[-1][1] < result.val_loss_before
    with pytest.raises(ConfigError, match="pack=True does not combine with method='prompt'"):
        finetune(
            str(setup / "base"),
            str(setup / "tasks.jsonl"),
            method="prompt",
            pack=True,
            config=config(setup, "bad"),
        )
