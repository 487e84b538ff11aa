"""Model FLOPs utilisation: the model's training FLOPs per second as a share of what this
machine's matrix multiply reaches at the run's dtype.

The ceiling is measured, not read from a data sheet (a CPU has none that fits, and a GPU's
peak assumes clocks it may not hold): ``torch.mm`` of two square matrices (2048 on a GPU,
1024 on a CPU, where 2048 takes seconds), one warm-up and then the fastest of ``reps``
timed products, ``2 n^3`` FLOPs each (the fastest: other work on a shared machine only
ever slows a product down). It is measured once per machine, dtype and thread count and
cached in ``~/.cache/lmlab/matmul_ceiling.json``.

A ceiling measured while other processes held the cores is too low, and every MFU read
against it too high (a 2-core machine under load cached a third of its bf16 rate, and the
demo logged "MFU 140%"). So a run that computes an MFU above 1 measures again
(``matmul_ceiling(..., remeasure=True)``), and the cache keeps the higher of the two.

MFU = flops_per_token * tokens_per_s / ceiling (PaLM, appendix B, counts it so with the
hardware's peak); the FLOPs per token are ``lmlab.models.flops.training_flops_per_token``.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import torch

from lmlab.devices import cpu_plan
from lmlab.fileio import atomic_write_json

log = logging.getLogger(__name__)


def cache_file() -> Path:
    return Path.home() / ".cache" / "lmlab" / "matmul_ceiling.json"


def machine_key(device: torch.device, dtype: torch.dtype) -> str:
    """``"cpu|AMD EPYC 9B45|threads=1|torch.bfloat16"`` or ``"cuda|NVIDIA H100 ...|..."``."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = cpu_plan().model
    return f"{device.type}|{name}|threads={torch.get_num_threads()}|{dtype}"


def measure_matmul_flops(device: torch.device, dtype: torch.dtype, size: int, reps: int) -> float:
    """FLOP/s of ``torch.mm`` on two ``size x size`` matrices: the fastest of ``reps``."""
    # A generator of its own: the global RNG (dropout, data order) must not move, or a run
    # that measures would differ from one that found the ceiling cached.
    generator = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(size, size, device=device, generator=generator).to(dtype)
    b = torch.randn(size, size, device=device, generator=generator).to(dtype)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    torch.mm(a, b)  # warm-up: kernels chosen, caches filled
    sync()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        torch.mm(a, b)
        sync()
        times.append(time.perf_counter() - start)
    return 2 * size**3 / min(times)


_MEASURED: dict[str, float] = {}  # this process's ceilings, by machine_key


def matmul_ceiling(device: torch.device, dtype: torch.dtype, remeasure: bool = False) -> float:
    """This machine's measured matmul FLOP/s at ``dtype`` (cached on disk and in memory).

    ``remeasure``: measure again (the cached value looks too low: an MFU above 1) and keep
    the higher of the old and new values, on disk too."""
    key = machine_key(device, dtype)
    if key in _MEASURED and not remeasure:
        return _MEASURED[key]
    path = cache_file()
    try:
        cached = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        cached = {}
    cached = cached if isinstance(cached, dict) else {}
    old = cached.get(key) if isinstance(cached.get(key), (int, float)) else None
    if old is not None and not remeasure:
        _MEASURED[key] = float(old)
        return _MEASURED[key]
    size = 2048 if device.type == "cuda" else 1024
    flops = max(measure_matmul_flops(device, dtype, size, reps=5), old or 0.0)
    _MEASURED[key] = flops
    try:
        atomic_write_json(path, {**cached, key: flops})
    except OSError as e:  # a read-only home: measure again next time
        log.warning("cannot cache the matmul ceiling in %s: %s", path, e)
    return flops


def forget_ceilings() -> None:
    """Drop this process's remembered ceilings (the next call reads the file again)."""
    _MEASURED.clear()
