"""A scaling-law sweep: a grid of GPT sizes and token budgets trained on one corpus, then
fitted (``lmlab scaling``; the fits are ``lmlab.scaling.fits``).

Every grid point is one run of lmlab's trainer in ``out_dir/runs/<size>-<tokens>/``
(``2x96-2.5M``: 2 layers of width 96 trained on 2.5M tokens), from scratch, seeded, with
warm-up and a cosine decay that ends at the run's own last step (Chinchilla's point: a
schedule longer than the run overstates the loss of short runs). A finished run leaves
``result.json`` and is skipped by a rerun; a killed sweep resumes the run it was in from
its last checkpoint. Each run's loss is measured once at its end on the whole validation
split (non-overlapping training windows, ``token_nll``), so that one run gives one point
(N, D, L) and the evaluation noise is small.

The learning rate may shrink with width: ``lr(d) = lr * (128 / d) ** lr_exponent`` (0: the
same for all; 0.5 by default, wider models taking smaller steps).

After the runs, ``fit_sweep`` fits Kaplan's L(N), L(D), L(C), Chinchilla's L(N, D) with N
counting all parameters and with N leaving out the embeddings (Pearce and Song 2024), with
bootstrap intervals, the compute-optimal N and D for budgets around the sweep's, and, with
``holdout_largest``, the L(N, D) fitted without the largest run and its error on it.
Outputs: ``scaling.json`` and ``scaling.png`` (loss against compute with the frontier,
the fitted L(N, D) contours, isoFLOP curves).
"""

from __future__ import annotations

import json
import logging
import math
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
from tqdm.auto import tqdm

from lmlab.api import prepare_data
from lmlab.errors import ConfigError
from lmlab.fileio import atomic_write_json
from lmlab.generate.likelihood import token_nll
from lmlab.models import build_model, get_preset
from lmlab.models.flops import (
    chinchilla_flops_per_token,
    count_parameters,
    kaplan_flops_per_token,
)
from lmlab.scaling.fits import (
    ChinchillaFit,
    compute_optimal,
    fit_chinchilla,
    fit_power_law,
    pareto_frontier,
)
from lmlab.scaling.plots import plot_sweep
from lmlab.seeds import seeded
from lmlab.train import TrainConfig, train
from lmlab.train.run import RunLock, ensure_run_dir

log = logging.getLogger(__name__)

# Named grids: (sizes as n_layers x d_model, token budgets per run).
PRESETS: dict[str, tuple[str, str]] = {
    # The real sweep: 12 runs, 66K to 1.8M parameters, 1M to 6M characters.
    "sweep": ("2x48,2x96,3x128,4x192", "1M,2.5M,6M"),
    # Lesson 25: 9 small runs, about 3 minutes of one CPU core.
    "lesson": ("1x32,2x48,2x64", "300k,600k,1.2M"),
}
SETTINGS_FILE = "sweep.json"
RESULT_FILE = "result.json"
LR_REFERENCE_WIDTH = 128
_SCALES = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9}


@dataclass(frozen=True)
class Size:
    n_layers: int
    d_model: int
    n_heads: int

    @property
    def label(self) -> str:
        return f"{self.n_layers}x{self.d_model}"


