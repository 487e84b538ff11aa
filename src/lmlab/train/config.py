"""The trainer's settings: one frozen dataclass, each field documented right under it."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

from lmlab.errors import ConfigError, closest

NO_DECAY_KINDS = ("bias", "norm", "embedding")
WANDB_MODES = ("online", "offline")


@dataclass(frozen=True)
class LogConfig:
    """Where a run's metrics go besides metrics.jsonl (which every run writes)."""

    tensorboard: bool = False
    """Also write TensorBoard event files to out_dir/tensorboard (needs the tensorboard
    package: pip install tensorboard); view them with ``tensorboard --logdir out_dir``."""
    wandb: bool = False
    """Also log to Weights & Biases (needs the wandb package); its files go to out_dir/wandb."""
    wandb_project: str = "lmlab"
    """The W&B project the run is logged to."""
    wandb_name: str | None = None
    """The W&B run's name; None: the name of out_dir."""
    wandb_mode: Literal["online", "offline"] = "online"
    """"online" sends the run to the W&B server as it trains; "offline" keeps it in
    out_dir/wandb (upload it later with ``wandb sync``)."""

    def __post_init__(self):
        for name in ("tensorboard", "wandb"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(
                    f"LogConfig.{name}={getattr(self, name)!r} is invalid: must be true or false"
                )
        if not isinstance(self.wandb_project, str) or not self.wandb_project:
            raise ConfigError(
                f"LogConfig.wandb_project={self.wandb_project!r} is invalid: must be a "
                "non-empty name"
            )
        if self.wandb_mode not in WANDB_MODES:
            raise ConfigError(
                f"LogConfig.wandb_mode={self.wandb_mode!r} is invalid: choose one of "
                f"{', '.join(WANDB_MODES)}{closest(str(self.wandb_mode), WANDB_MODES)}"
            )

    @classmethod
    def of(cls, value: LogConfig | Mapping | None) -> LogConfig:
        """A LogConfig from itself, a dict (a run's JSON record) or None (the default)."""
        if value is None:
            return cls()
        return cls(**value) if isinstance(value, Mapping) else value


@dataclass(frozen=True)
class TrainConfig:
    out_dir: str = "runs/train"
    """Run directory: config.json, metrics.jsonl, loss.png and checkpoints/ go here."""
    max_steps: int = 1000
    """Optimizer steps to train for (skipped steps do not count)."""
    time_budget_s: float | None = None
    """Stop after this many seconds of wall time in this call (then save); None: no limit."""
    batch_size: int = 32
    """Sequences per micro-batch."""
    seq_len: int = 128
    """Tokens per sequence (at most the model's max_seq_len)."""
    grad_accum: int = 1
    """Micro-batches per optimizer step: tokens per step = batch_size * grad_accum * seq_len."""
    optimizer: Literal["adamw", "sgd"] = "adamw"
    """AdamW (decoupled weight decay) or SGD with momentum (weight decay as L2 on the gradient)."""
    lr: float = 1e-3
    """Peak learning rate, reached at the end of warm-up."""
    min_lr: float = 1e-4
    """Learning rate at the end of the cosine decay (at max_steps)."""
    warmup_steps: int = 100
    """Steps of linear warm-up from lr / warmup_steps to lr."""
    lr_schedule: Literal["cosine", "constant"] = "cosine"
    """After warm-up: cosine decay to min_lr, or constant lr."""
    weight_decay: float = 0.1
    """Weight decay of the parameters not excluded by no_decay."""
    betas: tuple[float, float] = (0.9, 0.95)
    """AdamW's moment decay rates (beta1, beta2)."""
    momentum: float = 0.9
    """SGD momentum."""
    no_decay: tuple[str, ...] = NO_DECAY_KINDS
    """Kinds of parameters without weight decay: any of "bias", "norm", "embedding"."""
    grad_clip: float | None = 1.0
    """Clip the global gradient norm to this value; None: no clipping."""
    precision: Literal["auto", "bf16", "fp32"] = "auto"
    """bf16 autocast (weights stay float32), fp32, or auto: bf16 where the device supports it."""
    device: str = "auto"
    """Where the run trains: auto (CUDA, then MPS, then the CPU), cpu, cuda, cuda:N or mps.
    The model moves there before training; a run may resume on another device."""
    eval_interval: int = 250
    """Compute the validation loss every this many steps (and at the end)."""
    eval_batches: int = 20
    """Validation batches per evaluation (fixed windows spread over the validation tokens)."""
    ckpt_interval: int = 500
    """Save a checkpoint every this many steps (and at the end)."""
    keep_last: int | None = 3
    """Keep this many newest checkpoints; None keeps all."""
    keep_best: bool = False
    """Also keep the checkpoint with the lowest validation loss (evaluated at each save)."""
    seed: int = 1337
    """Seeds the data order and, for a fresh run, torch's global RNG (dropout); ``lmlab
    train`` (``lmlab.api.train``) seeds the model's initial weights with it too."""
    resume: str = "never"
    """"never": start fresh (out_dir must hold no checkpoint); "auto": resume from the newest
    complete checkpoint in out_dir if there is one, else start fresh; or a checkpoint or
    run directory to resume from. ``lmlab train`` resumes with the settings the run recorded
    (flags given replace only what they name)."""
    init_from: str | None = None
    """Checkpoint or run directory whose weights start a fresh run (not with resume)."""
    log_interval: int = 10
    """Write a train line to metrics.jsonl every this many steps."""
    max_nonfinite: int = 5
    """Stop with TrainingDiverged after this many non-finite steps in a row."""
    spike_factor: float | None = 3.0
    """Skip a step whose loss exceeds this times the median of the recent losses; None: off."""
    grad_spike_factor: float | None = None
    """Skip a step whose gradient norm exceeds this times the recent median; None: off."""
    spike_window: int = 50
    """How many recent steps the spike guard's median covers."""
    spike_warmup: int = 100
    """The spike guard acts only after this many steps (early losses fall fast)."""
    progress: bool = True
    """Show a progress bar (loss, tokens/s, ETA)."""
    objective: Literal[
        "teacher_forcing", "free_running", "linear", "exponential", "inverse_sigmoid"
    ] = "teacher_forcing"
    """What the model is fed (lmlab.train.objectives): the true tokens (teacher forcing), its
    own samples (free-running), or scheduled sampling (Bengio et al. 2015) with the
    probability of feeding the true token decaying linearly, exponentially or as an inverse
    sigmoid of the step."""
    ss_k: float = 1.0
    """Scheduled sampling's k: linear start value, exponential base (< 1), or inverse-sigmoid
    scale (>= 1, e.g. 100: the decay centres near step k * ln k)."""
    ss_c: float = 0.001
    """Linear schedule: decrease of the true-token probability per step."""
    ss_min: float = 0.0
    """Linear schedule: the floor of the true-token probability."""
    compile: bool = False
    """Compile the model's forward with torch.compile (inductor) for training steps. Measured
    on this project's 2-core CPU: gpt-char-tiny +11% tokens/s, the 6 x 384 shape no gain,
    after 20-40 s of compilation (bench/train_throughput.py)."""
    parallel: Literal["ddp", "fsdp"] = "ddp"
    """How several processes (``torchrun --nproc_per_node N -m lmlab train ...``) share the
    model: "ddp" keeps a full copy on each and averages gradients; "fsdp" (FSDP2) shards
    parameters, gradients and optimizer state over them, one unit per transformer block
    (with bf16 precision: bf16 compute, float32 gradient reduction). One process: ignored.
    ``grad_accum`` counts micro-batches over all processes (a multiple of N), so the
    global batch stays the same on any number of them."""
    grad_checkpoint: bool = False
    """Recompute each transformer block's activations in the backward pass instead of
    storing them (torch.utils.checkpoint): much less activation memory, about one more
    forward pass of compute per step."""
    data_workers: int = 0
    """DataLoader worker processes that read training batches from token shards
    (``lmlab.data.TokenShards``) ahead of the step; 0 reads them in the training process."""
    log: LogConfig = LogConfig()
    """TensorBoard and Weights & Biases logging beside metrics.jsonl (``--log.*`` flags)."""

    def __post_init__(self):
        object.__setattr__(self, "log", LogConfig.of(self.log))
        # JSON and YAML give lists; keep tuples so the config stays hashable and frozen.
        object.__setattr__(self, "betas", tuple(self.betas))
        object.__setattr__(self, "no_decay", tuple(self.no_decay))

        def bad(field: str, allowed: str):
            value = getattr(self, field)
            raise ConfigError(f"TrainConfig.{field}={value!r} is invalid: {allowed}")

        def integer(field: str, low: int, optional: bool = False):
            value = getattr(self, field)
            if optional and value is None:
                return
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                bad(field, f"must be an integer >= {low}" + (" or None" if optional else ""))

        def number(field: str, low: float, low_open: bool, high=math.inf, optional=False):
            value = getattr(self, field)
            if optional and value is None:
                return
            ok = (
                not isinstance(value, bool)
                and isinstance(value, (int, float))
                and math.isfinite(value)
                and (value > low if low_open else value >= low)
                and value <= high
            )
            if not ok:
                bound = f"> {low}" if low_open else f">= {low}"
                bad(field, f"must be a finite number {bound}" + (" or None" if optional else ""))

        def choice(field: str, allowed: tuple[str, ...]):
            value = getattr(self, field)
            if value not in allowed:
                hint = closest(str(value), allowed)
                bad(field, f"choose one of {', '.join(allowed)}{hint}")

        if not isinstance(self.out_dir, str) or not self.out_dir:
            bad("out_dir", "must be a non-empty path")
        for field in (
            "max_steps",
            "batch_size",
            "seq_len",
            "grad_accum",
            "eval_interval",
            "eval_batches",
            "ckpt_interval",
            "log_interval",
            "max_nonfinite",
            "spike_window",
        ):
            integer(field, 1)
        integer("warmup_steps", 0)
        integer("spike_warmup", 0)
        integer("keep_last", 1, optional=True)
        integer("seed", 0)
        integer("data_workers", 0)
        number("time_budget_s", 0, low_open=True, optional=True)
        number("lr", 0, low_open=True)
        number("min_lr", 0, low_open=False)
        if self.min_lr > self.lr:
            bad("min_lr", f"must be at most lr={self.lr}")
        number("weight_decay", 0, low_open=False)
        number("momentum", 0, low_open=False, high=0.999999)
        number("grad_clip", 0, low_open=True, optional=True)
        number("spike_factor", 1, low_open=True, optional=True)
        number("grad_spike_factor", 1, low_open=True, optional=True)
        if len(self.betas) != 2 or not all(
            isinstance(b, (int, float)) and 0 <= b < 1 for b in self.betas
        ):
            bad("betas", "must be two numbers in [0, 1)")
        choice("optimizer", ("adamw", "sgd"))
        choice("lr_schedule", ("cosine", "constant"))
        choice("precision", ("auto", "bf16", "fp32"))
        choice(
            "objective",
            ("teacher_forcing", "free_running", "linear", "exponential", "inverse_sigmoid"),
        )
        if self.objective == "exponential" and not 0 < self.ss_k < 1:
            bad("ss_k", "the exponential schedule needs 0 < ss_k < 1")
        if self.objective == "inverse_sigmoid" and not self.ss_k >= 1:
            bad("ss_k", "the inverse-sigmoid schedule needs ss_k >= 1")
        number("ss_c", 0, low_open=False)
        number("ss_min", 0, low_open=False, high=1.0)
        for kind in self.no_decay:
            if kind not in NO_DECAY_KINDS:
                bad(
                    "no_decay",
                    f"{kind!r} is not one of {', '.join(NO_DECAY_KINDS)}"
                    f"{closest(str(kind), NO_DECAY_KINDS)}",
                )
        choice("parallel", ("ddp", "fsdp"))
        for field in ("progress", "keep_best", "grad_checkpoint"):
            if not isinstance(getattr(self, field), bool):
                bad(field, "must be true or false")
        if not isinstance(self.resume, str) or not self.resume:
            bad("resume", '"never", "auto" or a checkpoint path')
        if self.init_from is not None and not isinstance(self.init_from, str):
            bad("init_from", "must be a checkpoint path or None")
        if self.resume != "never" and self.init_from is not None:
            raise ConfigError(
                f"TrainConfig.resume={self.resume!r} and init_from={self.init_from!r} cannot "
                "be used together: resume continues a run (weights, optimizer, data position), "
                "init_from starts a new run from a checkpoint's weights; choose one"
            )
