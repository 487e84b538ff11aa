"""``lmlab report``: one evaluation report per model, and the models side by side.

    report(["smollm2", "runs/tiny"], limit=20)   # -> reports/<name>/report.md, ...

For each model: every task of ``tasks`` (as ``lmlab.eval.run.run_task``), robustness of
``robustness_task`` to perturbations (``evaluate_robustness``: score per perturbation and
the spread), a reliability diagram per multiple-choice task (``reliability_diagram``) and
efficiency:

- parameters and their memory (bytes of every parameter; buffers, such as an n-gram's
  count tables or 4-bit weights, counted apart);
- decode speed: tokens per second of greedy decoding of ``DECODE_TOKENS`` new tokens from
  ``DECODE_PROMPT`` (the call behind ``lm.generate``, any family), timed with
  ``time.perf_counter`` after one warm-up call; end-of-text does not stop it early;
- peak resident memory of the process so far (``resource.getrusage``: ``ru_maxrss``), which
  includes whatever the process held before this model.

Files: ``out_dir/<name>/report.md``, ``report.html`` (self-contained: tables and the
figures as inline PNG), ``results.json``, ``calibration_<task>.png``; with several models
also ``out_dir/comparison.md``, ``comparison.html`` and ``comparison.png`` (one panel per
task, a bar per model), one column per model.

Tests: ``tests/eval/test_report.py`` runs two tiny models end to end.
"""

from __future__ import annotations

import base64
import html
import math
import resource
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch

from lmlab.errors import ConfigError, DataError
from lmlab.eval.calibration import reliability_diagram
from lmlab.eval.fairness import evaluate_fairness, evaluate_toxicity
from lmlab.eval.robustness import evaluate_robustness
from lmlab.eval.run import (
    BETTER,
    TaskRun,
    _check_settings,
    _plain,
    detect_kind,
    md_cell,
    parse_tasks,
    run_task,
    short_name,
)
from lmlab.eval.tasks import load_task
from lmlab.fileio import atomic_write_json, atomic_write_text
from lmlab.generate import SamplingParams
from lmlab.generate.search import generate
from lmlab.lm import LM, load
from lmlab.quant.quantize import QUANTIZED_LAYERS, model_size_bytes
from lmlab.version import __version__

DEFAULT_TASKS: tuple[str, ...] = (
    "world-facts",
    "shakespeare-cloze",
    "sentiment",
    "minimal-pairs",
    "bias-pairs",
    "perplexity",
)
"""The bundled multiple-choice tasks, minimal pairs, bias pairs and perplexity (the slow
generation and behaviour tasks are left out; name them in ``tasks`` to add them)."""
DECODE_PROMPT = "To be, or not to be"
DECODE_TOKENS = 64


@dataclass
class ModelReport:
    name: str
    model: str
    runs: list[TaskRun]
    robustness: dict[str, Any] | None
    """``{"task", "metric", "scores", "deltas", "spread", "std"}``, or ``{"error"}``."""
    efficiency: dict[str, Any]
    files: dict[str, str] = field(default_factory=dict)
    fairness: dict[str, Any] | None = None
    """``FairnessResult.to_dict()``: accuracy per group, gap, consistency (or ``{"error"}``)."""
    toxicity: dict[str, Any] | None = None
    """``ToxicityResult.to_dict()``: toxic fraction, toxicity probability, samples."""

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "model": self.model,
            "runs": [r.to_dict() for r in self.runs],
            "robustness": self.robustness,
            "fairness": self.fairness,
            "toxicity": self.toxicity,
            "efficiency": self.efficiency,
            "files": self.files,
        }


@dataclass
class ReportResult:
    models: list[ModelReport]
    out_dir: Path
    table: str
    """The comparison as a Markdown table: a row per task, a column per model."""
    files: dict[str, Path] = field(default_factory=dict)
    """``comparison.md``/``.html``/``.png`` when there are several models."""


def split_list(value: str | Sequence[str]) -> list[str]:
    """``"a,b"`` or ``["a", "b,c"]`` -> ``["a", "b", "c"]``."""
    parts = [value] if isinstance(value, str) else list(value)
    return [x.strip() for part in parts for x in str(part).split(",") if x.strip()]


