"""Optimizers and the learning-rate schedule.

- Parameter groups: weight decay only where it helps. Decaying a bias, a norm's gain or an
  embedding row pulls it towards zero for no benefit (an embedding row that a batch does
  not use still decays), so by default these get none, as in nanoGPT and most LLM recipes.
- AdamW (Loshchilov & Hutter 2019): weight decay decoupled from the adaptive update,
  ``p -= lr * (m_hat / (sqrt(v_hat) + eps) + wd * p)``. SGD with momentum adds
  ``wd * p`` to the gradient instead (plain L2).
- Schedule: linear warm-up then cosine decay to ``min_lr`` (Loshchilov & Hutter 2017,
  without restarts), a pure function of the step so that a resumed run needs no scheduler
  state beyond its step counter.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from lmlab.train.config import TrainConfig


def lr_at(step: int, config: TrainConfig) -> float:
    """Learning rate of the update that takes the model from ``step`` to ``step + 1``.

    With lr=1, min_lr=0.1, warmup_steps=2, max_steps=6, cosine::

        step:  0    1    2    3       4     5       6
        lr:    0.5  1.0  1.0  0.8682  0.55  0.2318  0.1

    Warm-up: ``lr * (step + 1) / warmup_steps`` (the first update is not wasted at lr 0).
    Cosine: ``min_lr + (lr - min_lr) * (1 + cos(pi * t)) / 2`` with
    ``t = (step - warmup_steps) / (max_steps - warmup_steps)``, clamped to [0, 1].
    """
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    if config.lr_schedule == "constant":
        return config.lr
    t = (step - config.warmup_steps) / max(1, config.max_steps - config.warmup_steps)
    t = min(max(t, 0.0), 1.0)
    return config.min_lr + (config.lr - config.min_lr) * 0.5 * (1.0 + math.cos(math.pi * t))


def parameter_kinds(model: nn.Module) -> dict[str, set[str]]:
    """The kinds ("bias", "norm", "embedding", "weight") of each trainable parameter.

    A parameter shared by several modules has the kinds of all of them (a tied embedding
    is also the output layer's weight); names are those of ``model.named_parameters()``.
    Norms are recognised as modules whose class name contains "Norm" (LayerNorm, RMSNorm,
    GroupNorm, BatchNorm...).
    """
    kinds_by_id: dict[int, set[str]] = {}
    for module in model.modules():
        is_norm = "Norm" in type(module).__name__
        is_embedding = isinstance(module, nn.Embedding)
        for name, param in module.named_parameters(recurse=False):
            kinds = kinds_by_id.setdefault(id(param), set())
            if name == "bias" or name.endswith("_bias"):
                kinds.add("bias")
            elif is_norm:
                kinds.add("norm")
            elif is_embedding:
                kinds.add("embedding")
            else:
                kinds.add("weight")
    return {name: kinds_by_id[id(p)] for name, p in model.named_parameters() if p.requires_grad}


def param_groups(model: nn.Module, config: TrainConfig) -> list[dict]:
    """Two optimizer groups: with weight decay, and without (kinds in ``config.no_decay``).

    Empty groups are left out. Each group carries a ``"name"`` for the logs.
    """
    params = dict(model.named_parameters())
    decay, no_decay = [], []
    for name, kinds in parameter_kinds(model).items():
        (no_decay if kinds & set(config.no_decay) else decay).append(params[name])
    groups = [
        {"name": "decay", "params": decay, "weight_decay": config.weight_decay},
        {"name": "no_decay", "params": no_decay, "weight_decay": 0.0},
    ]
    return [g for g in groups if g["params"]]


def build_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    """AdamW or SGD over ``param_groups``; the fused kernels where the device has them."""
    groups = param_groups(model, config)
    if config.optimizer == "adamw":
        make = lambda **fast: torch.optim.AdamW(groups, lr=config.lr, betas=config.betas, **fast)
    else:
        make = lambda **fast: torch.optim.SGD(
            groups, lr=config.lr, momentum=config.momentum, **fast
        )
    try:
        # One kernel per group instead of a Python loop over parameters; CPU and CUDA have it.
        return make(fused=True)
    except (RuntimeError, ValueError):
        return make()
