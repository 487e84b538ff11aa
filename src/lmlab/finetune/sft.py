"""Supervised fine-tuning: batches of (prompt, response) examples and their losses.

An encoded example (``lmlab.data.instructions.EncodedExample``) holds ``ids`` and ``labels``;
``labels`` is
-100 wherever the model is not asked to predict (the prompt, padding) and the token id
where it is (the response and its end-of-turn token). As in Hugging Face's causal-LM
convention the labels line up with the inputs, and the loss shifts them: the logits at
position t are scored against ``labels[t + 1]``::

    ids     <u> 2 + 2 ? <a> 4 <e>
    labels  -   -  -  - -   4 <e>      the loss is on "4" (predicted at <a>) and <e> (at 4)

The trainer (``lmlab.train.train(..., supervised=Supervised(batches, loss, val))``) does the
rest: optimizer, schedule, accumulation, guards, checkpoints and exact resume.

- ``sft_loss``: cross-entropy on the response tokens only.
- ``kl_sft_loss(reference, beta)``: the same plus ``beta * KL(policy || reference)`` at
  every response position, which keeps the fine-tuned model's next-token distributions
  close to the frozen pretrained ones (and so limits forgetting).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lmlab.data.instructions import IGNORE, collate
from lmlab.errors import ConfigError, DataError
from lmlab.train import Supervised, TrainConfig

Collate = Callable[[Sequence[Any], int], dict[str, torch.Tensor]]
"""``collate_fn(examples, pad_id) -> batch``: ``collate`` for SFT examples, ``collate_pairs``
(``lmlab.align.dpo``) for preference pairs."""


class ExampleBatches:
    """Shuffled batches of examples, resumable at ``(epoch, index)`` like ``TrainBatches``.

    Each epoch is a permutation of the examples drawn from a generator seeded by
    ``(seed, epoch)`` alone; the last incomplete batch of an epoch is dropped (unless the
    data has fewer examples than a batch: then every batch is the whole, reshuffled).
    ``collate_fn`` turns the picked examples into a batch (SFT examples by default).
    """

    def __init__(
        self,
        examples: Sequence[Any],
        batch_size: int,
        seed: int,
        pad_id: int,
        collate_fn: Collate = collate,
    ):
        if not examples:
            raise DataError("no training examples (after skipping the unusable ones)")
        if batch_size < 1:
            raise ConfigError(f"batch_size={batch_size} is invalid: must be >= 1")
        self.examples = list(examples)
        self.batch_size = min(batch_size, len(self.examples))
        self.seed, self.pad_id, self.collate_fn = seed, pad_id, collate_fn
        self.epoch, self.index = 0, 0
        self._order = self._permutation(0)

    def _permutation(self, epoch: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(len(self.examples), generator=g)

    def next_batch(self) -> dict[str, torch.Tensor]:
        if self.index + self.batch_size > len(self.examples):
            self.epoch, self.index = self.epoch + 1, 0
            self._order = self._permutation(self.epoch)
        picked = self._order[self.index : self.index + self.batch_size].tolist()
        self.index += self.batch_size
        return self.collate_fn([self.examples[i] for i in picked], self.pad_id)

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "index": self.index}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.index = int(state["epoch"]), int(state["index"])
        self._order = self._permutation(self.epoch)


def fixed_batches(
    examples: Sequence[Any], batch_size: int, pad_id: int, collate_fn: Collate = collate
) -> list[dict[str, torch.Tensor]]:
    """Validation batches: the examples in order, every one of them, in batches."""
    return [
        collate_fn(examples[i : i + batch_size], pad_id)
        for i in range(0, len(examples), batch_size)
    ]


def supervised_data(
    train_examples: Sequence[Any],
    val_examples: Sequence[Any],
    loss: Callable,
    config: TrainConfig,
    pad_id: int,
    collate_fn: Collate = collate,
) -> Supervised:
    """What the trainer's ``supervised=`` takes: shuffled, resumable training batches of
    ``config.batch_size`` examples, ``loss``, and the validation batches: the first
    ``config.eval_batches`` batches of the validation examples, in order (None without
    validation examples)."""
    size = config.batch_size
    val = list(val_examples)[: config.eval_batches * size]
    return Supervised(
        ExampleBatches(train_examples, size, config.seed, pad_id, collate_fn),
        loss,
        fixed_batches(val, size, pad_id, collate_fn) if val else None,
    )


def _shifted(model: nn.Module, batch: dict[str, torch.Tensor], autocast):
    """Float32 logits [B, T-1, V] at the positions that predict, and their labels [B, T-1].

    A batch of packed rows (``segments`` numbering more than one example in a row) runs
    with the segments, so no example attends to another (transformers only).
    """
    packed = "segments" in batch and int(batch["segments"].max()) > 1
    with autocast():
        if packed:
            logits = model(batch["ids"], segments=batch["segments"])  # (B, T, V)
        else:
            logits = model(batch["ids"])  # (B, T, V)
    return logits[:, :-1].float(), batch["labels"][:, 1:]


def sft_loss(
    model: nn.Module, batch: dict[str, torch.Tensor], autocast, keep: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed cross-entropy over the labelled tokens, and how many there are.

    A batch with no labelled token is an error, never a silent zero loss: the data side
    skips such examples (with a warning) before they reach a batch.
    """
    return _cross_entropy(*_shifted(model, batch, autocast))


def _cross_entropy(logits: torch.Tensor, labels: torch.Tensor):
    count = (labels != IGNORE).sum()
    if int(count) == 0:
        raise DataError("a batch has no response tokens to learn from (every label is masked)")
    loss = F.cross_entropy(
        logits.flatten(0, 1), labels.flatten(), ignore_index=IGNORE, reduction="sum"
    )
    return loss, count


def kl_sft_loss(reference: nn.Module, beta: float) -> Callable:
    """The loss of KL-regularised SFT: cross-entropy + ``beta`` KL(policy || reference).

    At each labelled position, KL(p || q) = sum_v p(v) (log p(v) - log q(v)) between the
    fine-tuned model's next-token distribution p and the frozen ``reference``'s q (computed
    without gradients). Both terms are summed over labelled positions, so the trainer's
    division makes them per-token means. ``beta = 0`` is plain SFT.
    """
    if beta < 0:
        raise ConfigError(f"beta={beta} is invalid: the KL weight must be >= 0")
    reference.eval().requires_grad_(False)

    def loss_fn(model, batch, autocast, keep=1.0):
        logits, labels = _shifted(model, batch, autocast)
        ce, count = _cross_entropy(logits, labels)
        if beta == 0:
            return ce, count
        with torch.no_grad():
            ref_logits, _ = _shifted(reference, batch, autocast)
        scored = labels != IGNORE  # (B, T-1)
        logp = logits[scored].log_softmax(-1)  # (N, V)
        logq = ref_logits[scored].log_softmax(-1)
        kl = (logp.exp() * (logp - logq)).sum()
        return ce + beta * kl, count

    return loss_fn
