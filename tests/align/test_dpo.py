"""DPO through the trainer: sequence log-probs, log 2 at the start, learning, exact resume,
written model, CLI."""

import copy
import json
import math

import pytest
import torch

import lmlab
from lmlab.align.dpo import (
    DPOLoss,
    collate_pairs,
    dpo,
    encode_pairs,
    last_metrics,
    precompute_reference,
    reply_kl,
    sequence_logps,
)
from lmlab.checkpoint.io import save_checkpoint
from lmlab.cli.main import main
from lmlab.data import BPETokenizer
from lmlab.data.instructions import IGNORE, EncodedExample, collate, template_for
from lmlab.data.preferences import PreferencePair, load_preferences, write_preferences
from lmlab.data.tasks import generate_tasks
from lmlab.errors import ConfigError
from lmlab.finetune import LoRAConfig, apply_lora, lora_layers
from lmlab.models import build_model, get_preset
from lmlab.train import TrainConfig


def _pairs(n, seed):
    """Reverse-a-word prompts: chosen the reversed word, rejected the word unchanged."""
    rows = generate_tasks(["reverse"], n, seed=seed)
    return [
        PreferencePair(f"{r['instruction']}\n\n{r['input']}", r["output"], r["input"])
        for r in rows
        if r["output"] != r["input"]
    ]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("dpo")
    train_pairs, val_pairs = _pairs(24, 0), _pairs(8, 1)
    write_preferences(train_pairs, root / "prefs.jsonl")
    write_preferences(val_pairs, root / "val.jsonl")
    text = "\n".join(f"{p.prompt} {p.chosen} {p.rejected}" for p in train_pairs + val_pairs)
    tok = BPETokenizer.train(text + " ### Instruction: Response:", 300)
    torch.manual_seed(0)
    model = build_model(
        {**get_preset("gpt-char-tiny"), "vocab_size": tok.vocab_size, "n_layers": 1, "d_model": 64}
        | {"n_heads": 4, "d_ff": 128}
    )
    save_checkpoint(root / "base", model.eval(), tokenizer=tok)
    return root


def config(root, name, **kw):
    base = dict(
        out_dir=str(root / name),
        max_steps=20,
        batch_size=4,
        lr=3e-3,
        warmup_steps=0,
        lr_schedule="constant",
        eval_interval=10,
        ckpt_interval=1000,
        log_interval=1,
        precision="fp32",
        progress=False,
        spike_factor=None,
        seed=0,
    )
    return TrainConfig(**{**base, **kw})


def _tiny_batch():
    """A tiny GPT and a batch of two rows whose replies are tokens 3, 4 and 6: position 1
    of row 0 predicts 3, position 2 predicts 4, position 0 of row 1 predicts 6."""
    torch.manual_seed(0)
    model = build_model({**get_preset("gpt-char-tiny"), "vocab_size": 11, "n_layers": 1}).eval()
    examples = [
        EncodedExample([1, 2, 3, 4], [IGNORE, IGNORE, 3, 4]),
        EncodedExample([5, 6], [IGNORE, 6]),
    ]
    return model, collate(examples, pad_id=0)


def test_sequence_logps_sums_reply_tokens_only():
    model, batch = _tiny_batch()
    logps = sequence_logps(model, batch)
    with torch.no_grad():
        a = model(torch.tensor([[1, 2, 3, 4]]))[0].log_softmax(-1)
        b = model(torch.tensor([[5, 6]]))[0].log_softmax(-1)
    expected = torch.stack([a[1, 3] + a[2, 4], b[0, 6]])
    torch.testing.assert_close(logps, expected, atol=1e-5, rtol=1e-5)
    averaged = sequence_logps(model, batch, average=True)
    torch.testing.assert_close(averaged, expected / torch.tensor([2.0, 1.0]), atol=1e-5, rtol=1e-5)


