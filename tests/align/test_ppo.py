import dataclasses
import json
import math
import os
import signal
import socket
import subprocess
from pathlib import Path

import pytest
import torch

from builders import start_lmlab, tensorboard_scalars
from lmlab.align.ppo import PPOConfig, _Run, ppo, row_prompt, task_reward
from lmlab.align.rl import (
    AdaptiveKLController,
    FixedKLController,
    gae,
    kl_penalty,
    leave_one_out_baseline,
    policy_loss,
    token_rewards,
    value_loss,
    whiten,
)
from lmlab.api import LM
from lmlab.checkpoint.io import checkpoint_dir, list_checkpoints
from lmlab.data.tokenizers import CharTokenizer
from lmlab.devices import model_device
from lmlab.errors import CheckpointError, ConfigError
from lmlab.finetune import LoRAConfig
from lmlab.models import build_model, get_preset
from lmlab.train.metrics import read_metrics
from lmlab.train.run import LOCK_FILE, Interrupted, RunDir, RunInUse

# ----------------------------------------------------------------------------- the maths
# Each example is the hand-worked one in the function's docstring. Tolerances: 1e-6 for
# float32 rounding (and whiten's eps of 1e-8 under the square root).


def close(actual, expected):
    torch.testing.assert_close(actual, torch.as_tensor(expected), atol=1e-6, rtol=1e-6)


