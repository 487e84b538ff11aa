"""Single-task fine-tuning against a FLAN-style mixture: what each forgets, and whether a
mixture generalises to a task it never saw (``lmlab mixture``, lesson 30).

FLAN (Wei et al. 2022) fine-tuned one model on many tasks, each asked through several
instruction templates, and measured it on whole task clusters held out of training: the
mixture taught the model to follow instructions it had not been trained on. The opposite
recipe, fine-tuning on a single task, is known to cost the model what it could do before
(catastrophic forgetting, McCloskey and Cohen 1989; Luo et al. 2023 for LLMs).

``mixture_study`` runs both on the bundled tasks (``lmlab.data.tasks``) with the same
model, method, number of examples and steps::

    base       the model as loaded
    single     fine-tuned on one task, asked one way (its generator's phrasing)
    mixture    fine-tuned on every task but ``held_out``, each row asked through one of
               phrasings 0..N_PHRASINGS-2 in turn (``lmlab.data.tasks.rephrase``)

and measures each on every task's held-out rows, asked in phrasing 0 ("seen wording") and
in the last phrasing, which no run trains on ("unseen wording"), plus the perplexity of a
general text (how much of its language modelling a run gave up). The table marks each cell
as trained or not, so forgetting (untrained tasks after single-task tuning, against the
base) and held-out generalisation (the held-out task after the mixture) read off one table.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from lmlab.data.corpus import load_corpus, split_text
from lmlab.data.tasks import N_PHRASINGS, TASKS, generate_splits, get_task, rephrase
from lmlab.errors import ConfigError
from lmlab.fileio import atomic_write_json, atomic_write_text
from lmlab.finetune.run import check_method, finetune, task_accuracy
from lmlab.lm import LM, load
from lmlab.train import TrainConfig


@dataclass
class MixtureConfig:
    """What ``mixture_study`` compares."""

    model: str = "smollm2"
    """Anything ``lmlab.load`` takes."""
    single: str = "arithmetic"
    """The task of the single-task run."""
    held_out: str = "format"
    """The task no run trains on (the mixture's test of generalisation)."""
    method: str = "lora"
    """The fine-tuning method of both runs (``lmlab finetune --method``)."""
    n_train: int = 240
    """Training rows of each run (the mixture's split evenly among its tasks)."""
    n_test: int = 24
    """Held-out rows per task, the same for every model."""
    steps: int = 60
    batch_size: int = 8
    lr: float = 1e-3
    max_len: int = 96
    max_new_tokens: int = 12
    general_chars: int = 1024
    """Characters of general text (Tiny Shakespeare's validation split) for perplexity."""
    seed: int = 0

    def __post_init__(self):
        for name in ("single", "held_out"):
            get_task(getattr(self, name))  # a ConfigError naming the valid tasks
        if self.single == self.held_out:
            raise ConfigError(
                f"single={self.single!r} is also held_out: the single-task run must train "
                "on a task the mixture trains on too"
            )
        check_method(self.method)
        for name in (
            "n_train",
            "n_test",
            "steps",
            "batch_size",
            "max_len",
            "max_new_tokens",
            "general_chars",
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name}={value!r} is invalid: must be an integer >= 1")
        mixed = len(TASKS) - 1
        if self.n_train < mixed:
            raise ConfigError(f"n_train={self.n_train} is too small: the mixture needs {mixed}")
        if not self.lr > 0:
            raise ConfigError(f"lr={self.lr!r} is invalid: must be > 0")


def study_data(config: MixtureConfig) -> dict[str, list[dict[str, str]]]:
    """The runs' training rows and every task's test rows (``"test:<task>"``).

    Each task's rows come from one ``generate_splits`` call (``n_train`` training rows and
    ``n_test`` test rows, never sharing a prompt), so no run trains on any test prompt. The
    mixture takes an even share of its tasks' training rows, phrased 0, 1, ..., in turn.
    """
    mixed = [t for t in TASKS if t != config.held_out]
    shares = {
        t: config.n_train // len(mixed) + (i < config.n_train % len(mixed))
        for i, t in enumerate(mixed)
    }
    data: dict[str, list[dict[str, str]]] = {"single": [], "mixture": []}
    for task in TASKS:
        train_rows, _, test_rows = generate_splits(
            task, config.n_train, 0, config.n_test, config.seed
        )
        data[f"test:{task}"] = test_rows
        if task == config.single:
            data["single"] = train_rows
        if task in mixed:
            data["mixture"].extend(train_rows[: shares[task]])
    data["mixture"] = [
        rephrase(row, i % (N_PHRASINGS - 1)) for i, row in enumerate(_interleave(data["mixture"]))
    ]
    return data


def _interleave(rows: list[dict[str, str]]) -> list[dict[str, str]]:
    """Rows of several tasks in turns (a, b, c, a, b, c, ...), so that every task meets every
    phrasing and a batch holds a mixture."""
    by_task: dict[str, list[dict[str, str]]] = {}
    for row in rows:
        by_task.setdefault(row["task"], []).append(row)
    out, queues = [], list(by_task.values())
    for i in range(max(len(q) for q in queues)):
        out.extend(q[i] for q in queues if i < len(q))
    return out


def measure(
    lm: LM,
    data: dict[str, list[dict[str, str]]],
    config: MixtureConfig,
    general: str,
    name: str,
    progress: bool | None = None,
) -> dict[str, Any]:
    """``lm``'s accuracy on every task's test rows, in the seen and the unseen phrasing, and
    the perplexity of ``general``: ``{"accuracy": {task: {"seen", "unseen"}}, "perplexity"}``.
    Greedy replies, asked as one user turn of the model's chat template, a batch per task
    and phrasing."""
    scores: dict[str, dict[str, float]] = {}
    unseen = N_PHRASINGS - 1  # the phrasing no run trains on
    jobs = [(task, how, k) for task in TASKS for how, k in (("seen", 0), ("unseen", unseen))]
    with tqdm(
        total=len(jobs),
        desc=f"measure {name}",
        unit="set",
        disable=None if progress is None else not progress,
    ) as bar:
        for task, how, k in jobs:
            rows = [rephrase(row, k) for row in data[f"test:{task}"]]
            score, _ = task_accuracy(lm, rows, config.max_new_tokens, batch_size=len(rows))
            scores.setdefault(task, {})[how] = score
            bar.update(1)
    return {"accuracy": scores, "perplexity": lm.perplexity(general)}


def general_text(chars: int) -> str:
    """The first ``chars`` characters of Tiny Shakespeare's validation split: general text
    that no fine-tuning run here trains on, whose perplexity before and after a run
    measures how much of its language modelling the run gave up."""
    return split_text(load_corpus("tinyshakespeare"))[1][:chars]


def mixture_study(
    config: MixtureConfig, out: str | os.PathLike, progress: bool | None = None
) -> dict[str, Any]:
    """Base, single-task and mixture models measured on every task (see the module
    docstring); writes ``out/mixture.json`` and the runs under ``out/single``,
    ``out/mixture`` (their data under ``out/data``) -> the report."""
    out = Path(out)
    data = study_data(config)
    for run in ("single", "mixture"):
        atomic_write_text(
            out / "data" / f"{run}.jsonl", "".join(json.dumps(r) + "\n" for r in data[run])
        )
    general = general_text(config.general_chars)
    models: dict[str, Any] = {}
    base = load(config.model, dtype="float32", keep_quantized=False)
    models["base"] = measure(base, data, config, general, "base", progress)
    del base
    for run in ("single", "mixture"):
        train_config = TrainConfig(
            out_dir=str(out / run),
            max_steps=config.steps,
            batch_size=config.batch_size,
            lr=config.lr,
            warmup_steps=min(10, config.steps // 5),
            eval_interval=10**9,
            ckpt_interval=10**9,
            seed=config.seed,
            progress=progress is not False,
        )
        done = finetune(
            config.model,
            str(out / "data" / f"{run}.jsonl"),
            method=config.method,  # type: ignore[arg-type]
            val_fraction=0.0,
            max_len=config.max_len,
            config=train_config,
        )
        models[run] = measure(done.lm, data, config, general, run, progress)
        models[run]["trainable"] = done.trainable
    trained = {
        "base": [],
        "single": [config.single],
        "mixture": [t for t in TASKS if t != config.held_out],
    }
    report = {"config": asdict(config), "tasks": list(TASKS), "trained": trained, "models": models}
    atomic_write_json(out / "mixture.json", report)
    return report


def table(report: dict[str, Any]) -> str:
    """The report as a Markdown table: a row per model, a column per task (seen / unseen
    wording), trained cells marked with *, and the general text's perplexity."""
    tasks = report["tasks"]
    held = report["config"]["held_out"]
    head = ["model", *[f"{t}{' (held out)' if t == held else ''}" for t in tasks], "perplexity"]
    lines = ["| " + " | ".join(head) + " |", "| --- |" + " --: |" * (len(head) - 1)]
    for name, result in report["models"].items():
        cells = []
        for task in tasks:
            acc = result["accuracy"][task]
            mark = "*" if task in report["trained"][name] else ""
            cells.append(f"{acc['seen']:.2f} / {acc['unseen']:.2f}{mark}")
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {result['perplexity']:.1f} |")
    return "\n".join(lines)
