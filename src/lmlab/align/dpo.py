"""``lmlab dpo`` and ``lmlab.align.dpo.dpo``: direct preference optimisation (DPO, IPO).

DPO (Rafailov et al. 2023) fine-tunes a policy on (prompt, chosen, rejected) pairs with no
reward model and no sampling: the loss (``lmlab.align.losses.dpo_loss``, eq. 7) raises the
log-probability of the chosen reply relative to a frozen reference model and lowers that
of the rejected one. One training step::

    ids = [chosen_1 .. chosen_B, rejected_1 .. rejected_B]       # one batch of 2B rows
    logps = sum over reply tokens of log pi(token)               # [2B], prompt masked
    ref   = the same under the reference (precomputed once)      # [2B], no gradient
    loss  = dpo_loss(logps[:B], logps[B:], ref[:B], ref[B:], beta).mean()

The reference is the starting model. By default its log-probabilities are precomputed
once for every pair before training (``precompute_reference=True``), so no second copy
of the weights is kept and a resumed run sees exactly the same numbers; otherwise they are
computed at each step from a frozen copy (``method="full"``) or from the policy with its
LoRA update switched off (``method="lora"``, ``disabled_lora``), or from ``reference``.
IPO (``loss_type="ipo"``) uses per-token averaged log-probabilities, as TRL does.

Training runs through the lmlab trainer (``Supervised``), so checkpoints, guards and an
exact resume come with it. Each logged step also carries the implicit rewards
beta * log(pi / pi_ref) of chosen and rejected replies, their margin and the reward
accuracy (chosen reward > rejected reward); validation the same (``val_`` prefix), plus
``val_kl``: the mean per-token KL(pi || pi_ref) of the next-token distributions over the
validation replies, chosen and rejected (``reply_kl``), how far the policy has drifted.
``dpo.png`` plots them (``lmlab.align.plots``). At the end the model is written like ``finetune`` does.
Parity of the loss with TRL: ``tests/align/test_losses.py``.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from lmlab.align.losses import PairStats, dpo_loss
from lmlab.align.plots import plot_dpo
from lmlab.data.instructions import (
    IGNORE,
    EncodedExample,
    Example,
    collate,
    encode_example,
    template_for,
)
from lmlab.data.preferences import PreferencePair, load_preferences
from lmlab.errors import ConfigError, DataError
from lmlab.finetune import trainable_parameters
from lmlab.finetune.lora import LoRAConfig, disabled_lora
from lmlab.finetune.run import (
    check_method,
    keep_base_reference,
    prepare_method,
    write_tuned_model,
)
from lmlab.finetune.sft import supervised_data
from lmlab.lm import LM, load
from lmlab.seeds import seeded
from lmlab.train import TrainConfig, TrainResult, distributed, train
from lmlab.train.metrics import read_metrics

log = logging.getLogger(__name__)

METHODS = ("full", "lora")
METRICS = ("rewards_chosen", "rewards_rejected", "margin", "reward_accuracy", "kl")


# ----------------------------------------------------------------------------- data


@dataclass(frozen=True)
class EncodedPair:
    """A preference pair as two encoded conversations (prompt masked in ``labels``)."""

    chosen: EncodedExample
    rejected: EncodedExample
    ref_chosen: float | None = None
    """log pi_ref(chosen | prompt), when precomputed."""
    ref_rejected: float | None = None


def prompt_messages(prompt: str | Sequence[dict[str, str]]) -> list[dict[str, str]]:
    """The conversation before the reply: a plain prompt is one user message."""
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}]
    return [dict(m) for m in prompt]


def encode_pair(
    pair: PreferencePair, tokenizer: Any, template: Any, max_len: int | None = None
) -> EncodedPair:
    """Both replies rendered after the prompt with the chat template, as SFT renders them."""
    messages = prompt_messages(pair.prompt)
    chosen, rejected = (
        encode_example(
            Example(tuple(messages + [{"role": "assistant", "content": reply}])),
            tokenizer,
            template,
            max_len,
        )
        for reply in (pair.chosen, pair.rejected)
    )
    return EncodedPair(chosen, rejected)


def encode_pairs(
    pairs: Sequence[PreferencePair], tokenizer: Any, template: Any, max_len: int | None = None
) -> tuple[list[EncodedPair], int]:
    """Encoded pairs, and how many were skipped (a reply left with no token after
    ``max_len``: it would give no gradient and a meaningless reward; RELIABILITY item 12)."""
    out, skipped = [], 0
    for i, pair in enumerate(pairs):
        encoded = encode_pair(pair, tokenizer, template, max_len)
        if encoded.chosen.n_targets == 0 or encoded.rejected.n_targets == 0:
            log.warning("preference pair %d: a reply has no token left after max_len; skipped", i)
            skipped += 1
            continue
        out.append(encoded)
    return out, skipped


def collate_pairs(pairs: Sequence[EncodedPair], pad_id: int) -> dict[str, torch.Tensor]:
    """One batch of 2B rows, chosen replies first: ``ids``, ``labels``, ``mask`` [2B, T]
    (see ``collate``) and, when every pair has them, ``ref_logps`` [2B] float32."""
    batch = collate([p.chosen for p in pairs] + [p.rejected for p in pairs], pad_id)
    batch = {k: batch[k] for k in ("ids", "labels", "mask")}
    if all(p.ref_chosen is not None for p in pairs):
        refs = [p.ref_chosen for p in pairs] + [p.ref_rejected for p in pairs]
        batch["ref_logps"] = torch.tensor(refs, dtype=torch.float32)
    return batch


# ----------------------------------------------------------------------------- log-probs


def sequence_logps(
    model: nn.Module, batch: dict[str, torch.Tensor], autocast=nullcontext, average: bool = False
) -> torch.Tensor:
    """Sum (or per-token mean) of log pi(token) over each row's labelled tokens -> [N] float32.

    ``batch["ids"]``, ``batch["labels"]``: [N, T] int64, labels ``IGNORE`` on the prompt and
    padding (right padding: the model is causal, so real positions do not see it).
    """
    with autocast():
        logits = model(batch["ids"])  # (N, T, V)
    logits = logits[:, :-1].float()  # (N, T-1, V): position t predicts token t + 1
    labels = batch["labels"][:, 1:]  # (N, T-1)
    scored = labels != IGNORE
    token_logps = logits.log_softmax(-1).gather(-1, labels.clamp(min=0).unsqueeze(-1))
    token_logps = token_logps.squeeze(-1) * scored  # (N, T-1)
    total = token_logps.sum(-1)  # (N,)
    return total / scored.sum(-1).clamp(min=1) if average else total


@torch.no_grad()
def reference_logps(
    model: nn.Module,
    batch: dict[str, torch.Tensor],
    autocast=nullcontext,
    average: bool = False,
    reference: nn.Module | None = None,
) -> torch.Tensor:
    """``sequence_logps`` of the reference [N]: ``reference`` if given, else ``model`` with
    its LoRA update off (a model with no LoRA layers is then its own reference)."""
    if reference is not None:
        return sequence_logps(reference, batch, autocast, average)
    with disabled_lora(model):
        return sequence_logps(model, batch, autocast, average)


@torch.no_grad()
def reply_kl(
    model: nn.Module,
    batch: dict[str, torch.Tensor],
    autocast=nullcontext,
    reference: nn.Module | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """KL(pi || pi_ref) of the next-token distributions, summed over every row's labelled
    tokens, and the number of those tokens (two scalars, on the device: no host sync).

    At a reply position t: sum over v of pi(v | <t) * (log pi(v | <t) - log ref(v | <t)),
    the exact KL of that step (not a one-sample estimate). The reference is ``reference``
    if given, else ``model`` with its LoRA update off. ``batch`` as ``sequence_logps``.
    """
    with autocast():
        logits = model(batch["ids"])  # (N, T, V)
        if reference is not None:
            ref_logits = reference(batch["ids"])
        else:
            with disabled_lora(model):
                ref_logits = model(batch["ids"])
    scored = batch["labels"][:, 1:] != IGNORE  # (N, T-1): position t predicts token t + 1
    logp = logits[:, :-1][scored].float().log_softmax(-1)  # (n, V)
    logq = ref_logits[:, :-1][scored].float().log_softmax(-1)
    return (logp.exp() * (logp - logq)).sum(), scored.sum()


@torch.no_grad()
def precompute_reference(
    model: nn.Module,
    pairs: Sequence[EncodedPair],
    batch_size: int,
    pad_id: int,
    average: bool = False,
    reference: nn.Module | None = None,
) -> list[EncodedPair]:
    """``pairs`` with ``ref_chosen`` / ``ref_rejected`` filled in (evaluation mode, float32)."""
    device = next(model.parameters()).device
    net = reference if reference is not None else model
    was_training = net.training
    net.eval()
    out = []
    for start in range(0, len(pairs), batch_size):
        chunk = [replace(p, ref_chosen=None) for p in pairs[start : start + batch_size]]
        batch = {k: v.to(device) for k, v in collate_pairs(chunk, pad_id).items()}
        logps = reference_logps(model, batch, average=average, reference=reference).tolist()
        B = len(chunk)
        out += [
            replace(p, ref_chosen=logps[i], ref_rejected=logps[B + i]) for i, p in enumerate(chunk)
        ]
    net.train(was_training)
    return out


# ----------------------------------------------------------------------------- the loss


class DPOLoss:
    """The trainer's loss function: ``(model, batch, autocast, keep) -> (summed loss, pairs)``.

    It also keeps running sums of the implicit rewards, separately for training and
    evaluation batches (``model.training``), which the trainer reads through ``metrics``.
    """

    def __init__(
        self,
        beta: float = 0.1,
        loss_type: str = "sigmoid",
        label_smoothing: float = 0.0,
        reference: nn.Module | None = None,
        rpo_alpha: float | None = None,
    ):
        dpo_loss(*torch.zeros(4, 1), beta, label_smoothing, loss_type)  # validates the settings
        if rpo_alpha is not None and not rpo_alpha >= 0:
            raise ConfigError(f"rpo_alpha={rpo_alpha} is invalid: must be >= 0 (or None: off)")
        self.beta, self.loss_type, self.label_smoothing = beta, loss_type, label_smoothing
        self.reference, self.rpo_alpha = reference, rpo_alpha
        self.stats = PairStats("reward_accuracy")
        self.track_kl = False
        """Measure ``reply_kl`` on evaluation batches (needs ``reference`` or a LoRA model
        whose update can be switched off); ``dpo`` turns it on where it can."""
        self._kl: torch.Tensor | None = None  # [summed KL, token count] since the last read

    def __call__(self, model, batch, autocast=nullcontext, keep: float = 1.0):
        average = self.loss_type == "ipo"  # IPO compares per-token means (TRL's convention)
        logps = sequence_logps(model, batch, autocast, average)  # (2B,)
        if "ref_logps" in batch:
            ref = batch["ref_logps"]
        else:
            ref = reference_logps(model, batch, autocast, average, self.reference)
        B = logps.shape[0] // 2
        losses, chosen, rejected = dpo_loss(
            logps[:B], logps[B:], ref[:B], ref[B:], self.beta, self.label_smoothing, self.loss_type
        )
        self.stats.add(model.training, chosen, rejected)
        if self.track_kl and not model.training:
            kl = torch.stack(reply_kl(model, batch, autocast, self.reference)).float()
            self._kl = kl if self._kl is None else self._kl + kl
        loss = losses.sum()
        if self.rpo_alpha:
            # RPO (Pang et al. 2024; TRL's rpo_alpha): plus alpha times the chosen replies'
            # negative log-likelihood per token, a batch mean added to every pair's loss.
            counts = (batch["labels"][:B, 1:] != IGNORE).sum(-1)  # (B,) reply tokens
            summed = logps[:B] * counts if average else logps[:B]
            loss = loss + self.rpo_alpha * B * (-summed.sum() / counts.sum().clamp(min=1))
        return loss, logps.new_tensor(B, dtype=torch.int64)  # count: a tensor, no sync

    def metrics(self, training: bool) -> dict[str, float]:
        """Means since the last call: rewards of chosen and rejected, margin, accuracy;
        in evaluation also ``kl`` (nats per reply token) when ``track_kl`` is on."""
        means = self.stats.means(training)
        if not training and self._kl is not None:
            total, count = self._kl.tolist()
            means["kl"], self._kl = total / max(count, 1), None
        return means


# ----------------------------------------------------------------------------- the run


@dataclass
class DPOResult:
    train: TrainResult
    method: str
    trainable: int
    total: int
    pairs: dict[str, int]
    """How many train / val pairs were used, and how many were skipped."""
    out_dir: Path
    last: dict[str, float] = field(default_factory=dict)
    """The last logged training metrics (loss, rewards, margin, reward accuracy)."""
    val: dict[str, float] = field(default_factory=dict)
    """The last validation metrics (val_loss, val_margin, val_reward_accuracy, ...)."""
    model_dir: Path | None = None
    adapter_dir: Path | None = None
    plot: Path | None = None
    lm: LM | None = None
    """The tuned model (LoRA merged) with its tokenizer and chat template, ready to generate."""


def dpo(
    model: str = "smollm2",
    data: str = "prefs.jsonl",
    val_data: str | None = None,
    beta: float = 0.1,
    loss_type: Literal["sigmoid", "ipo"] = "sigmoid",
    label_smoothing: float = 0.0,
    rpo_alpha: float | None = None,
    method: Literal["full", "lora"] = "lora",
    reference: str | None = None,
    precompute_reference_logps: bool = True,
    max_len: int = 256,
    lora: LoRAConfig = LoRAConfig(),
    config: TrainConfig | None = None,
    callbacks: Sequence[Callable[[dict[str, Any]], None]] | None = None,
) -> DPOResult:
    """Tune a model on preference pairs with DPO (or IPO).

    Args:
        model: anything ``lmlab.load`` takes (a checkpoint, an HF folder, "smollm2").
        data: preference JSONL (``prompt``, ``chosen``, ``rejected``).
        val_data: held-out preference JSONL (validation loss, rewards and accuracy).
        beta: the strength of the pull toward the reference (DPO's beta, IPO's tau).
        loss_type: "sigmoid" (DPO) or "ipo".
        label_smoothing: conservative DPO's probability that a label is flipped (sigmoid only).
        rpo_alpha: RPO (Pang et al. 2024, TRL's ``rpo_alpha``): add this times the chosen
            replies' negative log-likelihood per token to the loss; None (default) is off.
        method: "full" (every weight) or "lora" (reference = LoRA switched off).
        reference: a different reference model (anything ``lmlab.load`` takes); by
            default the starting model.
        precompute_reference_logps: compute the reference's log-probabilities once before
            training (default) instead of at every step.
        max_len: conversations are cut to this many tokens (a pair left with no reply token
            is skipped with a warning).
        lora: LoRA's rank, scale, dropout and target layers (method "lora").
        config: the trainer's settings (out_dir, max_steps, lr, batch_size = pairs per step).
        callbacks: called with every logged event (see ``lmlab.train.train``).
    """
    config = config or TrainConfig(out_dir="runs/dpo", max_steps=200, lr=5e-6, min_lr=5e-7)
    ranks = distributed.command_ranks(config, "dpo")  # under torchrun: DDP, rank 0 writes
    check_method(method, METHODS)
    if label_smoothing and loss_type != "sigmoid":
        raise ConfigError(f"label_smoothing={label_smoothing} applies to loss_type='sigmoid' only")
    loss_fn = DPOLoss(beta, loss_type, label_smoothing, rpo_alpha=rpo_alpha)
    lm = load(model, dtype="float32", keep_quantized=False, device=config.device)
    pad_id = lm.tokenizer.eos_id if lm.tokenizer.eos_id is not None else 0
    train_pairs, val_pairs, skipped = load_pairs(lm, data, val_data, max_len)

    net = lm.model.train()
    ref_model = reference_model(net, reference, method, precompute_reference_logps)
    with seeded(config.seed):  # the LoRA weights: the run's seed fixes them
        net = prepare_method(net, method, lora)
    keep_base_reference(net, lm, method)  # LoRA checkpoints: the adapter and a base reference
    if precompute_reference_logps:
        # Before any update, the policy (LoRA off, or the untouched weights) is the reference.
        average, size = loss_type == "ipo", config.batch_size
        train_pairs = precompute_reference(net, train_pairs, size, pad_id, average, ref_model)
        val_pairs = precompute_reference(net, val_pairs, size, pad_id, average, ref_model)
        ref_model = None
    loss_fn.reference = ref_model
    # The drift on the validation replies: against the reference model, or the policy with
    # its LoRA off when that is the reference. With precomputed log-probabilities, a full
    # fine-tune or a separate reference keeps no reference weights to compare with.
    loss_fn.track_kl = ref_model is not None or (method == "lora" and reference is None)
    trainable, total, _ = trainable_parameters(net)
    supervised = supervised_data(train_pairs, val_pairs, loss_fn, config, pad_id, collate_pairs)
    result = train(
        net, None, None, config, tokenizer=lm.tokenizer, supervised=supervised, callbacks=callbacks
    )

    out = Path(config.out_dir)
    counts = {"train": len(train_pairs), "val": len(val_pairs), "skipped": skipped}
    done = DPOResult(result, method, trainable, total, counts, out, lm=lm)
    done.last, done.val = last_metrics(out / "metrics.jsonl")
    done.plot = out / "dpo.png"
    if ranks.main:
        plot_dpo(out / "metrics.jsonl", done.plot, config.eval_interval)
        done.adapter_dir, done.model_dir = write_tuned_model(net, lm, out, method)
    ranks.barrier()
    return done


def load_pairs(
    lm: LM, data: str, val_data: str | None, max_len: int
) -> tuple[list[EncodedPair], list[EncodedPair], int]:
    """The training and validation pairs, encoded with ``lm``'s tokenizer and chat template,
    and how many of both were skipped. Raises DataError when no training pair is usable."""
    template = template_for(lm.tokenizer, lm.chat_template)
    train_pairs, skipped = encode_pairs(load_preferences(data), lm.tokenizer, template, max_len)
    if not train_pairs:
        raise DataError(f"{data}: no usable preference pair (every one was skipped)")
    val_pairs: list[EncodedPair] = []
    if val_data is not None:
        val_pairs, val_skipped = encode_pairs(
            load_preferences(val_data), lm.tokenizer, template, max_len
        )
        skipped += val_skipped
    return train_pairs, val_pairs, skipped


def reference_model(
    net: nn.Module, reference: str | None, method: str, precompute: bool
) -> nn.Module | None:
    """The frozen reference kept beside the policy ``net``: the ``reference`` model when one
    is named, a copy of ``net`` for a full fine-tune computing it live, else None (the
    reference is then ``net`` itself with its LoRA update off, or precomputed)."""
    ref_model = None
    if reference is not None:
        device = next(net.parameters()).device
        ref_model = load(reference, dtype="float32", keep_quantized=False, device=str(device))
        ref_model = ref_model.model
    elif method == "full" and not precompute:
        ref_model = copy.deepcopy(net)
    if ref_model is None:
        return None
    return ref_model.to(next(net.parameters()).device).eval().requires_grad_(False)


def last_metrics(metrics_path: Path) -> tuple[dict[str, float], dict[str, float]]:
    """The last logged training metrics (step, loss, rewards, margin, reward accuracy) and
    the last validation ones (their ``val_`` forms), from a run's metrics.jsonl."""
    records = read_metrics(metrics_path)
    trains = [r for r in records if r.get("event") == "train"]
    evals = [r for r in records if r.get("event") == "eval"]
    keep = ("step", "loss", *METRICS)
    last = {k: trains[-1][k] for k in keep if trains and k in trains[-1]}
    val_keep = ("step", "val_loss", *(f"val_{k}" for k in METRICS))
    val = {k: evals[-1][k] for k in val_keep if evals and k in evals[-1]}
    return last, val
