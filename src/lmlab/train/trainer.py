"""The training loop for any lmlab model: next-token cross-entropy on windows of tokens.

One optimizer step::

    set every group's lr to lr_at(step)              # optim.py: warm-up + cosine
    for each of grad_accum micro-batches:            # batches.py: shuffled, resumable
        loss = cross_entropy(model(x), y)            # under bf16 autocast if enabled
        (loss / grad_accum).backward()               # mean over micro-batches
    grad_norm = clip_grad_norm_(params, grad_clip)
    if guard.check(step, loss, grad_norm) is None:   # guards.py: NaN and spike guards
        optimizer.step(); step += 1                  # else: skipped, batch consumed
    optimizer.zero_grad(set_to_none=True)

The loop syncs with the device once per step (one ``.tolist()`` of loss and gradient
norm, which the guards need); logging, evaluation and checkpoints happen at their
intervals. A checkpoint (``lmlab.checkpoint.io``) holds everything a bit-exact resume
needs: weights, optimizer state, RNG states, data position, guard state and counters (the
schedule is a pure function of the step). Ctrl-C saves a checkpoint and re-raises.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import logging
import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from lmlab.checkpoint.io import (
    checkpoint_dir,
    latest_checkpoint,
    list_checkpoints,
    load_train_state,
    load_weights,
    read_config,
    remove_stale_temporaries,
    resolve_checkpoint,
    rotate_checkpoints,
    save_checkpoint,
)
from lmlab.devices import bf16_supported
from lmlab.errors import CheckpointError, ConfigError
from lmlab.fileio import atomic_write_json
from lmlab.models import base_model, model_spec
from lmlab.train.batches import Tokens, TrainBatches, fixed_batches
from lmlab.train.config import TrainConfig
from lmlab.train.guards import StepGuard, TrainingDiverged
from lmlab.train.metrics import MetricsLog, plot_losses, truncate_after_checkpoint
from lmlab.train.objectives import keep_probability, mix_inputs
from lmlab.train.optim import build_optimizer, lr_at

log = logging.getLogger(__name__)

Callback = Callable[[dict[str, Any]], None]


@dataclass
class TrainResult:
    step: int
    """Optimizer steps applied in total (counting those before a resume)."""
    train_losses: list[tuple[int, float]] = field(default_factory=list)
    """(step, loss) of every step applied in this call; loss is the mean over micro-batches."""
    val_losses: list[tuple[int, float]] = field(default_factory=list)
    """(step, validation loss) of every evaluation in this call."""
    checkpoint: Path | None = None
    """The last checkpoint written (or resumed from, when none was written)."""
    wall_time_s: float = 0.0
    """Seconds spent in this call's training loop (evaluation and saving included)."""
    tokens_per_s: float = 0.0
    """Training tokens processed per second of wall_time_s (skipped steps included)."""
    skipped: list[dict[str, Any]] = field(default_factory=list)
    """The skip events of this call (step, reason, loss, grad_norm)."""
    stop_reason: str = "max_steps"
    """"max_steps" or "time_budget"."""


@dataclass
class Supervised:
    """Training data other than one token stream: batches of examples with their own loss
    (instruction fine-tuning, ``lmlab.finetune``).

    ``batches``: ``next_batch()`` -> a dict of CPU tensors; ``state_dict()`` and
    ``load_state_dict()`` (checkpoints store the position, so resume stays exact).
    ``loss(model, batch, autocast, keep=1.0) -> (summed loss, number of tokens)`` with the
    batch on the model's device; the trainer divides, and sums both for validation. A
    loss with a ``metrics(training: bool) -> dict[str, float]`` method adds those numbers
    to the logged ``train`` and ``eval`` events (DPO's rewards and accuracy).
    ``val``: fixed validation batches, or None.
    """

    batches: Any
    loss: Callable[..., tuple[torch.Tensor, Any]]
    val: list[dict[str, torch.Tensor]] | None = None