# ---------------------------------------------------------------------------- efficiency


def model_memory(model: torch.nn.Module) -> dict[str, int]:
    """``{"parameters": count, "parameter_bytes", "buffer_bytes", "weight_bytes"}`` of a
    module.

    The count is of weights, however they are stored: a quantized linear layer (int8,
    int4, NF4) keeps its weight in buffers, and counts ``in_features x out_features``
    (SmolLM2 loaded in 4 bits: 134.5 M, not the 28 M its float tensors hold).
    ``weight_bytes`` is what the model stores, every tensor once in its saved form
    (``lmlab.quant.model_size_bytes``: a 4-bit layer's packed kernel copy included)."""
    params = list(model.parameters())
    quantized = sum(
        m.in_features * m.out_features for m in model.modules() if isinstance(m, QUANTIZED_LAYERS)
    )
    return {
        "parameters": sum(p.numel() for p in params) + quantized,
        "parameter_bytes": sum(p.numel() * p.element_size() for p in params),
        "buffer_bytes": sum(b.numel() * b.element_size() for b in model.buffers()),
        "weight_bytes": model_size_bytes(model),
    }


def peak_rss_bytes() -> int:
    """Peak resident memory of this process (``ru_maxrss`` is KiB on Linux, bytes on macOS)."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)


def decode_speed(
    lm: LM, prompt: str = DECODE_PROMPT, new_tokens: int = DECODE_TOKENS
) -> dict[str, Any]:
    """Greedy decoding speed: ``{"tokens", "seconds", "tokens_per_s"}`` (one warm-up call
    first). A model with a short context decodes ``max_seq_len - 1`` tokens at most."""
    context = getattr(lm.model.config, "max_seq_len", None)
    if context is not None:
        new_tokens = min(new_tokens, context - 1)
    ids = lm.tokenizer.encode(prompt)
    # token ids and no tokenizer: no end-of-text id, so every run decodes new_tokens tokens
    params = SamplingParams(max_new_tokens=new_tokens, temperature=0.0, truncate_prompt=True)
    generate(lm.model, [ids], params)  # warm-up
    start = time.perf_counter()
    out = generate(lm.model, [ids], params)
    seconds = time.perf_counter() - start
    tokens = len(out.ids[0])
    return {"tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds}


def efficiency(lm: LM, decode_tokens: int = DECODE_TOKENS) -> dict[str, Any]:
    """Parameters, their memory, decode speed and peak RSS (see the module docstring)."""
    out: dict[str, Any] = dict(model_memory(lm.model))
    first = next(iter(lm.model.parameters()), None)
    out["dtype"] = "-" if first is None else str(first.dtype).removeprefix("torch.")
    try:
        out["decode"] = decode_speed(lm, new_tokens=decode_tokens)
    except DataError as e:  # the prompt is outside the tokenizer's vocabulary
        out["decode"] = {"error": str(e)}
    out["peak_rss_bytes"] = peak_rss_bytes()
    return out


# ------------------------------------------------------------------------------- report


def report(
    models: str | list[str],
    tasks: str | Sequence[str] = DEFAULT_TASKS,
    out_dir: str = "reports",
    names: str | list[str] | None = None,
    num_fewshot: int = 0,
    limit: int | None = None,
    robustness_task: str | None = "world-facts",
    dtype: str = "auto",
    device: str = "auto",
    batch_size: int = 16,
    seed: int = 0,
    decode_tokens: int = DECODE_TOKENS,
    fairness: bool = True,
    toxicity: bool = True,
) -> ReportResult:
    """Evaluate each model on ``tasks`` and write the reports (see the module docstring).

    Args:
        models: anything ``lmlab.load`` takes, one per model ("smollm2", a run folder, ...);
            a list or one comma-separated string.
        tasks: task names or files (``lmlab.eval.run``), a list or comma-separated;
            default ``DEFAULT_TASKS``.
        out_dir: the reports go in ``out_dir/<name>/``, the comparison in ``out_dir``.
        names: a short name per model, a list or comma-separated (default: derived from
            the path, e.g. the run folder).
        num_fewshot: few-shot examples per multiple-choice item.
        limit: evaluate only the first ``limit`` items of each task (and of robustness,
            fairness, and of each half of the toxicity prompts).
        robustness_task: the multiple-choice task to perturb; None skips robustness.
        dtype: the weights' dtype: auto, float32 or bfloat16.
        device: where the model runs: auto (CUDA, then MPS, then the CPU), cpu, cuda, cuda:N, mps.
        batch_size: requests scored together.
        seed: picks few-shot examples and perturbations.
        decode_tokens: new tokens decoded to measure the decode speed.
        fairness: accuracy of the sentiment reviews told by different groups
            (``lmlab.eval.fairness``): per group, the gap and the consistency.
        toxicity: the share of sampled continuations with a word of the bundled lexicon.
    """

    models = split_list(models)
    if not models:
        raise ConfigError("models is empty: give at least one model")
    _check_settings(num_fewshot, limit, batch_size)
    if not isinstance(decode_tokens, int) or isinstance(decode_tokens, bool) or decode_tokens < 1:
        raise ConfigError(f"decode_tokens={decode_tokens!r} is invalid: must be an integer >= 1")
    task_list = parse_tasks(tasks)
    for t in task_list:
        detect_kind(t)
    if robustness_task is not None and detect_kind(robustness_task) != "choice":
        raise ConfigError(
            f"robustness_task={robustness_task!r} is invalid: it must be a multiple-choice task"
        )
    names = [short_name(m) for m in models] if names is None else split_list(names)
    if len(names) != len(models):
        raise ConfigError(f"names has {len(names)} entries for {len(models)} models")
    if len(set(names)) != len(names):
        raise ConfigError(
            f"names={names} repeat a name (each model needs its own folder); give --names"
        )
    out = Path(out_dir)
    reports = []
    for model, name in zip(models, names):
        lm = load(model, dtype=dtype, device=device)
        runs = [run_task(lm, t, num_fewshot, limit, batch_size, seed) for t in task_list]
        rob = None
        if robustness_task is not None:
            rob = _robustness(lm, robustness_task, num_fewshot, limit, batch_size, seed)
        rep = ModelReport(name, model, runs, rob, efficiency(lm, decode_tokens))
        if fairness:
            rep.fairness = _guarded(
                partial(evaluate_fairness, lm, None, num_fewshot, limit, batch_size, seed)
            )
        if toxicity:
            rep.toxicity = _guarded(partial(evaluate_toxicity, lm, seed=seed, limit=limit))
        _write_model(rep, out / name)
        reports.append(rep)
        del lm
    table = comparison_table(reports)
    files: dict[str, Path] = {}
    if len(reports) > 1:
        files = _write_comparison(reports, out, table)
    return ReportResult(reports, out, table, files)


def _guarded(run) -> dict[str, Any]:
    """A fairness or toxicity result as a dict, or ``{"error"}`` when the model cannot take
    its text (a character vocabulary without some letter) or cannot generate."""
    try:
        return _plain(run().to_dict())
    except (DataError, ConfigError) as e:
        return {"error": str(e)}


def _robustness(
    lm: LM, task: str, num_fewshot: int, limit: int | None, batch_size: int, seed: int
) -> dict[str, Any]:

    try:
        r = evaluate_robustness(
            lm, load_task(task), seed=seed, num_fewshot=num_fewshot, batch_size=batch_size,
            limit=limit, progress=False,
        )  # fmt: skip
    except DataError as e:
        return {"task": task, "error": str(e)}
    return _plain(
        {
            "task": r.task,
            "metric": r.metric,
            "scores": r.scores,
            "deltas": r.deltas,
            "spread": r.spread,
            "std": r.std,
            "n": r.results["none"].n,
        }
    )


# ------------------------------------------------------------------------------ writing


def _fmt(value: Any, digits: int = 4) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _size(n: int) -> str:
    """Bytes for people: ``2312 -> "2.3 KiB"``."""
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


def efficiency_rows(eff: dict[str, Any]) -> list[tuple[str, str]]:
    """(measure, value) rows for a table."""
    decode = eff.get("decode", {})
    speed = (
        f"n/a ({decode['error']})"
        if "error" in decode
        else f"{decode['tokens_per_s']:.1f} tokens/s ({decode['tokens']} tokens)"
    )
    return [
        ("parameters", f"{eff['parameters']:,}"),
        ("parameter memory", f"{_size(eff['parameter_bytes'])} ({eff['dtype']})"),
        ("buffer memory", _size(eff["buffer_bytes"])),
        ("stored weights, all formats", _size(eff["weight_bytes"])),
        ("decode speed (greedy, batch 1)", speed),
        ("peak RSS of the process", _size(eff["peak_rss_bytes"])),
    ]


def _task_table(runs: Sequence[TaskRun]) -> tuple[list[str], list[list[str]]]:
    header = ["task", "metric", "value", "n", "seconds", "other scores"]
    rows = []
    for r in runs:
        others = ", ".join(
            f"{k} {_fmt(v, 3)}"
            for k, v in r.scores.items()
            if k != r.metric and not k.endswith("_stderr") and ":" not in k
        )
        if r.skipped:
            others += f" ({len(r.skipped)} items skipped: not encodable)"
        rows.append(
            [r.task, r.metric, r.value_text(), "-" if r.error else str(r.n), f"{r.seconds:.1f}",
             others]
        )  # fmt: skip
    return header, rows


def _robustness_table(rob: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    header = ["perturbation", rob["metric"], "delta"]
    rows = [
        [k, _fmt(v, 3), "" if k == "none" else f"{rob['deltas'][k]:+.3f}"]
        for k, v in rob["scores"].items()
    ]
    return header, rows


def _md(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(md_cell(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _html_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in rows
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _img(path: Path, alt: str) -> str:
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'


_STYLE = (
    "body{font-family:sans-serif;max-width:60em;margin:2em auto;padding:0 1em;color:#222}"
    "table{border-collapse:collapse;margin:1em 0}th,td{border:1px solid #ccc;"
    "padding:.3em .6em;text-align:left}th{background:#f2f2f2}img{max-width:100%}"
)


def _page(title: str, sections: Sequence[tuple[str, str]]) -> str:
    body = "".join(f"<h2>{html.escape(h)}</h2>\n{content}\n" for h, content in sections)
    return (
        f'<!DOCTYPE html>\n<html><head><meta charset="utf-8"><title>{html.escape(title)}'
        f"</title><style>{_STYLE}</style></head>\n<body><h1>{html.escape(title)}</h1>\n"
        f"{body}</body></html>\n"
    )


def _note(settings: dict[str, Any]) -> str:
    return ", ".join(f"{k} {v}" for k, v in settings.items())


def _write_model(rep: ModelReport, folder: Path) -> None:

    folder.mkdir(parents=True, exist_ok=True)
    plots = []
    for r in rep.runs:
        if r.kind == "choice" and r.result is not None:
            safe = "".join(c if c.isalnum() or c in "-_" else "_" for c in r.task)
            path = reliability_diagram(r.result, folder / f"calibration_{safe}.png")
            rep.files[f"calibration:{r.task}"] = str(path)
            plots.append((r.task, path))
    title = f"Evaluation report: {rep.name}"
    settings = rep.runs[0].settings if rep.runs else {}
    intro = f"Model: `{rep.model}`. Settings: {_note(settings)}."
    tasks = _task_table(rep.runs)
    eff = (["measure", "value"], [list(row) for row in efficiency_rows(rep.efficiency)])
    md = [f"# {title}", "", intro, "", "## Tasks", "", _md(*tasks), ""]
    sections = [("Tasks", f"<p>{html.escape(intro)}</p>" + _html_table(*tasks))]
    if rep.robustness is not None:
        if "error" in rep.robustness:
            text = f"{rep.robustness['task']}: n/a ({rep.robustness['error']})"
            md += ["## Robustness", "", text, ""]
            sections.append(("Robustness", f"<p>{html.escape(text)}</p>"))
        else:
            rob = rep.robustness
            text = (
                f"{rob['task']} (n={rob['n']}): {rob['metric']} spread "
                f"{rob['spread']:.3f}, std {rob['std']:.3f} over the perturbations."
            )
            table = _robustness_table(rob)
            md += ["## Robustness", "", text, "", _md(*table), ""]
            sections.append(("Robustness", f"<p>{html.escape(text)}</p>" + _html_table(*table)))
    for heading, text, table in _fairness_sections(rep):
        md += [f"## {heading}", "", text, ""] + ([_md(*table), ""] if table else [])
        body = f"<p>{html.escape(text)}</p>" + (_html_table(*table) if table else "")
        sections.append((heading, body))
    if plots:
        md += ["## Calibration", ""]
        cal_rows = [
            [r.task, _fmt(r.scores.get("ece"), 3), _fmt(r.scores.get("mce"), 3),
             _fmt(r.scores.get("brier"), 3)]
            for r in rep.runs
            if r.kind == "choice" and r.error is None
        ]  # fmt: skip
        cal = (["task", "ECE", "MCE", "Brier"], cal_rows)
        md += [_md(*cal), ""] + [f"![{t}]({p.name})" for t, p in plots] + [""]
        sections.append(("Calibration", _html_table(*cal) + "".join(_img(p, t) for t, p in plots)))
    md += ["## Efficiency", "", _md(*eff), ""]
    sections.append(("Efficiency", _html_table(*eff)))
    rep.files["markdown"] = str(folder / "report.md")
    rep.files["html"] = str(folder / "report.html")
    rep.files["json"] = str(folder / "results.json")
    atomic_write_text(folder / "report.md", "\n".join(md))
    atomic_write_text(folder / "report.html", _page(title, sections))

    atomic_write_json(folder / "results.json", {"lmlab_version": __version__, **rep.to_dict()})


def _fairness_sections(rep: ModelReport) -> list[tuple[str, str, Any]]:
    out = []
    fair, tox = rep.fairness, rep.toxicity
    if fair is not None:
        if "error" in fair:
            out.append(("Fairness", f"n/a ({fair['error']})", None))
        else:
            text = (
                f"Sentiment reviews told by each group (n={fair['n']}): accuracy gap "
                f"{fair['gap']:.3f} between the best and worst group; the same prediction "
                f"for every group on {fair['consistency']:.1%} of the reviews."
            )
            rows = [[g, f"{a:.3f}"] for g, a in fair["accuracy"].items()]
            out.append(("Fairness", text, (["group", "accuracy"], rows)))
    if tox is not None:
        if "error" in tox:
            out.append(("Toxicity", f"n/a ({tox['error']})", None))
        else:
            text = (
                f"{tox['toxic_fraction']:.1%} of sampled continuations contain a word of the "
                f"bundled lexicon (a crude measure: lmlab.eval.fairness); "
                f"{tox['toxicity_probability']:.1%} of prompts had at least one such continuation."
            )
            rows = [[k, f"{v:.3f}"] for k, v in tox.get("by_kind", {}).items()]
            out.append(("Toxicity", text, (["prompts", "toxic fraction"], rows) if rows else None))
    return out


# --------------------------------------------------------------------------- comparison


def _comparison_rows(reports: Sequence[ModelReport]) -> tuple[list[str], list[list[str]]]:
    header = ["task", "metric", *(r.name for r in reports)]
    rows = []
    tasks = list(dict.fromkeys(run.task for rep in reports for run in rep.runs))
    for task in tasks:
        runs = [next((x for x in rep.runs if x.task == task), None) for rep in reports]
        metric = next(x.metric for x in runs if x is not None)
        better = BETTER.get(metric, "")
        label = f"{metric} ({'closest to 50' if better == '50' else better} is better)"
        rows.append([task, label, *("-" if x is None else x.value_text() for x in runs)])
    rob = [rep.robustness for rep in reports]
    if any(r is not None for r in rob):
        rows.append(
            ["robustness", "spread (lower is better)",
             *("-" if r is None else "n/a" if "error" in r else f"{r['spread']:.4f}" for r in rob)]
        )  # fmt: skip
    for key, label, what in (
        ("fairness", "accuracy gap between groups (lower is better)", "gap"),
        ("fairness", "consistency across groups (higher is better)", "consistency"),
        ("toxicity", "toxic fraction, lexicon (lower is better)", "toxic_fraction"),
    ):
        values = [getattr(rep, key) for rep in reports]
        if any(v is not None for v in values):
            rows.append(
                [key, label,
                 *("-" if v is None else "n/a" if "error" in v else f"{v[what]:.4f}" for v in values)]
            )  # fmt: skip
    for i, (measure, _) in enumerate(efficiency_rows(reports[0].efficiency)):
        rows.append(
            ["efficiency", measure, *(efficiency_rows(rep.efficiency)[i][1] for rep in reports)]
        )
    return header, rows


def comparison_table(reports: Sequence[ModelReport]) -> str:
    """Markdown: a row per task (headline metric), robustness and efficiency; a column per
    model."""
    return _md(*_comparison_rows(reports))


def comparison_plot(reports: Sequence[ModelReport], path: str | Path) -> Path:
    """One panel per task, a bar per model (its headline score); failed runs are left out."""
    from matplotlib.figure import Figure  # deferred: slow to import, only for plots

    tasks = list(dict.fromkeys(run.task for rep in reports for run in rep.runs))
    cols = min(3, len(tasks))
    rows = math.ceil(len(tasks) / cols)
    fig = Figure(figsize=(3.6 * cols, 2.9 * rows), dpi=100)
    axes = fig.subplots(rows, cols, squeeze=False)
    colours = [f"C{i % 10}" for i in range(len(reports))]
    for ax, task in zip(axes.flat, tasks):
        metric = ""
        for i, rep in enumerate(reports):
            run = next((x for x in rep.runs if x.task == task), None)
            if run is None:
                continue
            metric = run.metric
            value = run.value
            ax.bar(i, 0 if value is None else value, color=colours[i], label=rep.name)
            ax.text(i, 0 if value is None else value, "n/a" if value is None else f"{value:.3g}",
                    ha="center", va="bottom", fontsize=7)  # fmt: skip
        better = BETTER.get(metric, "")
        values = [x.value for rep in reports for x in rep.runs if x.task == task and x.value]
        top = max([abs(v) for v in values] + [1e-9])
        ax.set_ylim(0, 1.0 if metric in ("acc", "accuracy", "exact_match", "failure_rate")
                    else 100.0 if metric == "pct_stereotype" else 1.15 * top)  # fmt: skip
        ax.set_title(f"{task}\n{metric} ({'50 = none' if better == '50' else better} better)",
                     fontsize=8)  # fmt: skip
        ax.set_xticks(range(len(reports)), [r.name for r in reports], fontsize=7, rotation=20)
        ax.tick_params(axis="y", labelsize=7)
        ax.grid(axis="y", alpha=0.3)
    for ax in list(axes.flat)[len(tasks) :]:
        ax.set_visible(False)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, bbox_inches="tight")
    return path


def _write_comparison(reports: Sequence[ModelReport], out: Path, table: str) -> dict[str, Path]:
    header, rows = _comparison_rows(reports)
    png = comparison_plot(reports, out / "comparison.png")
    links = ", ".join(f"[{r.name}]({r.name}/report.md)" for r in reports)
    md = [
        "# Model comparison",
        "",
        f"Reports: {links}.",
        "",
        table,
        "",
        "![comparison](comparison.png)",
        "",
    ]
    page = _page(
        "Model comparison",
        [
            ("Scores", _html_table(header, rows)),
            ("Headline scores", _img(png, "comparison")),
        ],
    )
    files = {"markdown": out / "comparison.md", "html": out / "comparison.html", "plot": png}
    atomic_write_text(files["markdown"], "\n".join(md))
    atomic_write_text(files["html"], page)
    return files
