"""``lmlab train``: tokenize a corpus, build a model, train it (``lmlab.api.train``).

With ``--train.resume`` (auto or a path) the run continues with the settings it recorded
in ``out_dir/config.json`` and ``out_dir/data/source.json``, not the defaults: the flags
given on the resume command replace only what they name (and are recorded), and a flag
that cannot change mid-run (the model, the tokenizer, the data, the seed, seq_len, the
optimizer) is refused in one line.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from jsonargparse import ArgumentParser

from lmlab import api
from lmlab.checkpoint.io import CONFIG_FILE, resolve_checkpoint
from lmlab.cli.args import add_log_arguments, log_config, resume_note, resumed
from lmlab.errors import ConfigError
from lmlab.train import TrainConfig, distributed
from lmlab.train.recipes import with_recipe
from lmlab.train.run import RUN_CONFIG_FILE, read_json, resume_settings

# TrainConfig fields a resumed run cannot change: they fix its data order and optimizer state.
FIXED_ON_RESUME = ("seed", "seq_len", "optimizer")
DATA_OPTIONS = ("data", "tokenizer", "vocab_size", "val_fraction")


def add_arguments(parser: ArgumentParser) -> None:
    parser.add_function_arguments(api.train, skip={"config"}, as_group=False)
    parser.add_class_arguments(TrainConfig, "train", skip={"log"}, help="the trainer's settings")
    add_log_arguments(parser)


def run(args, given=None) -> None:
    skip = ("train", "log", "config", "__path__")
    options = {k: v for k, v in vars(args).items() if k not in skip}
    config = TrainConfig(**vars(args.train), log=log_config(args))
    named = given.as_dict() if hasattr(given, "as_dict") else dict(given or {})
    # the preset's tuned settings (lmlab.train.recipes) wherever the command line is silent
    config = with_recipe(config, options.get("model"), named.get("train") or {})
    options, config = resumed(options, config, given, resume_options)
    result = api.train(**options, config=config)
    if not distributed.setup(config.device).main:  # under torchrun, rank 0 reports
        return
    if result.stop_reason == "fitted":  # a count-based model: fitted, not trained
        print(f"fitted in {result.wall_time_s:.2f} s ({result.tokens_per_s:,.0f} tokens/s)")
        if result.val_losses:
            loss = result.val_losses[-1][1]
            print(f"validation loss {loss:.4f} (perplexity {math.exp(loss):.2f})")
        else:
            print("no validation loss: stupid_backoff gives scores, not probabilities")
        print(f"checkpoint: {result.checkpoint}")
        return
    print(
        f"trained {result.step} step{'' if result.step == 1 else 's'} in {result.wall_time_s:.0f} s "
        f"({result.tokens_per_s:,.0f} tokens/s)"
    )
    if result.val_losses:
        step, loss = result.val_losses[-1]
        print(f"validation loss {loss:.4f} (perplexity {math.exp(loss):.2f}) at step {step}")
    if result.skipped:
        print(
            f"skipped {len(result.skipped)} steps (non-finite or spiking loss): see metrics.jsonl"
        )
    print(f"checkpoint: {result.checkpoint}")
    print(f"run directory: {config.out_dir} (metrics.jsonl, loss.png)")


def resume_options(
    options: dict[str, Any], config: TrainConfig, given: dict[str, Any]
) -> tuple[dict[str, Any], TrainConfig, str] | None:
    """The options, settings and a one-line note for resuming the run in ``config.out_dir``
    with its recorded settings, or None when it recorded none (a fresh start).

    ``given``: what the command line named, nested as parsed (``{"train": {...}, ...}``).
    """
    out_dir = Path(config.out_dir)
    record_file = out_dir / RUN_CONFIG_FILE
    record = read_json(record_file)
    if record is None and config.resume != "auto" and Path(config.resume).exists():
        # Another folder's checkpoint: the settings it was trained with travel in it.
        record_file = resolve_checkpoint(config.resume) / CONFIG_FILE
        saved = read_json(record_file) or {}
        record = {"model": saved.get("model"), "train": saved.get("train_config")}
    if record is None or not isinstance(record.get("train"), dict):
        return None
    given_train = {k: v for k, v in (given.get("train") or {}).items() if k != "resume"}
    config, changed = resume_settings(
        TrainConfig,
        record["train"],
        given_train,
        fixed=FIXED_ON_RESUME,
        # the progress bar and the loggers are a matter of this command, not of the run
        keep={
            "out_dir": config.out_dir,
            "resume": config.resume,
            "init_from": None,
            "progress": config.progress,
            "log": config.log,
        },
    )
    options = dict(options)
    source = read_json(out_dir / "data" / "source.json") or {}
    for name in DATA_OPTIONS:
        if name not in source:
            continue
        if name in given and given[name] != source[name]:
            raise ConfigError(
                f"--{name} {given[name]!r} cannot change mid-run (the run in {str(out_dir)!r} "
                f"has {name}={source[name]!r}): drop it to resume, or start a new run in "
                "another out_dir"
            )
        options[name] = source[name]
    recorded_model = record.get("model")
    if isinstance(recorded_model, dict):
        if "model" in given or "model_overrides" in given:
            _same_model(options, recorded_model, out_dir)
        # the recorded spec itself, whatever preset or file it came from
        options["model"], options["model_overrides"] = str(record_file), None
    return options, config, resume_note(out_dir, config.resume, changed)


def _same_model(options: dict[str, Any], recorded: dict[str, Any], out_dir: Path) -> None:
    """Refuse a --model / --model_overrides that would build another model than the run's."""
    spec = api.model_spec_from(options["model"], options.get("model_overrides"))
    keys = (set(spec) | set(recorded)) - {"vocab_size"}  # the tokenizer fixes vocab_size
    diff = sorted(k for k in keys if k in spec and spec.get(k) != recorded.get(k))
    if diff:
        shown = ", ".join(f"{k}: {recorded.get(k)!r} there, {spec.get(k)!r} here" for k in diff)
        raise ConfigError(
            f"the model cannot change mid-run (the run in {str(out_dir)!r} trains another "
            f"model: {shown}): drop --model/--model_overrides to resume, or use another out_dir"
        )