def test_reply_kl_sums_the_exact_kl_over_reply_tokens_only():
    """At each labelled position, sum_v p(v) (log p(v) - log q(v)); a fresh LoRA (B = 0)
    is its own reference, so 0; with the update on it equals the sum against a copy of
    the base model, and passing that copy as ``reference`` gives the same."""
    base, batch = _tiny_batch()
    policy = apply_lora(copy.deepcopy(base), LoRAConfig(r=2, targets=("q_proj", "v_proj")))
    kl, n = reply_kl(policy, batch)
    assert n.item() == 3 and kl.item() == 0.0
    for layer in lora_layers(policy).values():
        torch.nn.init.normal_(layer.lora_B, std=0.5)
    kl, n = reply_kl(policy, batch)
    expected = 0.0
    with torch.no_grad():
        for ids, positions in (([1, 2, 3, 4], [1, 2]), ([5, 6], [0])):
            p = policy(torch.tensor([ids]))[0, positions].log_softmax(-1)
            q = base(torch.tensor([ids]))[0, positions].log_softmax(-1)
            expected += (p.exp() * (p - q)).sum().item()
    assert expected > 1e-3  # the update moved the model
    assert kl.item() == pytest.approx(expected, rel=1e-5)  # float32 sums in another order
    kl_ref, _ = reply_kl(policy, batch, reference=base)
    assert kl_ref.item() == pytest.approx(expected, rel=1e-5)


def test_initial_loss_is_log_2_and_rewards_zero(setup):
    """A fresh policy equals its reference: every log-ratio is 0, so each pair's loss is
    -log sigmoid(0) = log 2 = 0.6931 and both implicit rewards are 0."""
    lm = lmlab.load(str(setup / "base"))
    template = template_for(lm.tokenizer, lm.chat_template)
    pairs, skipped = encode_pairs(load_preferences(setup / "prefs.jsonl"), lm.tokenizer, template)
    assert skipped == 0
    pairs = precompute_reference(lm.model, pairs, batch_size=5, pad_id=0)
    loss_fn = DPOLoss(beta=0.1)
    lm.model.train()
    loss_sum, n = loss_fn(lm.model, collate_pairs(pairs[:8], pad_id=0))
    assert n == 8
    assert (loss_sum / n).item() == pytest.approx(math.log(2), abs=1e-5)
    metrics = loss_fn.metrics(training=True)
    assert metrics["margin"] == pytest.approx(0.0, abs=1e-5)
    assert loss_fn.metrics(training=True) == {}  # read and reset


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo"])
def test_rpo_adds_the_chosen_replies_token_mean_nll_per_pair(setup, loss_type):
    """RPO's loss = the DPO (or IPO) loss + alpha * B * NLL, with NLL the cross-entropy of
    the chosen replies' tokens averaged over the batch's chosen tokens (TRL's nll_loss,
    added to each pair's loss before TRL's mean)."""
    lm = lmlab.load(str(setup / "base"))
    template = template_for(lm.tokenizer, lm.chat_template)
    pairs, _ = encode_pairs(load_preferences(setup / "prefs.jsonl"), lm.tokenizer, template)
    pairs = precompute_reference(lm.model, pairs, batch_size=5, pad_id=0)
    batch = collate_pairs(pairs[:6], pad_id=0)
    lm.model.eval()
    plain, n = DPOLoss(beta=0.1, loss_type=loss_type)(lm.model, batch)
    rpo, _ = DPOLoss(beta=0.1, loss_type=loss_type, rpo_alpha=0.5)(lm.model, batch)
    with torch.no_grad():
        logits = lm.model(batch["ids"][:6])[:, :-1]
    nll = torch.nn.functional.cross_entropy(
        logits.flatten(0, 1), batch["labels"][:6, 1:].flatten(), ignore_index=IGNORE
    )
    assert rpo.item() == pytest.approx(plain.item() + 0.5 * 6 * nll.item(), rel=1e-5)
    with pytest.raises(ConfigError, match="rpo_alpha"):
        DPOLoss(rpo_alpha=-1.0)


def _train_accuracy(policy, base, pairs, tokenizer, template):
    """Fraction of training pairs where the policy's implicit reward prefers the chosen reply."""
    encoded, _ = encode_pairs(pairs, tokenizer, template)
    batch = collate_pairs(encoded, pad_id=0)
    with torch.no_grad():
        ratio = sequence_logps(policy.eval(), batch) - sequence_logps(base.eval(), batch)
    B = len(encoded)
    return (ratio[:B] > ratio[B:]).float().mean().item(), (ratio[:B] - ratio[B:]).mean().item()


