"""What the model is fed while training: teacher forcing, free-running, scheduled sampling.

Teacher forcing (the default) feeds the true previous tokens at every position. At
generation time the model is fed its *own* previous outputs instead, so the two differ
("exposure bias"). Scheduled sampling (Bengio et al. 2015) closes the gap gradually:
at training step i each input token after the first is, with probability 1 - eps_i, replaced
by a token sampled from the model's own prediction for that position. The targets stay the
true next tokens. eps_i, the probability of keeping the true token, decays with one of the
paper's three schedules (section 2.4):

    linear:           eps_i = max(eps_min, k - c * i)
    exponential:      eps_i = k ** i                    (k < 1)
    inverse sigmoid:  eps_i = k / (k + exp(i / k))      (k >= 1)

Free-running is eps = 0 throughout: every input after the first is the model's own sample.

The model's predictions come from a first, gradient-free pass over the true inputs, so one
mixing step works for every family through the one interface (the parallel approximation
of Mihaylova & Martins 2019 for transformers; for a recurrent model the paper feeds samples
one step at a time, which this approximates by sampling each position given the true
prefix). Sampling draws from torch's global RNG, whose state checkpoints save, so resumed
runs stay exact.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from lmlab.seeds import seeded


def keep_probability(
    step: int, schedule: str, k: float, c: float = 0.0, eps_min: float = 0.0
) -> float:
    """eps at ``step``: the probability of feeding the true token (Bengio et al. 2015).

    >>> keep_probability(0, "linear", k=1.0, c=0.001), keep_probability(600, "linear", 1.0, 0.001)
    (1.0, 0.4)
    >>> round(keep_probability(10, "exponential", k=0.9), 4)
    0.3487
    >>> round(keep_probability(100, "inverse_sigmoid", k=50.0), 4)
    0.8712
    """
    if schedule == "teacher_forcing":
        return 1.0
    if schedule == "free_running":
        return 0.0
    if schedule == "linear":
        return max(eps_min, min(1.0, k - c * step))
    if schedule == "exponential":
        return k**step
    if schedule == "inverse_sigmoid":
        return k / (k + math.exp(min(step / k, 700.0)))  # exp overflows past ~709
    raise ValueError(f"unknown schedule {schedule!r}")


@torch.no_grad()
def mix_inputs(model: nn.Module, x: torch.Tensor, keep: float) -> torch.Tensor:
    """Inputs ``x`` [B, T] with each token after the first replaced, with probability
    1 - ``keep``, by a sample from the model's prediction for that position -> [B, T].

    Position t's prediction comes from the logits at t - 1 (given the true x[:, :t]).
    """
    if keep >= 1.0:
        return x
    logits = model(x[:, :-1]).float()  # (B, T-1, V): predictions for positions 1..T-1
    probs = logits.softmax(-1).flatten(0, 1)  # (B*(T-1), V)
    sampled = torch.multinomial(probs, 1).view(x.shape[0], -1)  # (B, T-1)
    use_model = torch.rand(sampled.shape, device=x.device) >= keep
    mixed = x.clone()
    mixed[:, 1:] = torch.where(use_model, sampled, x[:, 1:])
    return mixed


@torch.no_grad()
def loss_fed_own_samples(
    model: nn.Module, windows: torch.Tensor, keeps: Sequence[float], draws: int = 3, seed: int = 0
) -> list[float]:
    """Exposure bias, measured: for each share ``keep`` of true inputs, the mean next-token
    loss (nats) on ``windows`` [B, T + 1] when every other input is the model's own sample
    (``mix_inputs``), averaged over ``draws`` draws of the samples -> one loss per keep.

    The targets are always the true next tokens; keep = 1 is the ordinary validation loss.
    The draws are seeded (``seed``, ``seed + 1``, ...) without touching the global RNG.
    """
    x, y = windows[:, :-1], windows[:, 1:]
    training = model.training
    model.eval()
    losses = []
    try:
        for keep in keeps:
            total = 0.0
            for draw in range(draws):
                with seeded(seed + draw):
                    logits = model(mix_inputs(model, x, keep)).float()
                total += F.cross_entropy(logits.flatten(0, 1), y.flatten()).item()
            losses.append(total / draws)
    finally:
        model.train(training)
    return losses