def train(
    model: nn.Module,
    train_tokens: Tokens,
    val_tokens: Tokens | None,
    config: TrainConfig,
    tokenizer: Any | None = None,
    callbacks: Sequence[Callback] | None = None,
    supervised: Supervised | None = None,
) -> TrainResult:
    """Train ``model`` on 1-D token arrays and write the run to ``config.out_dir``.

    train_tokens / val_tokens: 1-D integer arrays (numpy, np.memmap or torch) of token
    ids; val_tokens may be None (no evaluation). ``supervised`` replaces both (pass None
    for them) with batches of examples and their own loss: fine-tuning (``Supervised``).
    The model trains on the device its
    parameters are on. ``callbacks`` are called with every event written to metrics.jsonl
    (see ``lmlab.train.metrics``), after it is written; an exception raised by one stops
    the run as a crash would.

    Ctrl-C (KeyboardInterrupt) saves a checkpoint, then re-raises. Between steps the saved
    state is exact; in the middle of a step, the step's batches and RNG are rewound so that
    a resume replays it; inside the optimizer update itself nothing is saved (the weights
    may be half-updated) and the previous checkpoint stays the newest.
    """
    out_dir = Path(config.out_dir)
    spec = model_spec(base_model(model))  # fails early for a model that cannot be saved
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ConfigError("the model has no trainable parameters")
    device = params[0].device
    max_len = getattr(model.config, "max_seq_len", None)
    if supervised is not None:
        if train_tokens is not None or val_tokens is not None:
            raise ConfigError("give either token arrays or supervised batches, not both")
        if config.objective != "teacher_forcing":
            raise ConfigError(
                f"objective={config.objective!r} needs a token stream; supervised batches "
                "train with teacher_forcing"
            )
    elif max_len is not None and config.seq_len > max_len:
        raise ConfigError(
            f"TrainConfig.seq_len={config.seq_len} is invalid: the model's context "
            f"(max_seq_len) is {max_len}; use seq_len <= {max_len}"
        )
    # A crash between the two renames of a checkpoint replace is repaired before choosing.
    remove_stale_temporaries(out_dir)
    resume_from = _resume_source(config)

    optimizer = build_optimizer(model, config)
    val = None
    if supervised is not None:
        batches, loss_of = supervised.batches, supervised.loss
        if supervised.val is not None:
            val = [_to_device(batch, device) for batch in supervised.val]
    else:
        batches = TrainBatches(train_tokens, config.batch_size, config.seq_len, config.seed)
        loss_of = _next_token_loss
        if val_tokens is not None:
            val = fixed_batches(val_tokens, config.batch_size, config.seq_len, config.eval_batches)
            val = [window.to(device) for window in val]
    guard = StepGuard(
        config.spike_factor, config.spike_window, config.spike_warmup, config.grad_spike_factor
    )
    step, tokens_seen = 0, 0
    out_dir.mkdir(parents=True, exist_ok=True)
    if resume_from is not None:
        step, tokens_seen = _restore(resume_from, model, optimizer, batches, guard, spec)
        truncate_after_checkpoint(out_dir / "metrics.jsonl", step)
    else:
        if config.init_from is not None:
            load_weights(model, resolve_checkpoint(config.init_from))
        torch.manual_seed(config.seed)

    # The compiled module shares the model's parameters; checkpoints still use `model`.
    forward = torch.compile(model) if config.compile else model
    use_bf16 = resolve_precision(config.precision, device)
    autocast = (
        functools.partial(torch.autocast, device.type, dtype=torch.bfloat16)
        if use_bf16
        else contextlib.nullcontext
    )
    atomic_write_json(
        out_dir / "config.json",
        {
            "model": spec,
            "tokenizer": tokenizer.to_config() if hasattr(tokenizer, "to_config") else None,
            "train": dataclasses.asdict(config),
            "resolved": {
                "precision": "bf16" if use_bf16 else "fp32",
                "device": str(device),
                "parameters": sum(p.numel() for p in params),
            },
        },
    )
    run = _Run(
        model, optimizer, batches, loss_of, guard, config, tokenizer, device, callbacks or ()
    )
    run.metrics = MetricsLog(out_dir / "metrics.jsonl")
    result = TrainResult(step=step)
    if resume_from is not None:
        run.emit({"event": "resume", "step": step, "from": str(resume_from)})
        run.last_saved = step
        result.checkpoint = resume_from

    tokens_per_step = config.batch_size * config.seq_len * config.grad_accum
    # A time-budgeted run counts seconds (its step count is unknown in advance); the
    # others count steps.
    by_time = config.time_budget_s is not None
    bar = tqdm(
        total=config.time_budget_s if by_time else config.max_steps,
        initial=0 if by_time else step,
        disable=not config.progress,
        unit="s" if by_time else "step",
        bar_format="{l_bar}{bar}| {n:.0f}/{total:.0f}s [{elapsed}<{remaining}{postfix}]"
        if by_time
        else None,
    )
    model.train()
    t_start = t_log = run.t_start = time.perf_counter()
    tokens_at_start = tokens_at_log = tokens_seen
    since_log: list[float] = []
    # A run resumed when already finished evaluates nothing again (nothing changed).
    last_eval = step if resume_from is not None and step >= config.max_steps else None
    in_step = applying = False
    step_start_data, step_start_rng = batches.state_dict(), None
    try:
        while step < config.max_steps:
            if config.time_budget_s and time.perf_counter() - t_start >= config.time_budget_s:
                result.stop_reason = "time_budget"
                break
            in_step = True
            step_start_data, step_start_rng = batches.state_dict(), _torch_rng(device)
            lr = lr_at(step, config)
            for group in optimizer.param_groups:
                group["lr"] = lr
            keep = keep_probability(step, config.objective, config.ss_k, config.ss_c, config.ss_min)
            loss, counted = _accumulate_gradients(
                forward, batches, config.grad_accum, device, autocast, keep, loss_of
            )
            grad_norm = _grad_norm(params, config.grad_clip)
            # The step's one sync: the guards need loss and norm on the host (and supervised
            # batches count their labelled tokens).
            numbers = [loss, grad_norm.to(loss)] + ([counted.to(loss)] if supervised else [])
            loss_value, norm_value, *count = torch.stack(numbers).tolist()
            tokens_seen += int(count[0]) if supervised else tokens_per_step
            skip = guard.check(step, loss_value, norm_value)
            if skip is None:
                applying = True
                optimizer.step()
                step += 1
            # One statement: an interrupt before it sees applying (no save) or in_step.
            in_step = applying = False
            optimizer.zero_grad(set_to_none=True)

            if skip is not None:
                event = {
                    "event": "skip",
                    "step": step,
                    "reason": skip,
                    "loss": loss_value,
                    "grad_norm": norm_value,
                }
                result.skipped.append(event)
                log.warning("step %d skipped: %s (loss %s)", step + 1, skip, loss_value)
                run.emit(event)
                if guard.nonfinite_in_a_row >= config.max_nonfinite:
                    last = result.checkpoint or "none yet"
                    raise TrainingDiverged(
                        f"training diverged: {guard.nonfinite_in_a_row} steps in a row had a "
                        f"non-finite loss or gradient (after step {step}); no checkpoint was "
                        f"written from this state (last checkpoint: {last}). Try a lower lr "
                        f"(now {config.lr}) or gradient clipping (grad_clip={config.grad_clip})"
                    )
                continue

            result.train_losses.append((step, loss_value))
            since_log.append(loss_value)
            bar.update(min(time.perf_counter() - t_start, bar.total) - bar.n if by_time else 1)
            if step % config.log_interval == 0 or step == config.max_steps:
                now = time.perf_counter()
                rate = (tokens_seen - tokens_at_log) / max(now - t_log, 1e-9)
                run.emit(
                    {
                        "event": "train",
                        "step": step,
                        "loss": sum(since_log) / len(since_log),
                        "lr": lr,
                        "grad_norm": norm_value,
                        "tokens": tokens_seen,
                        "tokens_per_s": rate,
                        "elapsed_s": now - t_start,
                        **_loss_metrics(loss_of, training=True),
                    }
                )
                bar.set_postfix(
                    step=step, loss=f"{since_log[-1]:.3f}", tok_s=f"{rate:.0f}", refresh=False
                )
                since_log.clear()
                t_log, tokens_at_log = now, tokens_seen
            want_best = config.keep_best and step % config.ckpt_interval == 0
            if val is not None and (step % config.eval_interval == 0 or want_best):
                result.val_losses.append((step, run.evaluate(val, step, autocast)))
                last_eval = step
            if step % config.ckpt_interval == 0:
                val_loss = result.val_losses[-1][1] if last_eval == step else None
                result.checkpoint = run.save(step, tokens_seen, val_loss)

        if val is not None and last_eval != step and step > 0:
            result.val_losses.append((step, run.evaluate(val, step, autocast)))
            last_eval = step
        if run.last_saved != step:
            val_loss = result.val_losses[-1][1] if last_eval == step else None
            result.checkpoint = run.save(step, tokens_seen, val_loss)
    except KeyboardInterrupt:
        if applying:
            log.error("interrupted inside the optimizer update: no checkpoint saved")
            raise
        if in_step:  # replay the interrupted step on resume: same batches, same dropout
            batches.load_state_dict(step_start_data)
            _set_torch_rng(step_start_rng, device)
        optimizer.zero_grad(set_to_none=True)
        if run.last_saved != step:
            log.warning("interrupted: saving a checkpoint at step %d", step)
            run.save(step, tokens_seen, None)
        plot_losses(out_dir / "metrics.jsonl", out_dir / "loss.png")
        raise
    finally:
        bar.close()
        run.metrics.close()

    plot_losses(out_dir / "metrics.jsonl", out_dir / "loss.png")
    result.step = step
    result.wall_time_s = time.perf_counter() - t_start
    result.tokens_per_s = (tokens_seen - tokens_at_start) / max(result.wall_time_s, 1e-9)
    return result


