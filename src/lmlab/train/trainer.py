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
schedule is a pure function of the step). The run folder (its lock, config.json,
metrics.jsonl, checkpoint rotation, the resume source and the stop signals) belongs to
``lmlab.train.run.RunDir``; Ctrl-C and SIGTERM save a checkpoint and re-raise.

Under torchrun the same loop runs on every process (``lmlab.train.distributed``: DDP or
FSDP2, one global stream of micro-batches, DCP checkpoints; rank 0 writes the files).

``train`` reads in that order: check the inputs, own the folder, set up (``_Loop.start``:
restore or seed, record), then ``_Loop.run``: ``train_step`` (with the out-of-memory
back-off), ``log``, ``evaluate``, ``save`` at their intervals.
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
    load_train_state,
    load_weights,
    read_config,
    resolve_checkpoint,
)
from lmlab.data.tokens import TokenShards
from lmlab.devices import bf16_supported, resolve_device
from lmlab.errors import CheckpointError, ConfigError
from lmlab.models import base_model, model_spec
from lmlab.models.flops import training_flops_per_token
from lmlab.train import distributed
from lmlab.train.batches import ShardBatches, Tokens, TrainBatches, fixed_batches
from lmlab.train.config import TrainConfig
from lmlab.train.distributed import Ranks
from lmlab.train.guards import StepGuard, TrainingDiverged
from lmlab.train.metrics import plot_losses, truncate_after_checkpoint
from lmlab.train.mfu import matmul_ceiling
from lmlab.train.objectives import keep_probability, mix_inputs
from lmlab.train.optim import build_optimizer, lr_at
from lmlab.train.run import METRICS_FILE, RunDir, StopSignals

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
    """"max_steps" or "time_budget"; "fitted" when ``lmlab.train`` counted an n-gram model
    instead of training it (no optimizer steps ran)."""
    flops: float | None = None
    """Training FLOPs of every token processed (before a resume too), Chinchilla's count
    (``lmlab.models.flops``); None where the model's FLOPs are not counted."""


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
    ``split(batch, n)``: the batch cut into ``n`` smaller ones as ``[(part, weight)]``, the
    weights making ``sum(weight * loss(part))`` the batch's loss; the trainer uses it after
    an out-of-memory error (None: such an error stops the run, since only the loss knows
    which rows belong together, e.g. DPO's chosen and rejected halves).
    """

    batches: Any
    loss: Callable[..., tuple[torch.Tensor, Any]]
    val: list[dict[str, torch.Tensor]] | None = None
    split: Callable[[Any, int], list[tuple[Any, float]]] | None = None


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
    ids; val_tokens may be None (no evaluation). train_tokens may also be token shards
    (``lmlab.data.TokenShards``), streamed by rank and DataLoader worker. ``supervised`` replaces both (pass None
    for them) with batches of examples and their own loss: fine-tuning (``Supervised``).
    The model moves to ``config.device`` (``auto``: CUDA, then MPS, then the CPU) and
    trains there. ``callbacks`` are called with every event written to metrics.jsonl
    (see ``lmlab.train.metrics``), after it is written; an exception raised by one stops
    the run as a crash would.

    The run owns ``out_dir`` while it trains (``lmlab.train.run``: a second process gets
    ``RunInUse``). Ctrl-C (KeyboardInterrupt) and SIGTERM (``Interrupted``) save a
    checkpoint, then re-raise. Between steps the saved state is exact; in the middle of a
    step, the step's batches and RNG are rewound so that a resume replays it; a signal
    that arrives inside the optimizer update waits for the update to end. An out-of-memory
    error in a step halves the micro-batch and doubles the accumulation (same batch, same
    loss) and retries the step.
    """
    spec = _check_inputs(model, train_tokens, val_tokens, config, supervised)
    # Under torchrun: join the process group; rank 0 alone writes the run's files.
    ranks = distributed.setup(config.device)
    model.to(resolve_device(config.device))
    run = (RunDir if ranks.main else distributed.FollowerRun)(config.out_dir, callbacks or ())
    with run.owned(), run.stop_signals() as stop:
        # A crash between the two renames of a checkpoint replace is repaired before choosing.
        run.clean()
        resume_from = ranks.from_main(lambda: run.resume_source(config.resume))
        loop = _Loop(
            model, spec, train_tokens, val_tokens, config, tokenizer, supervised, run, ranks
        )
        loop.start(resume_from)
        return loop.run(stop)


def _check_inputs(model, train_tokens, val_tokens, config: TrainConfig, supervised) -> dict:
    """The model's spec, after checking that model, data and settings fit together."""
    spec = model_spec(base_model(model))  # fails early for a model that cannot be saved
    if not any(p.requires_grad for p in model.parameters()):
        raise ConfigError("the model has no trainable parameters")
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
    return spec


class _Loop:
    """One training run in memory: setup (``__init__``, ``start``), the step
    (``train_step``, ``back_off``, ``skipped``), and what happens at intervals (``log``,
    ``evaluate``, ``save``, and ``save_interrupted`` on Ctrl-C or SIGTERM)."""

    def __init__(
        self,
        model,
        spec,
        train_tokens,
        val_tokens,
        config,
        tokenizer,
        supervised,
        run: RunDir,
        ranks: Ranks | None = None,
    ):
        self.model = model
        self.spec = spec
        self.config = config
        self.tokenizer = tokenizer
        self.run_dir = run
        self.ranks = ranks = ranks or Ranks()
        self.device = device = next(model.parameters()).device
        self.use_bf16 = resolve_precision(config.precision, device)
        if config.init_from is not None:  # a fresh run's weights, loaded before any sharding
            load_weights(model, resolve_checkpoint(config.init_from))
        if config.grad_checkpoint:
            distributed.checkpoint_blocks(model)
        # DDP around the model, or the model sharded in place (FSDP2); `model` is saved.
        wrapped = distributed.parallelize(model, config.parallel, ranks, self.use_bf16)
        self.accum = distributed.check_grad_accum(config.grad_accum, ranks)
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = build_optimizer(model, config)
        self.val = None
        self.supervised = supervised is not None
        self.split_batch = split_rows
        if supervised is not None:
            self.batches, self.loss_of = supervised.batches, supervised.loss
            self.split_batch = supervised.split
            if supervised.val is not None:
                self.val = [_to_device(batch, device) for batch in supervised.val]
        else:
            self.batches = _train_batches(train_tokens, config, ranks)
            self.loss_of = _next_token_loss
            if val_tokens is not None:
                val = fixed_batches(
                    val_tokens, config.batch_size, config.seq_len, config.eval_batches
                )
                self.val = [_to_device(window, device) for window in val]
        if ranks.enabled and not getattr(self.batches, "by_rank", False):
            # rank r: micro-batches r, r + W, ... of the one global stream
            self.batches = distributed.RankBatches(self.batches, ranks)
        self.guard = StepGuard(
            config.spike_factor, config.spike_window, config.spike_warmup, config.grad_spike_factor
        )
        # The compiled module shares the model's parameters; checkpoints still use `model`.
        self.forward = torch.compile(wrapped) if config.compile else wrapped
        # FLOPs per token (None: not counted for this model) and, measured at the first
        # log line, the matmul ceiling that MFU divides by (lmlab.train.mfu).
        self.flops_per_token = (
            None if supervised else training_flops_per_token(base_model(model), config.seq_len)
        )
        self.ceiling: float | None = None
        self.ceiling_remeasured = False  # once per run at most (see lmlab.train.mfu)
        self.autocast = (
            functools.partial(torch.autocast, device.type, dtype=torch.bfloat16)
            if self.use_bf16
            else contextlib.nullcontext
        )
        # Tokens processed (a supervised batch's real tokens, padding aside) and, for
        # supervised batches, those the loss is on (the responses): the two rates differ.
        self.step, self.tokens_seen, self.sup_tokens_seen = 0, 0, 0
        self.split = 1  # micro-batches per drawn batch: doubled at each out-of-memory error
        self.result = TrainResult(step=0)
        self.last_eval: int | None = None
        self.in_step = self.applying = False
        self.step_start: tuple[dict, dict | None] = (self.batches.state_dict(), None)

    # ------------------------------------------------------------------------- setup

    def start(self, resume_from: Path | None) -> None:
        """Restore a checkpoint (or seed a fresh run), record the config, open the log."""
        config, run = self.config, self.run_dir
        if resume_from is not None:
            self.step, self.tokens_seen, self.sup_tokens_seen = _restore(
                resume_from, self.model, self.optimizer, self.batches, self.guard, self.spec
            )
            if self.ranks.main:
                truncate_after_checkpoint(run.path / METRICS_FILE, self.step)
        else:
            torch.manual_seed(config.seed)
        previous = (run.recorded() or {}).get("train") or {}
        run.record(
            {
                "model": self.spec,
                "tokenizer": self.tokenizer.to_config()
                if hasattr(self.tokenizer, "to_config")
                else None,
                "train": dataclasses.asdict(config),
                "resolved": {
                    "precision": "bf16" if self.use_bf16 else "fp32",
                    "device": str(self.device),
                    "parameters": sum(p.numel() for p in self.params),
                    "flops_per_token": self.flops_per_token,
                },
            }
        )
        run.open_metrics(config.log, start_step=self.step)
        self.result.step = self.step
        if resume_from is not None:
            event = {"event": "resume", "step": self.step, "from": str(resume_from)}
            changed = _changed_settings(previous, dataclasses.asdict(config))
            if changed:
                event["changed"] = changed
                log.info("resuming with changed settings: %s", changed)
            self.emit(event)
            run.last_saved = self.step
            self.result.checkpoint = resume_from
            # A run resumed when already finished evaluates nothing again (nothing changed).
            if self.step >= config.max_steps:
                self.last_eval = self.step

    def emit(self, record: dict[str, Any]) -> None:
        self.run_dir.emit(record)

    # ------------------------------------------------------------------------- the loop

    def run(self, stop: StopSignals) -> TrainResult:
        config, result = self.config, self.result
        bar = self._progress_bar()
        self.model.train()
        self.t_start = self.t_log = time.perf_counter()
        tokens_at_start = self.tokens_at_log = self.tokens_seen
        self.sup_tokens_at_log = self.sup_tokens_seen
        self.since_log: list[float] = []
        try:
            while self.step < config.max_steps:
                if config.time_budget_s and self.ranks.from_main(
                    lambda: self._elapsed() >= config.time_budget_s
                ):
                    result.stop_reason = "time_budget"
                    break
                lr, loss, grad_norm, skip = self.train_step(stop)
                if skip is not None:
                    self.skipped(skip, loss, grad_norm)
                    continue
                result.train_losses.append((self.step, loss))
                self.since_log.append(loss)
                by_time = config.time_budget_s is not None
                bar.update(min(self._elapsed(), bar.total) - bar.n if by_time else 1)
                if self.step % config.log_interval == 0 or self.step == config.max_steps:
                    self.log(lr, grad_norm, bar)
                want_best = config.keep_best and self.step % config.ckpt_interval == 0
                if self.val is not None and (self.step % config.eval_interval == 0 or want_best):
                    self.evaluate()
                if self.step % config.ckpt_interval == 0:
                    self.save()
            if self.val is not None and self.last_eval != self.step and self.step > 0:
                self.evaluate()
            if self.run_dir.last_saved != self.step:
                self.save()
        except KeyboardInterrupt:
            self.save_interrupted()
            raise
        finally:
            bar.close()
        self.plot()
        result.step = self.step
        result.wall_time_s = self._elapsed()
        result.tokens_per_s = (self.tokens_seen - tokens_at_start) / max(result.wall_time_s, 1e-9)
        if self.flops_per_token is not None:
            result.flops = self.tokens_seen * self.flops_per_token
        return result

    def _elapsed(self) -> float:
        return time.perf_counter() - self.t_start

    def _progress_bar(self):
        # A time-budgeted run counts seconds (its step count is unknown in advance); the
        # others count steps.
        config = self.config
        by_time = config.time_budget_s is not None
        return tqdm(
            total=config.time_budget_s if by_time else config.max_steps,
            initial=0 if by_time else self.step,
            disable=not (config.progress and self.ranks.main),
            unit="s" if by_time else "step",
            bar_format="{l_bar}{bar}| {n:.0f}/{total:.0f}s [{elapsed}<{remaining}{postfix}]"
            if by_time
            else None,
        )

    # ------------------------------------------------------------------------- the step

    def train_step(self, stop: StopSignals):
        """One optimizer step -> (lr, loss, grad norm, None) when applied, or the guard's
        reason to skip it in place of None (the batches are consumed either way)."""
        config, optimizer = self.config, self.optimizer
        self.in_step = True
        self.step_start = (self.batches.state_dict(), _torch_rng(self.device))
        lr = lr_at(self.step, config)
        for group in optimizer.param_groups:
            group["lr"] = lr
        keep = keep_probability(
            self.step, config.objective, config.ss_k, config.ss_c, config.ss_min
        )
        while True:
            try:
                loss, counted, processed = _accumulate_gradients(
                    self.forward,
                    self.batches,
                    self.accum,
                    self.device,
                    self.autocast,
                    keep,
                    self.loss_of,
                    self.split,
                    self.split_batch,
                    sync=functools.partial(distributed.gradient_sync, self.forward)
                    if self.ranks.enabled
                    else None,
                )
                break
            except Exception as e:
                if not is_out_of_memory(e):
                    raise
                self.back_off(e)
        if self.ranks.enabled:  # the global batch's loss and token counts, on every rank
            loss, counted, processed = distributed.reduce_step(loss, counted, processed, self.ranks)
        grad_norm = distributed.full_value(_grad_norm(self.params, config.grad_clip))
        # The step's one sync: the guards need loss and norm on the host (and supervised
        # batches count their labelled tokens).
        numbers = [loss, grad_norm.to(loss)] + ([counted.to(loss)] if self.supervised else [])
        loss_value, norm_value, *count = torch.stack(numbers).tolist()
        self.tokens_seen += processed
        self.sup_tokens_seen += int(count[0]) if self.supervised else 0
        skip = self.guard.check(self.step, loss_value, norm_value)
        if skip is None:
            with stop.deferred():  # a signal now is raised after the update, at a step edge
                self.applying = True
                optimizer.step()
                self.step += 1
                # One statement: an interrupt before it sees applying (no save) or in_step.
                self.in_step = self.applying = False
        self.in_step = False
        optimizer.zero_grad(set_to_none=True)
        return lr, loss_value, norm_value, skip

    def back_off(self, error: BaseException) -> None:
        """After an out-of-memory error: rewind the step, halve the micro-batch (reliability
        item 13), or re-raise when it is a single row already."""
        if self.split_batch is None:
            log.error("out of memory: these batches cannot be split (Supervised.split is None)")
            raise error
        if math.ceil(self.config.batch_size / self.split) <= 1:
            raise error  # one row per micro-batch already: nothing left to halve
        self.optimizer.zero_grad(set_to_none=True)
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        self.batches.load_state_dict(self.step_start[0])
        _set_torch_rng(self.step_start[1], self.device)
        before = math.ceil(self.config.batch_size / self.split)
        self.split *= 2
        micro = math.ceil(self.config.batch_size / self.split)
        accum = self.config.grad_accum * self.split
        log.warning(
            "out of memory in step %d: micro-batch %d -> %d rows, accumulation %d -> %d "
            "(the same batch per step); retrying the step",
            self.step + 1,
            before,
            micro,
            accum // 2,
            accum,
        )
        self.emit({"event": "oom", "step": self.step, "micro_batch": micro, "grad_accum": accum})

    def skipped(self, reason: str, loss: float, grad_norm: float) -> None:
        config, step = self.config, self.step
        event = {
            "event": "skip",
            "step": step,
            "reason": reason,
            "loss": loss,
            "grad_norm": grad_norm,
        }
        self.result.skipped.append(event)
        log.warning("step %d skipped: %s (loss %s)", step + 1, reason, loss)
        self.emit(event)
        if self.guard.nonfinite_in_a_row >= config.max_nonfinite:
            last = self.result.checkpoint or "none yet"
            raise TrainingDiverged(
                f"training diverged: {self.guard.nonfinite_in_a_row} steps in a row had a "
                f"non-finite loss or gradient (after step {step}); no checkpoint was "
                f"written from this state (last checkpoint: {last}). Try a lower lr "
                f"(now {config.lr}) or gradient clipping (grad_clip={config.grad_clip})"
            )

    # ------------------------------------------------------------------------- log, eval, save

    def log(self, lr: float, grad_norm: float, bar) -> None:
        now = time.perf_counter()
        seconds = max(now - self.t_log, 1e-9)
        rate = (self.tokens_seen - self.tokens_at_log) / seconds
        # Supervised batches: the tokens the loss is on (responses), beside all processed.
        sup_rate = (self.sup_tokens_seen - self.sup_tokens_at_log) / seconds
        supervised = (
            {"sup_tokens": self.sup_tokens_seen, "sup_tokens_per_s": sup_rate}
            if self.supervised
            else {}
        )
        compute = self._compute(rate)
        self.emit(
            {
                "event": "train",
                "step": self.step,
                "loss": sum(self.since_log) / len(self.since_log),
                "lr": lr,
                "grad_norm": grad_norm,
                "tokens": self.tokens_seen,
                "tokens_per_s": rate,
                **compute,
                **supervised,
                "elapsed_s": now - self.t_start,
                **_loss_metrics(self.loss_of, training=True),
            }
        )
        shown = {"sup_tok_s": f"{sup_rate:.0f}"} if self.supervised else {}
        shown |= {"mfu": f"{compute['mfu']:.1%}"} if compute else {}
        bar.set_postfix(
            step=self.step,
            loss=f"{self.since_log[-1]:.3f}",
            tok_s=f"{rate:.0f}",
            **shown,
            refresh=False,
        )
        self.since_log.clear()
        self.t_log, self.tokens_at_log = now, self.tokens_seen
        self.sup_tokens_at_log = self.sup_tokens_seen

    def _compute(self, tokens_per_s: float) -> dict[str, float]:
        """Cumulative training FLOPs and MFU for the log line (empty when not counted)."""
        if self.flops_per_token is None:
            return {}
        dtype = torch.bfloat16 if self.use_bf16 else torch.float32
        if self.ceiling is None:
            self.ceiling = matmul_ceiling(self.device, dtype)
        mfu = tokens_per_s * self.flops_per_token / self.ceiling
        if mfu > 1 and not self.ceiling_remeasured:  # the cached ceiling was measured low
            self.ceiling_remeasured = True
            self.ceiling = matmul_ceiling(self.device, dtype, remeasure=True)
            mfu = tokens_per_s * self.flops_per_token / self.ceiling
        return {"flops": self.tokens_seen * self.flops_per_token, "mfu": mfu}

    @torch.no_grad()
    def evaluate(self) -> float:
        """Mean loss per token over the fixed validation batches (nats per token)."""
        self.model.eval()
        total, count = 0.0, 0
        for batch in self.val:
            loss_sum, n = self.loss_of(self.model, batch, self.autocast)
            total += loss_sum.item()
            count += int(n)
        self.model.train()
        val_loss = total / count
        ppl = math.exp(val_loss) if val_loss < 700 else math.inf
        self.emit(
            {
                "event": "eval",
                "step": self.step,
                "val_loss": val_loss,
                "val_ppl": ppl,
                "elapsed_s": self._elapsed(),  # for loss-against-time plots
                **{f"val_{k}": v for k, v in _loss_metrics(self.loss_of, training=False).items()},
            }
        )
        self.result.val_losses.append((self.step, val_loss))
        self.last_eval = self.step
        return val_loss

    def save(self, with_val: bool = True) -> Path:
        """Checkpoint the current state as ``step``, rotate, and log it."""
        step, config = self.step, self.config
        if not self.ranks.all_true(_all_finite(self.model)):
            raise TrainingDiverged(
                f"the model's parameters are not finite at step {step}; refusing to write a "
                "checkpoint from this state"
            )
        val_loss = self.result.val_losses[-1][1] if with_val and self.last_eval == step else None
        train_state = {
            "step": step,
            "tokens_seen": self.tokens_seen,
            "sup_tokens_seen": self.sup_tokens_seen,
            # A distributed run's optimizer state goes into dcp/ (distributed.save_checkpoint).
            "optimizer": None if self.ranks.enabled else self.optimizer.state_dict(),
            # The schedule is lr_at(step, config): its whole state is the step counter.
            "scheduler": {"schedule": config.lr_schedule, "step": step},
            "rng": _rng_state(self.device),
            "data": self.batches.state_dict(),
            "guard": self.guard.state_dict(),
        }
        extra = {
            "train": {"step": step, "tokens_seen": self.tokens_seen, "val_loss": val_loss},
            "train_config": dataclasses.asdict(config),
        }
        files = dict(
            tokenizer=self.tokenizer,
            train_state=train_state,
            extra_config=extra,
            keep_last=config.keep_last,
            keep_best=config.keep_best,
        )
        target = checkpoint_dir(self.run_dir.path, step)
        if self.ranks.enabled:
            path = distributed.save_checkpoint(
                self.run_dir, target, self.model, self.optimizer, step, self.ranks, **files
            )
        else:
            path = self.run_dir.save(target, self.model, step, **files)
        self.result.checkpoint = path
        return path

    def plot(self) -> None:
        """loss.png, from metrics.jsonl."""
        if not self.ranks.main:
            return
        every = self.config.eval_interval
        plot_losses(
            self.run_dir.path / METRICS_FILE,
            self.run_dir.path / "loss.png",
            val_note=f"no validation yet: runs every {every} steps"
            if self.val is not None
            else "no validation data",
        )

    def save_interrupted(self) -> None:
        """Ctrl-C or SIGTERM: save the exact state (rewinding a step begun), unless the
        interrupt came inside the optimizer update."""
        if self.applying:
            log.error("interrupted inside the optimizer update: no checkpoint saved")
            return
        if self.ranks.enabled:  # a save needs every rank at the same point; they are not
            log.warning("interrupted: a distributed run resumes from its last checkpoint")
            return
        if self.in_step:  # replay the interrupted step on resume: same batches, same dropout
            self.batches.load_state_dict(self.step_start[0])
            _set_torch_rng(self.step_start[1], self.device)
        self.optimizer.zero_grad(set_to_none=True)
        if self.run_dir.last_saved != self.step:
            log.warning("interrupted: saving a checkpoint at step %d", self.step)
            self.save(with_val=False)
        self.plot()


def _train_batches(tokens, config: TrainConfig, ranks: Ranks):
    """Shuffled windows of a 1-D token array, or streamed from token shards by rank and
    DataLoader worker (``TokenShards``: a corpus larger than memory)."""
    if isinstance(tokens, TokenShards):
        return ShardBatches(
            tokens,
            config.batch_size,
            config.seq_len,
            config.seed,
            ranks.rank,
            ranks.world_size,
            config.data_workers,
        )
    return TrainBatches(tokens, config.batch_size, config.seq_len, config.seed)


def _next_token_loss(model, window, autocast, keep=1.0) -> tuple[torch.Tensor, int]:
    """Summed next-token cross-entropy of a [B, T+1] window batch -> (sum, B*T)."""
    x, y = window[:, :-1], window[:, 1:]  # (B, T) inputs and next-token targets
    with autocast():
        x = mix_inputs(model, x, keep)  # scheduled sampling; x itself when keep == 1
        logits = model(x)  # (B, T, V)
    # float32 log-softmax whatever the autocast dtype (.float() is free at fp32).
    return F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), reduction="sum"), y.numel()