def parse_sizes(text: str) -> list[Size]:
    """``"2x48,3x128"`` (n_layers x d_model, optionally ``x n_heads``) -> sizes.

    Heads default to width / 32 (head size 32), else width / 16, else 1.

    >>> [s.n_heads for s in parse_sizes("2x48,4x192,1x20x2")]
    [3, 6, 2]
    """
    sizes = []
    for item in [s.strip() for s in str(text).split(",") if s.strip()]:
        m = re.fullmatch(r"(\d+)x(\d+)(?:x(\d+))?", item)
        if not m or min(int(g) for g in m.groups() if g) < 1:
            raise ConfigError(
                f"size {item!r} is invalid: write n_layers x d_model, optionally x n_heads, "
                'e.g. "2x48,4x192" or "2x48x3"'
            )
        layers, width = int(m[1]), int(m[2])
        heads = int(m[3]) if m[3] else next(width // h for h in (32, 16, width) if width % h == 0)
        if width % heads:
            raise ConfigError(f"size {item!r}: n_heads={heads} must divide d_model={width}")
        sizes.append(Size(layers, width, heads))
    if not sizes or len({s.label for s in sizes}) != len(sizes):
        raise ConfigError(f"sizes={text!r} must name at least one size, each once")
    return sizes


def parse_tokens(text: str) -> list[int]:
    """``"150k,2.5M"`` -> token budgets per run.

    >>> parse_tokens("150k, 2.5M,1000")
    [150000, 2500000, 1000]
    """
    budgets = []
    for item in [s.strip() for s in str(text).split(",") if s.strip()]:
        m = re.fullmatch(r"(\d+(?:\.\d*)?|\.\d+)\s*([kKmMgG]?)", item)
        value = int(float(m[1]) * _SCALES[m[2].lower()]) if m else 0
        if value < 1:
            raise ConfigError(
                f"token budget {item!r} is invalid: a positive count such as 150k, 2.5M, 1000"
            )
        budgets.append(value)
    if not budgets or len(set(budgets)) != len(budgets):
        raise ConfigError(f"tokens={text!r} must name at least one budget, each once")
    return budgets


@dataclass
class RunPoint:
    """One finished grid point (the content of its result.json)."""

    name: str
    n_layers: int
    d_model: int
    n_heads: int
    params: int
    """All parameters (Chinchilla's N)."""
    params_non_embedding: int
    """Kaplan's N: embedding tables left out."""
    tokens: int
    """Training tokens actually seen (steps x batch x seq_len)."""
    steps: int
    lr: float
    flops: float
    """Training FLOPs, Chinchilla's appendix F count (embeddings included)."""
    flops_kaplan: float
    """Training FLOPs, Kaplan's 6 N + 6 L T d_attn per token (N non-embedding)."""
    val_loss: float
    """Nats per token over the whole validation split."""
    cpu_s: float
    """CPU seconds (all threads) of the call that finished the run, evaluation included."""
    wall_s: float
    resumed: bool = False


@dataclass
class SweepResult:
    runs: list[RunPoint]
    fits: dict[str, Any]
    out_dir: Path
    files: dict[str, Path] = field(default_factory=dict)


def scaling(
    preset: Literal["sweep", "lesson"] = "sweep",
    sizes: str | None = None,
    tokens: str | None = None,
    data: str = "tinyshakespeare",
    tokenizer: Literal["char", "byte", "bpe"] = "char",
    vocab_size: int | None = None,
    out_dir: str = "runs/scaling",
    batch_size: int = 32,
    seq_len: int = 128,
    lr: float = 3e-3,
    lr_exponent: float = 0.5,
    precision: Literal["auto", "bf16", "fp32"] = "auto",
    device: str = "auto",
    seed: int = 1337,
    holdout_largest: bool = True,
    bootstrap: int = 100,
    budgets: str | None = None,
    progress: bool = True,
) -> SweepResult:
    """Train a grid of GPT sizes x token budgets (resumably) and fit scaling laws to it.

    Args:
        preset: a named grid: "sweep" (12 runs, 66K-1.8M parameters, 1M-6M tokens) or
            "lesson" (9 small runs, a few minutes); sizes and tokens replace its parts.
        sizes: model sizes as n_layers x d_model (x n_heads), e.g. "2x48,2x96,4x192".
        tokens: training tokens per run, e.g. "1M,2.5M,6M".
        data: "tinyshakespeare", a text file, or a folder of .txt files.
        tokenizer: char, byte or BPE (all runs share it).
        vocab_size: BPE vocabulary size.
        out_dir: data in out_dir/data, each run in out_dir/runs/<size>-<tokens>, and the
            fits in scaling.json and scaling.png.
        batch_size: sequences per optimizer step.
        seq_len: tokens per training sequence (the models' context).
        lr: peak learning rate at width 128; warm-up, then cosine decay to lr/10.
        lr_exponent: lr(d) = lr * (128 / d) ** lr_exponent (0: one lr for all widths).
        precision: bf16 autocast, fp32, or auto (bf16 where supported).
        device: auto, cpu, cuda, cuda:N or mps.
        seed: seeds every run's weights and data order, and the bootstrap.
        holdout_largest: also fit without the largest run (most compute) and report the
            error of its predicted loss.
        bootstrap: resamples of the runs for the fits' intervals (0: none).
        budgets: compute budgets in FLOPs to plan for, e.g. "1e15,1e17"; None: 1x, 10x
            and 100x the sweep's largest run.
        progress: show progress bars.
    """
    if preset not in PRESETS:
        raise ConfigError(f"preset={preset!r} is invalid: choose one of {', '.join(PRESETS)}")
    grid_sizes = parse_sizes(sizes or PRESETS[preset][0])
    grid_tokens = parse_tokens(tokens or PRESETS[preset][1])
    plan_budgets = _parse_budgets(budgets)
    for name, value, low in (("batch_size", batch_size, 1), ("seq_len", seq_len, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ConfigError(f"{name}={value!r} is invalid: must be an integer >= {low}")
    if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0):
        raise ConfigError(f"lr={lr!r} is invalid: must be a positive number")
    if not isinstance(bootstrap, int) or bootstrap < 0:
        raise ConfigError(f"bootstrap={bootstrap!r} is invalid: must be an integer >= 0")
    settings = {
        "data": str(data),
        "tokenizer": tokenizer,
        "vocab_size": vocab_size,
        "batch_size": batch_size,
        "seq_len": seq_len,
        "lr": lr,
        "lr_exponent": lr_exponent,
        "precision": precision,
        "seed": seed,
    }
    out = ensure_run_dir(out_dir)
    with RunLock(out):
        _check_settings(out, settings)
        tok, train_ids, val_ids = prepare_data(data, out, tokenizer, vocab_size)
        grid = [(s, t) for s in grid_sizes for t in grid_tokens]
        runs = []
        bar = tqdm(grid, desc="scaling sweep", unit="run", disable=not progress)
        for size, budget in bar:
            bar.set_postfix(run=f"{size.label}-{_short(budget)}", refresh=True)
            runs.append(
                run_point(size, budget, tok, train_ids, val_ids, out, settings, device, progress)
            )
        bar.close()
    fits = fit_sweep(runs, holdout_largest, bootstrap, seed, plan_budgets)
    files = {"json": out / "scaling.json", "plot": out / "scaling.png"}
    atomic_write_json(
        files["json"],
        {
            "settings": {**settings, "sizes": [s.label for s in grid_sizes]},
            "runs": [asdict(r) for r in runs],
            "cpu_s_total": sum(r.cpu_s for r in runs),
            "fits": fits,
        },
    )
    plot_sweep(runs, fits, files["plot"])
    return SweepResult(runs, fits, out, files)


def _check_settings(out: Path, settings: dict[str, Any]) -> None:
    """A rerun must train as the first call did: the runs it skips were made that way."""
    path = out / SETTINGS_FILE
    if path.is_file():
        before = json.loads(path.read_text(encoding="utf-8"))
        changed = {k: (before.get(k), v) for k, v in settings.items() if before.get(k) != v}
        if changed:
            listed = ", ".join(f"{k}: {a!r} before, {b!r} now" for k, (a, b) in changed.items())
            raise ConfigError(
                f"{str(out)!r} holds a sweep made with other settings ({listed}): use another "
                "out_dir, or the same settings to resume it"
            )
    else:
        atomic_write_json(path, settings)


def _short(tokens: int) -> str:
    """2500000 -> "2.5M", 150000 -> "150k"."""
    for scale, unit in ((10**9, "G"), (10**6, "M"), (10**3, "k")):
        if tokens >= scale:
            return f"{tokens / scale:g}{unit}"
    return str(tokens)


def run_point(
    size: Size,
    budget: int,
    tok: Any,
    train_ids: np.ndarray,
    val_ids: np.ndarray,
    out: Path,
    settings: dict[str, Any],
    device: str,
    progress: bool,
) -> RunPoint:
    """Train (or resume, or skip when finished) one grid point; -> its RunPoint."""
    name = f"{size.label}-{_short(budget)}"
    run_dir = out / "runs" / name
    done = run_dir / RESULT_FILE
    if done.is_file():
        return RunPoint(**json.loads(done.read_text(encoding="utf-8")))
    batch_size, seq_len = settings["batch_size"], settings["seq_len"]
    spec = {
        **get_preset("gpt-char-tiny"),
        "vocab_size": tok.vocab_size,
        "n_layers": size.n_layers,
        "d_model": size.d_model,
        "n_heads": size.n_heads,
        "d_ff": 4 * size.d_model,
        "max_seq_len": seq_len,
    }
    with seeded(settings["seed"]):
        model = build_model(spec)
    steps = max(1, math.ceil(budget / (batch_size * seq_len)))
    lr = settings["lr"] * (LR_REFERENCE_WIDTH / size.d_model) ** settings["lr_exponent"]
    resumed = (run_dir / "checkpoints").is_dir()
    config = TrainConfig(
        out_dir=str(run_dir),
        max_steps=steps,
        batch_size=batch_size,
        seq_len=seq_len,
        lr=lr,
        min_lr=lr / 10,
        warmup_steps=min(100, max(1, steps // 10)),
        precision=settings["precision"],
        device=device,
        eval_interval=10**9,  # the one evaluation that counts is the one below
        ckpt_interval=max(50, steps // 4),  # a killed sweep loses at most a quarter run
        keep_last=1,
        log_interval=max(1, min(50, steps // 10)),
        seed=settings["seed"],
        resume="auto",
        progress=progress,
    )
    cpu, wall = time.process_time(), time.perf_counter()
    result = train(model, train_ids, None, config, tokenizer=tok)
    loss = token_nll(model, val_ids, stride=seq_len, context=seq_len, progress=False)
    counts = count_parameters(model.config)
    point = RunPoint(
        name=name,
        n_layers=size.n_layers,
        d_model=size.d_model,
        n_heads=size.n_heads,
        params=counts.total,
        params_non_embedding=counts.non_embedding,
        tokens=result.step * batch_size * seq_len,
        steps=result.step,
        lr=lr,
        flops=chinchilla_flops_per_token(model.config, seq_len)
        * result.step
        * batch_size
        * seq_len,
        flops_kaplan=kaplan_flops_per_token(model.config, seq_len)
        * result.step
        * batch_size
        * seq_len,
        val_loss=float(loss.mean()),
        cpu_s=time.process_time() - cpu,
        wall_s=time.perf_counter() - wall,
        resumed=resumed,
    )
    atomic_write_json(done, asdict(point))
    log.info("scaling: %s val_loss %.4f (%.0f CPU s)", name, point.val_loss, point.cpu_s)
    return point


def _parse_budgets(text: str | None) -> list[float] | None:
    if text is None:
        return None
    try:
        values = [float(v) for v in str(text).split(",") if v.strip()]
    except ValueError:
        values = []
    if not values or not all(math.isfinite(v) and v > 0 for v in values):
        raise ConfigError(f"budgets={text!r} is invalid: positive FLOP counts such as 1e15,1e17")
    return values


# ----------------------------------------------------------------------------- fits


def fit_sweep(
    runs: list[RunPoint],
    holdout_largest: bool = True,
    bootstrap: int = 100,
    seed: int = 0,
    budgets: list[float] | None = None,
) -> dict[str, Any]:
    """Every fit of a sweep, as JSON-ready dicts (module doc)."""
    n = np.array([r.params for r in runs], dtype=float)
    n_ne = np.array([r.params_non_embedding for r in runs], dtype=float)
    d = np.array([r.tokens for r in runs], dtype=float)
    c = np.array([r.flops for r in runs], dtype=float)
    loss = np.array([r.val_loss for r in runs], dtype=float)
    fits: dict[str, Any] = {"kaplan": _kaplan(n_ne, d, c, loss)}
    if len(runs) < 5:
        fits["chinchilla"] = None
        fits["note"] = f"L(N, D) has 5 parameters: {len(runs)} runs are too few to fit it"
        return fits
    budgets = budgets or [float(c.max() * k) for k in (1, 10, 100)]
    for key, n_used, what in (
        ("chinchilla", n, "all parameters (embeddings included)"),
        ("chinchilla_non_embedding", n_ne, "non-embedding parameters (Kaplan's N)"),
    ):
        fit = fit_chinchilla(n_used, d, loss, bootstrap=bootstrap, seed=seed)
        fits[key] = {
            "N": what,
            **fit.params(),
            "a": fit.beta / (fit.alpha + fit.beta),
            "intervals": fit.intervals,
            "bootstrap": bootstrap,
            "compute_optimal": _plans(fit, budgets),
        }
    if holdout_largest:
        fits["holdout"] = _holdout(runs, n, d, loss, c)
    return fits


def _plans(fit: ChinchillaFit, budgets: list[float]) -> list[dict[str, float]]:
    """The compute-optimal split of each budget; none when the fit has no optimum."""
    try:
        return [asdict(compute_optimal(fit, b)) for b in budgets]
    except ConfigError as e:
        log.warning("no compute-optimal plan: %s", e)
        return []


def _kaplan(n_ne, d, c, loss) -> dict[str, Any]:
    """L(N): the best loss of each size; L(D): the best of each token budget; L(C): the
    runs on the compute frontier (none cheaper did better)."""
    laws = {}
    for key, x in (("L(N)", n_ne), ("L(D)", d)):
        best = {v: loss[x == v].min() for v in np.unique(x)}
        laws[key] = _law(list(best), list(best.values()))
    frontier = pareto_frontier(c, loss)
    laws["L(C)"] = _law(c[frontier].tolist(), loss[frontier].tolist())
    laws["frontier"] = frontier
    return laws


def _law(x: list[float], y: list[float]) -> dict[str, float] | None:
    if len(x) < 2:
        return None
    law = fit_power_law(x, y)
    return {"exponent": law.exponent, "scale": law.scale}


def _holdout(runs, n, d, loss, c) -> dict[str, Any]:
    """Fit L(N, D) without the run of most compute (then most parameters); predict it."""
    largest = max(range(len(runs)), key=lambda i: (c[i], n[i]))
    rest = [i for i in range(len(runs)) if i != largest]
    if len(rest) < 5:
        return {"run": runs[largest].name, "note": "too few other runs (5 needed) to fit"}
    fit = fit_chinchilla(n[rest], d[rest], loss[rest])
    predicted = float(fit(n[largest], d[largest]))
    actual = float(loss[largest])
    return {
        "run": runs[largest].name,
        "fit": fit.params(),
        "predicted": predicted,
        "actual": actual,
        "error": (predicted - actual) / actual,
    }


def chinchilla_of(fits: dict[str, Any], key: str = "chinchilla") -> ChinchillaFit | None:
    """The ChinchillaFit stored under ``key`` of ``fit_sweep``'s result, if any."""
    entry = fits.get(key)
    if not entry:
        return None
    return ChinchillaFit(**{k: entry[k] for k in ("E", "A", "B", "alpha", "beta")})
