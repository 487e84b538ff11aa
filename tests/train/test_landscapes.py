"""Optimization on functions you can draw: each claim of lmlab.train.landscapes, checked."""

import math

import pytest
import torch

from lmlab.errors import ConfigError
from lmlab.train import landscapes as L


@pytest.mark.parametrize("a", [0.5, 1.0, 3.0])
@pytest.mark.parametrize("lr_times_a", [0.1, 1.0, 1.5, 1.99, 2.01, 3.0])
def test_descent_on_a_quadratic_follows_the_closed_form(a, lr_times_a):
    lr, x0, steps = lr_times_a / a, 2.5, 15
    path = L.descend(L.quadratic(a), x0, lr, steps)[:, 0]
    expected = torch.tensor([x0 * (1 - lr * a) ** t for t in range(steps + 1)], dtype=torch.float64)
    torch.testing.assert_close(path, expected, rtol=1e-12, atol=1e-12)
    converges = abs(path[-1]) < abs(path[0])
    assert converges == (lr_times_a < 2)


def test_the_four_step_sizes_show_their_regimes():
    paths = {k: L.descend(L.quadratic(), 3.0, lr, 30)[:, 0] for k, lr in L.STEP_SIZES.items()}
    small, right = paths["too small"], paths["right"]
    assert (small.diff() < 0).all() and small[-1] > 0.5  # monotone, still far
    assert (right >= 0).all() and right[-1] < 1e-6  # no overshoot, there
    large = paths["too large"]
    assert (large[1:] * large[:-1] < 0).all() and abs(large[-1]) < abs(
        large[0]
    )  # flips sign, shrinks
    assert abs(paths["diverging"][-1]) > 10 * 3.0


def test_the_start_decides_which_minimum_of_the_double_well():
    left = L.descend(L.double_well, -0.2, 0.02, 300)[-1].item()
    right = L.descend(L.double_well, 0.5, 0.02, 300)[-1].item()
    # stationary points: 4x^3 - 6x + 1 = 0
    for x in (left, right):
        assert abs(4 * x**3 - 6 * x + 1) < 1e-6
    assert left < 0 < right and L.double_well(torch.tensor([left])) < L.double_well(
        torch.tensor([right])
    )


def test_optimizer_paths_use_torch_optimizers_step_by_step():
    start = (1.0, -2.0)
    sgd = L.optimizer_paths(L.valley, start, {"s": L.OptimizerSpec("sgd", 0.01)}, steps=1)["s"]
    # one SGD step: x - lr * (x, 20 y)
    torch.testing.assert_close(
        sgd[1], torch.tensor([1.0 - 0.01, -2.0 + 0.01 * 40], dtype=torch.float64)
    )
    adam = L.optimizer_paths(L.valley, start, {"a": L.OptimizerSpec("adam", 0.1)}, steps=1)["a"]
    # Adam's first step is lr * sign(gradient) in every coordinate (up to eps)
    torch.testing.assert_close(
        adam[1] - adam[0], torch.tensor([-0.1, 0.1], dtype=torch.float64), atol=1e-6, rtol=0
    )


def test_momentum_crosses_the_valley_faster_than_sgd_at_its_best_step():
    paths = L.optimizer_paths(L.valley, (-8.0, 1.5), steps=100)
    sgd = L.steps_to_reach(paths["SGD"], L.valley, 1e-2)
    momentum = L.steps_to_reach(paths["SGD + momentum 0.7"], L.valley, 1e-2)
    assert momentum is not None and sgd is not None and momentum < 0.7 * sgd
    # and SGD could not go faster: past lr = 2 / 20 the steep direction diverges
    faster = L.optimizer_paths(L.valley, (-8.0, 1.5), {"s": L.OptimizerSpec("sgd", 0.101)}, 100)[
        "s"
    ]
    assert L.valley(faster[-1]) > L.valley(faster[0])


def test_cross_entropy_gradient_stays_large_when_confidently_wrong():
    wrong, right = L.logit_gradients(0.01), L.logit_gradients(0.99)
    assert wrong["ce"] > 1.0 and wrong["mse"] < 0.05  # MSE's gradient vanishes on its worst errors
    assert right["ce"] < 0.02 and right["mse"] < 0.02


def test_cross_entropy_learns_faster_from_a_bad_start():
    curves = L.mse_vs_ce(steps=60)
    assert curves["ce"]["accuracy"][0] == curves["mse"]["accuracy"][0]  # the same start
    assert curves["ce"]["accuracy"][20] > curves["mse"]["accuracy"][20] + 0.05


def test_minibatch_gradient_variance_falls_as_one_over_batch_size():
    var = L.gradient_variance([1, 8, 64], n=4000, draws=300)
    for b in (8, 64):
        correction = (4000 - b) / (4000 - 1)
        assert var[b] == pytest.approx(var[1] / b * correction, rel=0.25)


def test_smaller_batches_give_noisier_loss_curves():
    curves = L.batch_noise(batch_sizes=(1, 64, 2000), steps=80)

    def wiggle(losses):
        return sum(abs(b - a) for a, b in zip(losses[40:], losses[41:]))

    assert wiggle(curves[1]) > wiggle(curves[64]) > wiggle(curves[2000])
    assert all(math.isfinite(x) for c in curves.values() for x in c)


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: L.descend(L.valley, (0, 0), 0.0, 3), "lr"),
        (lambda: L.descend(L.valley, (0, 0), 0.1, -1), "steps"),
        (lambda: L.OptimizerSpec("rmsprop", 0.1).build([]), "sgd or adam"),
        (lambda: L.logit_gradients(1.0), "p_true"),
        (lambda: L.gradient_variance([0]), "batch size"),
        (lambda: L.classification_loss("hinge", torch.zeros(1, 3), torch.tensor([0])), "ce or mse"),
    ],
)
def test_bad_settings_are_one_line_errors(call, message):
    with pytest.raises(ConfigError, match=message):
        call()