def _next_token_loss(model, window, autocast, keep=1.0) -> tuple[torch.Tensor, int]:
    """Summed next-token cross-entropy of a [B, T+1] window batch -> (sum, B*T)."""
    x, y = window[:, :-1], window[:, 1:]  # (B, T) inputs and next-token targets
    with autocast():
        x = mix_inputs(model, x, keep)  # scheduled sampling; x itself when keep == 1
        logits = model(x)  # (B, T, V)
    # float32 log-softmax whatever the autocast dtype (.float() is free at fp32).
    return F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), reduction="sum"), y.numel()


def _accumulate_gradients(
    model, batches, grad_accum, device, autocast, keep=1.0, loss_of=_next_token_loss
) -> tuple[torch.Tensor, torch.Tensor | int]:
    """Forward and backward over ``grad_accum`` micro-batches -> (mean loss, tokens).

    Each micro-batch loss is a mean over its tokens; dividing by grad_accum makes the
    summed gradient that of the mean over all micro-batches (equal sizes), i.e. of one
    batch of batch_size * grad_accum rows. ``loss_of(model, batch, autocast, keep)``
    returns a summed loss and the number of tokens it sums over.
    """
    total, counted = None, 0
    for _ in range(grad_accum):
        batch = _to_device(batches.next_batch(), device)
        loss_sum, count = loss_of(model, batch, autocast, keep)
        loss = loss_sum / count
        (loss / grad_accum).backward()
        total = loss.detach() if total is None else total + loss.detach()
        counted = counted + count
    return (total / grad_accum if grad_accum > 1 else total), counted