@pytest.mark.parametrize("method", [pytest.param("full", marks=pytest.mark.slow), "lora"])
def test_dpo_learns_to_prefer_the_chosen_replies(setup, method):
    lr = 3e-3 if method == "full" else 2e-2
    result = dpo(
        str(setup / "base"),
        str(setup / "prefs.jsonl"),
        val_data=str(setup / "val.jsonl"),
        beta=0.5,
        method=method,
        lora=LoRAConfig(targets=("q_proj", "v_proj", "up_proj", "down_proj")),
        config=config(setup, f"learn-{method}", lr=lr),
    )
    first = result.train.train_losses[0][1]
    assert first == pytest.approx(math.log(2), abs=1e-5)  # the policy starts as the reference
    base = lmlab.load(str(setup / "base"))
    template = template_for(base.tokenizer, base.chat_template)
    pairs = load_preferences(setup / "prefs.jsonl")
    acc, margin = _train_accuracy(result.lm.model, base.model, pairs, base.tokenizer, template)
    assert acc >= 0.9 and margin > 0.5, (acc, margin)
    assert result.train.train_losses[-1][1] < 0.5 * math.log(2)
    assert set(result.last) >= {"loss", "margin", "reward_accuracy", "rewards_chosen"}
    assert "val_reward_accuracy" in result.val and "val_margin" in result.val
    if method == "lora":
        # The last evaluation ran on the final weights: its KL is the direct one of the
        # tuned model (merged now, so float32 rounding differs) against the base.
        val, _ = encode_pairs(load_preferences(setup / "val.jsonl"), base.tokenizer, template)
        kl, n = reply_kl(result.lm.model.eval(), collate_pairs(val, 0), reference=base.model)
        assert result.val["val_kl"] > 1e-3
        assert result.val["val_kl"] == pytest.approx((kl / n).item(), rel=1e-3)
    else:  # full, reference log-probs precomputed: no reference weights kept to compare
        assert "val_kl" not in result.val
    assert (setup / f"learn-{method}" / "dpo.png").stat().st_size > 0
    reloaded = lmlab.load(str(result.model_dir))  # merged: a plain lmlab checkpoint
    acc2, _ = _train_accuracy(reloaded.model, base.model, pairs, base.tokenizer, template)
    assert acc2 == acc
    if method == "lora":
        assert (result.adapter_dir / "adapter.safetensors").is_file()
        assert 0 < result.trainable < result.total


def test_metrics_are_logged_every_step(setup):
    result = dpo(
        str(setup / "base"),
        str(setup / "prefs.jsonl"),
        val_data=str(setup / "val.jsonl"),
        method="full",
        loss_type="ipo",
        config=config(setup, "ipo", max_steps=4, eval_interval=2),
    )
    records = [json.loads(line) for line in open(result.out_dir / "metrics.jsonl")]
    trains = [r for r in records if r["event"] == "train"]
    evals = [r for r in records if r["event"] == "eval"]
    assert [r["step"] for r in trains] == [1, 2, 3, 4]
    for r in trains:
        assert r["margin"] == pytest.approx(r["rewards_chosen"] - r["rewards_rejected"], abs=1e-6)
        assert 0.0 <= r["reward_accuracy"] <= 1.0
    assert [r["step"] for r in evals] == [2, 4] and all("val_margin" in r for r in evals)
    # IPO's loss at the start: (0 - 1 / (2 beta))^2 = 25 for beta = 0.1
    assert trains[0]["loss"] == pytest.approx(25.0, abs=1e-3)


