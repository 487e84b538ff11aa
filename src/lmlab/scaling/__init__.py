"""Scaling laws: Kaplan power laws, Chinchilla's L(N, D) fitted the Epoch way, compute-optimal
allocation (``fits``), and the figures of a sweep (``plots``). The sweep itself, a grid of
models and token budgets trained with ``lmlab.train``, is ``lmlab.sweep`` (``lmlab scaling``).
"""

from lmlab.scaling.fits import (
    EPOCH,
    HOFFMANN,
    Allocation,
    ChinchillaFit,
    PowerLaw,
    compute_optimal,
    fit_chinchilla,
    fit_power_law,
    pareto_frontier,
)

__all__ = [
    "EPOCH",
    "HOFFMANN",
    "Allocation",
    "ChinchillaFit",
    "PowerLaw",
    "compute_optimal",
    "fit_chinchilla",
    "fit_power_law",
    "pareto_frontier",
]
