"""The experiments behind ``lmlab prompt`` and ``lmlab icl``: tables, JSON and figures.

- ``compare_methods``: direct, chain of thought, self-consistency, PAL and ReAct on
  generated word problems, accuracy read strictly and flexibly with bootstrap 95%
  intervals, the maj@k curve of self-consistency; writes ``methods.json``,
  ``attempts.jsonl``, ``methods.png`` (and ReAct's ``trace.jsonl`` and ``trace.md``).
- ``icl_sweep``: accuracy against k for several prompt formats (and seeds, which change
  the examples and their order) on a bundled multiple-choice task; writes ``icl.json`` and
  ``icl.png``. The spread across formats at one k is the format sensitivity.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tqdm import tqdm

from lmlab.data.word_problems import word_problems
from lmlab.eval.tasks import load_task
from lmlab.fileio import atomic_write_text, atomic_write_with
from lmlab.lm import LM
from lmlab.prompting.fewshot import Embed, evaluate_icl
from lmlab.prompting.models import Completer
from lmlab.prompting.reasoning import METHODS, attempt_rows, maj_curve, solve, summarise
from lmlab.prompting.traces import render_markdown, save_traces


def compare_methods(
    model: Completer,
    out: str | os.PathLike,
    methods: Sequence[str] = METHODS,
    n: int = 200,
    shots: int = 4,
    samples: int = 5,
    temperature: float = 0.7,
    max_tokens: int = 160,
    seed: int = 0,
    batch_size: int = 8,
    layout: str = "plain",
    max_steps: int = 6,
) -> dict[str, Any]:
    """Each method on the same ``n`` word problems; returns (and writes) the summary."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    problems = word_problems(n, seed=seed)
    summary: dict[str, Any] = {
        "model": model.name,
        "n": n,
        "shots": shots,
        "layout": layout,
        "seed": seed,
        "methods": {},
    }
    rows = []
    for method in methods:
        attempts = solve(
            model, problems, method, shots, samples, temperature, max_tokens, seed, batch_size,
            layout=layout, max_steps=max_steps,
        )  # fmt: skip
        summary["methods"][method] = summarise(attempts, seed)
        if method == "self-consistency":
            summary["methods"][method]["maj_at_k"] = {
                how: maj_curve(attempts, how) for how in ("strict", "flexible")
            }
        if method == "react":  # the episodes, replayable with lmlab agent --replay
            traces = [a.trace for a in attempts]
            save_traces(traces, out / "trace.jsonl")
            atomic_write_text(out / "trace.md", render_markdown(traces))
        rows += attempt_rows(attempts)
    atomic_write_text(out / "methods.json", json.dumps(summary, indent=2) + "\n")
    atomic_write_text(out / "attempts.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    plot_methods(summary, out / "methods.png")
    return summary


def plot_methods(summary: dict[str, Any], path: str | os.PathLike) -> None:
    from matplotlib.figure import Figure  # deferred: slow to import, only for plots

    methods = summary["methods"]
    curve = methods.get("self-consistency", {}).get("maj_at_k")
    fig = Figure(figsize=(11 if curve else 6, 4))
    axes = fig.subplots(1, 2 if curve else 1, squeeze=False)
    ax = axes[0][0]
    names = list(methods)
    for j, how in enumerate(("strict", "flexible")):
        acc = [methods[m][how]["accuracy"] for m in names]
        err = [
            [a - methods[m][how]["ci95"][0] for m, a in zip(names, acc)],
            [methods[m][how]["ci95"][1] - a for m, a in zip(names, acc)],
        ]
        x = [i + (j - 0.5) * 0.38 for i in range(len(names))]
        ax.bar(x, acc, width=0.38, yerr=err, capsize=3, label=f"{how} extraction")
    ax.set_xticks(range(len(names)), names)
    ax.set_ylim(0, 1)
    ax.set_ylabel("accuracy (bootstrap 95% interval)")
    layout = summary.get("layout", "plain")
    ax.set_title(
        f"{summary['model']}: {summary['n']} word problems, {summary['shots']}-shot, {layout}"
    )
    ax.legend()
    if curve:
        ax = axes[0][1]
        for how, values in curve.items():
            ax.plot(range(1, len(values) + 1), values, marker="o", label=how)
        top = max(max(values) for values in curve.values())
        ax.set_ylim(0, min(1.0, max(0.1, top * 1.25)))  # accuracies: never below 0
        ax.set_xticks(range(1, max(len(v) for v in curve.values()) + 1))
        ax.set_xlabel("samples k")
        ax.set_ylabel("maj@k accuracy")
        ax.set_title("self-consistency: majority of k chains of thought")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def icl_sweep(
    lm: LM,
    out: str | os.PathLike,
    task: str = "sentiment",
    ks: Sequence[int] = (0, 1, 2, 4, 8),
    formats: Sequence[str] = ("qa", "io", "arrow"),
    selection: str = "random",
    order: str = "given",
    layout: str = "plain",
    seeds: Sequence[int] = (0, 1, 2),
    embed: Embed | None = None,
    context: int | None = None,
    on_overflow: str = "drop",
    progress: bool = True,
) -> dict[str, Any]:
    """Accuracy for every (format, k, seed); returns (and writes) the table. ``context``:
    the prompt budget in tokens (default: the model's context); a prompt over it drops
    its farthest examples, or stops with an error (``on_overflow``, see ``fit_prompt``)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    choice_task = load_task(task)
    # 0-shot does not depend on the seed
    settings = [(f, k, seed) for f in formats for k in ks for seed in (seeds if k else seeds[:1])]
    rows = []
    for fmt, k, seed in tqdm(settings, desc="icl", unit="setting", disable=not progress):
        result = evaluate_icl(
            lm, choice_task, k, selection, order, layout, fmt, seed, embed, context, on_overflow
        )
        rows.append(result.to_dict())
    table = {
        "task": task,
        "selection": selection,
        "order": order,
        "layout": layout,
        "context": context,
        "rows": rows,
    }
    atomic_write_text(out / "icl.json", json.dumps(table, indent=2) + "\n")
    plot_icl(table, out / "icl.png")
    return table


def plot_icl(table: dict[str, Any], path: str | os.PathLike) -> None:
    from matplotlib.figure import Figure  # deferred: slow to import, only for plots

    fig = Figure(figsize=(6.5, 4))
    ax = fig.subplots()
    for fmt in dict.fromkeys(r["format"] for r in table["rows"]):
        rows = [r for r in table["rows"] if r["format"] == fmt]
        ks = sorted({r["k"] for r in rows})
        by_k = [[r["accuracy"] for r in rows if r["k"] == k] for k in ks]
        mean = [sum(v) / len(v) for v in by_k]
        line = ax.plot(ks, mean, marker="o", label=f"format {fmt}")[0]
        for k, values in zip(ks, by_k):
            ax.scatter([k] * len(values), values, color=line.get_color(), alpha=0.35, s=12)
    ax.set_xlabel("examples in the prompt (k)")
    ax.set_ylabel("accuracy (dots: seeds)")
    ax.set_ylim(0, 1)
    ax.set_title(f"in-context learning on {table['task']} ({table['selection']} examples)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def actions_by_step(traces: Sequence[Any]) -> dict[str, list[int]]:
    """For each action (``invalid``: a reply with none), how many runs took it at step 1,
    2, ...: ``{action: [count at step 1, count at step 2, ...]}``, every list as long as
    the longest run."""
    longest = max((len(t.steps) for t in traces), default=0)
    counts: dict[str, list[int]] = {}
    for trace in traces:
        for i, step in enumerate(trace.steps):
            counts.setdefault(step.action or "invalid", [0] * longest)[i] += 1
    return counts


def repeats_an_action(trace: Any) -> bool:
    """Whether the run took the same action with the same argument twice (a loop)."""
    seen = [(s.action, s.argument) for s in trace.steps if s.action is not None]
    return len(set(seen)) < len(seen)


def plot_agent_eval(summary: dict[str, Any], path: str | os.PathLike) -> None:
    """``lmlab agent --eval``'s figure: accuracy of each way of answering with its bootstrap
    95% interval, and the actions the runs took at each step (``summary["by_step"]``)."""
    from matplotlib.figure import Figure  # deferred: slow to import, only for plots

    fig = Figure(figsize=(11, 4))
    left, right = fig.subplots(1, 2)
    scores = summary["scores"]
    acc = [s["accuracy"] for s in scores]
    err = [
        [a - s["low"] for a, s in zip(acc, scores)],
        [s["high"] - a for a, s in zip(acc, scores)],
    ]
    left.bar(range(len(scores)), acc, yerr=err, capsize=3, color="C0")
    for i, s in enumerate(scores):
        left.text(i, 0.02, f"{s['correct']}/{s['n']}", ha="center", fontsize=8)
    left.set_xticks(
        range(len(scores)), [s["method"].replace(" (", "\n(") for s in scores], fontsize=8
    )
    left.set(ylim=(0, 1), ylabel="accuracy (bootstrap 95% interval)")
    left.set_title(f"{summary['set']}: {scores[0]['n']} questions", fontsize=10)
    by_step = summary["by_step"]
    bottom = [0] * max((len(v) for v in by_step.values()), default=0)
    for action, counts in by_step.items():
        right.bar(range(1, len(counts) + 1), counts, bottom=bottom, label=action)
        bottom = [b + c for b, c in zip(bottom, counts)]
    right.set(xlabel="step", ylabel="runs")
    right.yaxis.get_major_locator().set_params(integer=True)
    right.set_title("the action each run took at each step", fontsize=10)
    if by_step:
        right.set_xticks(range(1, len(bottom) + 1))
        right.legend(fontsize=8)
    fig.tight_layout()
    atomic_write_with(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