@pytest.mark.parametrize("precompute", [True, False])
def test_val_kl_is_measured_only_against_the_reference_itself(setup, precompute):
    """A reference model other than the policy's base. Kept live (precompute off), val_kl
    is the KL to it, > 0 although the policy has barely moved from its base. Precomputed,
    its weights are gone and the LoRA-off policy is not the reference, so no val_kl is
    logged rather than a KL to the wrong model."""
    lm = lmlab.load(str(setup / "base"))
    noise = torch.Generator().manual_seed(1)
    with torch.no_grad():  # another model of the same shape
        for param in lm.model.parameters():
            param.add_(0.2 * torch.randn(param.shape, generator=noise))
    save_checkpoint(setup / f"other-{precompute}", lm.model.eval(), tokenizer=lm.tokenizer)
    result = dpo(
        str(setup / "base"),
        str(setup / "prefs.jsonl"),
        val_data=str(setup / "val.jsonl"),
        reference=str(setup / f"other-{precompute}"),
        precompute_reference_logps=precompute,
        config=config(
            setup, f"ref-{precompute}", max_steps=2, eval_interval=2, lr=1e-9, min_lr=0.0
        ),
    )
    if precompute:
        assert "val_kl" not in result.val
    else:
        assert result.val["val_kl"] > 0.01  # lr 1e-9: the policy is still the base, not `other`


@pytest.mark.parametrize("precompute", [True, pytest.param(False, marks=pytest.mark.slow)])
def test_dpo_resume_is_exact(setup, precompute):
    """K = 8 steps uninterrupted vs a crash after step 5 (checkpoint at 4) and a resume:
    losses of steps 5..8 and the final weights are bit-exact in float32 (RELIABILITY 1)."""

    class Crash(Exception):
        pass

    def crash_at_5(event):
        if event["event"] == "train" and event["step"] == 5:
            raise Crash

    tag = "pre" if precompute else "live"
    kw = dict(method="lora", precompute_reference_logps=precompute)
    full = dpo(
        str(setup / "base"),
        str(setup / "prefs.jsonl"),
        config=config(setup, f"full-{tag}", max_steps=8, ckpt_interval=4),
        **kw,
    )
    with pytest.raises(Crash):
        dpo(
            str(setup / "base"),
            str(setup / "prefs.jsonl"),
            config=config(setup, f"resumed-{tag}", max_steps=8, ckpt_interval=4),
            callbacks=[crash_at_5],
            **kw,
        )
    resumed = dpo(
        str(setup / "base"),
        str(setup / "prefs.jsonl"),
        config=config(setup, f"resumed-{tag}", max_steps=8, ckpt_interval=4, resume="auto"),
        **kw,
    )
    assert resumed.train.train_losses == full.train.train_losses[4:]
    a, b = full.lm.model.state_dict(), resumed.lm.model.state_dict()
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_last_metrics_are_the_last_train_and_eval_events(tmp_path):
    events = [
        {"event": "train", "step": 1, "loss": 0.7, "margin": 0.0, "lr": 1e-3},
        {"event": "eval", "step": 1, "val_loss": 0.69, "val_kl": 0.01},
        {"event": "train", "step": 2, "loss": 0.6, "margin": 0.2, "reward_accuracy": 1.0},
        {"event": "checkpoint", "step": 2, "path": "x"},
    ]
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps(e) + "\n" for e in events))
    last, val = last_metrics(path)
    assert last == {"step": 2, "loss": 0.6, "margin": 0.2, "reward_accuracy": 1.0}
    assert val == {"step": 1, "val_loss": 0.69, "val_kl": 0.01}


def test_cli_dpo_prints_a_summary_and_bad_data_is_one_line(setup, tmp_path, capsys):
    argv = ["dpo", "--model", str(setup / "base"), "--data", str(setup / "prefs.jsonl")]
    argv += ["--val_data", str(setup / "val.jsonl"), "--beta", "0.2", "--loss_type", "sigmoid"]
    argv += ["--method", "lora", "--train.out_dir", str(tmp_path / "cli")]
    argv += ["--train.max_steps", "2", "--train.eval_interval", "2", "--train.progress", "false"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "dpo (lora): trained" in out and "validation:" in out and "model:" in out
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "x", "chosen": "y"}\n')
    argv = ["dpo", "--model", str(setup / "base"), "--data", str(bad)]
    assert main([*argv, "--train.out_dir", str(tmp_path / "o")]) == 2
    assert "bad.jsonl:1" in capsys.readouterr().err
    assert main([*argv, "--method", "magic"]) == 2