def _accumulate_gradients(
    model,
    batches,
    grad_accum,
    device,
    autocast,
    keep=1.0,
    loss_of=_next_token_loss,
    split=1,
    split_batch=None,
    sync=None,
) -> tuple[torch.Tensor, torch.Tensor | int]:
    """Forward and backward over ``grad_accum`` micro-batches -> (mean loss, tokens the
    loss is on, tokens processed).

    Each micro-batch loss is a mean over its tokens; dividing by grad_accum makes the
    summed gradient that of the mean over all micro-batches (equal sizes), i.e. of one
    batch of batch_size * grad_accum rows. ``loss_of(model, batch, autocast, keep)``
    returns a summed loss and the number of tokens it sums over.

    ``split`` > 1 (after an out-of-memory error) cuts each drawn batch into that many
    parts with ``split_batch(batch, split) -> [(part, weight)]`` (``split_rows`` for
    token windows): the same windows and the same loss per step, in less memory.
    ``sync(last)``: a context for each forward and backward, letting only the last one
    synchronise gradients across ranks (``distributed.gradient_sync``); None in one process.
    """
    total, counted, processed = None, 0, 0
    for i in range(grad_accum):
        batch = batches.next_batch()
        processed += _tokens_in(batch)
        parts = [(batch, None)] if split == 1 else split_batch(batch, split)
        for j, (part, weight) in enumerate(parts):
            last = i == grad_accum - 1 and j == len(parts) - 1
            with sync(last) if sync is not None else contextlib.nullcontext():
                loss_sum, count = loss_of(model, _to_device(part, device), autocast, keep)
                loss = loss_sum / count if weight is None else loss_sum / count * weight
                (loss / grad_accum).backward()
            total = loss.detach() if total is None else total + loss.detach()
            counted = counted + count
    return (total / grad_accum if grad_accum > 1 else total), counted, processed


