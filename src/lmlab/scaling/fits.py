"""Scaling-law fits: Kaplan's power laws and Chinchilla's L(N, D), fitted the Epoch way.

**Kaplan et al. 2020**: with the other resources unconstrained, the loss falls as a power
of parameters N, tokens D or compute C:

    L(N) = (N_c / N)^alpha_N     L(D) = (D_c / D)^alpha_D     L(C) = (C_c / C)^alpha_C

(their exponents: 0.076, 0.095, 0.050). Each is a straight line in log-log, fitted by least
squares: ``log L = alpha log x_c - alpha log x`` (``fit_power_law``).

**Hoffmann et al. 2022** (Chinchilla, approach 3): an irreducible loss plus one term per
resource,

    L(N, D) = E + A / N^alpha + B / D^beta

(theirs: E 1.69, A 406.4, B 410.7, alpha 0.34, beta 0.28). ``fit_chinchilla`` follows the
replication by Besiroglu et al. 2024 (Epoch AI), which found the published fit and its
narrow intervals irreproducible from the paper's own data (theirs: E 1.82, A 482, B 2085,
alpha 0.35, beta 0.37). With ``a = log A``, ``b = log B``, ``e = log E``, the prediction
in log space is a log-sum-exp,

    log L_hat = LSE(a - alpha log N,  b - beta log D,  e)

and the fit minimises ``sum_i Huber_delta(log L_hat_i - log L_i)`` with delta = 1e-3 (robust
to outlying runs) by L-BFGS, started from the best points of Hoffmann's grid (alpha, beta in
0..2 by 0.5; e in -1..1 by 0.5; a, b in 0..25 by 5). Intervals come from a bootstrap over
runs: resample the runs with replacement, refit, take percentiles.

**Compute-optimal allocation**: minimising L(N, D) under C = 6 N D gives

    G = (alpha A / (beta B))^(1 / (alpha + beta))
    N_opt = G (C/6)^(beta / (alpha + beta))     D_opt = (C/6)^(alpha / (alpha + beta)) / G

(Hoffmann et al., eq. 4). ``compute_optimal`` takes any FLOPs-per-token function instead of
6 N, and either N: Pearce and Song 2024 show that fitting with N counting or leaving out
the embedding parameters is what separates Kaplan's allocation from Chinchilla's.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
from scipy.optimize import minimize, minimize_scalar
from scipy.special import logsumexp, softmax

from lmlab.errors import ConfigError

HUBER_DELTA = 1e-3
# Hoffmann et al.'s initialisation grid (Epoch's replication uses the same).
GRID = {
    "alpha": np.arange(0.0, 2.01, 0.5),
    "beta": np.arange(0.0, 2.01, 0.5),
    "e": np.arange(-1.0, 1.01, 0.5),
    "a": np.arange(0.0, 25.1, 5.0),
    "b": np.arange(0.0, 25.1, 5.0),
}


# ----------------------------------------------------------------------------- Kaplan


@dataclass(frozen=True)
class PowerLaw:
    """L(x) = (scale / x)^exponent, Kaplan's form."""

    scale: float
    exponent: float

    def __call__(self, x):
        return (self.scale / np.asarray(x, dtype=float)) ** self.exponent


def fit_power_law(x: Sequence[float], loss: Sequence[float]) -> PowerLaw:
    """Least squares on log L = exponent * (log scale - log x).

    >>> law = fit_power_law([1e6, 1e7, 1e8], [(8.8e13 / n) ** 0.076 for n in (1e6, 1e7, 1e8)])
    >>> round(law.exponent, 3), f"{law.scale:.2g}"
    (0.076, '8.8e+13')
    """
    log_x, log_l = _logs(x, "x"), _logs(loss, "loss")
    if len(log_x) != len(log_l) or len(set(log_x.tolist())) < 2:
        raise ConfigError("a power-law fit needs at least two distinct x values, one loss each")
    slope, intercept = np.polyfit(log_x, log_l, 1)
    if slope >= 0:  # loss not falling with x: no Kaplan law (scale would be meaningless)
        return PowerLaw(scale=math.nan, exponent=float(-slope))
    exponent = -float(slope)
    return PowerLaw(scale=float(math.exp(intercept / exponent)), exponent=exponent)


def pareto_frontier(x: Sequence[float], loss: Sequence[float]) -> list[int]:
    """Indices of the runs no cheaper run beats (loss below every run with smaller x),
    in increasing x: the frontier that Kaplan's L(C) describes."""
    order = np.argsort(np.asarray(x, dtype=float), kind="stable")
    best, keep = math.inf, []
    for i in order:
        if loss[i] < best:
            best = loss[i]
            keep.append(int(i))
    return keep


# ----------------------------------------------------------------------------- Chinchilla


