"""Scalar heads on a language model: read the final hidden state beside the logits.

A reward model (one score per sequence) and PPO's value head (one score per position) are
a linear layer on the decoder's last hidden state, the input of its ``lm_head``. Every
lmlab decoder family ends in an ``lm_head``, so a forward pre-hook there reads that state
without changing the model: one forward pass gives both the logits and the hidden states.

    >>> logits, hidden = logits_and_hidden(model, ids)     # [B, T, V], [B, T, D]
    >>> values = value_head(hidden).squeeze(-1)            # [B, T]
"""

from __future__ import annotations

import torch
from torch import nn

from lmlab.errors import ConfigError


def hidden_size(model: nn.Module) -> int:
    """D, the width of the hidden state that feeds ``model.lm_head``."""
    head = getattr(model, "lm_head", None)
    size = getattr(head, "in_features", None)
    if size is None:
        raise ConfigError(
            f"a scalar head needs a decoder ending in a linear lm_head; "
            f"{type(model).__name__} has none (use a transformer, MLP or recurrent model)"
        )
    return int(size)


def logits_and_hidden(
    model: nn.Module, ids: torch.Tensor, **forward_kwargs
) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits [B, T, V] and the final hidden states [B, T, D] of one forward pass.

    ``forward_kwargs`` go to the model (e.g. ``mask=`` for left padding).
    """
    hidden_size(model)  # a clear error for families without an lm_head
    seen: list[torch.Tensor] = []
    handle = model.lm_head.register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    try:
        logits = model(ids, **forward_kwargs)
    finally:
        handle.remove()
    return logits, seen[-1]
