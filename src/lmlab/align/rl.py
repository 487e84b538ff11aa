"""The maths of PPO for language models (RLHF), as small pure functions.

A response of T tokens is an episode: the state before token t is the prompt plus the
tokens before it, the action is token t. The environment pays nothing until the end,
where the reward function (a checker or a reward model) gives one scalar score; every
token also pays ``-kl_coef * KL`` for moving away from the reference model (Ziegler et
al. 2019, "Fine-Tuning Language Models from Human Preferences"; Ouyang et al. 2022,
InstructGPT). PPO (Schulman et al. 2017) then improves the policy with the clipped
surrogate on advantages from GAE (Schulman et al. 2016), while a value head learns the
returns with a clipped value loss (as in OpenAI's lm-human-preferences and TRL).

Every tensor here is response-aligned: ``[B, T]`` with T the longest response, and
``mask`` (``[B, T]``, 1.0 on response tokens, a prefix of each row, 0.0 on padding).

Reference: the formulas follow TRL's ``PPOTrainer`` (``compute_advantages``,
``whiten``, ``loss``) and ``AdaptiveKLController``; ``tests/align/test_ppo.py`` checks each
function against the hand-worked example in its docstring.
"""

from __future__ import annotations

import math
from typing import Literal

import torch

from lmlab.errors import ConfigError

KL_KINDS = ("k1", "abs", "k2", "k3")


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``x`` over the entries where ``mask`` is 1 (a 0-dim tensor)."""
    return (x * mask).sum() / mask.sum().clamp(min=1)


def whiten(x: torch.Tensor, mask: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """``(x - mean) / sqrt(var + eps)`` over the masked entries (unbiased variance, as TRL's
    ``masked_whiten``); padding comes out 0.

        x = [[1, 2, 3, 100]], mask = [[1, 1, 1, 0]]: mean 2, var (1 + 0 + 1) / 2 = 1
        -> [[-1, 0, 1, 0]] (up to eps)
    """
    n = mask.sum()
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    if n > 1:
        var = var * n / (n - 1)  # Bessel's correction
    return (x - mean) * torch.rsqrt(var + eps) * mask


def gae(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation (Schulman et al. 2016), in the truncated form of
    eqs. 11-12 of the PPO paper -> (advantages, returns), both [B, T] and 0 on padding.

    delta_t = r_t + gamma V_{t+1} - V_t and A_t = delta_t + gamma lam A_{t+1}, where V and A
    past a row's last response token are 0 (the episode ends there: no bootstrapping from
    padding). returns = A + V, the value head's targets.

        rewards [[0, 0, 1], [0, 1, 9]], values [[.5, .5, .5], [.5, .5, 7]],
        mask [[1, 1, 1], [1, 1, 0]], gamma 1, lam 0.5
        row 0: A2 = 1 - .5 = .5, A1 = 0 + .5 - .5 + .5 * .5 = .25, A0 = .125
        row 1: A1 = 1 - .5 = .5 (the 7 is padding), A0 = .25
        -> advantages [[.125, .25, .5], [.25, .5, 0]], returns [[.625, .75, 1], [.75, 1, 0]]
    """
    B, T = rewards.shape
    next_value = torch.zeros(B, dtype=values.dtype, device=values.device)
    next_adv = torch.zeros_like(next_value)
    advantages = torch.zeros_like(values)
    for t in reversed(range(T)):
        m = mask[:, t]
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        adv = (delta + gamma * lam * next_adv) * m
        advantages[:, t] = adv
        next_value, next_adv = values[:, t] * m, adv
    returns = (advantages + values) * mask
    return advantages, returns


def policy_loss(
    logp_new: torch.Tensor,
    logp_old: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_eps: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """PPO's clipped surrogate (Schulman et al. 2017, eq. 7), as a loss to minimise ->
    (loss, clip_fraction, approx_kl), each a 0-dim tensor, masked means over tokens.

    ratio = exp(logp_new - logp_old); loss = mean(max(-A ratio, -A clip(ratio, 1 - eps,
    1 + eps))); clip_fraction is the share of tokens where the clipped term is the larger;
    approx_kl = mean((logp_new - logp_old)^2) / 2 (TRL's estimate of KL(old || new)).

        ratio [1.5, .5, 1], A [1, 1, -2], eps .2
        -A ratio [-1.5, -.5, 2], -A clip [-1.2, -.8, 2] -> max [-1.2, -.5, 2]
        -> loss .1, clip_fraction 1/3, approx_kl (ln(1.5)^2 + ln(.5)^2) / 6 = 0.10748
    """
    log_ratio = logp_new - logp_old
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_eps, 1.0 + clip_eps)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    clip_fraction = masked_mean((clipped > unclipped).to(logp_new.dtype), mask)
    approx_kl = 0.5 * masked_mean(log_ratio.detach() ** 2, mask)
    return loss, clip_fraction.detach(), approx_kl


