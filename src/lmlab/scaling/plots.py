"""The figure of a scaling sweep, ``scaling.png``, in three panels:

1. loss against training compute, each model size in its colour, the compute frontier
   (no cheaper run did better) and Kaplan's L(C) fitted to it; with a holdout, the held-out
   run's predicted loss beside its measured one;
2. the fitted L(N, D) as contours over tokens and parameters, the runs on top, and the
   compute-optimal path (N_opt, D_opt) as the budget grows;
3. isoFLOP curves: the fitted loss against N at fixed compute (D = C / 6N), each minimum
   marked: where the compute-optimal model sits for that budget.

``lmlab.sweep.scaling`` draws it after fitting; matplotlib is imported inside the function
(slow to import, only needed here).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from lmlab.fileio import atomic_write_with
from lmlab.scaling.fits import ChinchillaFit, compute_optimal


def plot_sweep(runs: Sequence[Any], fits: dict[str, Any], png_path: str | Path):
    """``runs``: objects with ``name, params, tokens, flops, val_loss, n_layers, d_model``
    (``lmlab.sweep.RunPoint``); ``fits``: ``lmlab.sweep.fit_sweep``'s dict. -> the Figure."""
    from matplotlib import colormaps  # deferred: slow to import, only for plots
    from matplotlib.figure import Figure  # deferred: slow to import, only for plots

    n = np.array([r.params for r in runs], dtype=float)
    d = np.array([r.tokens for r in runs], dtype=float)
    c = np.array([r.flops for r in runs], dtype=float)
    loss = np.array([r.val_loss for r in runs], dtype=float)
    sizes = sorted({(r.n_layers, r.d_model, r.params) for r in runs}, key=lambda s: s[2])
    cmap = colormaps["viridis"]
    colour = {s[:2]: cmap(i / max(1, len(sizes) - 1)) for i, s in enumerate(sizes)}
    entry = fits.get("chinchilla")
    fit = (
        ChinchillaFit(**{k: entry[k] for k in ("E", "A", "B", "alpha", "beta")}) if entry else None
    )

    fig = Figure(figsize=(16, 4.8), dpi=100)
    ax_c, ax_nd, ax_iso = fig.subplots(1, 3)

    # 1. loss against compute
    for layers, width, params in sizes:
        pick = [i for i, r in enumerate(runs) if (r.n_layers, r.d_model) == (layers, width)]
        order = sorted(pick, key=lambda i: c[i])
        ax_c.plot(c[order], loss[order], "o-", color=colour[(layers, width)], alpha=0.8,
                  label=f"{layers}x{width} ({params / 1e3:.0f}K)")  # fmt: skip
    frontier = fits["kaplan"]["frontier"]
    ax_c.plot(c[frontier], loss[frontier], "k-", lw=2.5, alpha=0.3, label="frontier")
    law = fits["kaplan"].get("L(C)")
    if law and np.isfinite(law["scale"]):
        xs = np.geomspace(c.min(), c.max() * 3, 50)
        ax_c.plot(xs, (law["scale"] / xs) ** law["exponent"], "k--", lw=1,
                  label=f"Kaplan L(C) ∝ C^-{law['exponent']:.3f}")  # fmt: skip
    held = fits.get("holdout")
    if held and "predicted" in held:
        i = next(i for i, r in enumerate(runs) if r.name == held["run"])
        ax_c.plot([c[i]], [held["predicted"]], "r*", ms=14,
                  label=f"{held['run']} predicted without it ({100 * held['error']:+.1f}%)")  # fmt: skip
    ax_c.set_xscale("log")
    ax_c.set_xlabel("training FLOPs (Chinchilla's count)")
    ax_c.set_ylabel("validation loss (nats/token)")
    ax_c.set_title("loss against compute", fontsize=10)
    ax_c.grid(alpha=0.3, which="both")
    ax_c.legend(fontsize=7)

    if fit is None:
        for ax in (ax_nd, ax_iso):
            ax.text(0.5, 0.5, fits.get("note", "no L(N, D) fit"), ha="center", va="center",
                    transform=ax.transAxes, fontsize=9)  # fmt: skip
    else:
        _contours(ax_nd, fit, n, d, loss)
        _isoflops(ax_iso, fit, n, c, loss)
    fig.tight_layout()
    atomic_write_with(png_path, lambda tmp: fig.savefig(tmp, format="png"))
    return fig