def _loss_metrics(loss_of, training: bool) -> dict[str, float]:
    """Extra numbers a supervised loss reports (DPO's rewards, margins, accuracy), if any.

    A loss object with a ``metrics(training)`` method returns the means of what it saw
    since its last call, over training or over evaluation batches; they go into the
    step's ``train`` event (and, prefixed ``val_``, into the ``eval`` event).
    """
    metrics = getattr(loss_of, "metrics", None)
    return dict(metrics(training)) if callable(metrics) else {}


def _to_device(batch, device):
    """A tensor, or a dict of tensors (supervised batches), on ``device``."""
    if isinstance(batch, dict):
        return {k: v.to(device, non_blocking=True) for k, v in batch.items()}
    return batch.to(device, non_blocking=True)


def _grad_norm(params: list[nn.Parameter], grad_clip: float | None) -> torch.Tensor:
    """The global L2 norm of the gradients before clipping (clipping them if asked)."""
    if grad_clip is not None:
        return torch.nn.utils.clip_grad_norm_(params, grad_clip)
    grads = [p.grad for p in params if p.grad is not None]
    if hasattr(torch.nn.utils, "get_total_norm"):  # torch >= 2.6: one foreach kernel
        return torch.nn.utils.get_total_norm(grads)
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))


# ----------------------------------------------------------------------------- the run