def test_gae_hand_worked_example_stops_at_the_last_response_token():
    rewards = torch.tensor([[0.0, 0.0, 1.0], [0.0, 1.0, 9.0]])
    values = torch.tensor([[0.5, 0.5, 0.5], [0.5, 0.5, 7.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    advantages, returns = gae(rewards, values, mask, gamma=1.0, lam=0.5)
    close(advantages, [[0.125, 0.25, 0.5], [0.25, 0.5, 0.0]])
    close(returns, [[0.625, 0.75, 1.0], [0.75, 1.0, 0.0]])


def test_gae_with_lambda_one_is_the_discounted_return_minus_the_value():
    rewards, values = torch.tensor([[1.0, 2.0, 3.0]]), torch.tensor([[0.1, 0.2, 0.3]])
    advantages, returns = gae(rewards, values, torch.ones(1, 3), gamma=0.5, lam=1.0)
    close(returns, [[1 + 0.5 * 2 + 0.25 * 3, 2 + 0.5 * 3, 3.0]])
    close(advantages, returns - values)


def test_whiten_hand_worked_example_ignores_padding():
    out = whiten(torch.tensor([[1.0, 2.0, 3.0, 100.0]]), torch.tensor([[1.0, 1.0, 1.0, 0.0]]))
    close(out, [[-1.0, 0.0, 1.0, 0.0]])


def test_policy_loss_hand_worked_example():
    logp_old = torch.zeros(1, 3)
    logp_new = torch.log(torch.tensor([[1.5, 0.5, 1.0]]))
    advantages = torch.tensor([[1.0, 1.0, -2.0]])
    loss, clip_fraction, approx_kl = policy_loss(
        logp_new, logp_old, advantages, torch.ones(1, 3), 0.2
    )
    close(loss, 0.1)
    close(clip_fraction, 1 / 3)
    close(approx_kl, (math.log(1.5) ** 2 + math.log(0.5) ** 2) / 6)


def test_policy_loss_ignores_padding():
    logp_new, logp_old = torch.tensor([[0.1, 5.0]]), torch.zeros(1, 2)
    advantages = torch.tensor([[1.0, 100.0]])
    loss, _, _ = policy_loss(logp_new, logp_old, advantages, torch.tensor([[1.0, 0.0]]), 0.2)
    close(loss, -math.exp(0.1))  # ratio 1.105 is inside the clip range


def test_value_loss_hand_worked_example():
    loss = value_loss(
        torch.tensor([[1.0, -0.1]]),
        torch.zeros(1, 2),
        torch.tensor([[2.0, 0.0]]),
        torch.ones(1, 2),
        0.2,
    )
    close(loss, 0.8125)


def test_kl_penalty_kinds_hand_worked():
    d = torch.tensor([math.log(2.0)])
    zero = torch.zeros(1)
    close(kl_penalty(d, zero, "k1"), [math.log(2.0)])
    close(kl_penalty(-d, zero, "abs"), [math.log(2.0)])
    close(kl_penalty(d, zero, "k2"), [0.5 * math.log(2.0) ** 2])
    close(kl_penalty(d, zero, "k3"), [0.5 - 1 + math.log(2.0)])
    with pytest.raises(ConfigError, match="k4"):
        kl_penalty(d, zero, "k4")


def test_token_rewards_hand_worked_example():
    rewards = token_rewards(
        torch.tensor([1.0]), torch.tensor([[0.1, 0.2, 0.3]]), torch.tensor([[1.0, 1.0, 0.0]]), 0.5
    )
    close(rewards, [[-0.05, 0.9, 0.0]])


def test_leave_one_out_baseline_hand_worked_example():
    close(leave_one_out_baseline(torch.tensor([1.0, 0, 0, 1, 1, 1]), 3), [0, 0.5, 0.5, 1, 1, 1])
    with pytest.raises(ConfigError, match="k >= 2"):
        leave_one_out_baseline(torch.ones(4), 1)
    with pytest.raises(ConfigError, match="multiple of k"):
        leave_one_out_baseline(torch.ones(5), 2)


def test_rloo_advantages_are_the_centred_score_plus_kl_to_go(tmp_path):
    # TRL's RLOO convention written out for one rollout: per-token rewards -kl_coef * KL,
    # the score less the mean of the prompt's other samples added at the last token, then
    # summed to the end of the reply (gamma 1, no value head), then whitened.
    config = small_config(
        tmp_path, advantage_estimator="rloo", samples_per_prompt=2, batch_size=2, kl_coef=0.5
    )
    run = _Run(tiny_lm(), PROMPTS, starts_with_a, config, RunDir(config.out_dir))
    run.model.lm_head.weight.data.add_(0.3 * torch.randn_like(run.model.lm_head.weight))
    rollout = run._rollout()
    scores, kl, mask = rollout["scores"], rollout["kl"], rollout["mask"]
    other = scores.reshape(-1, 2).flip(1).reshape(-1)  # with k=2 the baseline is the other one
    expected = torch.zeros_like(kl)
    for n in range(kl.shape[0]):
        length = int(mask[n].sum())
        for t in range(length):
            expected[n, t] = -0.5 * kl[n, t:length].sum() + scores[n] - other[n]
    close(rollout["advantages"], whiten(expected, mask))
    assert rollout["values"] is None


def test_adaptive_kl_controller_hand_worked_example_and_state():
    ctl = AdaptiveKLController(0.1, target=6.0, horizon=10000)
    ctl.update(12.0, n_steps=1000)
    assert ctl.value == pytest.approx(0.102, abs=1e-12)
    ctl.update(0.0, n_steps=1000)  # error clipped at -0.2
    assert ctl.value == pytest.approx(0.102 * 0.98, abs=1e-12)
    other = AdaptiveKLController(1.0, target=1.0, horizon=1)
    other.load_state_dict(ctl.state_dict())
    assert other.state_dict() == ctl.state_dict()
    fixed = FixedKLController(0.3)
    fixed.update(100.0, 10)
    assert fixed.value == 0.3
    fixed.load_state_dict({"value": 0.5})
    assert fixed.value == 0.5


# ----------------------------------------------------------------------------- the loop

TOKENIZER = CharTokenizer.train("abcdefgh")
PROMPTS = ["ab", "cde", "h", "gfe"]


def tiny_lm(seed: int = 0) -> LM:
    torch.manual_seed(seed)
    spec = {
        **get_preset("gpt-char-tiny"),
        "vocab_size": TOKENIZER.vocab_size,
        "n_layers": 1,
        "d_model": 32,
        "n_heads": 2,
        "d_ff": 64,
        "max_seq_len": 32,
    }
    return LM(build_model(spec), TOKENIZER)


def starts_with_a(prompts, completions):
    return [1.0 if c.startswith("a") else 0.0 for c in completions]


def small_config(tmp_path, **overrides) -> PPOConfig:
    settings = dict(
        batch_size=4,
        samples_per_prompt=4,
        max_new_tokens=3,
        minibatch_size=8,
        ppo_epochs=2,
        lr=3e-3,
        method="full",
        chat_template=False,
        max_steps=4,
        out_dir=str(tmp_path / "run"),
        progress=False,
    )
    return PPOConfig(**{**settings, **overrides})


def without_time(records):
    return [{k: v for k, v in r.items() if k != "elapsed_s"} for r in records]


@pytest.mark.slow
@pytest.mark.parametrize("estimator", ["gae", "rloo"])
def test_ppo_learns_an_easy_reward_with_finite_kl(tmp_path, estimator):
    # Reward 1 when the first generated character is "a" (1 of 8, so ~0.125 at random).
    config = small_config(tmp_path, max_steps=12, advantage_estimator=estimator)
    result = ppo(tiny_lm(), PROMPTS, starts_with_a, config)
    assert (result.value_head is None) == (estimator == "rloo")
    scores = [r["score"] for r in result.metrics]
    assert len(scores) == 12
    assert sum(scores[:3]) / 3 < 0.3
    assert sum(scores[-3:]) / 3 > sum(scores[:3]) / 3 + 0.25
    assert all(math.isfinite(r["kl"]) and math.isfinite(r["value_loss"]) for r in result.metrics)
    assert result.metrics[-1]["kl"] > 0  # it moved away from the reference to get there
    # The written model is loadable and is the trained one.
    import lmlab

    loaded = lmlab.load(result.model_dir)
    for (name, a), b in zip(
        result.lm.model.state_dict().items(), loaded.model.state_dict().values()
    ):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)
    assert (tmp_path / "run" / "ppo.png").is_file()
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert sum(json.loads(line)["event"] == "ppo" for line in lines) == 12


@pytest.mark.parametrize("method", ["full", "lora"])
def test_lr_zero_leaves_the_policy_unchanged_and_kl_zero(tmp_path, method):
    lm = tiny_lm()
    before = {k: v.clone() for k, v in lm.model.state_dict().items()}
    config = small_config(tmp_path, lr=0.0, method=method, max_steps=2, lora=LoRAConfig(r=2))
    result = ppo(lm, PROMPTS, starts_with_a, config)
    for record in result.metrics:
        assert record["kl"] == 0.0 and record["approx_kl"] == 0.0
        assert record["clip_fraction"] == 0.0
    after = result.lm.model.state_dict()
    assert after.keys() == before.keys()
    for name, tensor in before.items():
        torch.testing.assert_close(after[name], tensor, rtol=0, atol=0, msg=name)
    if method == "lora":
        assert (result.adapter_dir / "adapter_config.json").is_file()


@pytest.mark.slow
@pytest.mark.parametrize("method", ["full", "lora"])
def test_interrupted_and_resumed_run_equals_an_uninterrupted_one(tmp_path, method):
    # Exact resume (RELIABILITY item 1): 4 iterations straight vs Ctrl-C during the rollout
    # of iteration 3 (a checkpoint is saved at 2), then resume -> the same metrics and
    # bit-identical final weights and value head.
    extra = dict(method=method, lora=LoRAConfig(r=2), lr=1e-2, ckpt_interval=3, kl_target=1.0)
    straight = ppo(tiny_lm(), PROMPTS, starts_with_a, small_config(tmp_path / "a", **extra))

    calls = []

    def interrupting(prompts, completions):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return starts_with_a(prompts, completions)

    config = small_config(tmp_path / "b", **extra)
    with pytest.raises(KeyboardInterrupt):
        ppo(tiny_lm(), PROMPTS, interrupting, config)
    assert (tmp_path / "b" / "run" / "checkpoints" / "step-00000002").is_dir()
    with pytest.raises(ConfigError, match="resume"):
        ppo(tiny_lm(), PROMPTS, starts_with_a, config)
    resumed_config = small_config(tmp_path / "b", resume="auto", **extra)
    if method == "full":  # the starting model is the reference: another one is refused
        with pytest.raises(CheckpointError, match="other weights"):
            ppo(tiny_lm(seed=1), PROMPTS, starts_with_a, resumed_config)
    # With LoRA every weight comes from the checkpoint, whatever the model passed.
    resumed = ppo(
        tiny_lm(seed=1 if method == "lora" else 0), PROMPTS, starts_with_a, resumed_config
    )

    assert resumed.iterations == straight.iterations == 4
    assert without_time(resumed.metrics) == without_time(straight.metrics)
    a, b = straight.lm.model.state_dict(), resumed.lm.model.state_dict()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=0, msg=name)
    for p, q in zip(straight.value_head.parameters(), resumed.value_head.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0)


def test_time_budget_stops_the_run_and_still_writes_the_model(tmp_path):
    config = small_config(tmp_path, max_steps=50, time_budget_s=1e-9)
    result = ppo(tiny_lm(), PROMPTS, starts_with_a, config)
    assert result.iterations == 0 and result.metrics == [] and result.checkpoint is None
    assert (result.model_dir / "COMPLETE").is_file()


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("batch_size", 0),
        ("ppo_epochs", 1.5),
        ("temperature", 0.0),
        ("top_p", 1.5),
        ("clip_eps", 0.0),
        ("lam", 2.0),
        ("lr", -1.0),
        ("kl_target", 0.0),
        ("kl_kind", "k9"),
        ("method", "lorra"),
        ("time_budget_s", -5.0),
        ("max_steps", 0),
        ("ckpt_interval", 0),
        ("keep_last", 0),
        ("resume", ""),
        ("advantage_estimator", "grpo"),
    ],
)
def test_bad_config_values_name_the_field(field, value):
    with pytest.raises(ConfigError, match=f"PPOConfig.{field}="):
        PPOConfig(**{field: value})


