"""Optimization from the ground up: gradient descent on functions you can draw.

Before a language model there is a loss and a step downhill. This module keeps that step
small enough to see:

- ``descend``: plain gradient descent, x <- x - lr * f'(x), on a function of one or two
  variables, with its path. On f(x) = a x^2 / 2 the step multiplies x by (1 - lr a): the
  path creeps when lr is far below 1 / a, lands in one step at lr = 1 / a, oscillates
  and still converges for 1 / a < lr < 2 / a, and diverges beyond 2 / a (``STEP_SIZES``).
  On a function with two valleys (``double_well``) the start decides which minimum it finds.
- ``optimizer_paths``: torch's own SGD, SGD with momentum (Polyak 1964) and Adam (Kingma &
  Ba 2015) on a long, narrow valley (``valley``: curvature 1 along x, 20 along y, minimum at
  (0, 0)) or Rosenbrock's banana. SGD's step is capped by the steep direction (beyond
  2 / 20 it diverges there) so it zig-zags across the valley and crawls along it; momentum
  builds speed along it and gets there in about half the steps; Adam's per-coordinate
  scaling walks diagonally at first and, with a constant step, hovers near the bottom.
- ``mse_vs_ce``: a softmax classifier trained with mean squared error on the probabilities
  and with cross-entropy, from the same start. For a confidently wrong prediction the
  cross-entropy gradient with respect to the logits is p - y (large), while the squared
  error's is squashed by the softmax's slope p (1 - p) (near zero): MSE learns slowly
  from its worst mistakes. ``logit_gradients`` shows that one number.
- ``batch_noise``: mini-batch gradients of a logistic regression against the full-batch
  gradient: their variance falls as 1 / batch size, and SGD's loss curve is noisier the
  smaller the batch.

Everything is seeded and deterministic, in float64.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from lmlab.errors import ConfigError

Fn = Callable[[torch.Tensor], torch.Tensor]


def quadratic(a: float = 1.0) -> Fn:
    """f(x) = a x^2 / 2: curvature a, minimum at 0."""
    return lambda x: 0.5 * a * (x**2).sum()


def double_well(x: torch.Tensor) -> torch.Tensor:
    """f(x) = x^4 - 3 x^2 + x: a deep minimum near x = -1.30 and a shallow one near 1.13."""
    return (x**4 - 3 * x**2 + x).sum()


def valley(x: torch.Tensor) -> torch.Tensor:
    """A long, narrow valley: f(x, y) = (x^2 + 20 y^2) / 2 (condition number 20)."""
    return 0.5 * (x[0] ** 2 + 20 * x[1] ** 2)


def rosenbrock(x: torch.Tensor) -> torch.Tensor:
    """Rosenbrock's banana: (1 - x)^2 + 100 (y - x^2)^2, minimum at (1, 1)."""
    return (1 - x[0]) ** 2 + 100 * (x[1] - x[0] ** 2) ** 2


FUNCTIONS: dict[str, Fn] = {"valley": valley, "rosenbrock": rosenbrock}

# Step sizes on f = x^2 / 2 (a = 1) that show the four regimes.
STEP_SIZES = {"too small": 0.05, "right": 0.5, "too large": 1.8, "diverging": 2.1}


def _point(start: float | Sequence[float]) -> torch.Tensor:
    values = [start] if isinstance(start, int | float) else list(start)
    return torch.tensor(values, dtype=torch.float64)


def descend(fn: Fn, start: float | Sequence[float], lr: float, steps: int) -> torch.Tensor:
    """Gradient descent's path: ``[steps + 1, dims]`` points, the start first.

    A path that overflows stops growing: the points after it are inf or nan, as they would be.
    """
    if not lr > 0:
        raise ConfigError(f"lr={lr!r} is invalid: the step size must be a positive number")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ConfigError(f"steps={steps!r} is invalid: must be an integer >= 0")
    x = _point(start)
    path = [x.clone()]
    for _ in range(steps):
        x = x.detach().requires_grad_(True)
        (grad,) = torch.autograd.grad(fn(x), x)
        x = x.detach() - lr * grad
        path.append(x.clone())
    return torch.stack(path)


