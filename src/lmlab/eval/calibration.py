"""Calibration of multiple-choice predictions: does a model that says 80% get 80% right?

Following Guo et al. 2017, "On Calibration of Modern Neural Networks" (section 2): each
item's confidence is the probability of its predicted choice (``ChoiceResult``: softmax
of the choices' log-likelihoods, prediction = ``acc``'s argmax). Items are grouped into M
bins by confidence; with B_m the items of bin m, n items in all::

    ECE = sum_m |B_m| / n * |acc(B_m) - conf(B_m)|     (expected calibration error)
    MCE = max_m |acc(B_m) - conf(B_m)|                  (maximum, over non-empty bins)
    Brier = 1/n sum_i sum_j (p_ij - [j == gold_i])^2    (multi-class Brier score)

``binning="width"``: equal-width bins ((m-1)/M, m/M] (confidence 0 joins the first);
``binning="mass"``: equal-mass bins, the items sorted by confidence and split into M
groups of near-equal size (``numpy.array_split``; Nixon et al. 2019's adaptive ECE).

Worked example (M = 5 equal-width bins), confidences [0.9, 0.75, 0.58, 0.52] with
correct [1, 0, 1, 0]::

    bin (0.4, 0.6]: 0.58, 0.52  acc 0.5  conf 0.55  gap 0.05  weight 2/4 -> 0.025
    bin (0.6, 0.8]: 0.75        acc 0    conf 0.75  gap 0.75  weight 1/4 -> 0.1875
    bin (0.8, 1.0]: 0.9         acc 1    conf 0.9   gap 0.1   weight 1/4 -> 0.025
    ECE = 0.2375, MCE = 0.75

Reference: the definitions above (no library implements them for lmlab's results);
``tests/eval/test_calibration.py`` checks this example by hand.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from lmlab.errors import ConfigError, DataError

BINNINGS = ("width", "mass")


@dataclass(frozen=True)
class Bin:
    lo: float
    hi: float
    count: int
    accuracy: float
    """Fraction correct in the bin (nan when empty)."""
    confidence: float
    """Mean confidence in the bin (nan when empty)."""


def calibration_bins(
    confidences: Sequence[float],
    correct: Sequence[bool],
    n_bins: int = 10,
    binning: str = "width",
) -> list[Bin]:
    """The M bins of the module docstring, empty ones included (equal width)."""
    conf = np.asarray(confidences, dtype=np.float64)
    hit = np.asarray(correct, dtype=np.float64)
    if n_bins < 1:
        raise ConfigError(f"n_bins={n_bins} is invalid: must be >= 1")
    if binning not in BINNINGS:
        raise ConfigError(f"binning={binning!r} is invalid; valid: {', '.join(BINNINGS)}")
    if conf.shape != hit.shape or conf.ndim != 1 or len(conf) == 0:
        raise DataError(
            f"need as many confidences as correctness flags (>= 1): got {conf.shape} and "
            f"{hit.shape}"
        )
    if ((conf < 0) | (conf > 1)).any():
        raise DataError("confidences must lie in [0, 1]")
    if binning == "width":
        index = np.clip(np.ceil(conf * n_bins).astype(int) - 1, 0, n_bins - 1)
        groups = [np.flatnonzero(index == m) for m in range(n_bins)]
        edges = [(m / n_bins, (m + 1) / n_bins) for m in range(n_bins)]
    else:
        order = np.argsort(conf, kind="stable")
        groups = [g for g in np.array_split(order, min(n_bins, len(conf))) if len(g)]
        edges = [(float(conf[g].min()), float(conf[g].max())) for g in groups]
    bins = []
    for g, (lo, hi) in zip(groups, edges):
        if len(g):
            bins.append(Bin(lo, hi, len(g), float(hit[g].mean()), float(conf[g].mean())))
        else:
            bins.append(Bin(lo, hi, 0, float("nan"), float("nan")))
    return bins


def expected_calibration_error(
    confidences: Sequence[float], correct: Sequence[bool], n_bins: int = 10, binning: str = "width"
) -> float:
    """ECE: the count-weighted mean |accuracy - confidence| over the bins."""
    bins = calibration_bins(confidences, correct, n_bins, binning)
    n = sum(b.count for b in bins)
    return float(sum(b.count / n * abs(b.accuracy - b.confidence) for b in bins if b.count))


def maximum_calibration_error(
    confidences: Sequence[float], correct: Sequence[bool], n_bins: int = 10, binning: str = "width"
) -> float:
    """MCE: the largest |accuracy - confidence| of a non-empty bin."""
    bins = calibration_bins(confidences, correct, n_bins, binning)
    return float(max(abs(b.accuracy - b.confidence) for b in bins if b.count))


def brier_score(probs: Sequence[Sequence[float]], gold: Sequence[int]) -> float:
    """Mean over items of sum_j (p_j - [j == gold])^2; items may have different numbers of
    choices. ``[[0.8, 0.2]], [0] -> 0.04 + 0.04 = 0.08``."""
    if len(probs) != len(gold) or not len(probs):
        raise DataError(f"need one gold index per item (>= 1): {len(probs)} vs {len(gold)}")
    total = 0.0
    for p, g in zip(probs, gold):
        onehot = np.zeros(len(p))
        onehot[g] = 1.0
        total += float(((np.asarray(p, dtype=np.float64) - onehot) ** 2).sum())
    return total / len(probs)


@dataclass(frozen=True)
class CalibrationResult:
    task: str
    n: int
    ece: float
    mce: float
    brier: float
    accuracy: float
    mean_confidence: float
    n_bins: int
    binning: str
    bins: list[Bin]

    def summary(self) -> str:
        return (
            f"{self.task}: ECE {self.ece:.3f} ({self.n_bins} {self.binning} bins), "
            f"MCE {self.mce:.3f}, Brier {self.brier:.3f}, acc {self.accuracy:.3f} vs "
            f"confidence {self.mean_confidence:.3f} (n={self.n})"
        )

    def to_dict(self) -> dict[str, Any]:
        def num(v: float) -> float | None:
            return None if np.isnan(v) else v

        return {
            "task": self.task,
            "n": self.n,
            "ece": self.ece,
            "mce": self.mce,
            "brier": self.brier,
            "accuracy": self.accuracy,
            "mean_confidence": self.mean_confidence,
            "n_bins": self.n_bins,
            "binning": self.binning,
            "bins": [
                {
                    "lo": b.lo,
                    "hi": b.hi,
                    "count": b.count,
                    "accuracy": num(b.accuracy),
                    "confidence": num(b.confidence),
                }
                for b in self.bins
            ],
        }


def _confidences(result: Any) -> tuple[list[float], list[bool]]:
    """(confidence, correct) of each item of a ``ChoiceResult`` (the ``acc`` prediction)."""
    return [it.confidence for it in result.items], [it.correct["acc"] for it in result.items]


def calibration(result: Any, n_bins: int = 10, binning: str = "width") -> CalibrationResult:
    """ECE, MCE and Brier score of a ``ChoiceResult``."""
    conf, hit = _confidences(result)
    return CalibrationResult(
        task=result.task,
        n=len(conf),
        ece=expected_calibration_error(conf, hit, n_bins, binning),
        mce=maximum_calibration_error(conf, hit, n_bins, binning),
        brier=brier_score([it.probs for it in result.items], [it.gold for it in result.items]),
        accuracy=float(np.mean(hit)),
        mean_confidence=float(np.mean(conf)),
        n_bins=n_bins,
        binning=binning,
        bins=calibration_bins(conf, hit, n_bins, binning),
    )


def reliability_diagram(
    result: Any, path: str | os.PathLike, n_bins: int = 10, binning: str = "width"
) -> Path:
    """Save a reliability diagram (PNG) of a ``ChoiceResult``: the accuracy of each
    confidence bin as a bar, the diagonal of perfect calibration, each bar's count above
    it and the ECE in the title. Returns the path."""
    from matplotlib.figure import Figure  # deferred: slow to import, only for plots

    cal = calibration(result, n_bins, binning)
    fig = Figure(figsize=(4.5, 4.5))
    ax = fig.subplots()
    for b in cal.bins:
        if not b.count:
            continue
        width = max(b.hi - b.lo, 0.01)  # equal-mass bins may hold a single confidence
        ax.bar(
            b.lo,
            b.accuracy,
            width=width,
            align="edge",
            color="tab:blue",
            edgecolor="black",
            alpha=0.8,
        )
        ax.text(b.lo + width / 2, b.accuracy + 0.02, str(b.count), ha="center", fontsize=7)
    ax.plot([0, 1], [0, 1], "--", color="gray", label="perfect calibration")
    ax.set(
        xlim=(0, 1),
        ylim=(0, 1.08),
        ylabel="accuracy",
        xlabel="confidence (probability of the predicted choice)",
    )
    ax.set_title(
        f"{cal.task}: ECE {cal.ece:.3f}, {cal.n_bins} {cal.binning} bins (n={cal.n})", fontsize=9
    )
    ax.legend(loc="upper left", fontsize=7)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    return path