def _tokens_in(batch) -> int:
    """The tokens a batch feeds the model: a [B, T+1] window batch's B*T inputs, or a
    supervised batch's real tokens (its ``n_tokens`` when it counts them itself, else its
    ``mask`` or ``attention_mask``, else all of ``ids``). Counted on the host copy, so no
    device sync.

    >>> _tokens_in({"ids": torch.zeros(2, 3), "mask": torch.tensor([[1, 1, 1], [1, 0, 0]])})
    4
    """
    if isinstance(batch, dict):
        for key in ("n_tokens", "mask", "attention_mask"):
            if key in batch:
                return int(batch[key].sum())
        return batch["ids"].numel()
    return batch[:, :-1].numel()


def split_rows(batch: torch.Tensor, n: int) -> list[tuple[torch.Tensor, float]]:
    """A [B, T+1] window batch cut into ``n`` row blocks, each weighted by its share of the
    rows: every window has T targets, so the weighted mean losses add up to the batch's.

    >>> [(part.shape[0], w) for part, w in split_rows(torch.zeros(5, 3), 2)]
    [(3, 0.6), (2, 0.4)]
    """
    rows = batch.shape[0]
    return [(part, part.shape[0] / rows) for part in torch.tensor_split(batch, n) if len(part)]


def is_out_of_memory(error: BaseException) -> bool:
    """An allocator's out-of-memory error (CUDA, MPS, CPU), not any other failure."""
    if isinstance(error, torch.OutOfMemoryError):
        return True
    return isinstance(error, RuntimeError) and "out of memory" in str(error).lower()