@dataclass(frozen=True)
class OptimizerSpec:
    """One of torch's optimizers and its settings, for ``optimizer_paths``."""

    name: str
    lr: float
    momentum: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)

    def build(self, params) -> torch.optim.Optimizer:
        if self.name == "adam":
            return torch.optim.Adam(params, lr=self.lr, betas=self.betas)
        if self.name == "sgd":
            return torch.optim.SGD(params, lr=self.lr, momentum=self.momentum)
        raise ConfigError(f"optimizer {self.name!r} is unknown: choose sgd or adam")


# On ``valley`` from (-8, 1.5): SGD at 0.09, just under the 2 / 20 where the steep direction
# diverges, needs 43 steps to a loss of 0.01; momentum 0.7 at 0.05 needs 25; Adam at 0.3
# needs 67 and then hovers (a constant step size does not settle on a quadratic).
DEFAULT_OPTIMIZERS = {
    "SGD": OptimizerSpec("sgd", lr=0.09),
    "SGD + momentum 0.7": OptimizerSpec("sgd", lr=0.05, momentum=0.7),
    "Adam": OptimizerSpec("adam", lr=0.3),
}


def optimizer_paths(
    fn: Fn,
    start: Sequence[float],
    optimizers: dict[str, OptimizerSpec] | None = None,
    steps: int = 60,
) -> dict[str, torch.Tensor]:
    """Each optimizer's path ``[steps + 1, dims]`` from ``start`` on ``fn``."""
    optimizers = DEFAULT_OPTIMIZERS if optimizers is None else optimizers
    paths = {}
    for label, spec in optimizers.items():
        x = _point(start).requires_grad_(True)
        opt = spec.build([x])
        path = [x.detach().clone()]
        for _ in range(steps):
            opt.zero_grad()
            fn(x).backward()
            opt.step()
            path.append(x.detach().clone())
        paths[label] = torch.stack(path)
    return paths


def steps_to_reach(path: torch.Tensor, fn: Fn, tolerance: float) -> int | None:
    """The first step whose loss is at most ``tolerance`` (None: never)."""
    for step, point in enumerate(path):
        if fn(point).item() <= tolerance:
            return step
    return None


# ----------------------------------------------------------------------------- classification


def blobs(n: int = 300, classes: int = 3, seed: int = 0, spread: float = 1.0):
    """``n`` points in 2-D around ``classes`` centres on a circle, and their labels."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % classes
    angles = 2 * math.pi * labels.double() / classes
    centres = 2.0 * torch.stack([angles.cos(), angles.sin()], 1)
    return centres + spread * torch.randn(n, 2, generator=g, dtype=torch.float64), labels


def classification_loss(kind: str, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``"ce"``: cross-entropy; ``"mse"``: mean squared error between softmax and one-hot."""
    if kind == "ce":
        return F.cross_entropy(logits, labels)
    if kind == "mse":
        one_hot = F.one_hot(labels, logits.shape[-1]).to(logits.dtype)
        return ((logits.softmax(-1) - one_hot) ** 2).sum(-1).mean()
    raise ConfigError(f"loss {kind!r} is unknown: choose ce or mse")


def logit_gradients(p_true: float, classes: int = 3) -> dict[str, float]:
    """The size of d loss / d logits for one example whose true class has probability
    ``p_true`` (the rest shared equally): large for cross-entropy when it is wrong, near
    zero for MSE when it is confidently wrong."""
    if not 0 < p_true < 1:
        raise ConfigError(f"p_true={p_true!r} is invalid: must be strictly between 0 and 1")
    probs = torch.full((classes,), (1 - p_true) / (classes - 1), dtype=torch.float64)
    probs[0] = p_true
    out = {}
    for kind in ("ce", "mse"):
        logits = probs.log().requires_grad_(True)
        classification_loss(kind, logits[None], torch.tensor([0])).backward()
        out[kind] = logits.grad.norm().item()
    return out


