"""Bottleneck adapters (Houlsby et al. 2019, "Parameter-Efficient Transfer Learning for NLP").

A small residual module is inserted after each sublayer of every block, on the sublayer's
output before it joins the residual stream (Fig. 2 of the paper):

    adapter(h) = h + W_up act(W_down h + b_down) + b_up      W_down: [m, D], W_up: [D, m]

with a bottleneck m << D. W_up starts at zero, so a fresh adapter is the identity and the
adapted model computes exactly what the base model does. The base model is frozen; the
adapters train, and, as in the paper (section 2.1), so do the norms unless
``train_norms=False``.

Where: lmlab wraps the last linear layer of each sublayer, ``attn.o_proj`` and
``mlp.down_proj``, whose outputs are the attention and MLP outputs. Wrapping (rather than a
forward hook on ``hook_attn_out``) keeps the adapter visible in ``print(model)``, in
``state_dict`` and to hook-clearing code, the same way LoRA does; the hook points still see
the adapted outputs.

    >>> model = build_model({**get_preset("gpt-char-tiny"), "vocab_size": 65})
    >>> apply_adapters(model, bottleneck=16).blocks[0].attn.o_proj
    WithAdapter(
      (base): Linear(in_features=192, out_features=192, bias=True)
      (adapter): Adapter(
        d_model=192, bottleneck=16
        (down): Linear(in_features=192, out_features=16, bias=True)
        (up): Linear(in_features=16, out_features=192, bias=True)
      )
    )
    >>> describe_trainable(model)        # 8 adapters of 6,352 and 9 LayerNorms of 384
    'trainable 54,272 of 1,867,712 parameters (2.91%)'

Tests: tests/finetune/test_adapters.py (identity at init, what trains, a training step).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from lmlab.errors import ConfigError

_ACTIVATIONS = {"gelu": F.gelu, "relu": F.relu, "tanh": torch.tanh}


class Adapter(nn.Module):
    """h [.., D] -> h + up(act(down(h))) [.., D]; identity at initialisation (up = 0)."""

    def __init__(self, d_model: int, bottleneck: int, activation: str = "gelu"):
        super().__init__()
        self.down = nn.Linear(d_model, bottleneck)
        self.up = nn.Linear(bottleneck, d_model)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)
        self.activation = activation

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + self.up(_ACTIVATIONS[self.activation](self.down(h)))

    def extra_repr(self) -> str:
        return f"d_model={self.up.out_features}, bottleneck={self.down.out_features}"


class WithAdapter(nn.Module):
    """adapter(base(x)): a frozen sublayer output projection followed by an Adapter."""

    def __init__(self, base: nn.Module, adapter: Adapter):
        super().__init__()
        self.base = base
        self.adapter = adapter

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.adapter(self.base(x))


def apply_adapters(
    model: nn.Module,
    bottleneck: int = 64,
    activation: Literal["gelu", "relu", "tanh"] = "gelu",
    train_norms: bool = True,
) -> nn.Module:
    """Freeze ``model`` and insert an Adapter after the attention and MLP of every block.

    In place; returns ``model``. Each adapter has 2 * D * m + D + m parameters (D =
    d_model, m = ``bottleneck``). Adapters take the dtype and device of the layer they
    follow.
    """
    if not isinstance(bottleneck, int) or bottleneck < 1:
        raise ConfigError(f"bottleneck={bottleneck!r} is invalid: must be a positive integer")
    if activation not in _ACTIVATIONS:
        raise ConfigError(
            f"activation={activation!r} is invalid: choose one of {', '.join(_ACTIVATIONS)}"
        )
    blocks = getattr(model, "blocks", None)
    if blocks is None or not all(hasattr(b, "attn") and hasattr(b, "mlp") for b in blocks):
        raise ConfigError(
            f"{type(model).__name__} has no transformer blocks (blocks.N.attn, blocks.N.mlp) "
            "to put adapters in"
        )
    if any(isinstance(m, WithAdapter) for m in model.modules()):
        raise ConfigError("adapters are already applied to this model")
    model.requires_grad_(False)
    for block in blocks:
        for sublayer, name in ((block.attn, "o_proj"), (block.mlp, "down_proj")):
            base = getattr(sublayer, name)
            weight = base.weight
            adapter = Adapter(base.out_features, bottleneck, activation)
            adapter.to(device=weight.device, dtype=weight.dtype)
            setattr(sublayer, name, WithAdapter(base, adapter))
    if train_norms:
        for module in model.modules():
            if "Norm" in type(module).__name__:  # LayerNorm, RMSNorm
                module.requires_grad_(True)
    return model
