"""PPO for RLHF: improve a language model against a reward, held near where it started.

    result = ppo(lmlab.load("runs/align/sft/model"), prompts, task_reward(rows),
                 PPOConfig(max_steps=50, method="lora", out_dir="runs/align/ppo"))

Each iteration (Ziegler et al. 2019; Ouyang et al. 2022, InstructGPT; Schulman et al. 2017):

1. rollout: ``batch_size`` prompts, ``samples_per_prompt`` completions each, sampled from
   the policy with lmlab's own decoding (``generate`` with a seed of (seed, iteration));
2. score: ``reward_fn(prompts, completions) -> list[float]`` (a checker, ``task_reward``,
   or a reward model behind the same signature);
3. the log-probs of the sampled tokens under the policy and the reference (the starting
   model: the same module with LoRA disabled, or a frozen copy for full fine-tuning), the
   per-token reward ``-kl_coef * KL`` plus the score at the last token, and the value
   head's estimates (``nn.Linear(D, 1)`` on the policy's last hidden state);
4. GAE advantages (whitened) and returns, then ``ppo_epochs`` passes of shuffled
   minibatches with the clipped policy and value losses (``lmlab.align.rl``), gradient
   clipping and AdamW. With ``advantage_estimator="rloo"`` there is no value head: a
   sample's advantage is its score less the mean score of the same prompt's other samples
   (Ahmadian et al. 2024), plus the KL penalties to the end of the reply, as in TRL's
   ``RLOOTrainer`` and OpenRLHF's ``--advantage_estimator rloo``;
5. the KL coefficient is updated (fixed, or adaptive toward ``kl_target``).

Dropout is off throughout (as in TRL), so before the first update the recomputed
log-probs equal the rollout's and the ratio is exactly 1. Log-probs are those of the
temperature-scaled distribution the rollout sampled from (top-p truncation is not
modelled, as in TRL).

``out_dir`` is a run folder as the trainer's (``lmlab.train.run.RunDir``: one writer at a
time, ``config.json``, ``metrics.jsonl`` with one ``"ppo"`` event per iteration,
``checkpoints/`` saved atomically every ``ckpt_interval`` iterations, at the end and on
Ctrl-C or SIGTERM, the ``keep_last`` newest kept). PPO's step is an iteration: ``max_steps``
counts iterations. ``resume="auto"`` (or a path) continues exactly: policy, value head,
optimizer, KL controller, shuffling generator, prompt order and counter. The folder also
gets ``ppo.png`` (score and KL against iteration, ``lmlab.align.plots``), ``adapter/`` for
LoRA and ``model/`` (an lmlab checkpoint; with LoRA, its checkpoints hold A and B and a
reference to the base model, ``lmlab.checkpoint.base``; ``lmlab.load`` merges them in).
The seed makes a run reproducible bit for bit: LoRA's init (under ``lmlab.seeds.seeded``),
the sampling (seed, iteration), the minibatch shuffling and the prompt order.

Tests: ``tests/align/test_ppo.py`` (hand-worked maths, exact resume, SIGTERM and a second
writer on a real subprocess, the seed, lr=0 invariance, learning a simple reward on a tiny
model).
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn
from tqdm.auto import tqdm

from lmlab.align.heads import hidden_size, logits_and_hidden
from lmlab.align.plots import plot_ppo
from lmlab.align.reward import load_reward_model
from lmlab.align.rl import (
    KL_KINDS,
    AdaptiveKLController,
    FixedKLController,
    entropy_from_logits,
    gae,
    kl_penalty,
    leave_one_out_baseline,
    masked_mean,
    policy_loss,
    token_rewards,
    value_loss,
    whiten,
)
from lmlab.checkpoint.io import checkpoint_dir, load_train_state, load_weights
from lmlab.data.instructions import example_from_row, read_rows, template_for
from lmlab.data.tasks import check
from lmlab.devices import model_device, resolve_device
from lmlab.errors import CheckpointError, ConfigError, DataError, closest
from lmlab.finetune import LoRAConfig, apply_lora, disabled_lora
from lmlab.finetune.run import keep_base_reference, write_tuned_model
from lmlab.generate import SamplingParams, generate
from lmlab.lm import LM, load
from lmlab.models.contract import require_gradients
from lmlab.seeds import seeded
from lmlab.train.config import LogConfig
from lmlab.train.metrics import read_metrics, truncate_after_checkpoint
from lmlab.train.run import METRICS_FILE, RunDir, StopSignals, resume_mode

log = logging.getLogger(__name__)

RewardFn = Callable[[list[str], list[str]], Sequence[float]]
METHODS = ("full", "lora")
ESTIMATORS = ("gae", "rloo")


@dataclass(frozen=True)
class PPOConfig:
    batch_size: int = 8
    """Prompts per rollout."""
    samples_per_prompt: int = 2
    """Completions sampled per prompt (a rollout has batch_size * samples_per_prompt)."""
    max_new_tokens: int = 16
    """Longest completion, in tokens (a completion also ends at the tokenizer's eos)."""
    temperature: float = 1.0
    """Sampling temperature of the rollouts (> 0); log-probs use the same temperature."""
    top_p: float = 1.0
    """Nucleus sampling of the rollouts, in (0, 1]; 1 = off."""
    ppo_epochs: int = 4
    """Passes over each rollout."""
    minibatch_size: int = 8
    """Sequences per optimizer step."""
    lr: float = 1e-5
    """AdamW learning rate (constant, no weight decay)."""
    max_grad_norm: float = 1.0
    """Clip the global gradient norm to this (0 = no clipping)."""
    clip_eps: float = 0.2
    """PPO's ratio clipping epsilon."""
    clip_value: float = 0.2
    """How far the value head may move from its rollout estimate before clipping."""
    vf_coef: float = 0.1
    """Weight of the value loss in the total loss."""
    gamma: float = 1.0
    """Discount per token."""
    lam: float = 0.95
    """GAE's lambda."""
    kl_coef: float = 0.05
    """Weight of the per-token KL penalty (the starting value when adaptive)."""
    kl_kind: Literal["k1", "abs", "k2", "k3"] = "k1"
    """The per-token KL estimator of the penalty (see ``lmlab.align.rl.kl_penalty``)."""
    kl_target: float | None = None
    """With a target (nats per sequence) the coefficient adapts toward it (Ziegler et al.
    2019); None keeps it fixed."""
    kl_horizon: int = 10000
    """Adaptive control's horizon, in sequences."""
    advantage_estimator: Literal["gae", "rloo"] = "gae"
    """"gae": the value head and GAE (the classic RLHF PPO). "rloo": no value head; each
    sample's score minus the mean score of the same prompt's other samples (RLOO's
    leave-one-out baseline, Ahmadian et al. 2024), plus the per-token KL penalties, summed
    to the end of the reply (lam = 1). Needs samples_per_prompt >= 2."""
    whiten_advantages: bool = True
    """Normalise the advantages of each rollout to mean 0 and standard deviation 1."""
    entropy: bool = True
    """Log the policy's mean per-token entropy on the rollouts."""
    method: Literal["full", "lora"] = "lora"
    """Train every weight (reference = a frozen copy) or LoRA (reference = LoRA off)."""
    lora: LoRAConfig = LoRAConfig()
    """LoRA's rank, scale, dropout and target layers (method "lora")."""
    chat_template: bool = True
    """Ask each prompt as one user turn of the model's chat template (or the plain one);
    False feeds the prompt text to the model as it is."""
    seed: int = 0
    """Seeds the whole run: LoRA's init, the rollouts' sampling, the minibatch shuffling and
    the prompt order (the same seed gives bit-identical weights)."""
    device: str = "auto"
    """Where the run trains: auto (CUDA, then MPS, then the CPU), cpu, cuda, cuda:N or mps.
    The model is loaded (or moved) there; a run may resume on another device."""
    out_dir: str = "runs/ppo"
    """Where config.json, metrics, checkpoints, the plot and the final model go."""
    max_steps: int = 20
    """Iterations to run in all, a resumed run counting the earlier ones. PPO's step is one
    iteration (a rollout, then ppo_epochs passes of optimizer updates over it)."""
    time_budget_s: float | None = None
    """Also stop after this many seconds (of this process) when set."""
    ckpt_interval: int = 10
    """Save a checkpoint every this many iterations (and at the end, on Ctrl-C and SIGTERM)."""
    keep_last: int | None = 2
    """Keep this many newest checkpoints; None keeps all."""
    resume: str = "never"
    """"never": start fresh (out_dir must hold no checkpoint); "auto": resume from the newest
    complete checkpoint in out_dir if there is one, else start fresh; or a checkpoint or
    run directory to resume from. True and False (the older spelling) mean "auto" and
    "never"."""
    progress: bool = True
    """Show a progress bar."""
    log: LogConfig = LogConfig()
    """TensorBoard and Weights & Biases logging beside metrics.jsonl (``--log.*`` flags)."""

    def __post_init__(self):
        if isinstance(self.lora, Mapping):  # from JSON (a checkpoint's config record)
            object.__setattr__(self, "lora", LoRAConfig(**self.lora))
        object.__setattr__(self, "log", LogConfig.of(self.log))
        object.__setattr__(self, "resume", resume_mode(self.resume))
        positive_ints = (
            "batch_size",
            "samples_per_prompt",
            "max_new_tokens",
            "ppo_epochs",
            "minibatch_size",
            "kl_horizon",
            "max_steps",
            "ckpt_interval",
            "keep_last",
        )
        for name in positive_ints:
            value = getattr(self, name)
            optional = name == "keep_last"  # None keeps every checkpoint
            if optional and value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                allowed = "an integer >= 1" + (" or None" if optional else "")
                raise ConfigError(f"PPOConfig.{name}={value!r} is invalid: must be {allowed}")
        if not isinstance(self.resume, str) or not self.resume:
            raise ConfigError(
                f'PPOConfig.resume={self.resume!r} is invalid: "never", "auto" or a '
                "checkpoint or run directory"
            )
        if not isinstance(self.device, str) or not self.device:
            raise ConfigError(
                f"PPOConfig.device={self.device!r} is invalid: auto, cpu, cuda, cuda:N or mps"
            )
        non_negative = ("lr", "max_grad_norm", "vf_coef", "kl_coef", "clip_value")
        for name in non_negative:
            value = getattr(self, name)
            if not _real(value) or value < 0:
                raise ConfigError(f"PPOConfig.{name}={value!r} is invalid: must be a number >= 0")
        checks = {
            "temperature": (self.temperature, "> 0", lambda v: v > 0),
            "top_p": (self.top_p, "in (0, 1]", lambda v: 0 < v <= 1),
            "clip_eps": (self.clip_eps, "in (0, 1)", lambda v: 0 < v < 1),
            "gamma": (self.gamma, "in [0, 1]", lambda v: 0 <= v <= 1),
            "lam": (self.lam, "in [0, 1]", lambda v: 0 <= v <= 1),
        }
        for name, (value, allowed, ok) in checks.items():
            if not _real(value) or not ok(value):
                raise ConfigError(f"PPOConfig.{name}={value!r} is invalid: must be {allowed}")
        if self.advantage_estimator not in ESTIMATORS:
            raise ConfigError(
                f"PPOConfig.advantage_estimator={self.advantage_estimator!r} is not one of "
                f"{', '.join(ESTIMATORS)}{closest(str(self.advantage_estimator), ESTIMATORS)}"
            )
        if self.advantage_estimator == "rloo" and self.samples_per_prompt < 2:
            raise ConfigError(
                f"PPOConfig.advantage_estimator='rloo' needs samples_per_prompt >= 2 (the "
                f"baseline is the other samples of the same prompt); got {self.samples_per_prompt}"
            )
        if self.kl_target is not None and (not _real(self.kl_target) or self.kl_target <= 0):
            raise ConfigError(
                f"PPOConfig.kl_target={self.kl_target!r} is invalid: must be > 0 or None (fixed)"
            )
        if self.time_budget_s is not None and (
            not _real(self.time_budget_s) or self.time_budget_s <= 0
        ):
            raise ConfigError(
                f"PPOConfig.time_budget_s={self.time_budget_s!r} is invalid: must be > 0 or None"
            )
        if self.kl_kind not in KL_KINDS:
            raise ConfigError(
                f"PPOConfig.kl_kind={self.kl_kind!r} is not one of {', '.join(KL_KINDS)}"
                f"{closest(str(self.kl_kind), KL_KINDS)}"
            )
        if self.method not in METHODS:
            raise ConfigError(
                f"PPOConfig.method={self.method!r} is not one of {', '.join(METHODS)}"
                f"{closest(str(self.method), METHODS)}"
            )


def _real(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


@dataclass
class PPOResult:
    iterations: int
    """Iterations done in all (a resumed run counts the earlier ones)."""
    metrics: list[dict[str, Any]]
    """The ``"ppo"`` events of metrics.jsonl, one per iteration, oldest first."""
    out_dir: Path
    wall_time_s: float
    model_dir: Path | None = None
    adapter_dir: Path | None = None
    checkpoint: Path | None = None
    value_head: nn.Module | None = None
    """The trained value head (None with ``advantage_estimator="rloo"``, which has none)."""
    lm: LM | None = None
    """The trained model with its tokenizer and chat template (LoRA merged in)."""
    plot: Path | None = None


# ----------------------------------------------------------------------------- rewards


def row_prompt(row: Mapping[str, Any]) -> str:
    """The user message of a task row (instruction, and input when there is one)."""
    messages = example_from_row(row).messages
    return next(m["content"] for m in reversed(messages) if m["role"] == "user")


def task_reward(rows: Sequence[Mapping[str, Any]]) -> RewardFn:
    """A reward function for rows of the bundled verifiable tasks (``lmlab.data.tasks``):
    1.0 when ``check(row["task"], completion, row["output"])`` accepts the completion,
    else 0.0. The rows are found by their prompt, ``row_prompt(row)``."""
    by_prompt: dict[str, Mapping[str, Any]] = {}
    for i, row in enumerate(rows):
        for key in ("task", "output"):
            if key not in row:
                raise DataError(f"task row {i} has no {key!r} field; the task reward needs it")
        by_prompt[row_prompt(row)] = row

    def reward(prompts: list[str], completions: list[str]) -> list[float]:
        scores = []
        for prompt, completion in zip(prompts, completions, strict=True):
            row = by_prompt.get(prompt)
            if row is None:
                raise DataError(f"no task row has the prompt {prompt[:60]!r}")
            scores.append(1.0 if check(row["task"], completion, row["output"]) else 0.0)
        return scores

    return reward


def ppo_from_files(
    model: str = "smollm2",
    prompts: str = "prompts.jsonl",
    reward: str = "task",
    config: PPOConfig | None = None,
) -> PPOResult:
    """PPO on the task rows of a JSONL file (what ``lmlab ppo`` runs).

    Args:
        model: anything ``lmlab.load`` takes (a checkpoint, an HF folder, "smollm2").
        prompts: JSONL rows of the bundled verifiable tasks (``task``, ``instruction``,
            optional ``input``, ``output``); each row's user message is a prompt.
        reward: "task" (1.0 when ``lmlab.data.tasks.check`` accepts the completion, else 0),
            or the directory of a reward model (``lmlab reward``), which scores each
            (prompt, completion); rows then need only a ``prompt`` (or an instruction).
        config: the PPO settings.

    ``model``, ``prompts`` and ``reward`` are recorded in ``config.json`` (``"source"``), so
    that ``lmlab ppo --ppo.resume`` finds them again.
    """
    config = config or PPOConfig()
    source = {"model": str(model), "prompts": str(prompts), "reward": str(reward)}
    if reward == "task":
        expected = "'task', 'instruction', 'output'"
        rows = [row for _, row in read_rows(prompts, "task rows", expected)]
        return ppo(model, [row_prompt(r) for r in rows], task_reward(rows), config, source=source)
    if not Path(reward).is_dir():
        raise ConfigError(
            f"reward={reward!r} is neither 'task' nor a reward-model directory (lmlab reward "
            "writes one)"
        )

    scorer = load_reward_model(reward)
    scorer.model.to(resolve_device(config.device))  # scored where the policy samples
    rows = [row for _, row in read_rows(prompts, "prompt rows", "'prompt' or 'instruction'")]
    texts = [r["prompt"] if isinstance(r.get("prompt"), str) else row_prompt(r) for r in rows]

    def reward_fn(prompts: list[str], completions: list[str]) -> list[float]:
        return scorer.score(list(zip(prompts, completions))).tolist()

    return ppo(model, texts, reward_fn, config, source=source)


# ----------------------------------------------------------------------------- scoring


def score_tokens(
    model: nn.Module,
    value_head: nn.Module | None,
    ids: torch.Tensor,
    prompt_lens: torch.Tensor,
    resp_len: int,
    temperature: float,
    with_entropy: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Log-probs [N, R] of the response tokens, values [N, R] of the states before them
    and (optionally) the entropies [N, R] of the policy there.

    ``ids`` [N, L] holds each prompt followed by its response, right-padded (safe for a
    causal model); response token j of row n sits at ``prompt_lens[n] + j`` and is
    predicted from the position before it. Entries past a response are garbage (mask them).
    """
    N, L = ids.shape
    logits, hidden = logits_and_hidden(model, ids)  # (N, L, V), (N, L, D)
    j = torch.arange(resp_len, device=ids.device)
    at = (prompt_lens[:, None] + j[None, :]).clamp(max=L - 1)  # (N, R): the tokens
    before = at - 1  # the positions that predict them
    logits = logits.gather(1, before[..., None].expand(-1, -1, logits.shape[-1]))  # (N, R, V)
    logits = logits.float() / temperature
    tokens = ids.gather(1, at)  # (N, R)
    logp = torch.log_softmax(logits, dim=-1).gather(-1, tokens[..., None]).squeeze(-1)
    values = None
    if value_head is not None:
        h = hidden.gather(1, before[..., None].expand(-1, -1, hidden.shape[-1]))  # (N, R, D)
        values = value_head(h).squeeze(-1).float()  # (N, R)
    entropy = entropy_from_logits(logits.detach()) if with_entropy else None
    return logp, values, entropy


# ----------------------------------------------------------------------------- prompt order


class PromptOrder:
    """Batches of prompt indices, each epoch a permutation seeded by (seed, epoch) alone;
    resumable from ``state_dict()`` (epoch, position)."""

    def __init__(self, n: int, batch_size: int, seed: int):
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.epoch, self.position = 0, 0

    def _order(self, epoch: int) -> list[int]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(self.n, generator=g).tolist()

    def next_batch(self) -> list[int]:
        batch: list[int] = []
        while len(batch) < self.batch_size:
            if self.position >= self.n:
                self.epoch, self.position = self.epoch + 1, 0
            take = min(self.batch_size - len(batch), self.n - self.position)
            batch += self._order(self.epoch)[self.position : self.position + take]
            self.position += take
        return batch

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: Mapping[str, int]) -> None:
        self.epoch, self.position = int(state["epoch"]), int(state["position"])


# ----------------------------------------------------------------------------- the loop


def ppo(
    model: Any,
    prompts: Sequence[str],
    reward_fn: RewardFn,
    config: PPOConfig | None = None,
    callbacks: Sequence[Callable[[dict[str, Any]], None]] | None = None,
    source: Mapping[str, str] | None = None,
) -> PPOResult:
    """Train ``model`` with PPO against ``reward_fn`` on ``prompts``.

    Args:
        model: an ``lmlab.LM`` (model, tokenizer, chat template) or anything
            ``lmlab.load`` takes (loaded in float32). Its model moves to ``config.device``
            and is trained there, in place.
        prompts: user requests (with ``config.chat_template``) or raw prompt texts.
        reward_fn: ``reward_fn(prompts, completions) -> list[float]``, one finite score
            per completion (``prompts`` are the strings given here, repeated per sample).
        config: the settings (``PPOConfig``).
        callbacks: called with every event written to metrics.jsonl, after it is written.
        source: what the run is made from (``ppo_from_files``: model, prompts, reward),
            recorded in config.json beside the settings.

    The run owns ``config.out_dir`` while it trains (``lmlab.train.run``: a second process
    gets ``RunInUse``). Ctrl-C (KeyboardInterrupt) and SIGTERM (``Interrupted``) save a
    checkpoint, then re-raise; one that arrives inside an iteration's optimizer updates
    waits for them to end, and one during a rollout rewinds the prompt order so that a
    resume replays it.
    """
    config = config or PPOConfig()
    device = resolve_device(config.device)
    if isinstance(model, LM):
        lm = model
        lm.model.to(device)
    else:
        lm = load(model, dtype="float32", device=str(device))
    require_gradients(lm.model, "PPO")
    if not prompts or not all(isinstance(p, str) and p for p in prompts):
        raise DataError("prompts must be a non-empty list of non-empty strings")
    run = RunDir(config.out_dir, callbacks or ())
    with run.owned(), run.stop_signals() as stop:
        run.clean()  # a crashed save's temporaries, before choosing what to resume
        resume_from = run.resume_source(config.resume)
        loop = _Run(lm, list(prompts), reward_fn, config, run)
        loop.start(resume_from, source)
        return loop.train(stop)


class _Run:
    """One PPO run's state and plumbing; the maths is in ``lmlab.align.rl`` and the run
    folder (lock, config.json, metrics.jsonl, checkpoints, signals) in ``lmlab.train.run``.
    """

    def __init__(self, lm, prompts: list[str], reward_fn: RewardFn, config: PPOConfig, run: RunDir):
        self.lm, self.prompts, self.reward_fn, self.config = lm, prompts, reward_fn, config
        self.run_dir = run
        self.out_dir = run.path
        net = lm.model.eval()
        self.device = model_device(net)
        self.tokenizer = lm.tokenizer
        self.prompt_ids = [self.tokenizer.encode(t) for t in self._render(prompts)]
        self.eos_id = getattr(self.tokenizer, "eos_id", None)
        # LoRA's A init and the value head draw from the config's seed, not the caller's RNG.
        with seeded(config.seed):
            if config.method == "lora":
                self.reference = None
                apply_lora(net, config.lora)
                keep_base_reference(net, lm, config.method)  # checkpoints: LoRA + base reference
            else:
                self.reference = copy.deepcopy(net).eval().requires_grad_(False)
                net.requires_grad_(True)
            param = next(net.parameters())
            self.value_head = nn.Linear(hidden_size(net), 1).to(param.device, param.dtype)
            nn.init.zeros_(self.value_head.weight)
            nn.init.zeros_(self.value_head.bias)
        # The starting weights, summarised: a resume must start from the same model (with
        # full fine-tuning it is the reference, which checkpoints do not hold).
        self.fingerprint = _fingerprint(self.reference) if self.reference is not None else None
        self.model = net
        self.params = [p for p in net.parameters() if p.requires_grad]
        self.params += list(self.value_head.parameters())
        self.optimizer = torch.optim.AdamW(self.params, lr=config.lr, weight_decay=0.0)
        self.kl_ctl = (
            AdaptiveKLController(config.kl_coef, config.kl_target, config.kl_horizon)
            if config.kl_target is not None
            else FixedKLController(config.kl_coef)
        )
        self.order = PromptOrder(len(prompts), config.batch_size, config.seed)
        self.shuffle = torch.Generator().manual_seed(config.seed)
        self.iteration = 0
        self.updating = False
        self.checkpoint: Path | None = None

    def _render(self, prompts: list[str]) -> list[str]:
        if not self.config.chat_template:
            return prompts

        template = template_for(self.tokenizer, self.lm.chat_template)
        return [
            template.render([{"role": "user", "content": p}], add_generation_prompt=True)
            for p in prompts
        ]

    # ------------------------------------------------------------------------- setup

    def start(self, resume_from: Path | None, source: Mapping[str, str] | None = None) -> None:
        """Restore a checkpoint (or start fresh), record the config, open the log."""
        run, metrics_path = self.run_dir, self.out_dir / METRICS_FILE
        if resume_from is not None:
            self._restore(resume_from)
            truncate_after_checkpoint(metrics_path, self.iteration)
        else:
            metrics_path.unlink(missing_ok=True)  # no events of an earlier, checkpointless run
        run.record(
            {
                "ppo": dataclasses.asdict(self.config),
                "source": dict(source) if source is not None else None,
                "resolved": {
                    "device": str(self.device),
                    "parameters": sum(p.numel() for p in self.params),
                },
            }
        )
        run.open_metrics(self.config.log, start_step=self.iteration)
        if resume_from is not None:
            run.emit({"event": "resume", "step": self.iteration, "from": str(resume_from)})
            run.last_saved = self.iteration
        self.checkpoint = resume_from

    # ------------------------------------------------------------------------- main loop

    def train(self, stop: StopSignals) -> PPOResult:
        """Iterate (rollout, then the updates) to ``max_steps``; save at intervals and at
        the end; on Ctrl-C or SIGTERM save and re-raise."""
        config, run = self.config, self.run_dir
        t_start = time.perf_counter()
        bar = tqdm(
            total=config.max_steps, initial=self.iteration, disable=not config.progress, unit="it"
        )
        self.updating = False
        order_state = self.order.state_dict()  # at the start of the current iteration
        try:
            while self.iteration < config.max_steps:
                if config.time_budget_s and time.perf_counter() - t_start >= config.time_budget_s:
                    break
                rollout = self._rollout()
                # A signal now waits for the iteration's end: its updates, counter and record.
                with stop.deferred():
                    self.updating = True
                    stats = self._update(rollout)
                    self.iteration += 1
                    order_state = self.order.state_dict()
                    self.updating = False
                    record = self._record(rollout, stats, time.perf_counter() - t_start)
                    run.emit(record)
                bar.set_postfix(score=f"{record['score']:.3f}", kl=f"{record['kl']:.3f}")
                bar.update(1)
                if self.iteration % config.ckpt_interval == 0:
                    self._save()
            if self.iteration > 0 and run.last_saved != self.iteration:
                self._save()
        except KeyboardInterrupt:
            self._save_interrupted(order_state)
            raise
        finally:
            bar.close()
        records = [r for r in read_metrics(self.out_dir / METRICS_FILE) if r.get("event") == "ppo"]
        result = PPOResult(
            self.iteration,
            records,
            self.out_dir,
            time.perf_counter() - t_start,
            checkpoint=self.checkpoint,
            value_head=self._value_head(),
        )
        result.plot = self.out_dir / "ppo.png"
        plot_ppo(records, result.plot)
        result.adapter_dir, result.model_dir = write_tuned_model(
            self.model, self.lm, self.out_dir, self.config.method
        )
        result.lm = self.lm
        return result

    def _save_interrupted(self, order_state: dict[str, int]) -> None:
        """Ctrl-C or SIGTERM: save the state at the last iteration's end, unless the
        interrupt came inside the updates (possible only where signals are not deferred:
        outside the main thread, or a KeyboardInterrupt raised by the code itself)."""
        if self.updating:
            log.error("interrupted inside an update: no checkpoint saved from this state")
            return
        # A rollout begun changed nothing but the prompt order: rewind it, so a resume
        # replays the same prompts.
        self.order.load_state_dict(order_state)
        if self.run_dir.last_saved != self.iteration:
            log.warning("interrupted: saving a checkpoint at iteration %d", self.iteration)
            self._save()

    def _rollout(self) -> dict[str, Any]:

        config = self.config
        index = [i for i in self.order.next_batch() for _ in range(config.samples_per_prompt)]
        prompt_ids = [self.prompt_ids[i] for i in index]
        params = SamplingParams(
            max_new_tokens=config.max_new_tokens,
            temperature=config.temperature,
            top_p=config.top_p,
            do_sample=True,
            seed=config.seed * 1_000_003 + self.iteration,
            eos_id=self.eos_id,
        )
        gen = generate(self.model, prompt_ids, params)
        responses = gen.ids
        completions = [self.tokenizer.decode(_strip_eos(r, self.eos_id)) for r in responses]
        texts = [self.prompts[i] for i in index]
        scores = [float(s) for s in self.reward_fn(texts, completions)]
        if len(scores) != len(completions) or not all(math.isfinite(s) for s in scores):
            raise DataError(
                f"reward_fn must return {len(completions)} finite numbers, one per completion; "
                f"got {len(scores)}: {scores[:8]}"
            )
        # Right-padded prompt + response, and the response mask.
        N, R = len(responses), max(len(r) for r in responses)
        L = max(len(p) + len(r) for p, r in zip(prompt_ids, responses))
        ids = torch.zeros(N, L, dtype=torch.long)
        mask = torch.zeros(N, R)
        for n, (p, r) in enumerate(zip(prompt_ids, responses)):
            ids[n, : len(p) + len(r)] = torch.tensor(p + r)
            mask[n, : len(r)] = 1.0
        ids, mask = ids.to(self.device), mask.to(self.device)
        prompt_lens = torch.tensor([len(p) for p in prompt_ids], device=self.device)
        with torch.no_grad():
            head = self._value_head()
            logp, values, entropy = score_tokens(
                self.model, head, ids, prompt_lens, R, config.temperature, config.entropy
            )
            ref_logp = self._reference_logp(ids, prompt_lens, R)
            kl = kl_penalty(logp, ref_logp, config.kl_kind) * mask
            score_t = torch.tensor(scores, device=self.device)
            rewards = token_rewards(score_t, kl, mask, self.kl_ctl.value)
            if head is not None:
                advantages, returns = gae(rewards, values, mask, config.gamma, config.lam)
            else:  # rloo: the score less the prompt's other samples' mean, summed to the end
                baseline = leave_one_out_baseline(score_t, config.samples_per_prompt)
                centred = token_rewards(score_t - baseline, kl, mask, self.kl_ctl.value)
                zeros = torch.zeros_like(centred)
                advantages, returns = gae(centred, zeros, mask, config.gamma, 1.0)
            if config.whiten_advantages:
                advantages = whiten(advantages, mask)
        return {
            "ids": ids,
            "mask": mask,
            "prompt_lens": prompt_lens,
            "R": R,
            "logp": logp,
            "values": values,
            "advantages": advantages,
            "returns": returns,
            "scores": score_t,
            "rewards": rewards,
            "kl": kl,
            "entropy": entropy,
            "kl_coef": self.kl_ctl.value,
        }

    def _value_head(self) -> nn.Module | None:
        """The value head, or None when the advantages need none (rloo)."""
        return self.value_head if self.config.advantage_estimator == "gae" else None

    def _reference_logp(self, ids, prompt_lens, R) -> torch.Tensor:

        t = self.config.temperature
        if self.reference is not None:
            return score_tokens(self.reference, None, ids, prompt_lens, R, t)[0]
        with disabled_lora(self.model):
            return score_tokens(self.model, None, ids, prompt_lens, R, t)[0]

    def _update(self, rollout: dict[str, Any]) -> dict[str, float]:
        config = self.config
        N = rollout["ids"].shape[0]
        sums = {"policy_loss": 0.0, "value_loss": 0.0, "clip_fraction": 0.0, "approx_kl": 0.0}
        steps = 0
        for _ in range(config.ppo_epochs):
            perm = torch.randperm(N, generator=self.shuffle)
            for start in range(0, N, config.minibatch_size):
                b = perm[start : start + config.minibatch_size].to(self.device)
                mask = rollout["mask"][b]
                logp, values, _ = score_tokens(
                    self.model,
                    self._value_head(),
                    rollout["ids"][b],
                    rollout["prompt_lens"][b],
                    rollout["R"],
                    config.temperature,
                )
                pg, clip_fraction, approx_kl = policy_loss(
                    logp, rollout["logp"][b], rollout["advantages"][b], mask, config.clip_eps
                )
                if values is None:  # rloo: no value head to train
                    vf = torch.zeros((), device=pg.device)
                else:
                    vf = value_loss(
                        values, rollout["values"][b], rollout["returns"][b], mask, config.clip_value
                    )
                loss = pg + config.vf_coef * vf
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if config.max_grad_norm > 0:
                    nn.utils.clip_grad_norm_(self.params, config.max_grad_norm)
                self.optimizer.step()
                for key, value in zip(sums, (pg, vf, clip_fraction, approx_kl)):
                    sums[key] += value.item()
                steps += 1
        self.optimizer.zero_grad(set_to_none=True)
        seq_kl = rollout["kl"].sum(dim=1).mean().item()
        self.kl_ctl.update(seq_kl, N)
        return {k: v / steps for k, v in sums.items()}

    def _record(self, rollout: dict[str, Any], stats: dict[str, float], elapsed: float) -> dict:
        mask = rollout["mask"]
        record = {
            "event": "ppo",
            "step": self.iteration,
            "score": rollout["scores"].mean().item(),
            "reward": rollout["rewards"].sum(dim=1).mean().item(),
            "kl": rollout["kl"].sum(dim=1).mean().item(),
            "kl_coef": rollout["kl_coef"],
            "response_length": mask.sum(dim=1).mean().item(),
            **stats,
            "elapsed_s": elapsed,
        }
        if rollout["entropy"] is not None:
            record["entropy"] = masked_mean(rollout["entropy"], mask).item()
        return record

    # ------------------------------------------------------------------------- checkpoints

    def _save(self) -> Path:
        """Checkpoint the state at the end of an iteration (``checkpoints/step-N``, N the
        iteration), rotate, and log it."""
        state = {
            "iteration": self.iteration,
            "optimizer": self.optimizer.state_dict(),
            "value_head": {k: v.detach().cpu() for k, v in self.value_head.state_dict().items()},
            "kl_controller": self.kl_ctl.state_dict(),
            "shuffle_rng": self.shuffle.get_state(),
            "prompt_order": self.order.state_dict(),
            "n_prompts": len(self.prompts),
            "start_fingerprint": self.fingerprint,
        }
        self.checkpoint = self.run_dir.save(
            checkpoint_dir(self.out_dir, self.iteration),
            self.model,
            self.iteration,
            tokenizer=self.tokenizer,
            train_state=state,
            extra_config={
                "ppo": {"iteration": self.iteration},
                "ppo_config": dataclasses.asdict(self.config),
            },
            keep_last=self.config.keep_last,
        )
        return self.checkpoint

    def _restore(self, ckpt: Path) -> None:

        state = load_train_state(ckpt)
        if "iteration" not in state:
            raise CheckpointError(
                f"cannot resume from {str(ckpt)!r}: it is not a PPO checkpoint (no iteration "
                "in its training state); give a checkpoint or run directory of lmlab ppo"
            )
        if state.get("n_prompts") != len(self.prompts):
            raise CheckpointError(
                f"cannot resume from {str(ckpt)!r}: it ran on {state.get('n_prompts')} prompts, "
                f"this run has {len(self.prompts)}"
            )
        if self.reference is not None and state.get("start_fingerprint") != self.fingerprint:
            raise CheckpointError(
                f"cannot resume from {str(ckpt)!r}: it started from other weights; pass the "
                "same starting model (with method='full' it is the KL reference)"
            )
        try:
            load_weights(self.model, ckpt)
            self.value_head.load_state_dict(state["value_head"])
            self.optimizer.load_state_dict(state["optimizer"])
            self.kl_ctl.load_state_dict(state["kl_controller"])
            self.shuffle.set_state(state["shuffle_rng"])
            self.order.load_state_dict(state["prompt_order"])
            self.iteration = int(state["iteration"])
        except (KeyError, ValueError, TypeError, RuntimeError) as e:
            raise CheckpointError(
                f"cannot resume from {str(ckpt)!r}: its state does not fit this run "
                f"(different method or settings?): {e}"
            ) from e


@torch.no_grad()
def _fingerprint(model: nn.Module) -> list[float]:
    """Sum and sum of squares of every weight (float64): equal weights, equal numbers."""
    tensors = [t for t in model.state_dict().values() if t.is_floating_point()]
    total = sum(t.sum(dtype=torch.float64).item() for t in tensors)
    squares = sum(torch.linalg.vector_norm(t, dtype=torch.float64).item() ** 2 for t in tensors)
    return [total, squares]


def _strip_eos(ids: list[int], eos_id: int | None) -> list[int]:
    return ids[:-1] if ids and eos_id is not None and ids[-1] == eos_id else ids


__all__ = [
    "PPOConfig",
    "PPOResult",
    "PromptOrder",
    "ppo",
    "ppo_from_files",
    "row_prompt",
    "score_tokens",
    "task_reward",
]
