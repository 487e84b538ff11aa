"""Fine-tuning losses and batches for an encoder's heads (``EncoderConfig.head``).

- ``sequence``: cross-entropy of the class logits [B, n_labels] from the pooled [CLS];
- ``token``: cross-entropy of each labelled subword's logits [B, T, n_labels], positions
  labelled ``IGNORE`` (-100: padding, special tokens, a word's later subwords) left out;
- ``span``: the mean of the cross-entropies of the start and of the end logits [B, T]
  against the answer's first and last token (BERT's SQuAD loss; index 0, [CLS], when the
  window does not hold the answer).

``head_loss`` computes one batch's loss; ``HeadLoss`` is what the trainer calls
(``Supervised``) and ``HeadBatches`` draws resumable training batches of examples.
Parity of the heads' logits with transformers: tests/checkpoint/test_bert_heads.py.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lmlab.data.mlm import IGNORE
from lmlab.errors import ConfigError
from lmlab.models import base_model
from lmlab.train.batches import IndexedBatches


def collate_rows(rows: Sequence[dict[str, Any]], pad_id: int) -> dict[str, torch.Tensor]:
    """Rows of ``ids``, ``token_type_ids`` (lists) and their targets (``label``: an int or
    a list per token; ``start``, ``end``) -> right-padded tensors with ``attention_mask``."""
    T = max(len(r["ids"]) for r in rows)
    pad = [T - len(r["ids"]) for r in rows]
    batch = {
        "ids": torch.tensor([r["ids"] + [pad_id] * p for r, p in zip(rows, pad)]),
        "token_type_ids": torch.tensor([r["token_type_ids"] + [0] * p for r, p in zip(rows, pad)]),
        "attention_mask": torch.tensor([[1] * len(r["ids"]) + [0] * p for r, p in zip(rows, pad)]),
    }
    if "label" in rows[0]:
        if isinstance(rows[0]["label"], list):
            batch["labels"] = torch.tensor([r["label"] + [IGNORE] * p for r, p in zip(rows, pad)])
        else:
            batch["labels"] = torch.tensor([r["label"] for r in rows])
    if "start" in rows[0]:
        batch["start"] = torch.tensor([r["start"] for r in rows])
        batch["end"] = torch.tensor([r["end"] for r in rows])
    return batch


def head_loss(
    model: nn.Module, batch: dict[str, torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed loss, count) of one batch: the trainer divides the one by the other. The
    count is the number of labelled tokens for ``token`` and of rows otherwise."""
    hidden = model(batch["ids"], batch["attention_mask"], batch["token_type_ids"])
    kind = base_model(model).config.head
    rows = torch.tensor(batch["ids"].shape[0], device=hidden.device)
    if kind == "sequence":
        logits = model.head_logits(hidden)  # (B, n_labels)
        return F.cross_entropy(logits.float(), batch["labels"], reduction="sum"), rows
    if kind == "token":
        logits = model.head_logits(hidden)  # (B, T, n_labels)
        labels = batch["labels"]
        loss = F.cross_entropy(
            logits.flatten(0, 1).float(), labels.flatten(), ignore_index=IGNORE, reduction="sum"
        )
        return loss, (labels != IGNORE).sum()
    if kind == "span":
        start, end = model.head_logits(hidden)  # (B, T) each
        padding = ~batch["attention_mask"].bool()
        start = start.float().masked_fill(padding, torch.finfo(torch.float32).min)
        end = end.float().masked_fill(padding, torch.finfo(torch.float32).min)
        loss = F.cross_entropy(start, batch["start"], reduction="sum")
        loss = loss + F.cross_entropy(end, batch["end"], reduction="sum")
        return loss / 2, rows
    raise ConfigError(f"the encoder has no fine-tuning head (head={kind!r})")


class HeadLoss:
    """The trainer's supervised loss for a head (``head_loss`` under autocast)."""

    def __call__(self, model, batch, autocast, keep=1.0):
        with autocast():
            return head_loss(model, batch)


class HeadBatches(IndexedBatches):
    """Training batches of head examples: each epoch a permutation of the rows drawn from
    ``(seed, epoch)`` alone, so ``batch(index)`` is fixed and resume is exact."""

    def __init__(self, rows: Sequence[dict[str, Any]], batch_size: int, seed: int, pad_id: int):
        if not rows:
            raise ConfigError("there are no training examples for the head")
        self.rows, self.seed, self.pad_id = list(rows), seed, pad_id
        self.batch_size = min(batch_size, len(self.rows))

    def batch(self, index: int) -> dict[str, torch.Tensor]:
        per_epoch = len(self.rows) // self.batch_size
        epoch, k = divmod(index, per_epoch)
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        order = torch.randperm(len(self.rows), generator=g)
        picked = order[k * self.batch_size : (k + 1) * self.batch_size].tolist()
        return collate_rows([self.rows[i] for i in picked], self.pad_id)