def test_the_recorded_config_rebuilds_the_same_config(tmp_path):
    """config.json and every checkpoint record ``asdict(config)``: read back from JSON, the
    nested LoRA settings become a LoRAConfig again."""
    config = small_config(tmp_path, method="lora", lora=LoRAConfig(r=2, targets=("q_proj",)))
    record = json.loads(json.dumps(dataclasses.asdict(config)))
    assert PPOConfig(**record) == config
    with pytest.raises(ConfigError, match="LoRAConfig.r=0"):
        PPOConfig(lora={"r": 0})


def test_rloo_needs_two_samples_per_prompt():
    with pytest.raises(ConfigError, match="'rloo' needs samples_per_prompt >= 2"):
        PPOConfig(advantage_estimator="rloo", samples_per_prompt=1)


def test_method_error_suggests_the_closest():
    with pytest.raises(ConfigError, match="did you mean 'lora'"):
        PPOConfig(method="lorra")


def test_task_reward_grades_rows_by_their_prompt():
    rows = [
        {"task": "arithmetic", "instruction": "What is 2 + 2?", "input": "", "output": "4"},
        {"task": "reverse", "instruction": "Reverse it.", "input": "abc", "output": "cba"},
    ]
    assert row_prompt(rows[1]) == "Reverse it.\n\nabc"
    reward = task_reward(rows)
    prompts = [row_prompt(rows[0]), row_prompt(rows[1]), row_prompt(rows[0])]
    assert reward(prompts, [" 4\n", "cba", "5"]) == [1.0, 1.0, 0.0]


