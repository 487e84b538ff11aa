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
base model's scores, once. With ``general_chars``, each model also gets the perplexity of
general text no method trains on (``lmlab.finetune.mixture.general_text``, as ``lmlab
mixture`` measures it): a rise is forgetting. ``generated_data`` writes training and test
rows of bundled tasks (``lmlab finetune --compare ... --generate arithmetic``).

Learning rates: a method that trains fewer parameters needs larger steps to move the model
as far. ``LR_FACTOR`` scales the configured rate (the one full fine-tuning uses) per
method: x10 for LoRA, QLoRA, adapters, BitFit and selective tuning, x100 for the soft
prompts, the ratios bench/finetune.py found to work on SmolLM2 (full 5e-5, LoRA 1e-3, soft
prompts 1e-2; Lester et al. use 0.3 for prompt tuning). ``lr_factor`` overrides them.
"""

from __future__ import annotations

import dataclasses
import resource
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lmlab.data.instructions import read_jsonl
from lmlab.data.tasks import generate_splits, write_jsonl
from lmlab.errors import ConfigError
from lmlab.eval.text import chrf
from lmlab.finetune.mixture import general_text
from lmlab.finetune.run import METHODS, check_method, finetune, task_accuracy
from lmlab.lm import LM, load
from lmlab.train import TrainConfig

PEFT_METHODS: tuple[str, ...] = ("full", "lora", "adapter", "prompt", "prefix", "bitfit")
"""The default methods of ``compare_methods``, from most trainable parameters to few."""

LR_FACTOR: dict[str, float] = {"lora": 10.0, "adapter": 10.0, "bitfit": 10.0, "selective": 10.0,
                               "qlora": 10.0, "prompt": 100.0, "prefix": 100.0}  # fmt: skip
"""Each method's learning rate as a multiple of the configured one (full and kl: x1)."""

GRADE_BATCH = 32
"""Test rows answered together (``task_accuracy``'s batch)."""


def grade(
    lm: LM, rows: list[dict[str, Any]], max_new_tokens: int, general: str | None = None
) -> dict[str, Any]:
    """Greedy answers of ``lm`` to task ``rows`` -> ``{"accuracy", "chrf", "answers",
    "perplexity"}``; the perplexity of ``general`` text (None without it)."""
    accuracy, answers = task_accuracy(lm, rows, max_new_tokens, batch_size=GRADE_BATCH)
    score = chrf([a.strip() for a in answers], [r["output"] for r in rows]).score
    perplexity = lm.perplexity(general) if general else None
    return {"accuracy": accuracy, "chrf": score, "answers": answers, "perplexity": perplexity}


def generated_data(
    tasks: Sequence[str] | str, n_train: int, n_test: int, seed: int, folder: str | Path
) -> tuple[str, str]:
    """Training and test rows of bundled ``tasks`` (``lmlab.data.tasks``, no prompt shared
    between the two), written to ``folder/train.jsonl`` and ``folder/test.jsonl`` -> their
    paths, for ``compare_methods``."""
    names = [t.strip() for t in tasks.split(",")] if isinstance(tasks, str) else list(tasks)
    for key, value in (("n_train", n_train), ("n_test", n_test)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"{key}={value!r} is invalid: must be an integer >= 1")
    train, _, test = generate_splits(names, n_train, 0, n_test, seed)
    paths = Path(folder) / "train.jsonl", Path(folder) / "test.jsonl"
    write_jsonl(train, paths[0])
    write_jsonl(test, paths[1])
    return str(paths[0]), str(paths[1])


def check_lr_factor(factors: dict[str, float]) -> dict[str, float]:
    """``factors`` (method -> multiple of the configured learning rate), checked."""
    for name, value in factors.items():
        check_method(name)
        if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
            raise ConfigError(f"lr_factor[{name!r}]={value!r} is invalid: must be a number > 0")
    return dict(factors)


def process_seconds() -> float:
    """CPU seconds (user + system) this process has used so far, over all its threads."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


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
    general_chars: int = 0,
    lr_factor: dict[str, float] | None = None,
    **options: Any,
) -> dict[str, Any]:
    """Fine-tune ``model`` on ``data`` once per method and grade each on ``test_data``
    (task rows, ``lmlab.data.tasks``) -> ``{"before": {"accuracy", "chrf", "perplexity"},
    "test_rows", "rows": [{"method", "lr", "trainable", "total", "val_loss_before",
    "val_loss", "accuracy", "chrf", "perplexity", "answers", "wall_time_s", "cpu_time_s"},
    ...]}``. ``general_chars`` > 0: the perplexity of that many characters of general text
    (``lmlab.finetune.mixture.general_text``), before and after each method: forgetting.
    ``lr_factor`` replaces entries of ``LR_FACTOR``. ``options`` go to ``finetune``
    (``lora``, ``bottleneck``, ``n_virtual``, ``max_len``, ...)."""
    methods = check_methods(methods)
    factors = {**LR_FACTOR, **check_lr_factor(lr_factor or {})}
    if isinstance(general_chars, bool) or not isinstance(general_chars, int) or general_chars < 0:
        raise ConfigError(f"general_chars={general_chars!r} is invalid: must be an integer >= 0")
    general = general_text(general_chars) if general_chars else None
    config = config or TrainConfig(out_dir="runs/peft", max_steps=200, lr=1e-3)
    rows = read_jsonl(test_data)
    missing = [i + 1 for i, r in enumerate(rows) if "output" not in r or "task" not in r]
    if missing:
        raise ConfigError(
            f"{test_data}: lines {missing[:5]} lack 'task' or 'output'; the test rows must be "
            "task rows (lmlab.data.tasks.generate_splits writes them)"
        )
    before = grade(load(model, dtype="float32"), rows, max_new_tokens, general)
    results = []
    for method in methods:
        lr = config.lr * factors.get(method, 1.0)
        start = process_seconds()
        out_dir = str(Path(config.out_dir) / method)
        settings = dataclasses.replace(
            config, out_dir=out_dir, lr=lr, min_lr=config.min_lr * lr / config.lr
        )
        run = finetune(model, data, method, config=settings, **options)
        graded = grade(run.lm, rows, max_new_tokens, general)
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
                "cpu_time_s": process_seconds() - start,
            }
        )
    before.pop("answers")
    return {"before": before, "test_rows": len(rows), "rows": results}
