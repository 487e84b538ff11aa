"""A reward model and DPO on one checkable task, measured before and after (``lmlab align``,
lesson 9).

``preference_study`` runs the preference pipeline end to end, small enough for a laptop::

    rows       prompts, validation prompts and test questions of a generated task
               (``lmlab.data.tasks.generate_splits``: no prompt in two splits)
    before     the model's greedy accuracy on the test questions, graded exactly
    pairs      k replies sampled per prompt and graded by the task's checker
               (``lmlab.align.pairs.sampled_pairs``): a right reply over a wrong one, and
               where all k are wrong the reference answer over the first of them
    reward     a reward model (Bradley-Terry, LoRA) trained on the pairs; its accuracy on
               the validation pairs, and on right-versus-near-miss pairs of the test
               questions (``reference_pairs``), which only a model that checks the answer
               can rank
    dpo        DPO with LoRA on the same pairs (reference: the model with LoRA off), with
               the validation pairs' rewards, margin and KL to the reference logged as it
               trains; then its greedy accuracy on the test questions

Everything is seeded: the same settings give the same report. The runs are written under
``out/reward`` and ``out/dpo`` (each with ``metrics.jsonl`` and ``model/``; a rerun
replaces them), the pairs under ``out/data``, and the report to ``out/preferences.json``.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from lmlab.align.dpo import dpo, last_metrics
from lmlab.align.pairs import reference_pairs, sampled_pairs
from lmlab.align.reward import reward_accuracy, train_reward_model
from lmlab.data.preferences import write_preferences
from lmlab.data.tasks import generate_splits, get_task
from lmlab.errors import ConfigError
from lmlab.fileio import atomic_write_json
from lmlab.finetune.lora import LoRAConfig
from lmlab.finetune.run import task_accuracy
from lmlab.lm import load
from lmlab.train import TrainConfig

METHODS = ("reward", "dpo")


@dataclass
class PreferenceConfig:
    """What ``preference_study`` runs."""

    model: str = "smollm2"
    """Anything ``lmlab.load`` takes (an instruction-tuned model: it is asked in its chat
    template)."""
    task: str = "arithmetic"
    """A task of ``lmlab.data.tasks`` (its checker grades the replies)."""
    methods: str = "reward,dpo"
    """Comma-separated: reward (a reward model), dpo."""
    n_prompts: int = 48
    """Prompts to sample training pairs from (each gives at most one pair)."""
    n_val: int = 12
    """Prompts for the validation pairs (DPO's validation, the reward model's accuracy)."""
    n_test: int = 40
    """Test questions, graded before and after."""
    k: int = 2
    """Replies sampled per prompt."""
    temperature: float = 1.0
    steps: int = 24
    """Training steps of each run."""
    batch_size: int = 4
    """Pairs per step."""
    lr: float = 5e-4
    """DPO's learning rate."""
    reward_lr: float = 1e-3
    """The reward model's learning rate."""
    beta: float = 0.1
    lora_r: int = 16
    eval_every: int = 8
    """DPO validates (rewards, margin, KL to the reference) every this many steps."""
    max_len: int = 96
    max_new_tokens: int = 12
    seed: int = 0

    def __post_init__(self):
        get_task(self.task)  # a ConfigError naming the valid tasks
        self.method_list()
        for name in ("n_prompts", "n_val", "n_test", "steps", "batch_size", "lora_r",
                     "eval_every", "max_len", "max_new_tokens"):  # fmt: skip
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name}={value!r} is invalid: must be an integer >= 1")
        if isinstance(self.k, bool) or not isinstance(self.k, int) or self.k < 2:
            raise ConfigError(f"k={self.k!r} is invalid: a pair needs at least 2 samples")
        for name in ("temperature", "lr", "reward_lr", "beta"):
            value = getattr(self, name)
            if not value > 0:
                raise ConfigError(f"{name}={value!r} is invalid: must be > 0")

    def method_list(self) -> list[str]:
        names = [m.strip() for m in self.methods.split(",") if m.strip()]
        unknown = [m for m in names if m not in METHODS]
        if not names or unknown or len(set(names)) != len(names):
            raise ConfigError(
                f"methods={self.methods!r} is invalid: name each of {', '.join(METHODS)} "
                "at most once, comma-separated"
            )
        return names


