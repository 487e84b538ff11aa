"""Two experiments that take a transformer apart, to see what each part is for.

Positions (``compare_positions``). Attention is a weighted sum over a *set* of tokens:
without positions, a transformer cannot tell "a b" from "b a" except through the causal
mask. The task makes order the whole point: a row is n random data tokens, then a query
token ``Q_k``, and the model must answer the k-th data token::

    x_1 x_2 ... x_n  Q_k  ->  x_k          (n = 16 data tokens, k drawn uniformly)

Four models, identical but for ``pos`` (``learned``, ``sinusoidal``, ``rope``, ``none``),
are trained with the same seed, data and steps; the answer's accuracy on held-out rows is
the measure (chance: one over the number of data tokens). A causal model without positions
can still infer *some* order (a token sees only those before it), but recovering the
index of every token is far beyond a small model: it stays near chance.

Residual connections and norms (``compare_depth``). A deep, thin transformer (16 blocks
of width 32 by default) is trained on characters of Tiny Shakespeare four times: as built,
without residual connections (He et al. 2016), without layer norm (Ba et al. 2016), and
without both. ``layer_grad_norms`` records the gradient norm of each block's parameters
at initialisation and during training: without residuals the gradient must pass through
every block in turn and shrinks layer after layer (vanishing gradients, as in lesson 2's
deep RNN); the residual stream gives it a path around each block.

Both loops are plain AdamW on freshly drawn batches (no run folder: a minute of CPU, no
checkpoint worth resuming); ``lmlab positions`` and ``lmlab residual`` draw the figures.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from lmlab.errors import ConfigError
from lmlab.models import build_model
from lmlab.models.transformer import Transformer, sinusoidal_table

POSITION_KINDS = ("learned", "sinusoidal", "rope", "none")


# ----------------------------------------------------------------------------- positions


@dataclass(frozen=True)
class PositionsConfig:
    kinds: tuple[str, ...] = POSITION_KINDS
    """The position schemes to compare (learned, sinusoidal, rope, none)."""
    n_tokens: int = 16
    """Data tokens per row, and different data token values (chance = 1 / n_tokens)."""
    steps: int = 1000
    """Training steps per model."""
    batch_size: int = 64
    """Rows per step."""
    lr: float = 1e-3
    """AdamW learning rate (at 3e-3 the sinusoidal model stays at chance for 1500 steps)."""
    d_model: int = 64
    """Width of each model."""
    n_layers: int = 2
    """Blocks of each model."""
    eval_every: int = 50
    """Steps between accuracy measurements on the held-out rows."""
    eval_rows: int = 1000
    """Held-out rows (drawn with another seed than the training rows)."""
    seed: int = 0
    """Seed of the weights and the data."""

    def __post_init__(self):
        for kind in self.kinds:
            if kind not in POSITION_KINDS:
                raise ConfigError(
                    f"PositionsConfig.kinds: {kind!r} is not a position scheme; choose from "
                    f"{', '.join(POSITION_KINDS)}"
                )
        _positive(self, ("n_tokens", "steps", "batch_size", "d_model", "n_layers"))
        _positive(self, ("eval_every", "eval_rows"))
        if not self.kinds:
            raise ConfigError("PositionsConfig.kinds is empty; give at least one, e.g. learned")
        if self.n_tokens < 2:
            raise ConfigError(f"PositionsConfig.n_tokens={self.n_tokens} is invalid: must be >= 2")


def kth_token_rows(n_tokens: int, rows: int, generator: torch.Generator) -> torch.Tensor:
    """Rows [rows, n + 2] int64 of the k-th token task: n data tokens (ids 0..n-1), the
    query Q_k (id n + k - 1, k = 1..n), then the answer x_k.

    Below, data 2 0 2, query id 3 = Q_1, answer the first data token, 2:

    >>> kth_token_rows(3, 1, torch.Generator().manual_seed(0)).tolist()
    [[2, 0, 2, 3, 2]]
    """
    data = torch.randint(0, n_tokens, (rows, n_tokens), generator=generator)  # (R, n)
    k = torch.randint(0, n_tokens, (rows, 1), generator=generator)  # (R, 1) 0-based
    return torch.cat([data, n_tokens + k, data.gather(1, k)], dim=1)


def position_model(kind: str, config: PositionsConfig) -> Transformer:
    """The model of ``compare_positions`` with positions ``kind`` (seeded by the caller)."""
    n = config.n_tokens
    return build_model(
        dict(
            family="transformer",
            vocab_size=2 * n,  # data tokens and query tokens
            d_model=config.d_model,
            n_layers=config.n_layers,
            n_heads=4,
            d_ff=4 * config.d_model,
            max_seq_len=n + 1,
            pos=kind,
        )
    )


def answer_logits(model: nn.Module, rows: torch.Tensor) -> torch.Tensor:
    """Logits [R, V] of the answer: the prediction after the query, from rows [R, n + 2]."""
    return model(rows[:, :-1])[:, -1]


def compare_positions(config: PositionsConfig, progress: bool | None = None) -> dict[str, Any]:
    """Train one model per position scheme on the k-th token task -> a report dict:
    ``curves[kind]``: [(step, held-out accuracy, training loss)], ``final[kind]``: the last
    accuracy, ``chance``, and the tables to draw: ``sinusoidal`` [n+1, D] and
    ``learned`` [n+1, D] (the trained model's position embeddings), as lists."""
    held_out = kth_token_rows(
        config.n_tokens, config.eval_rows, torch.Generator().manual_seed(config.seed + 1)
    )
    report: dict[str, Any] = {"curves": {}, "final": {}, "chance": 1 / config.n_tokens}
    for kind in config.kinds:
        torch.manual_seed(config.seed)  # the same initial weights wherever the shapes agree
        model = position_model(kind, config)
        data = torch.Generator().manual_seed(config.seed)  # the same rows for every kind
        opt = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=0.0)
        curve = []
        bar = tqdm(range(1, config.steps + 1), desc=f"pos={kind}", disable=_hidden(progress))
        for step in bar:
            rows = kth_token_rows(config.n_tokens, config.batch_size, data)
            loss = F.cross_entropy(answer_logits(model, rows), rows[:, -1])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if step % config.eval_every == 0 or step == config.steps:
                accuracy = _accuracy(model, held_out)
                curve.append((step, accuracy, loss.item()))
                bar.set_postfix(accuracy=f"{accuracy:.3f}")
        report["curves"][kind] = curve
        report["final"][kind] = curve[-1][1]
        if kind == "learned":
            report["learned"] = model.pos_emb.weight.detach().tolist()
    positions = torch.arange(config.n_tokens + 1)[None]
    report["sinusoidal"] = sinusoidal_table(positions, config.d_model)[0].tolist()
    return report