def _loss_metrics(loss_of, training: bool) -> dict[str, float]:
    """Extra numbers a supervised loss reports (DPO's rewards, margins, accuracy), if any.

    A loss object with a ``metrics(training)`` method returns the means of what it saw
    since its last call, over training or over evaluation batches; they go into the
    step's ``train`` event (and, prefixed ``val_``, into the ``eval`` event).
    """
    metrics = getattr(loss_of, "metrics", None)
    return dict(metrics(training)) if callable(metrics) else {}


def _to_device(batch, device):
    """A tensor, or a dict of tensors (supervised batches), on ``device``; bound for a GPU,
    each goes through pinned memory so that the copy overlaps the computation."""
    if isinstance(batch, dict):
        return {k: _to_device(v, device) for k, v in batch.items()}
    if device.type == "cuda" and batch.device.type == "cpu":
        batch = batch.pin_memory()
    return batch.to(device, non_blocking=True)


def _grad_norm(params: list[nn.Parameter], grad_clip: float | None) -> torch.Tensor:
    """The global L2 norm of the gradients before clipping (clipping them if asked)."""
    if grad_clip is not None:
        return torch.nn.utils.clip_grad_norm_(params, grad_clip)
    grads = [p.grad for p in params if p.grad is not None]
    if hasattr(torch.nn.utils, "get_total_norm"):  # torch >= 2.6: one foreach kernel
        return torch.nn.utils.get_total_norm(grads)
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))


