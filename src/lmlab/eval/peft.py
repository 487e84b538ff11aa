"""Parameter-efficient fine-tuning methods side by side: the same model, data and budget,
one run per method, then trainable parameters against held-out accuracy (lesson 31,
``lmlab finetune --compare``).

    compare_methods("runs/base", "train.jsonl", "test.jsonl", ["full", "lora", "prompt"],
                    config=TrainConfig(out_dir="runs/peft", max_steps=300, lr=1e-3))

Each method is ``lmlab.finetune.finetune`` with its own ``out_dir`` (``<out_dir>/<method>``)
and the same seed, so the only difference between two rows is the method:

    full      every weight                          (the baseline)
    lora      low-rank updates B A of chosen layers  (Hu et al. 2021)
    adapter   bottleneck MLPs after each sublayer    (Houlsby et al. 2019)
    prompt    trainable input embeddings in front    (Lester et al. 2021)
    prefix    trainable keys and values per layer    (Li and Liang 2021)
    bitfit    the biases only                         (Ben Zaken et al. 2022)

Each tuned model answers the held-out rows greedily (``task_accuracy``), graded two ways:
``accuracy``, exact answers by each row's task (``lmlab.data.tasks``), and ``chrf``, the
corpus chrF of the answers against the references (``lmlab.eval.text.chrf``, 0..100):
partial credit, for models too small to get whole answers right. ``before`` holds the
base model's scores, once.

Learning rates: a method that trains fewer parameters needs larger steps to move the model
as far. ``LR_FACTOR`` scales the configured rate (the one full fine-tuning uses) per
method, as ``tests/finetune/test_run.py`` does to make every method learn in a few steps:
x3 for LoRA, adapters and BitFit, x10 for the soft prompts (Lester et al. use 0.3).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lmlab.data.instructions import read_jsonl
from lmlab.errors import ConfigError
from lmlab.eval.text import chrf
from lmlab.finetune.run import METHODS, check_method, finetune, task_accuracy
from lmlab.lm import LM, load
from lmlab.train import TrainConfig

PEFT_METHODS: tuple[str, ...] = ("full", "lora", "adapter", "prompt", "prefix", "bitfit")
"""The default methods of ``compare_methods``, from most trainable parameters to few."""

LR_FACTOR: dict[str, float] = {"lora": 3.0, "adapter": 3.0, "bitfit": 3.0, "selective": 3.0,
                               "qlora": 3.0, "prompt": 10.0, "prefix": 10.0}  # fmt: skip
"""Each method's learning rate as a multiple of the configured one (full and kl: x1)."""


def grade(lm: LM, rows: list[dict[str, Any]], max_new_tokens: int) -> dict[str, Any]:
    """Greedy answers of ``lm`` to task ``rows`` -> ``{"accuracy", "chrf", "answers"}``."""
    accuracy, answers = task_accuracy(lm, rows, max_new_tokens)
    score = chrf([a.strip() for a in answers], [r["output"] for r in rows]).score
    return {"accuracy": accuracy, "chrf": score, "answers": answers}


def check_methods(methods: Sequence[str] | str) -> list[str]:
    """``methods`` (a list or a comma-separated string) as a list of known method names."""
    names = [m.strip() for m in methods.split(",")] if isinstance(methods, str) else list(methods)
    names = [n for n in names if n]
    if not names:
        raise ConfigError(f"no method given; choose from {', '.join(METHODS)}")
    if len(set(names)) != len(names):
        raise ConfigError(f"methods are named more than once: {names}")
    for name in names:
        check_method(name)
    return names


def compare_methods(
    model: str,
    data: str,
    test_data: str,
    methods: Sequence[str] | str = PEFT_METHODS,
    config: TrainConfig | None = None,
    max_new_tokens: int = 16,
    **options: Any,
) -> dict[str, Any]:
    """Fine-tune ``model`` on ``data`` once per method and grade each on ``test_data``
    (task rows, ``lmlab.data.tasks``) -> ``{"before": {"accuracy", "chrf"}, "test_rows",
    "rows": [{"method", "lr", "trainable", "total", "val_loss_before", "val_loss",
    "accuracy", "chrf", "answers", "wall_time_s"}, ...]}``. ``options`` go to ``finetune`` (``lora``,
    ``bottleneck``, ``n_virtual``, ``max_len``, ...)."""
    methods = check_methods(methods)
    config = config or TrainConfig(out_dir="runs/peft", max_steps=200, lr=1e-3)
    rows = read_jsonl(test_data)
    missing = [i + 1 for i, r in enumerate(rows) if "output" not in r or "task" not in r]
    if missing:
        raise ConfigError(
            f"{test_data}: lines {missing[:5]} lack 'task' or 'output'; the test rows must be "
            "task rows (lmlab.data.tasks.generate_splits writes them)"
        )
    before = grade(load(model, dtype="float32"), rows, max_new_tokens)
    results = []
    for method in methods:
        lr = config.lr * LR_FACTOR.get(method, 1.0)
        out_dir = str(Path(config.out_dir) / method)
        settings = dataclasses.replace(
            config, out_dir=out_dir, lr=lr, min_lr=config.min_lr * lr / config.lr
        )
        run = finetune(model, data, method, config=settings, **options)
        graded = grade(run.lm, rows, max_new_tokens)
        results.append(
            {
                "method": method,
                "lr": lr,
                "trainable": run.trainable,
                "total": run.total,
                "val_loss_before": run.val_loss_before,
                "val_loss": run.train.val_losses[-1][1] if run.train.val_losses else None,
                **graded,
                "wall_time_s": run.train.wall_time_s,
            }
        )
    before.pop("answers")
    return {"before": before, "test_rows": len(rows), "rows": results}
