"""Step guards: decide, from a step's loss and gradient norm, whether to apply it.

Two failures are caught before the optimizer moves the weights:

- **Non-finite step**: the loss or the gradient norm is NaN or infinite. The step is
  skipped (no optimizer update, the schedule does not advance, the batch is consumed);
  ``max_nonfinite`` such steps in a row mean the run has diverged.
- **Loss spike** (and, optionally, gradient-norm spike): after ``spike_warmup`` applied
  steps, a loss above ``spike_factor`` times the median of the last ``spike_window``
  losses. The step is skipped the same way.

Why skipping is a rollback here: the loss of a step is measured *before* its update, so
when a spike is seen the weights and optimizer state are still those after the last good
step. Discarding the step's gradients leaves the run exactly in that last good state, and
the offending batch is not used again; no copy of the weights is kept in memory. (A bad
*update* is what a gradient-norm spike would catch, before it is applied; clipping bounds
it too.)

The median window records every finite loss, skipped or not: an isolated spike is
skipped, but a lasting change of level (say, a new data mix) becomes the new normal after
about half a window instead of blocking training forever.

The guard is pure logic on Python floats, so its state is a small dict of numbers that
survives a checkpoint. Worked example, window 3, factor 2, no warm-up::

    losses 4.0 3.0 3.5 -> median 3.5; next 9.0 > 2 * 3.5 -> "loss_spike" (skipped)
    window now 3.0 3.5 9.0 -> median 3.5; next 3.2 -> applied
"""

from __future__ import annotations

import math
import statistics
from collections import deque

from lmlab.errors import LMLabError


class TrainingDiverged(LMLabError, RuntimeError):
    """Training stopped: too many non-finite steps in a row."""


class StepGuard:
    """Decides whether a step is applied; see the module docstring."""

    def __init__(
        self,
        spike_factor: float | None = None,
        spike_window: int = 50,
        spike_warmup: int = 0,
        grad_spike_factor: float | None = None,
    ):
        self.spike_factor = spike_factor
        self.grad_spike_factor = grad_spike_factor
        self.spike_warmup = spike_warmup
        self.losses: deque[float] = deque(maxlen=spike_window)
        self.grad_norms: deque[float] = deque(maxlen=spike_window)
        self.nonfinite_in_a_row = 0
        self.skipped = 0

    def check(self, step: int, loss: float, grad_norm: float) -> str | None:
        """None to apply the step, or why to skip it: "nonfinite_loss", "nonfinite_grad",
        "loss_spike" or "grad_spike". ``step`` counts the steps applied so far."""
        reason = None
        if not math.isfinite(loss):
            reason = "nonfinite_loss"
        elif not math.isfinite(grad_norm):
            reason = "nonfinite_grad"
        if reason is not None:
            self.nonfinite_in_a_row += 1
            self.skipped += 1
            return reason
        self.nonfinite_in_a_row = 0
        window_full = len(self.losses) == self.losses.maxlen
        if step >= self.spike_warmup and window_full:
            if self.spike_factor and loss > self.spike_factor * statistics.median(self.losses):
                reason = "loss_spike"
            elif self.grad_spike_factor and grad_norm > self.grad_spike_factor * (
                statistics.median(self.grad_norms)
            ):
                reason = "grad_spike"
        self.losses.append(loss)
        self.grad_norms.append(grad_norm)
        if reason is not None:
            self.skipped += 1
        return reason

    def state_dict(self) -> dict:
        return {
            "losses": list(self.losses),
            "grad_norms": list(self.grad_norms),
            "nonfinite_in_a_row": self.nonfinite_in_a_row,
            "skipped": self.skipped,
        }

    def load_state_dict(self, state: dict) -> None:
        self.losses.clear()
        self.losses.extend(float(x) for x in state["losses"])
        self.grad_norms.clear()
        self.grad_norms.extend(float(x) for x in state["grad_norms"])
        self.nonfinite_in_a_row = int(state["nonfinite_in_a_row"])
        self.skipped = int(state["skipped"])
