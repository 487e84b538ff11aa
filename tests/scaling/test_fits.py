"""The scaling-law fitters recover planted laws; the compute-optimal split matches the
closed form."""

import math

import numpy as np
import pytest

from lmlab.errors import ConfigError
from lmlab.scaling.fits import (
    EPOCH,
    _from_theta,
    compute_optimal,
    fit_chinchilla,
    fit_power_law,
    huber_objective,
    pareto_frontier,
)


def epoch_runs(seed: int, noise: float = 0.005):
    """Losses from Epoch's L(N, D) (E 1.82, A 482, B 2085, alpha 0.35, beta 0.37) over a
    grid like Chinchilla's (40M-16B parameters, 1B-500B tokens), times log-normal noise."""
    rng = np.random.default_rng(seed)
    n, d = (a.ravel() for a in np.meshgrid(np.logspace(7.6, 10.2, 9), np.logspace(9, 11.7, 8)))
    return n, d, EPOCH(n, d) * np.exp(rng.normal(0, noise, n.size))


@pytest.mark.parametrize("seed", [1, 2])
def test_the_epoch_fit_recovers_alpha_and_beta(seed):
    n, d, loss = epoch_runs(seed)
    fit = fit_chinchilla(n, d, loss)
    assert abs(fit.alpha - EPOCH.alpha) < 0.02
    assert abs(fit.beta - EPOCH.beta) < 0.02
    assert abs(fit.E - EPOCH.E) < 0.05


@pytest.mark.slow  # about 8 s of CPU: ten refits
def test_bootstrap_intervals_bracket_the_fit_near_the_planted_exponents():
    n, d, loss = epoch_runs(3)
    fit = fit_chinchilla(n, d, loss, bootstrap=10, seed=0)
    for name in ("alpha", "beta"):
        low, high = fit.intervals[name]
        assert low <= getattr(fit, name) + 1e-6 and getattr(fit, name) - 1e-6 <= high
        assert low - 0.02 < getattr(EPOCH, name) < high + 0.02
        assert 0 < high - low < 0.1
    assert set(fit.intervals) == {"E", "A", "B", "alpha", "beta", "a"}


def test_huber_gradient_matches_finite_differences():
    n, d, loss = epoch_runs(4, noise=0.05)
    log_n, log_d, log_l = np.log(n), np.log(d), np.log(loss)
    theta = np.array([6.0, 7.5, 0.6, 0.3, 0.4])
    _, grad = huber_objective(theta, log_n, log_d, log_l)
    eps = 1e-6
    numeric = [
        (
            huber_objective(theta + eps * e, log_n, log_d, log_l)[0]
            - huber_objective(theta - eps * e, log_n, log_d, log_l)[0]
        )
        / (2 * eps)
        for e in np.eye(5)
    ]
    np.testing.assert_allclose(grad, numeric, rtol=1e-4, atol=1e-8)


def test_kaplan_fit_recovers_a_planted_exponent():
    rng = np.random.default_rng(5)
    n = np.logspace(5, 9, 12)
    loss = (8.8e13 / n) ** 0.076 * np.exp(rng.normal(0, 0.002, n.size))
    law = fit_power_law(n, loss)
    assert abs(law.exponent - 0.076) < 0.003
    assert abs(math.log10(law.scale) - math.log10(8.8e13)) < 0.5


def test_compute_optimal_matches_the_closed_form():
    """Epoch's fit at C = 1e21 FLOPs (C/6 = 1.6667e20):
    G = (0.35*482 / (0.37*2085))^(1/0.72) = 0.21868^1.38889 = 0.12108;
    N_opt = G (C/6)^(0.37/0.72) = 0.12108 * 2.4656e10 = 2.985e9;
    D_opt = (C/6)^(0.35/0.72) / G = 6.7614e9 / 0.12108 = 5.584e10 (18.7 tokens/parameter).
    """
    plan = compute_optimal(EPOCH, 1e21)
    assert plan.n == pytest.approx(2.985e9, rel=2e-3)
    assert plan.d == pytest.approx(5.584e10, rel=2e-3)
    assert 6 * plan.n * plan.d == pytest.approx(1e21, rel=1e-9)
    # the same optimum found numerically through a FLOPs-per-token function
    numeric = compute_optimal(EPOCH, 1e21, flops_per_token=lambda n: 6 * n)
    assert numeric.n == pytest.approx(plan.n, rel=1e-4)
    # and it is a minimum along the isoFLOP line
    for factor in (0.8, 1.25):
        n = plan.n * factor
        assert EPOCH(n, 1e21 / (6 * n)) > plan.loss


def test_counting_embeddings_shifts_the_optimum():
    """A per-token cost above 6N (embeddings, attention) buys fewer tokens per parameter."""
    plain = compute_optimal(EPOCH, 1e18)
    costly = compute_optimal(EPOCH, 1e18, flops_per_token=lambda n: 6 * n + 6e6)
    assert 6 * costly.n * costly.d + 6e6 * costly.d == pytest.approx(1e18, rel=1e-9)
    assert costly.loss > plain.loss


def test_a_diverged_fit_gives_infinities_not_an_error():
    """Regression: a bootstrap resample of 9 runs drove log A past 709, and math.exp raised
    OverflowError out of the whole sweep."""
    fit = _from_theta(np.array([800.0, 5.0, 0.5, 0.3, 0.3]), math.nan)
    assert fit.A == math.inf and fit.B == pytest.approx(math.exp(5.0))


def test_pareto_frontier():
    assert pareto_frontier([3, 1, 2, 4], [2.0, 3.0, 2.5, 2.1]) == [1, 2, 0]


@pytest.mark.parametrize(
    "args, match",
    [
        (([1e6] * 4, [1e9] * 4, [2.0] * 4), "at least 5 runs"),
        (([1e6] * 5, [1e9] * 5, [2.0, 2.0, -1.0, 2.0, 2.0]), "positive"),
        (([1e6] * 5, [1e9] * 4, [2.0] * 5), "one value per run"),
    ],
)
def test_bad_runs_are_one_line_errors(args, match):
    with pytest.raises(ConfigError, match=match):
        fit_chinchilla(*args)
    with pytest.raises(ConfigError, match="positive number of FLOPs"):
        compute_optimal(EPOCH, -1.0)