def _contours(ax, fit: ChinchillaFit, n, d, loss) -> None:
    """Fitted L(N, D) over the runs' range (and a little beyond), runs and optimal path."""
    from matplotlib.ticker import NullFormatter  # deferred: slow to import, only for plots

    ds = np.geomspace(d.min() / 3, d.max() * 3, 120)
    ns = np.geomspace(n.min() / 3, n.max() * 3, 120)
    grid_d, grid_n = np.meshgrid(ds, ns)
    levels = np.linspace(loss.min() - 0.1, loss.max() + 0.2, 14)
    filled = ax.contourf(grid_d, grid_n, fit(grid_n, grid_d), levels=levels, cmap="magma_r",
                         extend="both")  # fmt: skip
    ax.contour(grid_d, grid_n, fit(grid_n, grid_d), levels=levels, colors="k", linewidths=0.3)
    ax.figure.colorbar(filled, ax=ax, label="fitted loss")
    ax.scatter(d, n, c=loss, cmap="magma_r", vmin=levels[0], vmax=levels[-1], edgecolors="w",
               s=40, zorder=3)  # fmt: skip
    if fit.alpha > 0 and fit.beta > 0:  # else the fit has no compute-optimal split
        budgets = np.geomspace(6 * n.min() * d.min() / 9, 6 * n.max() * d.max() * 9, 40)
        path = [compute_optimal(fit, b) for b in budgets]
        ax.plot([p.d for p in path], [p.n for p in path], "c-", lw=2,
                label=f"compute-optimal: N ∝ C^{fit.beta / (fit.alpha + fit.beta):.2f}")  # fmt: skip
        ax.legend(fontsize=7, loc="lower right")
    ax.set_xlim(ds[0], ds[-1])
    ax.set_ylim(ns[0], ns[-1])
    ax.set_xscale("log")
    ax.set_yscale("log")
    for axis in (ax.xaxis, ax.yaxis):  # over a short range, minor labels pile up
        axis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("training tokens D")
    ax.set_ylabel("parameters N")
    ax.set_title(
        f"L(N, D) = {fit.E:.2f} + {fit.A:.3g}/N^{fit.alpha:.2f} + {fit.B:.3g}/D^{fit.beta:.2f}",
        fontsize=9,
    )


def _isoflops(ax, fit: ChinchillaFit, n, c, loss) -> None:
    """Fitted loss against N at fixed C = 6 N D, for budgets spanning the sweep's."""
    from matplotlib import colormaps  # deferred: slow to import, only for plots

    budgets = np.geomspace(c.min(), c.max() * 10, 5)
    cmap = colormaps["plasma"]
    ns = np.geomspace(n.min() / 10, n.max() * 10, 200)
    for k, budget in enumerate(budgets):
        col = cmap(k / (len(budgets) - 0.5))
        ax.plot(ns, fit(ns, budget / (6 * ns)), color=col, label=f"C = {budget:.1e}")
        if fit.alpha > 0 and fit.beta > 0:
            best = compute_optimal(fit, budget)
            ax.plot([best.n], [best.loss], "o", color=col, mec="k")
    ax.scatter(n, loss, c="gray", s=14, alpha=0.6, label="runs (any C)", zorder=3)
    ax.set_xscale("log")
    ax.set_ylim(fit.E - 0.05, max(loss.max(), fit.E) + 0.6)
    ax.set_xlabel("parameters N")
    ax.set_ylabel("fitted loss")
    ax.set_title("isoFLOP curves of the fit (D = C / 6N); dots: optimal N", fontsize=9)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