def value_loss(
    values_new: torch.Tensor,
    values_old: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    clip_value: float,
) -> torch.Tensor:
    """The clipped value loss of lm-human-preferences and TRL (0-dim tensor):
    ``0.5 * mean(max((V - R)^2, (V_old + clip(V - V_old, -c, c) - R)^2))``.

        V_old [0, 0], V [1, -.1], R [2, 0], c .2: clipped V [.2, -.1]
        squared errors [1, .01] and [3.24, .01] -> 0.5 * (3.24 + .01) / 2 = 0.8125
    """
    clipped = values_old + torch.clamp(values_new - values_old, -clip_value, clip_value)
    worst = torch.maximum((values_new - returns) ** 2, (clipped - returns) ** 2)
    return 0.5 * masked_mean(worst, mask)


def kl_penalty(
    logp_policy: torch.Tensor,
    logp_ref: torch.Tensor,
    kind: Literal["k1", "abs", "k2", "k3"] = "k1",
) -> torch.Tensor:
    """Per-token estimate of KL(policy || reference) from the sampled tokens' log-probs.

    With d = logp_policy - logp_ref (the tokens come from the policy): k1 = d (unbiased,
    can be negative; Ziegler et al. 2019), abs = |d|, k2 = d^2 / 2, k3 = exp(-d) - 1 + d
    (unbiased and never negative; Schulman, "Approximating KL divergence", 2020).

        d = ln 2: k1 .6931, abs .6931, k2 .2402, k3 .5 - 1 + .6931 = .1931
    """
    d = logp_policy - logp_ref
    if kind == "k1":
        return d
    if kind == "abs":
        return d.abs()
    if kind == "k2":
        return 0.5 * d**2
    if kind == "k3":
        return torch.expm1(-d) + d
    raise ConfigError(f"kl kind {kind!r} is not one of {', '.join(KL_KINDS)}")


def token_rewards(
    scores: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor, kl_coef: float
) -> torch.Tensor:
    """Per-token rewards [B, T]: ``-kl_coef * kl`` at every response token, plus the
    sequence's score [B] at its last response token (Ziegler et al. 2019, InstructGPT).

        scores [1], kl [[.1, .2, .3]], mask [[1, 1, 0]], kl_coef .5
        -> [[-.05, -.1 + 1, 0]] = [[-.05, .9, 0]]
    """
    rewards = -kl_coef * kl * mask
    last = (mask.sum(dim=1).long() - 1).clamp(min=0)  # (B,)
    rows = torch.arange(rewards.shape[0], device=rewards.device)
    rewards[rows, last] += scores.to(rewards.dtype)
    return rewards


def leave_one_out_baseline(scores: torch.Tensor, k: int) -> torch.Tensor:
    """RLOO's baseline [B] (Kool et al. 2019; Ahmadian et al. 2024): rows come in runs of
    ``k`` samples of the same prompt, and each row's baseline is the mean score of the
    other ``k - 1``. ``scores - baseline`` is an unbiased advantage that needs no value
    head, and is 0 for a prompt whose samples all scored the same.

        scores [1, 0, 0, 1, 1, 1], k 3
        prompt 1: sum 1 -> (1 - 1) / 2 = 0, (1 - 0) / 2 = .5, .5
        prompt 2: sum 3 -> (3 - 1) / 2 = 1 each
        -> [0, .5, .5, 1, 1, 1]
    """
    if k < 2 or scores.shape[0] % k:
        raise ConfigError(
            f"a leave-one-out baseline needs k >= 2 samples per prompt and a multiple of k "
            f"rows; got k={k} and {scores.shape[0]} rows"
        )
    groups = scores.reshape(-1, k)
    return ((groups.sum(dim=1, keepdim=True) - groups) / (k - 1)).reshape(-1)


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy (nats) of the softmax of ``logits`` [..., V] -> [...]."""
    logp = torch.log_softmax(logits, dim=-1)
    return -(logp.exp() * logp).sum(dim=-1)


class FixedKLController:
    """A constant KL coefficient (``update`` does nothing)."""

    def __init__(self, kl_coef: float):
        self.value = float(kl_coef)

    def update(self, current_kl: float, n_steps: int) -> None:
        pass

    def state_dict(self) -> dict[str, float]:
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.value = float(state["value"])


class AdaptiveKLController:
    """Proportional control of the KL coefficient toward a target KL (Ziegler et al. 2019,
    section 2.2): e = clip(KL / target - 1, -0.2, 0.2), coef *= 1 + e * n_steps / horizon.

        AdaptiveKLController(0.1, target=6, horizon=10000).update(12, n_steps=1000)
        e = clip(1, -.2, .2) = .2 -> coef = 0.1 * (1 + .2 * .1) = 0.102
    """

    def __init__(self, init_kl_coef: float, target: float, horizon: int):
        self.value = float(init_kl_coef)
        self.target = float(target)
        self.horizon = int(horizon)

    def update(self, current_kl: float, n_steps: int) -> None:
        if not math.isfinite(current_kl):
            return
        error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_steps / self.horizon

    def state_dict(self) -> dict[str, float]:
        return {"value": self.value, "target": self.target, "horizon": self.horizon}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.value = float(state["value"])
        self.target = float(state["target"])
        self.horizon = int(state["horizon"])
