"""Preference losses: Bradley-Terry for reward models, DPO and IPO for policies.

All three turn a pair (chosen y_w, rejected y_l) into a number to minimise, from scores
the caller computed; they are pure functions of tensors (no model, no logging).

- Bradley-Terry (Bradley & Terry 1952; the reward-model loss of Ouyang et al. 2022, eq. 1):
  P(y_w > y_l) = sigmoid(r_w - r_l), so the loss is -log sigmoid(r_w - r_l).
- DPO (Rafailov et al. 2023, eq. 7): the policy's implicit reward of a reply is
  beta * log(pi(y|x) / pi_ref(y|x)), and the loss is Bradley-Terry on those rewards:
  -log sigmoid(beta * [(log pi(y_w) - log pi_ref(y_w)) - (log pi(y_l) - log pi_ref(y_l))]).
  ``label_smoothing`` eps is the conservative DPO of Mitchell (2023): the label is taken
  to be wrong with probability eps, -(1 - eps) log sigmoid(beta h) - eps log sigmoid(-beta h).
- IPO (Azar et al. 2023, eq. 17): a squared loss that pulls the log-ratio difference h to
  1 / (2 beta) instead of pushing it to infinity: (h - 1 / (2 beta))^2.

Length convention (as TRL 1.16 does): DPO uses *summed* log-probabilities of the reply
tokens; IPO uses *per-token averaged* ones (TRL divides each score by its number of reply
tokens, a choice its authors confirmed with the IPO authors). ``dpo_loss`` takes whatever
it is given; ``lmlab.align.dpo`` passes averages when ``loss_type="ipo"``.

Parity: ``tests/align/test_losses.py::test_dpo_loss_matches_trl`` and
``test_ipo_loss_matches_trl`` feed the same log-probabilities to TRL's DPOTrainer loss.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lmlab.errors import ConfigError

LOSS_TYPES = ("sigmoid", "ipo")


def bradley_terry_loss(
    chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean -log sigmoid(r_c - r_r) over pairs, and the pairwise accuracy (r_c > r_r).

    chosen_rewards, rejected_rewards: [B] float. Hand-worked::

        r_c = [2.0, 0.0], r_r = [0.0, 0.0]
        -log sigmoid(2) = 0.1269, -log sigmoid(0) = log 2 = 0.6931
        loss = (0.1269 + 0.6931) / 2 = 0.4100, accuracy = 1 / 2 (a tie is not a win)
    """
    margin = chosen_rewards - rejected_rewards  # (B,)
    loss = -F.logsigmoid(margin).mean()
    accuracy = (margin > 0).float().mean()
    return loss, accuracy


def dpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    beta: float,
    label_smoothing: float = 0.0,
    loss_type: str = "sigmoid",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair DPO or IPO losses [B] and the implicit rewards of chosen and rejected [B].

    Every input is [B] float: log pi(y|x) of the policy and of the reference, summed over
    the reply tokens (averaged per token for IPO, see the module docstring). The rewards
    beta * (log pi - log pi_ref) are detached (they are for logging).

    Hand-worked (sigmoid, beta = 0.5)::

        policy (chosen, rejected) = (-1, -3), reference = (-2, -2)
        h = (-1 - -2) - (-3 - -2) = 1 - (-1) = 2
        loss = -log sigmoid(0.5 * 2) = -log sigmoid(1) = 0.3133
        rewards: chosen 0.5 * 1 = 0.5, rejected 0.5 * -1 = -0.5
        IPO with the same numbers: (2 - 1 / (2 * 0.5))^2 = (2 - 1)^2 = 1

    A policy equal to its reference has h = 0: the DPO loss is log 2 = 0.6931 per pair.
    """
    if loss_type not in LOSS_TYPES:
        raise ConfigError(f"loss_type={loss_type!r} is invalid; valid: {', '.join(LOSS_TYPES)}")
    if not beta > 0:
        raise ConfigError(f"beta={beta} is invalid: must be > 0")
    if not 0.0 <= label_smoothing < 0.5:
        raise ConfigError(f"label_smoothing={label_smoothing} is invalid: must be in [0, 0.5)")
    chosen_logratios = policy_chosen_logps - ref_chosen_logps  # (B,)
    rejected_logratios = policy_rejected_logps - ref_rejected_logps  # (B,)
    h = chosen_logratios - rejected_logratios  # (B,) the "logits" of TRL
    if loss_type == "sigmoid":  # eq. 7 of the DPO paper (+ conservative label smoothing)
        losses = -(1 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(
            -beta * h
        )
    else:  # eq. 17 of the IPO paper, tau = beta
        losses = (h - 1 / (2 * beta)) ** 2
    chosen_rewards = beta * chosen_logratios.detach()
    rejected_rewards = beta * rejected_logratios.detach()
    return losses, chosen_rewards, rejected_rewards


class PairStats:
    """Running sums over batches of (chosen, rejected) rewards, kept apart for training
    and evaluation batches, for the trainer's log (a loss's ``metrics`` method).

    ``add`` stays on the device (no host sync per step); ``means`` returns the mean
    rewards, their margin and the share of pairs ranked right since its last call.
    """

    def __init__(self, accuracy_name: str = "accuracy"):
        self.accuracy_name = accuracy_name
        self._sums: dict[bool, torch.Tensor | None] = {True: None, False: None}

    def add(self, training: bool, chosen: torch.Tensor, rejected: torch.Tensor) -> None:
        c, r = chosen.detach(), rejected.detach()
        sums = torch.stack([c.sum(), r.sum(), (c > r).sum().float(), c.new_tensor(c.numel())])
        previous = self._sums[training]
        self._sums[training] = sums if previous is None else previous + sums

    def means(self, training: bool) -> dict[str, float]:
        sums, self._sums[training] = self._sums[training], None
        if sums is None:
            return {}
        chosen, rejected, wins, n = sums.tolist()
        return {
            "rewards_chosen": chosen / n,
            "rewards_rejected": rejected / n,
            "margin": (chosen - rejected) / n,
            self.accuracy_name: wins / n,
        }