@dataclass(frozen=True)
class ChinchillaFit:
    """L(N, D) = E + A / N^alpha + B / D^beta."""

    E: float
    A: float
    B: float
    alpha: float
    beta: float
    objective: float = math.nan
    """The summed Huber loss at the optimum."""
    intervals: dict[str, tuple[float, float]] = field(default_factory=dict)
    """Bootstrap percentile intervals per parameter (and "a" = beta / (alpha + beta)), if run."""

    def __call__(self, n, d):
        n, d = np.asarray(n, dtype=float), np.asarray(d, dtype=float)
        return self.E + self.A / n**self.alpha + self.B / d**self.beta

    def params(self) -> dict[str, float]:
        return {k: getattr(self, k) for k in ("E", "A", "B", "alpha", "beta")}


EPOCH = ChinchillaFit(E=1.82, A=482.0, B=2085.0, alpha=0.35, beta=0.37)
"""Besiroglu et al. 2024's refit of Chinchilla's data."""
HOFFMANN = ChinchillaFit(E=1.69, A=406.4, B=410.7, alpha=0.34, beta=0.28)
"""Hoffmann et al. 2022, approach 3."""


def huber_objective(theta: np.ndarray, log_n, log_d, log_l, delta: float = HUBER_DELTA):
    """(sum of Huber losses, gradient) for theta = (a, b, e, alpha, beta).

    r_i = LSE(a - alpha log N_i, b - beta log D_i, e) - log L_i; Huber(r) = r^2 / 2 for
    |r| <= delta, else delta (|r| - delta / 2); its derivative is clip(r, -delta, delta),
    and d LSE / d term = softmax weight of that term.
    """
    a, b, e, alpha, beta = theta
    terms = np.stack([a - alpha * log_n, b - beta * log_d, np.full_like(log_n, e)])  # (3, n)
    r = logsumexp(terms, axis=0) - log_l
    small = np.abs(r) <= delta
    value = np.where(small, 0.5 * r**2, delta * (np.abs(r) - 0.5 * delta)).sum()
    w = softmax(terms, axis=0) * np.clip(r, -delta, delta)  # (3, n): dLoss/dterm
    grad = np.array(
        [w[0].sum(), w[1].sum(), w[2].sum(), -(w[0] * log_n).sum(), -(w[1] * log_d).sum()]
    )
    return float(value), grad


def _grid_starts(log_n, log_d, log_l, k: int) -> np.ndarray:
    """The ``k`` points of Hoffmann's grid with the lowest objective, as (k, 5) thetas."""
    mesh = np.meshgrid(*(GRID[p] for p in ("a", "b", "e", "alpha", "beta")), indexing="ij")
    thetas = np.stack([m.ravel() for m in mesh], axis=1)  # (4500, 5)
    a, b, e, alpha, beta = (thetas[:, i : i + 1] for i in range(5))
    terms = np.stack(
        [a - alpha * log_n, b - beta * log_d, np.broadcast_to(e, (len(thetas), len(log_n)))]
    )  # (3, 4500, n)
    r = logsumexp(terms, axis=0) - log_l
    huber = np.where(
        np.abs(r) <= HUBER_DELTA, 0.5 * r**2, HUBER_DELTA * (np.abs(r) - 0.5 * HUBER_DELTA)
    )
    return thetas[np.argsort(huber.sum(axis=1))[:k]]


def _minimise(starts: np.ndarray, log_n, log_d, log_l) -> tuple[np.ndarray, float]:
    best, best_value = None, math.inf
    for theta0 in starts:
        result = minimize(
            huber_objective,
            theta0,
            args=(log_n, log_d, log_l),
            jac=True,
            method="L-BFGS-B",
            options={"maxiter": 2000, "ftol": 1e-15, "gtol": 1e-12},
        )
        if np.all(np.isfinite(result.x)) and result.fun < best_value:
            best, best_value = result.x, float(result.fun)
    return best, best_value


