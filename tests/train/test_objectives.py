import math

import pytest
import torch
from torch import nn

from lmlab.errors import ConfigError
from lmlab.train import TrainConfig
from lmlab.train.objectives import keep_probability, loss_fed_own_samples, mix_inputs


def test_schedules_follow_bengio_2015():
    """eps_i for the paper's three schedules, worked by hand:
    linear k=1, c=0.01: step 30 -> 0.7, step 200 -> floor 0.1;
    exponential k=0.99: step 100 -> 0.99**100 = 0.3660;
    inverse sigmoid k=10: step 0 -> 10/11, step 50 -> 10/(10 + e^5) = 0.0631."""
    assert keep_probability(30, "linear", 1.0, 0.01, 0.1) == pytest.approx(0.7)
    assert keep_probability(200, "linear", 1.0, 0.01, 0.1) == pytest.approx(0.1)
    assert keep_probability(100, "exponential", 0.99) == pytest.approx(0.99**100)
    assert keep_probability(0, "inverse_sigmoid", 10.0) == pytest.approx(10 / 11)
    assert keep_probability(50, "inverse_sigmoid", 10.0) == pytest.approx(10 / (10 + math.exp(5)))
    assert 0.0 <= keep_probability(10**6, "inverse_sigmoid", 10.0) < 1e-300  # no overflow
    assert keep_probability(5, "teacher_forcing", 1.0) == 1.0
    assert keep_probability(5, "free_running", 1.0) == 0.0


class Peaked(nn.Module):
    """Predicts (previous token + 1) mod V with near certainty."""

    def __init__(self, vocab=7):
        super().__init__()
        self.vocab = vocab
        self.calls = 0

    def forward(self, ids):
        self.calls += 1
        return torch.nn.functional.one_hot((ids + 1) % self.vocab, self.vocab).float() * 50


def test_keep_one_is_teacher_forcing_without_a_model_call():
    model, x = Peaked(), torch.randint(0, 7, (3, 9))
    assert mix_inputs(model, x, 1.0) is x and model.calls == 0


def test_keep_zero_feeds_the_models_own_predictions():
    model, x = Peaked(), torch.randint(0, 7, (3, 9))
    mixed = mix_inputs(model, x, 0.0)
    assert torch.equal(mixed[:, 0], x[:, 0])  # the first token has no prediction
    assert torch.equal(mixed[:, 1:], (x[:, :-1] + 1) % 7)  # position t predicted from t - 1


def test_partial_keep_mixes_at_the_right_rate():
    torch.manual_seed(0)
    model = Peaked(vocab=50)
    x = torch.zeros(200, 51, dtype=torch.long)  # the model predicts 1 everywhere
    mixed = mix_inputs(model, x, 0.3)
    replaced = (mixed[:, 1:] == 1).float().mean().item()
    assert replaced == pytest.approx(0.7, abs=0.02)  # 10,000 draws: 3 sigma is ~0.014


def test_config_checks_schedule_parameters():
    with pytest.raises(ConfigError, match="objective"):
        TrainConfig(objective="scheduled")
    with pytest.raises(ConfigError, match="ss_k"):
        TrainConfig(objective="exponential", ss_k=1.5)
    with pytest.raises(ConfigError, match="ss_k"):
        TrainConfig(objective="inverse_sigmoid", ss_k=0.5)


def _peaked_loss(predicted: torch.Tensor, target: torch.Tensor, vocab: int) -> float:
    """Cross-entropy of Peaked's logits (50 on ``predicted``, 0 elsewhere), by hand."""
    right = math.log1p((vocab - 1) * math.exp(-50))  # -50 + log(e^50 + V - 1)
    wrong = 50 + right  # -0 + log(e^50 + V - 1)
    hits = (predicted == target).double()
    return float((hits * right + (1 - hits) * wrong).mean())


def test_loss_fed_own_samples_by_hand():
    vocab = 7
    g = torch.Generator().manual_seed(0)
    # Rows that mostly count up (what Peaked predicts), with a jump a fifth of the time.
    jumps = (torch.rand(5, 12, generator=g) < 0.2) * torch.randint(2, vocab, (5, 12), generator=g)
    windows = (torch.arange(12) + jumps.cumsum(1)) % vocab
    x, y = windows[:, :-1], windows[:, 1:]
    model = Peaked(vocab).train()
    state = torch.random.get_rng_state()
    full, none = loss_fed_own_samples(model, windows, [1.0, 0.0], draws=2, seed=3)
    assert torch.equal(torch.random.get_rng_state(), state)  # the caller's RNG untouched
    assert model.training  # its mode put back
    # True inputs: the model predicts x + 1. Own samples (certain ones): the input at t >= 1
    # becomes x[t-1] + 1, so the prediction there is x[t-1] + 2.
    assert full == pytest.approx(_peaked_loss((x + 1) % vocab, y, vocab), rel=1e-6)
    own = torch.cat([x[:, :1] + 1, x[:, :-1] + 2], dim=1) % vocab
    assert none == pytest.approx(_peaked_loss(own, y, vocab), rel=1e-6)
    half = loss_fed_own_samples(model, windows, [0.5], draws=2, seed=3)
    assert half == loss_fed_own_samples(model, windows, [0.5], draws=2, seed=3)  # seeded
    assert full < half[0] < none  # the more of its own inputs, the more its slips cost