# ----------------------------------------------------------------------------- CLI


def task_run_files(tmp_path) -> tuple[Path, Path]:
    """A tiny char model that can read arithmetic questions, and 4 task rows -> (model
    checkpoint, rows.jsonl)."""
    from lmlab.checkpoint.io import save_checkpoint

    # digits, the questions and the plain template's "### Instruction:" / "### Response:"
    tokenizer = CharTokenizer.train("0123456789 +-*?.:#\nWhatisAnswrhenumbrolyIRcp")
    torch.manual_seed(0)
    spec = {
        **get_preset("gpt-char-tiny"),
        "vocab_size": tokenizer.vocab_size,
        "n_layers": 1,
        "d_model": 32,
        "n_heads": 2,
        "d_ff": 64,
        "max_seq_len": 128,
    }
    save_checkpoint(tmp_path / "model", build_model(spec), tokenizer=tokenizer)
    rows = tmp_path / "rows.jsonl"
    rows.write_text(
        "".join(
            json.dumps(
                {"task": "arithmetic", "instruction": f"What is {i} + 1?", "output": str(i + 1)}
            )
            + "\n"
            for i in range(4)
        )
    )
    return tmp_path / "model", rows


def cli_flags(out_dir, max_steps: int = 1) -> list[str]:
    return [
        "--ppo.max_steps", str(max_steps), "--ppo.batch_size", "2", "--ppo.max_new_tokens", "2",
        "--ppo.method", "full", "--ppo.chat_template", "false", "--ppo.progress", "false",
        "--ppo.lora.r", "2", "--ppo.lora.targets", "[q_proj]", "--ppo.device", "cpu",
        "--ppo.out_dir", str(out_dir),
    ]  # fmt: skip