def fit_chinchilla(
    n: Sequence[float],
    d: Sequence[float],
    loss: Sequence[float],
    starts: int = 16,
    bootstrap: int = 0,
    seed: int = 0,
    confidence: float = 0.95,
) -> ChinchillaFit:
    """Fit L(N, D) = E + A/N^alpha + B/D^beta to runs (N parameters, D tokens, final loss).

    ``starts``: L-BFGS runs, from the best points of Hoffmann's grid. ``bootstrap``: this
    many refits on runs resampled with replacement (seeded by ``seed``), each started from
    the full fit and the best few grid points; ``intervals`` then holds the ``confidence``
    percentile interval of every parameter and of the data exponent a = beta/(alpha+beta);
    a resample whose fit diverges (few runs, one of them drawn many times) is left out.
    """
    log_n, log_d, log_l = _logs(n, "N"), _logs(d, "D"), _logs(loss, "loss")
    if not len(log_n) == len(log_d) == len(log_l):
        raise ConfigError(
            f"N, D and loss must have one value per run (got {len(log_n)}, {len(log_d)}, "
            f"{len(log_l)})"
        )
    if len(log_n) < 5:
        raise ConfigError(f"L(N, D) has 5 parameters: fit it to at least 5 runs, not {len(n)}")
    if starts < 1 or bootstrap < 0:
        raise ConfigError(f"starts must be >= 1 and bootstrap >= 0 (got {starts}, {bootstrap})")
    theta, value = _minimise(_grid_starts(log_n, log_d, log_l, starts), log_n, log_d, log_l)
    fit = _from_theta(theta, value)
    if not bootstrap:
        return fit
    rng = np.random.default_rng(seed)
    samples = []
    for _ in range(bootstrap):
        pick = rng.integers(0, len(log_n), len(log_n))
        sample = log_n[pick], log_d[pick], log_l[pick]
        starts_b = np.vstack([theta, _grid_starts(*sample, 3)])
        theta_b, _ = _minimise(starts_b, *sample)
        p = _from_theta(theta_b, math.nan).params()
        p["a"] = p["beta"] / (p["alpha"] + p["beta"])
        if all(math.isfinite(v) for v in p.values()):  # else a degenerate resample: left out
            samples.append(p)
    if not samples:
        return fit
    tail = 100 * (1 - confidence) / 2
    intervals = {
        k: tuple(float(v) for v in np.percentile([s[k] for s in samples], [tail, 100 - tail]))
        for k in samples[0]
    }
    return ChinchillaFit(**fit.params(), objective=value, intervals=intervals)


def _from_theta(theta: np.ndarray, value: float) -> ChinchillaFit:
    a, b, e, alpha, beta = (float(t) for t in theta)
    with np.errstate(over="ignore"):  # a degenerate resample may run a or b off to inf
        E, A, B = (float(np.exp(t)) for t in (e, a, b))
    return ChinchillaFit(E, A, B, alpha, beta, value)


# ----------------------------------------------------------------------------- allocation


@dataclass(frozen=True)
class Allocation:
    """The compute-optimal split of a budget C (FLOPs)."""

    compute: float
    n: float
    """Parameters."""
    d: float
    """Training tokens."""
    loss: float
    """L(N_opt, D_opt) predicted by the fit."""

    @property
    def tokens_per_parameter(self) -> float:
        return self.d / self.n


def compute_optimal(
    fit: ChinchillaFit,
    compute: float,
    flops_per_token: Callable[[float], float] | None = None,
) -> Allocation:
    """The N and D that minimise ``fit(N, D)`` for ``compute`` FLOPs.

    ``flops_per_token(N)``: the training FLOPs per token of a model of N parameters; None
    means 6 N, and then the closed form of the module doc holds. Otherwise D = C /
    flops_per_token(N) and N is found numerically (in log N).
    """
    if not (isinstance(compute, (int, float)) and math.isfinite(compute) and compute > 0):
        raise ConfigError(f"compute={compute!r} is invalid: must be a positive number of FLOPs")
    alpha, beta, A, B = fit.alpha, fit.beta, fit.A, fit.B
    if not (alpha > 0 and beta > 0):
        raise ConfigError(
            f"the fit has alpha={alpha:.3g}, beta={beta:.3g}: a compute-optimal split needs "
            "both exponents positive (loss falling with parameters and with tokens)"
        )
    if flops_per_token is None:
        g = (alpha * A / (beta * B)) ** (1 / (alpha + beta))
        n = g * (compute / 6) ** (beta / (alpha + beta))
        d = (compute / 6) ** (alpha / (alpha + beta)) / g
    else:
        # the optimum of the 6N case, then the exact one around it (within 10^+-6 of it)
        guess = math.log(compute_optimal(fit, compute).n)

        def loss_at(log_n: float) -> float:
            n_ = math.exp(log_n)
            return float(fit(n_, compute / flops_per_token(n_)))

        found = minimize_scalar(
            loss_at, bounds=(guess - 14, guess + 14), method="bounded", options={"xatol": 1e-9}
        )
        n = math.exp(found.x)
        d = compute / flops_per_token(n)
    return Allocation(compute=float(compute), n=float(n), d=float(d), loss=float(fit(n, d)))


def _logs(values: Sequence[float], name: str) -> np.ndarray:
    array = np.asarray(values, dtype=float).ravel()
    if array.size == 0 or not np.all(np.isfinite(array)) or np.any(array <= 0):
        raise ConfigError(f"{name} must be finite positive numbers (got {list(values)[:5]}...)")
    return np.log(array)