def _all_finite(model: nn.Module) -> bool:
    """Whether every parameter (this rank's shard of it, under FSDP) is finite."""
    checks = [torch.isfinite(distributed.local_part(p)).all() for p in model.parameters()]
    return bool(torch.stack(checks).all()) if checks else True


# ----------------------------------------------------------------------------- resume


def _changed_settings(before: dict[str, Any], now: dict[str, Any]) -> dict[str, list]:
    """{field: [recorded, now]} of the settings a resumed run changed (resume itself aside)."""
    same = lambda a, b: json.loads(json.dumps(a)) == json.loads(json.dumps(b))  # noqa: E731
    return {
        k: [before[k], v]
        for k, v in now.items()
        if k in before and k != "resume" and not same(before[k], v)
    }


def _restore(ckpt: Path, model, optimizer, batches, guard, spec) -> tuple[int, int]:
    """Load weights and training state from ``ckpt`` -> (step, tokens_seen, sup_tokens_seen)."""
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
    sharded_state = distributed.has_sharded_state(ckpt)
    if sharded_state:  # written by a distributed run: DCP reshards it for this one
        distributed.load_checkpoint(ckpt, model, optimizer)
    elif distributed.is_sharded(model):
        raise CheckpointError(
            f"cannot resume {str(ckpt)!r} with parallel='fsdp': it was written by a single "
            "process (no dcp/ folder); resume it with parallel='ddp' (whose checkpoints "
            "hold dcp/, which FSDP reads)"
        )
    else:
        load_weights(model, ckpt)
    try:
        if not sharded_state:
            optimizer.load_state_dict(state["optimizer"])
        batches.load_state_dict(state["data"])
        guard.load_state_dict(state["guard"])
        _set_rng_state(state["rng"], next(model.parameters()).device)
        # sup_tokens_seen: absent from checkpoints written before it was counted
        return int(state["step"]), int(state["tokens_seen"]), int(state.get("sup_tokens_seen", 0))
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
