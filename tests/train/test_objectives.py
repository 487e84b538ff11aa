import math

import pytest
import torch
from torch import nn

from lmlab.errors import ConfigError
from lmlab.train import TrainConfig
from lmlab.train.objectives import keep_probability, mix_inputs


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