def test_cli_ppo_runs_on_task_rows(tmp_path, capsys):
    from lmlab.cli.main import main

    model, rows = task_run_files(tmp_path)
    args = ["ppo", "--model", str(model), "--prompts", str(rows)]
    flags = cli_flags(tmp_path / "run")
    assert main(args + flags + ["--log.tensorboard", "true"]) == 0
    out = capsys.readouterr().out
    assert "PPO: 1 iterations" in out and str(tmp_path / "run" / "model") in out
    # PPO's events reach TensorBoard as the trainer's do (one iteration: step 1).
    scalars = tensorboard_scalars(tmp_path / "run" / "tensorboard")
    assert [step for step, _ in scalars["ppo/score"]] == [1]
    recorded = json.loads((tmp_path / "run" / "config.json").read_text())
    assert recorded["ppo"]["lora"] == {"r": 2, "alpha": 16.0, "dropout": 0.0, "targets": ["q_proj"]}
    assert main(args + ["--reward", "rm_dir"] + flags) == 2
    assert "neither 'task' nor a reward-model directory" in capsys.readouterr().err

    # A reward model scores the completions instead (here a fresh one: all rewards 0).
    import lmlab
    from lmlab.align.reward import reward_model_from, save_reward_model

    save_reward_model(reward_model_from(lmlab.load(tmp_path / "model")), tmp_path / "rm")
    flags[-1] = str(tmp_path / "run-rm")
    assert main(args + ["--reward", str(tmp_path / "rm")] + flags) == 0
    assert "PPO: 1 iterations" in capsys.readouterr().out


# ----------------------------------------------------------------------------- the run folder


def start_ppo(model, rows, out_dir) -> subprocess.Popen:
    """`lmlab ppo` in another process, "forever" until the test stops it; waits until it
    has finished an iteration."""
    args = ["ppo", "--model", str(model), "--prompts", str(rows)]
    flags = [*cli_flags(out_dir, max_steps=100_000_000), "--ppo.ckpt_interval", "100000000"]
    return start_lmlab([*args, *flags], out_dir, "ppo")