def _train_config(config: PreferenceConfig, out: Path, lr: float, progress: bool | None):
    return TrainConfig(
        out_dir=str(out),
        max_steps=config.steps,
        batch_size=config.batch_size,
        lr=lr,
        min_lr=lr / 10,
        warmup_steps=min(5, config.steps // 5),
        eval_interval=config.eval_every,
        ckpt_interval=10**9,
        log_interval=1,
        precision="fp32",
        seed=config.seed,
        progress=progress is not False,
    )


def _pair_summary(sampled) -> dict[str, Any]:
    sources = [p.meta.get("source") for p in sampled.pairs]
    return {
        "prompts": sampled.prompts,
        "pairs": len(sampled.pairs),
        "sampled": sources.count("sampled"),
        "reference": sources.count("reference"),
        "all_right": sampled.all_right,
        "all_wrong": sampled.all_wrong,
        "sample_accuracy": sampled.accuracy,
    }


def preference_study(
    config: PreferenceConfig, out: str | os.PathLike, progress: bool | None = None
) -> dict[str, Any]:
    """The pipeline of the module docstring; writes ``out/preferences.json`` -> the report."""
    out = Path(out)
    methods = config.method_list()
    for run in METHODS:  # this command's own runs: a rerun replaces them (never resumes them)
        if (out / run).is_dir():
            shutil.rmtree(out / run)
    prompt_rows, val_rows, test_rows = generate_splits(
        config.task, config.n_prompts, config.n_val, config.n_test, config.seed
    )
    base = load(config.model, dtype="float32", keep_quantized=False)
    before, _ = task_accuracy(base, test_rows, config.max_new_tokens)
    sampling = dict(k=config.k, temperature=config.temperature, progress=bool(progress),
                    max_new_tokens=config.max_new_tokens, reference_if_all_wrong=True)  # fmt: skip
    train = sampled_pairs(base, prompt_rows, seed=config.seed, **sampling)
    val = sampled_pairs(base, val_rows, seed=config.seed + 1, **sampling)
    del base
    if not train.pairs or not val.pairs:
        raise ConfigError(
            f"every sampled reply to the {config.task} prompts was right: no pair to learn "
            "from; give a harder task or more prompts"
        )
    data, val_data = out / "data" / "pairs.jsonl", out / "data" / "val_pairs.jsonl"
    write_preferences(train.pairs, data)
    write_preferences(val.pairs, val_data)
    near_misses = reference_pairs(test_rows, seed=config.seed)
    lora = LoRAConfig(r=config.lora_r, alpha=2.0 * config.lora_r)
    report: dict[str, Any] = {
        "config": asdict(config),
        "pairs": {"train": _pair_summary(train), "val": _pair_summary(val)},
        "accuracy_before": before,
    }
    if "reward" in methods:
        rm = train_reward_model(
            config.model, str(data), str(val_data), method="lora", max_len=config.max_len,
            lora=lora, config=_train_config(config, out / "reward", config.reward_lr, progress),
        )  # fmt: skip
        report["reward"] = {
            "val_accuracy_before": rm.accuracy_before,
            "val_accuracy": rm.accuracy_after,
            "near_miss_accuracy": reward_accuracy(rm.reward_model, near_misses),
            "last": rm.last,
        }
        del rm
    if "dpo" in methods:
        done = dpo(
            config.model, str(data), str(val_data), beta=config.beta, method="lora",
            max_len=config.max_len, lora=lora,
            config=_train_config(config, out / "dpo", config.lr, progress),
        )  # fmt: skip
        after, _ = task_accuracy(done.lm, test_rows, config.max_new_tokens)
        last, val_last = last_metrics(out / "dpo" / "metrics.jsonl")
        report["dpo"] = {"accuracy_after": after, "last": last, "val": val_last}
    atomic_write_json(out / "preferences.json", report)
    return report


def table(report: dict[str, Any]) -> str:
    """The report as a Markdown table: one row per measure."""
    rows = [("test accuracy, the model as loaded", f"{report['accuracy_before']:.2f}")]
    if "reward" in report:
        rm = report["reward"]
        rows += [
            ("reward model: validation pairs ranked right", f"{rm['val_accuracy']:.2f}"),
            ("reward model: right vs near miss ranked right", f"{rm['near_miss_accuracy']:.2f}"),
        ]
    if "dpo" in report:
        d = report["dpo"]
        rows.append(("test accuracy after DPO", f"{d['accuracy_after']:.2f}"))
        for key, name in (
            ("val_rewards_chosen", "DPO validation reward, chosen"),
            ("val_rewards_rejected", "DPO validation reward, rejected"),
            ("val_margin", "DPO validation margin"),
            ("val_reward_accuracy", "DPO validation pairs ranked right"),
            ("val_kl", "KL to the reference (nats per reply token)"),
        ):
            if key in d["val"]:
                rows.append((name, f"{d['val'][key]:.3f}"))
    lines = ["| measure | value |", "| --- | --: |"]
    return "\n".join(lines + [f"| {a} | {b} |" for a, b in rows])