@torch.no_grad()
def _accuracy(model: nn.Module, rows: torch.Tensor) -> float:
    model.eval()
    right = (answer_logits(model, rows).argmax(-1) == rows[:, -1]).float().mean().item()
    model.train()
    return right


# ----------------------------------------------------------------------------- depth


VARIANTS = {
    "residual + layernorm": dict(residual=True, norm="layernorm"),
    "no residual": dict(residual=False, norm="layernorm"),
    "no layernorm": dict(residual=True, norm="none"),
    "neither": dict(residual=False, norm="none"),
}
"""The four models of ``compare_depth``: name -> TransformerConfig fields."""


@dataclass(frozen=True)
class DepthConfig:
    n_layers: int = 16
    """Blocks of the deep, thin model."""
    d_model: int = 32
    """Its width."""
    steps: int = 300
    """Training steps per variant."""
    batch_size: int = 16
    """Rows per step."""
    seq_len: int = 64
    """Characters per row."""
    lr: float = 1e-3
    """AdamW learning rate."""
    record_every: int = 25
    """Steps between records of the per-layer gradient norms (and step 0, at init)."""
    seed: int = 0
    """Seed of the weights and the batches."""

    def __post_init__(self):
        _positive(self, ("n_layers", "d_model", "steps", "batch_size", "seq_len", "record_every"))
        if self.d_model % 4:
            raise ConfigError(f"DepthConfig.d_model={self.d_model} is invalid: a multiple of 4")


def layer_grad_norms(model: Transformer) -> list[float]:
    """The gradient norm of each block's parameters, ||dL/dtheta_i||_2 over every parameter
    of block i (after ``loss.backward()``), first block first: [n_layers] floats."""
    norms = []
    for block in model.blocks:
        squares = [p.grad.double().pow(2).sum() for p in block.parameters() if p.grad is not None]
        norms.append(math.sqrt(float(torch.stack(squares).sum())) if squares else 0.0)
    return norms


def depth_model(variant: dict[str, Any], config: DepthConfig, vocab_size: int) -> Transformer:
    """The deep, thin model of ``compare_depth`` with ``variant``'s switches."""
    return build_model(
        dict(
            family="transformer",
            vocab_size=vocab_size,
            d_model=config.d_model,
            n_layers=config.n_layers,
            n_heads=4,
            d_ff=4 * config.d_model,
            max_seq_len=config.seq_len,
            **variant,
        )
    )


def compare_depth(
    config: DepthConfig, ids: torch.Tensor, vocab_size: int, progress: bool | None = None
) -> dict[str, Any]:
    """Train each of ``VARIANTS`` on windows of ``ids`` [N] int64 -> a report dict:
    ``losses[name]``: training loss per step, ``grad_norms[name]``: [(step, [norm per
    block])] with step 0 the gradient at initialisation (before any update)."""
    if ids.numel() <= config.seq_len + 1:
        raise ConfigError(f"compare_depth needs more than {config.seq_len + 1} token ids")
    report: dict[str, Any] = {"losses": {}, "grad_norms": {}}
    for name, variant in VARIANTS.items():
        torch.manual_seed(config.seed)
        model = depth_model(variant, config, vocab_size)
        batches = torch.Generator().manual_seed(config.seed)  # the same batches for all
        opt = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=0.0)
        losses, norms = [], []
        bar = tqdm(range(config.steps + 1), desc=name, disable=_hidden(progress))
        for step in bar:
            last = ids.numel() - config.seq_len - 1
            starts = torch.randint(0, last, (config.batch_size,), generator=batches)
            window = torch.stack([ids[s : s + config.seq_len + 1] for s in starts.tolist()])
            logits = model(window[:, :-1])  # (B, T, V)
            loss = F.cross_entropy(logits.flatten(0, 1), window[:, 1:].flatten())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if step % config.record_every == 0 or step == config.steps:
                norms.append((step, layer_grad_norms(model)))
            if step == config.steps:  # the last batch is only measured
                break
            opt.step()
            losses.append(loss.item())
            bar.set_postfix(loss=f"{loss.item():.3f}")
        report["losses"][name] = losses
        report["grad_norms"][name] = norms
    return report


# ----------------------------------------------------------------------------- helpers


def _positive(config, fields: tuple[str, ...]) -> None:
    for field in fields:
        value = getattr(config, field)
        if not isinstance(value, int) or value < 1:
            raise ConfigError(
                f"{type(config).__name__}.{field}={value!r} is invalid: must be a positive integer"
            )


def _hidden(progress: bool | None) -> bool | None:
    """tqdm's ``disable``: None (auto) hides the bar when stderr is not a terminal."""
    return None if progress is None else not progress