@pytest.mark.slow  # real processes
def test_sigterm_saves_a_checkpoint_a_second_writer_is_refused_and_the_run_resumes(
    tmp_path, capsys
):
    """A real `lmlab ppo` process (reliability item 28 and SIGTERM, as the trainer's test in
    tests/train/test_run.py): while it runs, a second PPO run into its folder (fresh or
    resuming) is refused naming the owner and writes nothing; SIGTERM saves a checkpoint
    at the last finished iteration and exits 128 + 15; `--ppo.resume auto` continues."""
    from lmlab.cli.main import main

    model, rows = task_run_files(tmp_path)
    out = tmp_path / "run"
    proc = start_ppo(model, rows, out)
    try:
        config_before = (out / "config.json").read_text()
        for resume in ("never", "auto"):
            second = PPOConfig(out_dir=str(out), resume=resume, device="cpu", progress=False)
            with pytest.raises(RunInUse, match=f"pid {proc.pid} on host {socket.gethostname()}"):
                ppo(str(model), ["What is 1 + 1?"], starts_with_a, second)
        assert (out / "config.json").read_text() == config_before
        assert proc.poll() is None  # the owner runs on
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            _, err = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "Traceback" not in err and "terminated" in err
    events = read_metrics(out / "metrics.jsonl")
    done = [e["step"] for e in events if e["event"] == "ppo"]
    [stopped] = [e["step"] for e in events if e["event"] == "checkpoint"]
    assert stopped == done[-1]  # an iteration's updates and record are never cut in two
    assert [p.name for p in list_checkpoints(out)] == [checkpoint_dir(out, stopped).name]
    assert not (out / LOCK_FILE).exists()  # the lock went with the process

    # The resume names only the folder: model, prompts, reward and settings are the run's.
    resume = ["ppo", "--ppo.out_dir", str(out), "--ppo.resume", "auto"]
    assert main([*resume, "--ppo.seed", "5"]) == 2
    assert "seed=5 cannot change mid-run" in capsys.readouterr().err
    assert main([*resume, "--ppo.max_steps", str(stopped + 1)]) == 0, capsys.readouterr().err
    assert f"resuming {str(out)!r} with its recorded settings; changed: max_steps" in (
        capsys.readouterr().out
    )
    recorded = json.loads((out / "config.json").read_text())
    assert recorded["source"]["model"] == str(model)
    assert recorded["ppo"]["max_new_tokens"] == 2 and recorded["ppo"]["resume"] == "auto"
    events = read_metrics(out / "metrics.jsonl")
    assert [e["step"] for e in events if e["event"] == "resume"] == [stopped]
    assert [e["step"] for e in events if e["event"] == "ppo"] == list(range(1, stopped + 2))
    assert list_checkpoints(out)[-1] == checkpoint_dir(out, stopped + 1)


def test_a_sigterm_inside_the_updates_waits_for_their_end_then_saves(tmp_path, monkeypatch):
    """SIGTERM sent as iteration 2's optimizer updates begin is raised only after the
    iteration ends (its updates, counter and record); its state is saved, and the resumed
    run ends bit for bit where an uninterrupted one does."""
    straight = ppo(tiny_lm(), PROMPTS, starts_with_a, small_config(tmp_path / "a"))
    update = _Run._update

    def terminated_in_iteration_2(self, rollout):
        if self.iteration == 1:
            os.kill(os.getpid(), signal.SIGTERM)
        return update(self, rollout)

    config = small_config(tmp_path / "b", ckpt_interval=100)
    with monkeypatch.context() as patch:
        patch.setattr(_Run, "_update", terminated_in_iteration_2)
        with pytest.raises(Interrupted):
            ppo(tiny_lm(), PROMPTS, starts_with_a, config)
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # the handlers are put back
    out = Path(config.out_dir)
    events = read_metrics(out / "metrics.jsonl")
    assert [e["step"] for e in events if e["event"] == "ppo"] == [1, 2]
    assert [p.name for p in list_checkpoints(out)] == [checkpoint_dir(out, 2).name]
    resumed = ppo(tiny_lm(), PROMPTS, starts_with_a, dataclasses.replace(config, resume="auto"))
    assert without_time(resumed.metrics) == without_time(straight.metrics)
    a, b = straight.lm.model.state_dict(), resumed.lm.model.state_dict()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=0, msg=name)


def test_resume_auto_with_nothing_to_resume_starts_fresh(tmp_path):
    fresh = ppo(tiny_lm(), PROMPTS, starts_with_a, small_config(tmp_path / "a", max_steps=1))
    config = small_config(tmp_path / "b", max_steps=1, resume="auto")
    auto = ppo(tiny_lm(), PROMPTS, starts_with_a, config)
    assert auto.iterations == 1
    assert [e["event"] for e in read_metrics(Path(config.out_dir) / "metrics.jsonl")] == [
        "ppo",
        "checkpoint",
    ]
    a, b = fresh.lm.model.state_dict(), auto.lm.model.state_dict()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=0, msg=name)


