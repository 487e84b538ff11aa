"""Reward model: scalar head at the last real token, Bradley-Terry training through the
trainer, held-out accuracy, save/load, CLI."""

import math

import pytest
import torch

from lmlab.align.reward import (
    RewardLoss,
    RewardModel,
    add_scalar_head,
    last_token_values,
    load_reward_model,
    save_reward_model,
    train_reward_model,
)
from lmlab.checkpoint.io import read_config, read_safetensors_header, save_checkpoint
from lmlab.cli.main import main
from lmlab.data import BPETokenizer
from lmlab.data.instructions import EncodedExample, collate
from lmlab.data.preferences import PreferencePair, load_preferences, write_preferences
from lmlab.data.tasks import generate_tasks
from lmlab.errors import CheckpointError
from lmlab.finetune import LoRAConfig
from lmlab.models import build_model, get_preset
from lmlab.train import TrainConfig


def _pairs(n, seed):
    """A preference a tiny model can learn and generalise: a word repeated in lowercase
    is preferred to the same word shouted in uppercase (held-out words are new)."""
    rows = generate_tasks(["reverse"], n, seed=seed)
    return [
        PreferencePair(f"Repeat the word.\n\n{r['input']}", r["input"], r["input"].upper())
        for r in rows
    ]


def tiny(vocab=300, seed=0):
    torch.manual_seed(seed)
    spec = {**get_preset("gpt-char-tiny"), "vocab_size": vocab, "n_layers": 1, "d_model": 64}
    return build_model({**spec, "n_heads": 4, "d_ff": 128})


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("reward")
    train_pairs, val_pairs = _pairs(32, 0), _pairs(12, 1)
    write_preferences(train_pairs, root / "prefs.jsonl")
    write_preferences(val_pairs, root / "val.jsonl")
    text = "\n".join(f"{p.prompt} {p.chosen} {p.rejected}" for p in train_pairs + val_pairs)
    tok = BPETokenizer.train(text + text.upper() + " ### Instruction: Response:", 300)
    save_checkpoint(root / "base", tiny(tok.vocab_size).eval(), tokenizer=tok)
    return root


def config(root, name, **kw):
    base = dict(
        out_dir=str(root / name),
        max_steps=30,
        batch_size=8,
        lr=3e-3,
        warmup_steps=0,
        lr_schedule="constant",
        eval_interval=15,
        ckpt_interval=1000,
        log_interval=1,
        precision="fp32",
        progress=False,
        spike_factor=None,
        seed=0,
    )
    return TrainConfig(**{**base, **kw})


def test_last_token_values_reads_the_last_real_token():
    values = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 0.0]])
    mask = torch.tensor([[True, True, True], [True, True, False]])
    assert last_token_values(values, mask).tolist() == [3.0, 5.0]


def test_scalar_head_starts_at_zero_and_ignores_right_padding():
    """Zero head: every reward is 0 and the Bradley-Terry loss is log 2 per pair. With a
    random head, a row's reward is the same alone and padded in a batch."""
    model = add_scalar_head(tiny(20)).eval()
    batch = collate([EncodedExample([1, 2, 3], [1, 2, 3]), EncodedExample([4, 5], [4, 5])], 0)
    loss, n = RewardLoss()(model, batch)
    assert int(n) == 1 and loss.item() == pytest.approx(math.log(2), abs=1e-6)
    torch.nn.init.normal_(model.lm_head.weight)
    rm = RewardModel(model, tokenizer=None)
    with torch.no_grad():
        values = model(batch["ids"]).squeeze(-1)
        alone = model(torch.tensor([[4, 5]])).squeeze(-1)
    assert last_token_values(values, batch["mask"])[1].item() == pytest.approx(
        alone[0, -1].item(), abs=1e-5
    )
    assert rm.model is model


def test_reward_model_learns_the_preference_and_reloads(setup, tmp_path):
    result = train_reward_model(
        str(setup / "base"),
        str(setup / "prefs.jsonl"),
        val_data=str(setup / "val.jsonl"),
        config=config(setup, "full"),
    )
    first = result.train.train_losses[0][1]
    assert first == pytest.approx(math.log(2), abs=1e-6)  # zero head: all rewards tie
    assert result.accuracy_before == 0.0  # ties are not wins
    assert result.accuracy_after >= 0.9, result.accuracy_after
    assert result.train.train_losses[-1][1] < 0.3
    rm = result.reward_model
    pairs = load_preferences(setup / "val.jsonl")
    items = [(p.prompt, p.chosen) for p in pairs]
    scores = rm.score(items)
    assert scores.shape == (len(pairs),)
    loaded = load_reward_model(result.model_dir)  # config + safetensors, no code
    torch.testing.assert_close(loaded.score(items), scores, atol=0, rtol=0)
    texts = rm.score(["plain text to score", "another"])
    assert texts.shape == (2,) and torch.isfinite(texts).all()
    save_reward_model(loaded, tmp_path / "again")
    assert load_reward_model(tmp_path / "again").score(items).equal(scores)


@pytest.mark.slow
def test_reward_model_with_lora_trains_the_head_and_the_adapter(setup):
    result = train_reward_model(
        str(setup / "base"),
        str(setup / "prefs.jsonl"),
        val_data=str(setup / "val.jsonl"),
        method="lora",
        lora=LoRAConfig(targets=("q_proj", "v_proj", "up_proj", "down_proj")),
        config=config(setup, "lora", lr=1e-2),
    )
    assert result.accuracy_after >= 0.8, result.accuracy_after
    assert load_reward_model(result.model_dir).score([("x", "y")]).shape == (1,)


def test_a_lora_reward_model_saves_head_and_adapter_over_its_base(setup):
    """The LoRA reward model's checkpoint holds the head and LoRA only (plus a reference
    to the base) and reloads with the same scores, bit for bit (the same float32 weights,
    LoRA merged on both sides)."""
    result = train_reward_model(
        str(setup / "base"),
        str(setup / "prefs.jsonl"),
        method="lora",
        config=config(setup, "lora-small", max_steps=2, lr=1e-2),
    )
    stored = read_safetensors_header(result.model_dir / "model.safetensors")
    assert stored and all(".lora_" in n or n.startswith("lm_head.") for n in stored), stored
    assert read_config(result.model_dir)["base"]["source"] == str(setup / "base")
    items = [(p.prompt, p.chosen) for p in load_preferences(setup / "prefs.jsonl")[:4]]
    loaded = load_reward_model(result.model_dir)
    torch.testing.assert_close(
        loaded.score(items), result.reward_model.score(items), atol=0, rtol=0
    )


def test_a_language_model_is_not_a_reward_model(setup):
    with pytest.raises(CheckpointError, match="not a reward model"):
        load_reward_model(setup / "base")


def test_cli_reward_prints_a_summary(setup, tmp_path, capsys):
    argv = ["reward", "--model", str(setup / "base"), "--data", str(setup / "prefs.jsonl")]
    argv += ["--val_data", str(setup / "val.jsonl"), "--train.out_dir", str(tmp_path / "cli")]
    argv += ["--train.max_steps", "2", "--train.progress", "false"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "reward model (full): 2 steps" in out and "held-out pairwise accuracy" in out
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "x", "chosen": "y"}\n')
    argv = ["reward", "--model", str(setup / "base"), "--data", str(bad)]
    assert main([*argv, "--train.out_dir", str(tmp_path / "o")]) == 2
    assert "bad.jsonl:1" in capsys.readouterr().err