class _Run:
    """What saving, evaluating and logging share; the loop itself is in ``train``."""

    def __init__(
        self, model, optimizer, batches, loss_of, guard, config, tokenizer, device, callbacks
    ):
        self.model = model
        self.optimizer = optimizer
        self.batches = batches
        self.loss_of = loss_of  # (model, batch, autocast) -> (summed loss, tokens)
        self.guard = guard
        self.config = config
        self.tokenizer = tokenizer
        self.device = device
        self.callbacks = callbacks
        self.metrics: MetricsLog | None = None
        self.last_saved: int | None = None
        self.out_dir = Path(config.out_dir)

    def emit(self, record: dict[str, Any]) -> None:
        self.metrics.write(record)
        for callback in self.callbacks:
            callback(record)

    @torch.no_grad()
    def evaluate(self, val: list, step: int, autocast) -> float:
        """Mean loss per token over the fixed validation batches (nats per token)."""
        self.model.eval()
        total, count = 0.0, 0
        for batch in val:
            loss_sum, n = self.loss_of(self.model, batch, autocast)
            total += loss_sum.item()
            count += int(n)
        self.model.train()
        val_loss = total / count
        ppl = math.exp(val_loss) if val_loss < 700 else math.inf
        elapsed = time.perf_counter() - self.t_start  # for loss-against-time plots
        self.emit(
            {
                "event": "eval",
                "step": step,
                "val_loss": val_loss,
                "val_ppl": ppl,
                "elapsed_s": elapsed,
                **{f"val_{k}": v for k, v in _loss_metrics(self.loss_of, training=False).items()},
            }
        )
        return val_loss

    def save(self, step: int, tokens_seen: int, val_loss: float | None) -> Path:
        """Checkpoint the current state as ``step``, rotate, and log it."""
        if not _all_finite(self.model):
            raise TrainingDiverged(
                f"the model's parameters are not finite at step {step}; refusing to write a "
                "checkpoint from this state"
            )
        train_state = {
            "step": step,
            "tokens_seen": tokens_seen,
            "optimizer": self.optimizer.state_dict(),
            # The schedule is lr_at(step, config): its whole state is the step counter.
            "scheduler": {"schedule": self.config.lr_schedule, "step": step},
            "rng": _rng_state(self.device),
            "data": self.batches.state_dict(),
            "guard": self.guard.state_dict(),
        }
        extra = {
            "train": {"step": step, "tokens_seen": tokens_seen, "val_loss": val_loss},
            "train_config": dataclasses.asdict(self.config),
        }
        path = save_checkpoint(
            checkpoint_dir(self.out_dir, step),
            self.model,
            tokenizer=self.tokenizer,
            train_state=train_state,
            extra_config=extra,
        )
        self.last_saved = step
        if self.config.keep_last is not None:
            rotate_checkpoints(
                self.out_dir, self.config.keep_last, 1 if self.config.keep_best else None
            )
        self.emit({"event": "checkpoint", "step": step, "path": str(path)})
        return path


