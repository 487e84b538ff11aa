"""BERT's pretraining loss: masked-LM cross-entropy over the chosen positions only, plus
next-sentence-prediction cross-entropy over every pair (``lmlab.data.mlm`` makes the batch).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lmlab.data.mlm import IGNORE, PairBatch


def pretraining_loss(
    model: nn.Module, batch: PairBatch, inputs: torch.Tensor, labels: torch.Tensor
) -> dict[str, torch.Tensor]:
    """``loss`` = MLM loss + NSP loss on one batch, with both parts and their accuracies.

    ``inputs`` and ``labels`` come from ``mask_tokens(batch.ids, ...)``; positions whose
    label is ``IGNORE`` add nothing to the MLM loss (nor to its accuracy).
    """
    hidden = model(inputs, batch.attention_mask, batch.token_type_ids)
    logits = model.mlm_logits(hidden)  # (B, T, V)
    mlm = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=IGNORE)
    nsp_logits = model.nsp_logits(hidden)  # (B, 2)
    nsp = F.cross_entropy(nsp_logits.float(), batch.nsp_labels)
    chosen = labels != IGNORE
    with torch.no_grad():
        mlm_acc = (logits.argmax(-1)[chosen] == labels[chosen]).float().mean()
        nsp_acc = (nsp_logits.argmax(-1) == batch.nsp_labels).float().mean()
    return {
        "loss": mlm + nsp,
        "mlm_loss": mlm,
        "nsp_loss": nsp,
        "mlm_acc": mlm_acc,
        "nsp_acc": nsp_acc,
    }