def mse_vs_ce(
    steps: int = 200, lr: float = 0.5, seed: int = 0, init_scale: float = 4.0
) -> dict[str, dict[str, list[float]]]:
    """Train the same linear softmax classifier on ``blobs`` with each loss, from the same
    (deliberately bad, large) start; returns per-step accuracy and cross-entropy of each."""
    x, y = blobs(seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    w0 = init_scale * torch.randn(2, 3, generator=g, dtype=torch.float64)
    b0 = torch.zeros(3, dtype=torch.float64)
    curves = {}
    for kind in ("ce", "mse"):
        w, b = w0.clone().requires_grad_(True), b0.clone().requires_grad_(True)
        opt = torch.optim.SGD([w, b], lr=lr)
        accuracy, cross_entropy = [], []
        for _ in range(steps + 1):
            logits = x @ w + b
            accuracy.append((logits.argmax(-1) == y).double().mean().item())
            cross_entropy.append(F.cross_entropy(logits, y).item())
            opt.zero_grad()
            classification_loss(kind, logits, y).backward()
            opt.step()
        curves[kind] = {"accuracy": accuracy, "cross_entropy": cross_entropy}
    return curves


# ----------------------------------------------------------------------------- mini-batches


def _logistic_data(n: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 5, generator=g, dtype=torch.float64)
    true_w = torch.randn(5, generator=g, dtype=torch.float64)
    y = (torch.rand(n, generator=g, dtype=torch.float64) < torch.sigmoid(x @ true_w)).double()
    return x, y


def _logistic_loss(w, x, y):
    return F.binary_cross_entropy_with_logits(x @ w, y)


def gradient_variance(batch_sizes: Sequence[int], n: int = 2000, draws: int = 200, seed: int = 0):
    """For each batch size B: the mean squared distance between a random mini-batch's
    gradient and the full-batch gradient, at a fixed point (close to sigma^2 / B, less the
    finite-population correction (n - B) / (n - 1))."""
    x, y = _logistic_data(n, seed)
    w = torch.zeros(5, dtype=torch.float64, requires_grad=True)
    (full,) = torch.autograd.grad(_logistic_loss(w, x, y), w)
    g = torch.Generator().manual_seed(seed + 1)
    out = {}
    for b in batch_sizes:
        if not 1 <= b <= n:
            raise ConfigError(f"batch size {b} is invalid: must be between 1 and n={n}")
        total = 0.0
        for _ in range(draws):
            idx = torch.randperm(n, generator=g)[:b]
            (grad,) = torch.autograd.grad(_logistic_loss(w, x[idx], y[idx]), w)
            total += (grad - full).pow(2).sum().item()
        out[b] = total / draws
    return out


def batch_noise(
    batch_sizes: Sequence[int] = (1, 16, 256, 2000),
    steps: int = 150,
    lr: float = 0.3,
    n: int = 2000,
    seed: int = 0,
) -> dict[int, list[float]]:
    """SGD on the logistic regression with each batch size (``n``: full batch): the
    full-data loss after every step."""
    x, y = _logistic_data(n, seed)
    curves = {}
    for b in batch_sizes:
        g = torch.Generator().manual_seed(seed + 2)
        w = torch.zeros(5, dtype=torch.float64, requires_grad=True)
        losses = [_logistic_loss(w, x, y).item()]
        for _ in range(steps):
            idx = torch.randperm(n, generator=g)[:b]
            (grad,) = torch.autograd.grad(_logistic_loss(w, x[idx], y[idx]), w)
            with torch.no_grad():
                w -= lr * grad
            losses.append(_logistic_loss(w, x, y).item())
        curves[b] = losses
    return curves
