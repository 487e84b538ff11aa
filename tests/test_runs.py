"""Every command that trains, run the same two ways (RELIABILITY items 1 and 31).

- Exact resume: K steps uninterrupted vs a crash after step k and a resume from the
  checkpoint at step c < k: the final weights are bit-identical (float32 on the CPU).
- Seeds: the same command with the same seed gives bit-identical weights (initialisation
  of the model or of its LoRA/head, data order, dropout); another seed gives others.

The crash is an exception from the run manager's event stream at step k, which stops a
run as a real crash would (no checkpoint is written on the way out).
"""

import pytest
import torch

import lmlab
from lmlab.align.dpo import dpo
from lmlab.align.ppo import PPOConfig, ppo
from lmlab.align.reward import train_reward_model
from lmlab.checkpoint.io import save_checkpoint
from lmlab.data import BPETokenizer
from lmlab.data.preferences import PreferencePair, write_preferences
from lmlab.data.tasks import generate_tasks, write_jsonl
from lmlab.finetune import LoRAConfig
from lmlab.finetune.run import finetune
from lmlab.models import build_model, get_preset
from lmlab.train import TrainConfig
from lmlab.train.metrics import read_metrics
from lmlab.train.run import RunDir

STEPS, SAVED, CRASH = 6, 3, 5


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    rows = generate_tasks(["reverse"], 24, seed=0)
    write_jsonl(rows, root / "tasks.jsonl")
    pairs = [
        PreferencePair(f"{r['instruction']}\n\n{r['input']}", r["output"], r["input"])
        for r in rows
        if r["output"] != r["input"]
    ]
    write_preferences(pairs, root / "prefs.jsonl")
    text = "\n".join(f"{r['instruction']} {r['input']} {r['output']}" for r in rows)
    (root / "corpus.txt").write_text(text * 4)
    tok = BPETokenizer.train(text + " ### Instruction: Response:", 300)
    torch.manual_seed(0)
    spec = {**get_preset("gpt-char-tiny"), "vocab_size": tok.vocab_size, "n_layers": 1}
    model = build_model({**spec, "d_model": 64, "n_heads": 4, "d_ff": 128, "dropout": 0.1})
    save_checkpoint(root / "base", model.eval(), tokenizer=tok)
    return root


def settings(out_dir, **kw):
    base = dict(
        out_dir=str(out_dir),
        max_steps=STEPS,
        batch_size=4,
        seq_len=32,
        lr=1e-3,
        warmup_steps=2,
        eval_interval=1000,
        ckpt_interval=SAVED,
        log_interval=1,
        precision="fp32",
        progress=False,
        seed=3,
    )
    return TrainConfig(**{**base, **kw})


LORA = LoRAConfig(r=2, targets=("q_proj", "v_proj"))
# command -> run(data folder, TrainConfig) -> the trained nn.Module
COMMANDS = {
    "train": lambda root, cfg: (
        lmlab.load(
            lmlab.train(
                data=str(root / "corpus.txt"),
                tokenizer="byte",
                model_overrides={"n_layers": 1, "dropout": 0.1},
                config=cfg,
            ).checkpoint
        ).model
    ),
    "finetune": lambda root, cfg: (
        finetune(
            str(root / "base"), str(root / "tasks.jsonl"), method="lora", lora=LORA, config=cfg
        ).lm.model
    ),
    "finetune-full": lambda root, cfg: (
        finetune(str(root / "base"), str(root / "tasks.jsonl"), method="full", config=cfg).lm.model
    ),
    "reward": lambda root, cfg: (
        train_reward_model(
            str(root / "base"), str(root / "prefs.jsonl"), method="lora", lora=LORA, config=cfg
        ).reward_model.model
    ),
    "dpo": lambda root, cfg: (
        dpo(
            str(root / "base"), str(root / "prefs.jsonl"), method="lora", lora=LORA, config=cfg
        ).lm.model
    ),
    "ppo": lambda root, cfg: (
        ppo(
            str(root / "base"),
            ["Reverse the word: cat", "Reverse the word: dog", "Say hello"],
            lambda prompts, completions: [sum(map(ord, c)) % 7 / 7 for c in completions],
            PPOConfig(
                out_dir=cfg.out_dir,
                max_steps=cfg.max_steps,
                ckpt_interval=cfg.ckpt_interval,
                resume=cfg.resume,
                seed=cfg.seed,
                method="lora",
                lora=LORA,
                batch_size=2,
                samples_per_prompt=2,
                max_new_tokens=3,
                minibatch_size=4,
                ppo_epochs=1,
                chat_template=False,
                progress=False,
            ),
        ).lm.model
    ),
}
# The events a command logs once per step (an optimizer step, or PPO's iteration).
STEP_EVENTS = ("train", "ppo")


def weights(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_same(a, b):
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_crash_and_resume_equals_an_uninterrupted_run(command, data, tmp_path, monkeypatch):
    run = COMMANDS[command]
    whole = weights(run(data, settings(tmp_path / "whole")))

    emit = RunDir.emit

    def crash_at_step(self, record):
        emit(self, record)
        if record.get("event") in STEP_EVENTS and record.get("step") == CRASH:
            raise RuntimeError("simulated crash")

    monkeypatch.setattr(RunDir, "emit", crash_at_step)
    with pytest.raises(RuntimeError, match="simulated crash"):
        run(data, settings(tmp_path / "crashed"))
    monkeypatch.setattr(RunDir, "emit", emit)
    resumed = weights(run(data, settings(tmp_path / "crashed", resume="auto")))
    assert_same(resumed, whole)
    # It really resumed (a fresh start would reach the same weights too): from the step-3
    # checkpoint, the crashed run's later log lines dropped, every step logged once.
    records = read_metrics(tmp_path / "crashed" / "metrics.jsonl")
    assert [r["step"] for r in records if r["event"] == "resume"] == [SAVED]
    steps = [r["step"] for r in records if r["event"] in STEP_EVENTS]
    assert steps == list(range(1, STEPS + 1))


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_the_same_seed_gives_the_same_weights(command, data, tmp_path):
    run = COMMANDS[command]
    torch.manual_seed(100)  # the caller's RNG state must not matter
    first = weights(run(data, settings(tmp_path / "a", max_steps=2)))
    torch.manual_seed(200)
    again = weights(run(data, settings(tmp_path / "b", max_steps=2)))
    other = weights(run(data, settings(tmp_path / "c", max_steps=2, seed=4)))
    assert_same(first, again)
    assert any(not torch.equal(first[k], other[k]) for k in first)
