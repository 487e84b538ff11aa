"""Looking inside models: gradient diagnostics (more arrives with the interpretability work)."""

from lmlab.interp.gradients import plot_vanishing_gradients, vanishing_gradients

__all__ = ["plot_vanishing_gradients", "vanishing_gradients"]
