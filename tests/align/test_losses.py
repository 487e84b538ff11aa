"""Preference losses: hand-worked examples and parity with TRL's DPOTrainer."""

import math
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch
from trl.trainer.dpo_trainer import DPOTrainer

from lmlab.align.losses import bradley_terry_loss, dpo_loss
from lmlab.errors import ConfigError


def test_bradley_terry_hand_worked():
    """r_c = [2, 0], r_r = [0, 0]: loss = (-log sigmoid(2) + log 2) / 2 = (0.1269 + 0.6931) / 2,
    accuracy 1/2 (the tie does not count as a win)."""
    loss, acc = bradley_terry_loss(torch.tensor([2.0, 0.0]), torch.tensor([0.0, 0.0]))
    expected = (math.log(1 + math.exp(-2)) + math.log(2)) / 2
    assert loss.item() == pytest.approx(expected, abs=1e-6)
    assert expected == pytest.approx(0.4100, abs=1e-4)
    assert acc.item() == 0.5


def test_dpo_and_ipo_hand_worked():
    """policy (-1, -3), reference (-2, -2), beta 0.5: h = 2; DPO -log sigmoid(1) = 0.3133,
    rewards (0.5, -0.5); IPO (2 - 1)^2 = 1; label smoothing 0.1:
    0.9 * 0.3133 + 0.1 * -log sigmoid(-1) (= 1.3133) = 0.4133."""
    args = [torch.tensor([-1.0]), torch.tensor([-3.0]), torch.tensor([-2.0]), torch.tensor([-2.0])]
    losses, rc, rr = dpo_loss(*args, beta=0.5)
    assert losses.item() == pytest.approx(math.log(1 + math.exp(-1)), abs=1e-6)
    assert losses.item() == pytest.approx(0.3133, abs=1e-4)
    assert (rc.item(), rr.item()) == (0.5, -0.5)
    ipo, _, _ = dpo_loss(*args, beta=0.5, loss_type="ipo")
    assert ipo.item() == pytest.approx(1.0)
    smooth, _, _ = dpo_loss(*args, beta=0.5, label_smoothing=0.1)
    assert smooth.item() == pytest.approx(0.4133, abs=1e-4)


def test_policy_equal_to_reference_gives_log_2():
    logps = torch.randn(5)
    losses, rc, rr = dpo_loss(logps, logps - 1, logps, logps - 1, beta=0.1)
    torch.testing.assert_close(losses, torch.full((5,), math.log(2)))
    assert torch.all(rc == 0) and torch.all(rr == 0)


def test_bad_settings_are_config_errors():
    x = torch.zeros(2)
    with pytest.raises(ConfigError, match="loss_type='hinge'.*sigmoid, ipo"):
        dpo_loss(x, x, x, x, beta=0.1, loss_type="hinge")
    with pytest.raises(ConfigError, match="beta=0"):
        dpo_loss(x, x, x, x, beta=0)
    with pytest.raises(ConfigError, match="label_smoothing=0.5"):
        dpo_loss(x, x, x, x, beta=0.1, label_smoothing=0.5)


# ----------------------------------------------------------------------------- TRL parity


def _trl_dpo(per_token_logps, completion_mask, ref_chosen, ref_rejected, beta, loss_type):
    """TRL 1.16's DPO loss: ``DPOTrainer._compute_loss`` is a method that also runs the
    model, so it is called unbound with a minimal stand-in ``self`` carrying the attributes
    it reads, precomputed reference log-probs, and a stand-in model whose output carries the
    per-token log-probabilities (zero outside the completion, as TRL's fused head gives).
    Returns (mean loss, the trainer's logged metrics)."""
    B2, T = completion_mask.shape
    fake_out = SimpleNamespace(
        log_probs=per_token_logps * completion_mask[:, 1:],
        entropy=torch.zeros(B2, T - 1),
        mean_logits=torch.zeros(B2, T - 1),
        is_top1=torch.zeros(B2, T - 1, dtype=torch.bool),
    )
    identity = SimpleNamespace(
        device=torch.device("cpu"), gather_for_metrics=lambda x: x, gather=lambda x: x
    )
    stand_in = SimpleNamespace(
        model=SimpleNamespace(training=True),
        accelerator=identity,
        aux_loss_enabled=False,
        ld_alpha=None,
        precompute_ref_logps=True,
        f_divergence_type="reverse_kl",
        loss_types=[loss_type],
        loss_weights=[1.0],
        beta=beta,
        label_smoothing=0.0,
        use_weighting=False,
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
        _total_train_tokens=0,
        _tp_size=1,
    )
    inputs = {
        "input_ids": torch.zeros(B2, T, dtype=torch.long),
        "attention_mask": torch.ones(B2, T, dtype=torch.long),
        "completion_mask": completion_mask,
        "ref_chosen_logps": ref_chosen,
        "ref_rejected_logps": ref_rejected,
    }
    loss = DPOTrainer._compute_loss(stand_in, lambda **kw: fake_out, inputs, False)
    return loss, stand_in._metrics["train"]


def _random_batch(B=6, T=9, seed=0):
    g = torch.Generator().manual_seed(seed)
    per_token = -torch.rand(2 * B, T - 1, generator=g) * 3  # (2B, T-1) log-probs < 0
    lengths = torch.randint(1, T - 2, (2 * B,), generator=g)  # reply tokens per row
    completion = torch.zeros(2 * B, T, dtype=torch.long)
    for row, n in enumerate(lengths.tolist()):
        completion[row, T - n :] = 1  # the reply is the last n tokens
    ref = -torch.rand(2 * B, generator=g) * 10
    return per_token, completion, ref


def test_dpo_loss_matches_trl():
    """Same random log-probabilities into TRL's sigmoid loss and ours: float32 arithmetic
    in a different order, so atol 1e-6."""
    B, beta = 6, 0.3
    per_token, completion, ref = _random_batch(B)
    trl_loss, metrics = _trl_dpo(per_token, completion, ref[:B], ref[B:], beta, "sigmoid")
    logps = (per_token * completion[:, 1:]).sum(1)  # (2B,) summed over the reply
    losses, rc, rr = dpo_loss(logps[:B], logps[B:], ref[:B], ref[B:], beta)
    torch.testing.assert_close(losses.mean(), trl_loss, atol=1e-6, rtol=1e-6)
    assert rc.mean().item() == pytest.approx(metrics["rewards/chosen"][0], abs=1e-6)
    assert rr.mean().item() == pytest.approx(metrics["rewards/rejected"][0], abs=1e-6)
    assert (rc > rr).float().mean().item() == metrics["rewards/accuracies"][0]


def test_ipo_loss_matches_trl():
    """IPO: TRL divides each (summed) log-ratio by the reply's token count; ours is given
    per-token averaged log-probabilities (policy and reference alike), which is the same
    quantity. Squares of float32 differences, so atol 1e-5."""
    B, beta = 6, 0.3
    per_token, completion, ref = _random_batch(B, seed=1)
    trl_loss, _ = _trl_dpo(per_token, completion, ref[:B], ref[B:], beta, "ipo")
    n = completion.sum(1).float()  # (2B,) reply tokens
    logps = (per_token * completion[:, 1:]).sum(1) / n
    ref_avg = ref / n
    losses, _, _ = dpo_loss(logps[:B], logps[B:], ref_avg[:B], ref_avg[B:], beta, loss_type="ipo")
    torch.testing.assert_close(losses.mean(), trl_loss, atol=1e-5, rtol=1e-6)