def _all_finite(model: nn.Module) -> bool:
    checks = [torch.isfinite(p).all() for p in model.parameters()]
    return bool(torch.stack(checks).all()) if checks else True


# ----------------------------------------------------------------------------- resume


def _resume_source(config: TrainConfig) -> Path | None:
    """The checkpoint to resume from, None for a fresh run, or a clear error."""
    out_dir = Path(config.out_dir)
    if config.resume == "never":
        if list_checkpoints(out_dir):
            raise ConfigError(
                f"out_dir {str(out_dir)!r} already holds checkpoints of an earlier run; use "
                "resume='auto' to continue it, or choose another out_dir"
            )
        return None
    if config.resume == "auto":
        return latest_checkpoint(out_dir)  # None: nothing yet, start fresh
    if not Path(config.resume).exists():
        raise CheckpointError(
            f"resume={config.resume!r}: no such checkpoint or run directory; give an "
            "existing path, resume='auto' (continue out_dir if possible) or 'never'"
        )
    try:
        return resolve_checkpoint(config.resume)
    except CheckpointError as e:
        raise CheckpointError(f"resume={config.resume!r}: nothing to resume: {e}") from e


def _restore(ckpt: Path, model, optimizer, batches, guard, spec) -> tuple[int, int]:
    """Load weights and training state from ``ckpt`` -> (step, tokens_seen)."""
    saved_spec = read_config(ckpt)["model"]
    spec = json.loads(json.dumps(spec))  # tuples -> lists, as saved
    if saved_spec != spec:
        diff = sorted(k for k in set(spec) | set(saved_spec) if spec.get(k) != saved_spec.get(k))
        raise CheckpointError(
            f"cannot resume from {str(ckpt)!r}: it holds a different model ("
            + ", ".join(f"{k}: {saved_spec.get(k)!r} there, {spec.get(k)!r} here" for k in diff)
            + ")"
        )
    state = load_train_state(ckpt)
    load_weights(model, ckpt)
    try:
        optimizer.load_state_dict(state["optimizer"])
        batches.load_state_dict(state["data"])
        guard.load_state_dict(state["guard"])
        _set_rng_state(state["rng"], next(model.parameters()).device)
        return int(state["step"]), int(state["tokens_seen"])
    except (KeyError, ValueError, TypeError, RuntimeError) as e:
        raise CheckpointError(
            f"cannot resume from {str(ckpt)!r}: its training state does not fit this run "
            f"(different optimizer or data settings?): {e}"
        ) from e


# ----------------------------------------------------------------------------- RNG


def _torch_rng(device: torch.device) -> dict[str, torch.Tensor]:
    state = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_torch_rng(state: dict[str, torch.Tensor], device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def _rng_state(device: torch.device) -> dict[str, Any]:
    """Every global RNG state as tensors, ints and tuples (loadable with weights_only)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    return {
        **_torch_rng(device),
        "python": random.getstate(),  # (version, tuple of 625 ints, None)
        "numpy": {
            "kind": kind,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
    }


def _set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    _set_torch_rng(state, device)
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    n = state["numpy"]
    np.random.set_state(
        (
            n["kind"],
            n["keys"].numpy().astype(np.uint32),
            n["pos"],
            n["has_gauss"],
            n["cached_gaussian"],
        )
    )


# ----------------------------------------------------------------------------- precision


def resolve_precision(precision: str, device: torch.device) -> bool:
    """True when the run uses bf16 autocast: "bf16", or "auto" on a supporting device."""
    if precision == "bf16":
        return True
    if precision == "fp32":
        return False
    return bf16_supported(device)
