"""The first-contact demo: train a small character-level GPT on Tiny Shakespeare, then
decode from it with several methods.

On 2 CPU cores it trains for about 5 minutes (see README for the figures measured), reports
the validation loss over the whole validation split, and samples with greedy search,
top-k, top-p and beam search from the same prompt. Re-running it finds the run it left
and says what it found and what it will do (``plan_demo``): a finished run only decodes
again, with the length it was trained for (``lmlab demo`` after ``lmlab demo --max_steps
25`` does not train on to 900 steps); an interrupted one resumes; ``--max_steps`` beyond
the run's own trains on and states the learning-rate change that brings.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

from lmlab.api import LM, load, train
from lmlab.checkpoint.io import latest_checkpoint, read_config
from lmlab.data import read_tokens
from lmlab.eval.perplexity import token_nll
from lmlab.train import TrainConfig, TrainResult
from lmlab.train.optim import lr_at
from lmlab.train.run import RUN_CONFIG_FILE, read_json, resume_settings

log = logging.getLogger(__name__)

# Tuned on this project's 2-core machine: lr 2e-3 reached 1.71 nats/char after 850 steps,
# lr 4e-3 reached 1.66 (20 validation batches); 900 steps take about 4.5 minutes.
DEMO_TRAIN = dict(
    max_steps=900,
    batch_size=32,
    seq_len=128,
    lr=4e-3,
    min_lr=4e-4,
    warmup_steps=50,
    weight_decay=0.1,
    eval_interval=300,
    eval_batches=10,
    ckpt_interval=300,
    keep_last=2,
)

# label -> SamplingParams fields; the same prompt and seed for each.
DEMO_DECODING: dict[str, dict] = {
    "greedy": dict(temperature=0.0),
    "top-k (k=10, T=0.8)": dict(top_k=10, temperature=0.8),
    "top-p (p=0.9, T=0.8)": dict(top_p=0.9, temperature=0.8),
    "beam search (4 beams)": dict(num_beams=4, temperature=0.0),
}


@dataclass
class DemoPlan:
    config: TrainConfig
    """The settings the demo trains (or resumes) with."""
    found_step: int | None
    """The step of the run found in out_dir; None when there is none (a fresh start)."""
    message: str
    """What was found and what will be done, in one line."""


def plan_demo(
    out_dir: str = "runs/demo", max_steps: int | None = None, seed: int = 1337, progress=True
) -> DemoPlan:
    """What ``demo`` will do in ``out_dir``: train fresh, resume, decode only, or train on.

    A run found there keeps its recorded settings (its length included); ``max_steps``
    replaces its length when given. Training on past a run's planned length stretches its
    cosine schedule, so the learning rate jumps back up: the message says by how much.
    """
    settings = {**DEMO_TRAIN, **({"max_steps": max_steps} if max_steps else {})}
    fresh = TrainConfig(out_dir=out_dir, seed=seed, resume="auto", progress=progress, **settings)
    ckpt = latest_checkpoint(out_dir) if Path(out_dir).is_dir() else None
    record = read_json(Path(out_dir) / RUN_CONFIG_FILE)
    if ckpt is None or record is None or not isinstance(record.get("train"), dict):
        return DemoPlan(
            fresh, None, f"training gpt-char-tiny for {fresh.max_steps} steps in {out_dir}"
        )
    step = int(read_config(ckpt).get("train", {}).get("step", 0))
    keep = {"out_dir": out_dir, "resume": "auto", "init_from": None, "progress": progress}
    before, _ = resume_settings(TrainConfig, record["train"], {}, keep=keep)
    given = {"max_steps": max_steps} if max_steps else {}
    config, _ = resume_settings(TrainConfig, record["train"], given, keep=keep)
    where = f"found a run in {out_dir} at step {step}"
    if step >= config.max_steps:
        more = f"; pass --max_steps above {step} to train on" if not max_steps else ""
        message = f"{where} (finished): decoding from it (delete the folder to retrain{more})"
    elif config.max_steps == before.max_steps:
        message = f"{where} of {config.max_steps}: resuming it to step {config.max_steps}"
    else:
        message = (
            f"{where} (planned for {before.max_steps} steps): training on to step "
            f"{config.max_steps}; its learning-rate schedule is stretched to match (lr "
            f"{lr_at(step - 1, before):.1e} at its last step -> {lr_at(step, config):.1e})"
        )
    return DemoPlan(config, step, message)


@dataclass
class DemoResult:
    out_dir: Path
    val_loss: float
    """Mean cross-entropy in nats per character over the whole validation split."""
    val_perplexity: float
    samples: dict[str, str] = field(default_factory=dict)
    """Decoding method -> generated text."""
    train: TrainResult | None = None
    plot: Path | None = None
    plan: str = ""
    """What the demo found in out_dir and did (``plan_demo``)."""


def val_loss(lm: LM, ids, seq_len: int, progress: bool | None = None) -> float:
    """Mean next-token loss over non-overlapping windows of ``seq_len`` predictions covering
    the whole split: every position counts once, with the context it has inside its
    window, as in training. ``progress``: a bar over the windows (None: on a terminal)."""
    return token_nll(lm.model, ids, stride=seq_len, progress=progress).mean().item()


def demo(
    out_dir: str = "runs/demo",
    prompt: str = "ROMEO:",
    max_new_tokens: int = 120,
    max_steps: int | None = None,
    seed: int = 1337,
    progress: bool = True,
    device: str = "auto",
) -> DemoResult:
    """Train ``gpt-char-tiny`` on Tiny Shakespeare and sample from it four ways.

    Args:
        out_dir: the run directory (checkpoints, metrics.jsonl, loss.png, samples.md).
        prompt: the text every decoding method continues.
        max_new_tokens: characters generated per method (past the 128-character context
            the window slides: the oldest characters drop out).
        max_steps: override the demo's training steps (fewer for a quick look); None
            keeps those of a run found in out_dir.
        seed: seeds training and sampling.
        progress: show the progress bars (training, then the validation split).
        device: where it trains and samples: auto (CUDA, then MPS, then the CPU), cpu,
            cuda, cuda:N, mps.
    """
    plan = plan_demo(out_dir, max_steps, seed, progress)
    log.info("%s", plan.message)
    config = dataclasses.replace(plan.config, device=device)
    result = train("gpt-char-tiny", "tinyshakespeare", "char", config=config)
    lm = load(out_dir, device=device)

    val_ids = read_tokens(Path(out_dir) / "data" / "val.bin")
    loss = val_loss(lm, val_ids, config.seq_len, progress)
    samples = {
        label: lm.generate(prompt, max_new_tokens=max_new_tokens, seed=seed, **params)
        for label, params in DEMO_DECODING.items()
    }
    lines = [f"# Samples after {result.step} steps (prompt {prompt!r})", ""]
    for label, text in samples.items():
        lines += [f"## {label}", "", "```", prompt + text, "```", ""]
    (Path(out_dir) / "samples.md").write_text("\n".join(lines), encoding="utf-8")
    plot = Path(out_dir) / "loss.png"
    return DemoResult(
        Path(out_dir),
        loss,
        math.exp(loss),
        samples,
        result,
        plot if plot.is_file() else None,
        plan.message,
    )
