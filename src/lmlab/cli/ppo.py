"""``lmlab ppo``: PPO against a reward on task prompts (``lmlab.align.ppo.ppo_from_files``).

With ``--ppo.resume`` (auto or a path) the run continues with the settings, model, prompts
and reward it recorded in ``out_dir/config.json``, not the defaults, as ``lmlab train``
does: the flags given on the resume command replace only what they name (and are
recorded), and a setting that cannot change mid-run (the seed, the method, LoRA's
settings) is refused in one line.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from jsonargparse import ArgumentParser

from lmlab.align.ppo import PPOConfig, ppo_from_files
from lmlab.checkpoint.io import CONFIG_FILE, resolve_checkpoint
from lmlab.cli.args import add_log_arguments, log_config, options, resume_note, resumed
from lmlab.cli.summaries import ppo_summary
from lmlab.finetune import LoRAConfig
from lmlab.train.run import RUN_CONFIG_FILE, read_json, resume_settings

# PPOConfig fields a resumed run cannot change: they fix its weights' layout and its draws.
FIXED_ON_RESUME = ("seed", "method", "lora")


def add_arguments(parser: ArgumentParser) -> None:
    parser.add_function_arguments(ppo_from_files, skip={"config"}, as_group=False)
    parser.add_class_arguments(PPOConfig, "ppo", skip={"log"}, help="the PPO settings")
    add_log_arguments(parser)


def run(args, given=None) -> None:
    lora = LoRAConfig(**options(args.ppo.lora))
    config = PPOConfig(**options(args.ppo, skip=("lora",)), lora=lora, log=log_config(args))
    inputs, config = resumed(options(args, skip=("ppo", "log")), config, given, resume_options)
    result = ppo_from_files(**inputs, config=config)
    for line in ppo_summary(result):
        print(line)


def resume_options(
    inputs: dict[str, Any], config: PPOConfig, given: dict[str, Any]
) -> tuple[dict[str, Any], PPOConfig, str] | None:
    """The inputs (model, prompts, reward), settings and a one-line note for resuming the
    run in ``config.out_dir`` as it recorded them, or None when it recorded none.

    ``given``: what the command line named, nested as parsed (``{"ppo": {...}, ...}``).
    """
    out_dir = Path(config.out_dir)
    record = read_json(out_dir / RUN_CONFIG_FILE)
    if record is None and config.resume != "auto" and Path(config.resume).exists():
        # Another folder's checkpoint: the settings it was trained with travel in it.
        saved = read_json(resolve_checkpoint(config.resume) / CONFIG_FILE) or {}
        record = {"ppo": saved.get("ppo_config")}
    if record is None or not isinstance(record.get("ppo"), dict):
        return None
    recorded = record["ppo"]
    given_ppo = {k: v for k, v in (given.get("ppo") or {}).items() if k != "resume"}
    if isinstance(given_ppo.get("lora"), dict) and isinstance(recorded.get("lora"), dict):
        given_ppo["lora"] = {**recorded["lora"], **given_ppo["lora"]}  # a flag names one field
    config, changed = resume_settings(
        PPOConfig,
        recorded,
        given_ppo,
        fixed=FIXED_ON_RESUME,
        # the progress bar and the loggers are a matter of this command, not of the run
        keep={
            "out_dir": config.out_dir,
            "resume": config.resume,
            "progress": config.progress,
            "log": config.log,
        },
    )
    inputs = dict(inputs)
    for name, value in (record.get("source") or {}).items():
        if name in inputs and name not in given:
            inputs[name] = value
    return inputs, config, resume_note(out_dir, config.resume, changed)
