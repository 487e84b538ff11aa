"""One seed for a whole run: ``seeded(seed)`` around everything a run draws at random
before its own generators take over (model initialisation, LoRA and adapter weights, a
soft prompt, a reward or value head).

    >>> with seeded(7):
    ...     model = build_model(spec)     # the same weights for the same seed, every time

Inside, torch's global RNG (CPU, and CUDA where present) starts from ``seed``; on leaving,
the caller's RNG state is put back, so seeding a run never changes what the code around
it draws next. The trainer's data order and dropout have their own seeded state
(``lmlab.train``), saved in every checkpoint for an exact resume.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch


@contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Run the block with torch's global RNG seeded from ``seed``, then restore it."""
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield
