"""Several model families trained on the same data for the same budget, side by side
(issue 3's comparison: from counting n-grams up to a small GPT).

Every model sees the same tokens: the corpus is tokenized once into ``out_dir/data`` and
each model trains in ``out_dir/<name>/`` from scratch (``resume="never"``). A budget is
either wall time per model (``"3m"``, ``"90s"``, ``"1h"``) or training tokens per model
(``"2M tok"``, ``"500k"``). The n-gram model has nothing to train: it is fitted to the
training ids (timed) and saved as a checkpoint like the others.

Every model is scored the same way on the whole validation split (``token_nll`` with
``context=stride=seq_len``):
non-overlapping windows of ``seq_len + 1`` tokens, each predicting its last ``seq_len``
tokens from what precedes them inside the window, as in training. Families without a fixed
context (n-gram, bigram, MLP, bag, recurrent) are scored in these windows too, so a
recurrent model gets no more left context than a transformer does.

Outputs: ``compare.md`` (a Markdown table and one sample per model), ``compare.json`` and
``compare.png``: validation loss from each run's metrics.jsonl against wall-clock seconds
(``x_axis="time"``; the n-gram is one point at its fit time) or against optimizer steps
(``x_axis="step"``: the same tokens for every model whatever the machine's load; a fitted
model is a dashed line at its loss). Each label ends with the model's whole-split loss.

Objectives. Every trained model is trained with teacher forcing unless ``objectives``
names others (``lmlab.train.objectives``: free-running, scheduled sampling with a linear,
exponential or inverse-sigmoid schedule); with several, each trained model runs once per
objective, in ``out_dir/<name>-<objective>``. ``exposure`` then asks the question
scheduled sampling is about: with a share eps of the inputs true and the rest the model's
own samples, how good is each model's next-token loss (``loss_fed_own_samples`` on 64
fixed validation windows; ``exposure.png``)?
"""

from __future__ import annotations

import dataclasses
import logging
import math
import re
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from lmlab.api import model_spec_from, prepare_data
from lmlab.checkpoint.io import save_checkpoint
from lmlab.errors import ConfigError, closest, pick_names
from lmlab.eval.perplexity import token_nll
from lmlab.fileio import atomic_write_json, atomic_write_with
from lmlab.generate import SamplingParams, generate_text
from lmlab.models import PRESETS, build_model, model_spec
from lmlab.train import TrainConfig
from lmlab.train import train as train_loop
from lmlab.train.metrics import note, read_metrics
from lmlab.train.objectives import loss_fed_own_samples

log = logging.getLogger(__name__)

# The n-gram rung: order 5 (four characters of context), interpolated Kneser-Ney.
NGRAM_SPEC: dict[str, Any] = {
    "family": "ngram",
    "vocab_size": None,
    "order": 5,
    "smoothing": "kneser_ney",
}

# Short name -> preset name (or the n-gram spec above).
SHORT_NAMES: dict[str, str | dict[str, Any]] = {
    "ngram": NGRAM_SPEC,
    "bigram": "bigram-char",
    "mlp": "mlp-char",
    "bag": "bag-char",
    "bag-sum": "bag-sum-char",
    "rnn": "rnn-char",
    "gru": "gru-char",
    "lstm": "lstm-char",
    "gpt": "gpt-char-tiny",
    "llama": "llama-small",
}

DEFAULT_MODELS = ("ngram", "bigram", "mlp", "bag", "rnn", "gru", "lstm", "gpt")

BUDGET_FORMS = (
    'wall time per model: "90s", "3m", "1.5h"; '
    'training tokens per model: "2M tok", "500k", "20000 tok"'
)
_TIME_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0}
_TOKEN_SCALES = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9, "b": 10**9}


@dataclass(frozen=True)
class Budget:
    """How long each model trains: ``kind`` "time" (seconds) or "tokens"."""

    kind: Literal["time", "tokens"]
    value: float


def parse_budget(text: str) -> Budget:
    """A budget string -> Budget.

    Lowercase s/m/h is wall time; a k/M/G multiplier or a ``tok``/``tokens`` suffix is
    tokens (``m`` means million only before ``tok``):

    >>> parse_budget("3m"), parse_budget("2M tok"), parse_budget("500k")
    (Budget(kind='time', value=180.0), Budget(kind='tokens', value=2000000), \
Budget(kind='tokens', value=500000))
    """
    s = str(text).strip()
    number = r"(\d+(?:\.\d*)?|\.\d+)"
    time_match = re.fullmatch(number + r"\s*([smh])", s)
    if time_match:
        seconds = float(time_match[1]) * _TIME_UNITS[time_match[2]]
        if seconds > 0:
            return Budget("time", seconds)
    token_match = re.fullmatch(number + r"\s*([kKMGB]?)\s*(tok|tokens)?", s) or re.fullmatch(
        number + r"\s*([kKmMgGbB]?)\s*(tok|tokens)", s
    )
    if token_match and (token_match[2] or token_match[3]):
        tokens = int(float(token_match[1]) * _TOKEN_SCALES[token_match[2].lower()])
        if tokens > 0:
            return Budget("tokens", tokens)
    raise ConfigError(f"budget={text!r} is invalid; valid forms: {BUDGET_FORMS}")


def resolve_model(name: str) -> tuple[str, dict[str, Any]]:
    """A short name (``SHORT_NAMES``), preset name or spec file -> (label, model spec).

    The label names the run's folder: the short or preset name, or a spec file's stem.
    """
    if name in SHORT_NAMES:
        target = SHORT_NAMES[name]
        return name, dict(target) if isinstance(target, dict) else model_spec_from(target)
    if name in PRESETS:
        return name, model_spec_from(name)
    path = Path(name)
    if path.suffix in (".json", ".yaml", ".yml"):
        return path.stem, model_spec_from(name)
    valid = list(SHORT_NAMES) + list(PRESETS)
    raise ConfigError(
        f"unknown model {name!r}{closest(name, valid)}; valid: {', '.join(valid)}, "
        "or a .json/.yaml spec file"
    )


def model_size(model: nn.Module) -> tuple[int, str]:
    """(count, unit): trainable parameters, or stored n-grams for the count-based model."""
    if model_spec(model)["family"] == "ngram":
        stored = sum(b.numel() for name, b in model.named_buffers() if name.startswith("keys_"))
        return stored, "n-grams"
    return sum(p.numel() for p in model.parameters()), "parameters"


@dataclass
class ModelResult:
    name: str
    """The name it was asked for (short name, preset or spec file stem)."""
    spec: dict[str, Any]
    """The model spec it was built from (vocab_size filled in)."""
    size: int
    """Trainable parameters, or for the n-gram the number of stored n-grams (see unit)."""
    size_unit: str
    steps: int
    """Optimizer steps (0 for the n-gram, which is fitted)."""
    wall_time_s: float
    """Training (or fitting) time in seconds, evaluation during training included."""
    tokens_per_s: float
    val_loss: float
    """Mean nats per token over the whole validation split (``token_nll``, training windows)."""
    val_perplexity: float
    sample: str
    """Generated continuation of the prompt (prompt excluded)."""
    run_dir: str
    curve: list[tuple[float, float]] = field(default_factory=list)
    """(wall-clock seconds, validation loss) of every evaluation during training."""
    step_curve: list[tuple[int, float]] = field(default_factory=list)
    """(optimizer step, validation loss) of the same evaluations (empty for the n-gram)."""
    objective: str = "teacher_forcing"
    """What it was fed in training (``TrainConfig.objective``; teacher_forcing for the n-gram)."""
    exposure: dict[str, float] = field(default_factory=dict)
    """Share of true inputs -> loss with the others its own samples (``exposure``)."""


@dataclass
class CompareResult:
    models: list[ModelResult]
    out_dir: Path
    table: str
    """The Markdown table written at the top of compare.md."""
    files: dict[str, Path] = field(default_factory=dict)
    """"markdown", "json", "plot" -> path."""


def compare(
    models: str | Sequence[str] = DEFAULT_MODELS,
    data: str = "tinyshakespeare",
    tokenizer: Literal["char", "byte", "bpe"] = "char",
    budget: str = "3m",
    out_dir: str = "runs/compare",
    batch_size: int = 32,
    seq_len: int = 128,
    lr: float = 2e-3,
    seed: int = 1337,
    prompt: str = "ROMEO:",
    sample_tokens: int = 100,
    temperature: float = 0.8,
    eval_interval: int | None = None,
    vocab_size: int | None = None,
    x_axis: Literal["time", "step"] = "time",
    title: str | None = None,
    objectives: str | Sequence[str] = "teacher_forcing",
    ss_k: float = 1.0,
    ss_c: float = 0.001,
    ss_min: float = 0.0,
    exposure: str | Sequence[float] | None = None,
    progress: bool = True,
) -> CompareResult:
    """Train several model families on the same data and budget; tabulate and plot them.

    Args:
        models: short names (ngram, bigram, mlp, bag, bag-sum, rnn, gru, lstm, gpt, llama), preset
            names or JSON/YAML spec files; a list, or one comma-separated string.
        data: ``"tinyshakespeare"``, a text file, or a folder of ``.txt`` files.
        tokenizer: char, byte, or BPE (all models share it).
        budget: per model, wall time ("90s", "3m", "1h") or tokens ("2M tok", "500k").
        out_dir: data in ``out_dir/data``, each model in ``out_dir/<name>``, and the
            comparison in compare.md, compare.json and compare.png.
        batch_size: sequences per optimizer step.
        seq_len: tokens per training sequence, and the scoring window (see module doc).
        lr: peak learning rate for every trained model (warmup, then cosine decay to lr/10
            for a token budget, constant for a time budget whose length in steps is unknown).
        seed: seeds training and sampling.
        prompt: the text every model continues.
        sample_tokens: tokens generated per model.
        temperature: sampling temperature (0 = greedy).
        eval_interval: steps between validation evaluations during training (the curves);
            None: a tenth of a token budget, 100 steps for a time budget.
        vocab_size: BPE vocabulary size.
        x_axis: what compare.png plots the validation loss against: wall-clock seconds
            ("time") or optimizer steps ("step", where a fitted n-gram is a dashed line).
        title: compare.png's title (None: none).
        objectives: what the trained models are fed in training, comma-separated:
            teacher_forcing, free_running, or scheduled sampling (linear, exponential,
            inverse_sigmoid); with several, each trained model runs once per objective.
        ss_k: scheduled sampling's k (linear start, exponential base < 1, inverse-sigmoid
            scale >= 1).
        ss_c: the linear schedule's decrease per step.
        ss_min: the linear schedule's floor.
        exposure: shares of true inputs, comma-separated (e.g. "1,0.5,0"): each trained
            model's loss with the other inputs its own samples, in compare.json and
            exposure.png; None: not measured.
        progress: show progress bars.
    """
    specs = resolve_models(models)  # bad names fail before any work
    if x_axis not in ("time", "step"):
        raise ConfigError(f"x_axis={x_axis!r} is invalid; valid: time, step")
    plan = parse_budget(budget)
    goals = parse_objectives(objectives)
    keeps = parse_keeps(exposure)
    out = Path(out_dir)
    schedule = {"ss_k": ss_k, "ss_c": ss_c, "ss_min": ss_min}
    for goal in goals:  # bad scheduled-sampling settings fail before any work too
        dataclasses.replace(
            train_config(plan, out, batch_size, seq_len, lr, seed, eval_interval, False),
            objective=goal,
            **schedule,
        )
    tok, train_ids, val_ids = prepare_data(data, out, tokenizer, vocab_size)
    tok.encode(prompt)  # a prompt the tokenizer cannot encode fails before any training
    sampling = SamplingParams(
        max_new_tokens=sample_tokens, temperature=temperature, seed=seed, truncate_prompt=True
    )
    windows = fixed_windows(val_ids, seq_len) if keeps else None
    results = []
    for base, spec in specs.items():
        spec = {**spec, "vocab_size": tok.vocab_size}
        fitted = spec["family"] == "ngram"
        for goal in ["teacher_forcing"] if fitted else goals:
            name = base if fitted or len(goals) == 1 else f"{base}-{goal}"
            run_dir = out / name
            log.info("compare: %s", name)
            torch.manual_seed(seed)
            model = build_model(spec)
            if fitted:
                run = fit_ngram(model, train_ids, tok, run_dir)
            else:
                config = train_config(
                    plan, run_dir, batch_size, seq_len, lr, seed, eval_interval, progress
                )
                config = dataclasses.replace(config, objective=goal, **schedule)
                run = train_model(model, train_ids, val_ids, tok, config)
            result = evaluate(
                name, spec, model, run, val_ids, tok, seq_len, prompt, sampling, progress
            )
            result.objective = goal
            if windows is not None and not fitted:
                losses = loss_fed_own_samples(model, windows.to(device_of(model)), keeps, seed=seed)
                result.exposure = {f"{k:g}": v for k, v in zip(keeps, losses)}
            results.append(result)

    settings = {
        "data": str(data),
        "tokenizer": tokenizer,
        "vocab_size": tok.vocab_size,
        "budget": budget,
        "budget_parsed": asdict(plan),
        "batch_size": batch_size,
        "seq_len": seq_len,
        "lr": lr,
        "seed": seed,
        "prompt": prompt,
        "train_tokens": len(train_ids),
        "val_tokens": len(val_ids),
        "objectives": goals,
        **schedule,
        "exposure": keeps,
    }
    table = markdown_table(results)
    files = write_comparison(results, table, settings, out, x_axis, title)
    return CompareResult(results, out, table, files)


OBJECTIVES = ("teacher_forcing", "free_running", "linear", "exponential", "inverse_sigmoid")


def parse_objectives(objectives: str | Sequence[str]) -> list[str]:
    """Training objectives (a list, or one comma-separated string) -> the list, checked."""
    return pick_names(objectives, OBJECTIVES, "objectives")


def parse_keeps(exposure: str | Sequence[float] | None) -> list[float]:
    """Shares of true inputs (``"1,0.5,0"`` or a list; None: none) -> floats in [0, 1]."""
    if exposure is None:
        return []
    parts = [p.strip() for p in exposure.split(",")] if isinstance(exposure, str) else exposure
    keeps = []
    for part in parts:
        if part == "":
            continue
        try:
            keep = float(part)
        except (TypeError, ValueError):
            keep = math.nan
        if not 0.0 <= keep <= 1.0:
            raise ConfigError(
                f"exposure: {part!r} is not a share of true inputs in [0, 1]; e.g. '1,0.5,0'"
            )
        keeps.append(keep)
    if not keeps:
        raise ConfigError("exposure is empty; give shares of true inputs, e.g. '1,0.5,0'")
    return keeps


def fixed_windows(val_ids: np.ndarray, seq_len: int, rows: int = 64) -> torch.Tensor:
    """``rows`` windows of ``seq_len + 1`` validation tokens spread evenly over the split
    (fewer, and shorter, when it is short) -> [rows, seq_len + 1] ids."""
    length = min(seq_len + 1, len(val_ids))
    if length < 2:
        raise ConfigError("exposure needs at least 2 validation tokens")
    starts = np.unique(np.linspace(0, len(val_ids) - length, rows).astype(int))
    return torch.tensor(
        np.stack([np.asarray(val_ids[s : s + length]) for s in starts]).astype(np.int64)
    )


