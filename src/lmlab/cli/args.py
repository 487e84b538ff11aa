"""Flags shared by several commands, and parsed flags as keyword arguments."""

from __future__ import annotations

from collections.abc import Callable, Collection
from pathlib import Path
from typing import Any

from jsonargparse import ArgumentParser

from lmlab.checkpoint.io import latest_checkpoint
from lmlab.train.config import LogConfig


def options(namespace: Any, skip: Collection[str] = ()) -> dict[str, Any]:
    """The values of a parsed command or group (``args``, ``args.lora``) as keyword
    arguments, without ``skip``, ``config`` (the ``--config`` file) and the ``__path__``
    that ``--group file.yaml`` records."""
    dropped = {"config", "__path__", *skip}
    return {k: v for k, v in vars(namespace).items() if k not in dropped}


def add_log_arguments(parser: ArgumentParser) -> None:
    """``--log.tensorboard``, ``--log.wandb``, ...: where a training command's metrics go
    besides metrics.jsonl (the ``log`` field of its settings, given as its own group)."""
    parser.add_class_arguments(
        LogConfig, "log", help="TensorBoard and Weights & Biases logging beside metrics.jsonl"
    )


def log_config(args: Any) -> LogConfig:
    """The ``--log.*`` flags of a parsed command as a ``LogConfig``."""
    return LogConfig(**options(args.log))


MODEL_HELP = (
    "anything lmlab.load takes: a run or checkpoint folder, an HF folder, a .gguf file, or a "
    "pretrained name (smollm2, minilm)"
)
"""The help of a command's --model flag that names a model to load."""


def add_model_arguments(parser: ArgumentParser) -> None:
    """``--dtype`` and ``--device``: how a command that loads a model holds and runs it."""
    parser.add_argument(
        "--dtype",
        type=str | None,
        default="auto",
        help="float32, bfloat16, auto (bf16 where the CPU/GPU computes it natively: about "
        "1.6x faster decoding) or null (as saved)",
    )
    parser.add_argument(
        "--device",
        type=str,
        default="auto",
        help="where the model runs: auto (CUDA, then MPS, then the CPU), cpu, cuda, cuda:N, mps",
    )


def resumed(inputs: dict[str, Any], config: Any, given: Any, restore: Callable):
    """``(inputs, config)`` for the run: as given, or, when ``config.resume`` asks to
    continue a run, as ``restore(inputs, config, given)`` rebuilds them from what the run
    recorded (printing its one-line note). ``given``: the flags the user named."""
    if config.resume == "never":
        return inputs, config
    given = given.as_dict() if hasattr(given, "as_dict") else dict(given or {})
    restored = restore(inputs, config, given)
    if restored is None:
        return inputs, config
    inputs, config, note = restored
    print(note)
    return inputs, config


def resume_note(out_dir: Path, resume: str, changed: dict[str, tuple[Any, Any]]) -> str:
    """The line a resumed command prints: what it continues and which settings changed."""
    ckpt = latest_checkpoint(out_dir) if resume == "auto" else resume
    what = f"resuming {str(out_dir)!r}" if ckpt else f"restarting {str(out_dir)!r} (no checkpoint)"
    note = f"{what} with its recorded settings"
    if changed:
        note += "; changed: " + ", ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in changed.items())
    return note