def test_a_bogus_resume_path_is_one_clear_error(tmp_path, capsys):
    from lmlab.cli.main import main

    missing = str(tmp_path / "no-such-run")
    with pytest.raises(CheckpointError, match="no such checkpoint or run directory"):
        ppo(tiny_lm(), PROMPTS, starts_with_a, small_config(tmp_path, resume=missing))
    (tmp_path / "empty").mkdir()
    empty = small_config(tmp_path, resume=str(tmp_path / "empty"))
    with pytest.raises(CheckpointError, match="nothing to resume"):
        ppo(tiny_lm(), PROMPTS, starts_with_a, empty)
    assert list_checkpoints(tmp_path / "run") == []
    # The CLI: one line naming the path, exit status 2.
    model, rows = task_run_files(tmp_path)
    args = ["ppo", "--model", str(model), "--prompts", str(rows), *cli_flags(tmp_path / "cli")]
    assert main([*args, "--ppo.resume", missing]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and missing in err and "no such checkpoint" in err


def test_a_checkpoint_of_another_command_is_not_resumed(tmp_path):
    from lmlab.checkpoint.io import save_checkpoint

    lm = tiny_lm()
    save_checkpoint(tmp_path / "plain", lm.model, tokenizer=TOKENIZER, train_state={"step": 3})
    config = small_config(tmp_path, resume=str(tmp_path / "plain"))
    with pytest.raises(CheckpointError, match="not a PPO checkpoint"):
        ppo(lm, PROMPTS, starts_with_a, config)


def test_resume_true_and_false_still_mean_auto_and_never():
    assert PPOConfig(resume=True).resume == "auto"
    assert PPOConfig(resume=False).resume == "never"


def test_the_seed_reproduces_the_run_bit_for_bit(tmp_path):
    """Reliability item 31: LoRA's init, the sampling and the shuffling all come from the
    config's seed, whatever torch's global RNG holds before the run."""

    def lora_run(seed: int, global_seed: int, name: str):
        lm = tiny_lm()
        torch.manual_seed(global_seed)
        config = small_config(
            tmp_path / name, method="lora", lora=LoRAConfig(r=2), max_steps=2, seed=seed
        )
        return ppo(lm, PROMPTS, starts_with_a, config).lm.model.state_dict()

    def lora_init(seed: int, global_seed: int):
        lm = tiny_lm()
        torch.manual_seed(global_seed)
        config = small_config(tmp_path / "init", method="lora", lora=LoRAConfig(r=2), seed=seed)
        _Run(lm, PROMPTS, starts_with_a, config, RunDir(config.out_dir))
        return {k: v for k, v in lm.model.state_dict().items() if "lora_a" in k.lower()}

    first, again, other = lora_init(0, 1), lora_init(0, 2), lora_init(1, 1)
    assert first and first.keys() == again.keys() == other.keys()
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert not any(torch.equal(first[k], other[k]) for k in first)

    a, b, c = lora_run(0, 1, "a"), lora_run(0, 2, "b"), lora_run(1, 1, "c")
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=0, msg=name)
    assert any(not torch.equal(a[name], c[name]) for name in a)


def test_a_missing_device_is_one_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="device='cuda:7' is not available"):
        ppo(tiny_lm(), PROMPTS, starts_with_a, small_config(tmp_path, device="cuda:7"))


@pytest.mark.gpu
@pytest.mark.parametrize("method", ["full", "lora"])
def test_ppo_trains_on_cuda_and_resumes_on_the_cpu(tmp_path, method):
    config = small_config(
        tmp_path, method=method, lora=LoRAConfig(r=2), max_steps=2, ckpt_interval=1, device="cuda"
    )
    result = ppo(tiny_lm(), PROMPTS, starts_with_a, config)
    assert model_device(result.lm.model).type == "cuda"
    assert result.value_head.weight.device.type == "cuda"
    assert all(math.isfinite(r["kl"]) for r in result.metrics)
    resumed_config = dataclasses.replace(config, device="cpu", resume="auto", max_steps=3)
    resumed = ppo(tiny_lm(), PROMPTS, starts_with_a, resumed_config)
    assert resumed.iterations == 3 and model_device(resumed.lm.model).type == "cpu"