def device_of(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def resolve_models(models: str | Sequence[str]) -> dict[str, dict[str, Any]]:
    """Model names (a list, or one comma-separated string) -> {label: model spec}.

    Raises ConfigError for no model, an unknown one or one named twice.
    """
    names = [m.strip() for m in models.split(",")] if isinstance(models, str) else list(models)
    names = [m for m in names if m]
    if not names:
        raise ConfigError("models is empty; give at least one, e.g. 'ngram,lstm,gpt'")
    specs = dict(resolve_model(m) for m in names)
    if len(specs) != len(names):
        raise ConfigError(f"models={names} names a model twice")
    return specs


def train_config(
    plan: Budget,
    run_dir: Path,
    batch_size: int,
    seq_len: int,
    lr: float,
    seed: int,
    eval_interval: int | None,
    progress: bool,
) -> TrainConfig:
    """The trainer's settings for one model of the comparison, from scratch.

    A token budget is a number of steps with warmup and cosine decay to lr/10, evaluated
    every tenth of the run; a time budget runs at a constant lr until the time is up,
    evaluated every 100 steps. Only the final checkpoint is kept.
    """
    if plan.kind == "tokens":
        max_steps = max(1, int(plan.value) // (batch_size * seq_len))
        time_budget_s = None
        default_interval = max(1, max_steps // 10)
    else:
        max_steps, time_budget_s, default_interval = 10**9, plan.value, 100
    interval = eval_interval or default_interval
    return TrainConfig(
        out_dir=str(run_dir),
        max_steps=max_steps,
        time_budget_s=time_budget_s,
        batch_size=batch_size,
        seq_len=seq_len,
        lr=lr,
        min_lr=lr / 10,
        lr_schedule="cosine" if plan.kind == "tokens" else "constant",
        warmup_steps=min(100, max(max_steps // 10, 1)),
        eval_interval=interval,
        eval_batches=10,
        ckpt_interval=10**9,  # only the final checkpoint
        keep_last=1,
        log_interval=min(10, interval),
        seed=seed,
        resume="never",
        progress=progress,
    )


@dataclass(frozen=True)
class Run:
    """Where and how one model's training (or fitting) went."""

    run_dir: Path
    steps: int
    """Optimizer steps (0 for the n-gram, which is fitted)."""
    wall_time_s: float
    tokens_per_s: float
    curve: list[tuple[float, float]]
    """(wall-clock seconds, validation loss) of every evaluation during training."""
    step_curve: list[tuple[int, float]] = field(default_factory=list)
    """(optimizer step, validation loss) of the same evaluations."""


def fit_ngram(model: nn.Module, train_ids: np.ndarray, tok: Any, run_dir: Path) -> Run:
    """Fit the count-based model to the training ids (timed) and save it as a checkpoint."""
    t0 = time.perf_counter()
    model.fit(train_ids.astype(np.int64))  # a writable copy of the memmap
    fit_s = time.perf_counter() - t0
    save_checkpoint(run_dir / "checkpoint", model, tok, extra_config={"fit_s": fit_s})
    return Run(run_dir, 0, fit_s, len(train_ids) / max(fit_s, 1e-9), [])


def train_model(
    model: nn.Module, train_ids: np.ndarray, val_ids: np.ndarray, tok: Any, config: TrainConfig
) -> Run:
    """Train ``model`` with the lmlab trainer; its curve comes from the run's metrics."""
    trained = train_loop(model, train_ids, val_ids, config, tokenizer=tok)
    run_dir = Path(config.out_dir)
    curve = eval_curve(run_dir / "metrics.jsonl")
    steps = eval_curve(run_dir / "metrics.jsonl", x="step")
    return Run(run_dir, trained.step, trained.wall_time_s, trained.tokens_per_s, curve, steps)


def evaluate(
    name: str,
    spec: dict[str, Any],
    model: nn.Module,
    run: Run,
    val_ids: np.ndarray,
    tok: Any,
    seq_len: int,
    prompt: str,
    sampling: SamplingParams,
    progress: bool = False,
) -> ModelResult:
    """Score a trained model on the whole validation split (windows of ``seq_len`` tokens,
    or its context if shorter; a bar with ``progress``) and sample a continuation of
    ``prompt``."""
    size, unit = model_size(model)
    context = getattr(model.config, "max_seq_len", None) or seq_len
    window = min(seq_len, context)
    loss = token_nll(model, val_ids, stride=window, context=window, progress=progress)
    loss = loss.mean().item()
    sample = generate_text(model, tok, prompt, sampling)
    return ModelResult(
        name=name,
        spec=spec,
        size=size,
        size_unit=unit,
        steps=run.steps,
        wall_time_s=run.wall_time_s,
        tokens_per_s=run.tokens_per_s,
        val_loss=loss,
        val_perplexity=math.exp(loss) if loss < 700 else math.inf,
        sample=sample,
        run_dir=str(run.run_dir),
        curve=[(run.wall_time_s, loss)] if spec["family"] == "ngram" else run.curve,
        step_curve=[(int(s), v) for s, v in run.step_curve],
    )


def write_comparison(
    results: list[ModelResult],
    table: str,
    settings: dict[str, Any],
    out: Path,
    x_axis: str = "time",
    title: str | None = None,
) -> dict[str, Path]:
    """Write compare.md (table and samples), compare.json and compare.png under ``out``."""
    files = {
        "markdown": out / "compare.md",
        "json": out / "compare.json",
        "plot": out / "compare.png",
    }
    files["markdown"].write_text(markdown_report(results, table, settings), encoding="utf-8")
    atomic_write_json(files["json"], {**settings, "models": [asdict(r) for r in results]})
    plot_curves(results, files["plot"], x_axis, title)
    if any(r.exposure for r in results):
        files["exposure"] = out / "exposure.png"
        plot_exposure(results, files["exposure"])
    return files


def eval_curve(metrics_path: Path, x: str = "elapsed_s") -> list[tuple[float, float]]:
    """(x, val_loss) of each eval event in a run's metrics.jsonl; x is the seconds since
    the run started (``"elapsed_s"``) or the optimizer step (``"step"``)."""
    records = read_metrics(metrics_path)
    return [(float(r[x]), float(r["val_loss"])) for r in records if r.get("event") == "eval"]


def markdown_table(results: list[ModelResult]) -> str:
    """One row per model: size, steps, time, throughput, validation loss and perplexity."""
    lines = [
        "| model | family | size | steps | wall time (s) | tokens/s | val loss | val perplexity |",
        "|---|---|--:|--:|--:|--:|--:|--:|",
    ]
    for r in results:
        lines.append(
            f"| {r.name} | {r.spec['family']} | {r.size:,} {r.size_unit} | {r.steps:,} | "
            f"{r.wall_time_s:.1f} | {r.tokens_per_s:,.0f} | {r.val_loss:.4f} | "
            f"{r.val_perplexity:.2f} |"
        )
    return "\n".join(lines)


def markdown_report(results: list[ModelResult], table: str, settings: dict[str, Any]) -> str:
    lines = [
        "# Model comparison",
        "",
        f"Data {settings['data']!r} ({settings['tokenizer']} tokens, vocabulary "
        f"{settings['vocab_size']}), budget {settings['budget']!r} per model, batch "
        f"{settings['batch_size']} x {settings['seq_len']} tokens. Validation loss in nats "
        f"per token over the whole validation split ({settings['val_tokens']:,} tokens), "
        f"scored in windows of {settings['seq_len'] + 1} tokens for every model. The "
        "n-gram's size is its number of stored n-grams; it is fitted, not trained.",
        "",
        table,
        "",
        f"## Samples (prompt {settings['prompt']!r}, seed {settings['seed']})",
        "",
    ]
    for r in results:
        lines += [f"### {r.name}", "", "```", settings["prompt"] + r.sample, "```", ""]
    return "\n".join(lines)


def plot_curves(
    results: list[ModelResult],
    png_path: str | Path,
    x_axis: str = "time",
    title: str | None = None,
) -> None:
    """Validation loss (during training) against wall-clock seconds or optimizer steps, one
    line per model; a fitted model is a point (time) or a dashed line (steps). Each label
    ends with the model's loss on the whole validation split."""
    from matplotlib import rcParams  # deferred: slow to import, only for plots
    from matplotlib.figure import Figure  # deferred: slow to import, only for plots

    fig = Figure(figsize=(7, 4.5), dpi=100)
    ax = fig.add_subplot()
    colors = rcParams["axes.prop_cycle"].by_key()["color"]
    drawn = False
    for i, r in enumerate(results):
        label, color = f"{r.name}: {r.val_loss:.3f}", colors[i % len(colors)]
        if x_axis == "step" and r.steps == 0:  # fitted, not trained: its loss at every step
            ax.axhline(r.val_loss, ls="--", lw=1.2, color=color, label=label)
            drawn = True
            continue
        curve = r.step_curve if x_axis == "step" else r.curve
        if not curve:
            continue
        xs, losses = zip(*curve)
        style = "*" if len(curve) == 1 else "o-"
        size = 8 if style == "*" else 3
        ax.plot(xs, losses, style, color=color, label=label, markersize=size)
        drawn = True
    ax.set_xlabel("optimizer step" if x_axis == "step" else "wall-clock seconds")
    ax.set_ylabel("validation loss (nats/token)")
    if title:
        ax.set_title(title)
    ax.grid(alpha=0.3)
    if drawn:
        ax.legend(title="whole validation split, nats/token", title_fontsize=8, fontsize=8)
    else:
        note(ax, "no validation loss recorded by any model")
    fig.tight_layout()
    atomic_write_with(png_path, lambda tmp: fig.savefig(tmp, format="png"))


def plot_exposure(results: list[ModelResult], png_path: str | Path) -> None:
    """Each trained model's loss against the share of its inputs that are true (the rest
    its own samples), from 1 (teacher forcing) on the left to 0 on the right."""
    from matplotlib.figure import Figure  # deferred: slow to import, only for plots

    fig = Figure(figsize=(7, 4.5), dpi=100)
    ax = fig.add_subplot()
    for r in results:
        if r.exposure:
            keeps = [float(k) for k in r.exposure]
            ax.plot(keeps, list(r.exposure.values()), "o-", markersize=4, label=r.name)
    ax.invert_xaxis()
    ax.set_xlabel("eps: share of inputs that are true (the rest: the model's own samples)")
    ax.set_ylabel("validation loss (nats/token)")
    ax.set_title("Fed its own samples after training")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    atomic_write_with(png_path, lambda tmp: fig.savefig(tmp, format="png"))
