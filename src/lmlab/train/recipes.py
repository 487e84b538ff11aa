"""Training recipes: the trainer settings a model preset was tuned with.

A preset (``lmlab.models.PRESETS``) fixes a model's shape; some shapes also come with the
settings that train them well (batch, sequence length, learning rate and schedule,
precision, steps). ``lmlab train --model <preset>`` starts from those settings wherever the
command line is silent, so the preset a benchmark measured is the preset a user runs::

    >>> preset_training("gpt-char-fast")["seq_len"]
    64
    >>> preset_training("gpt-char-tiny")  # no recipe: the trainer's defaults apply
    {}

Each recipe names how it was found (bench/train_to_loss.py for ``gpt-char-fast`` and
``llama-char-fast``).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from lmlab.errors import ConfigError
from lmlab.train.config import TrainConfig

RECIPES: dict[str, dict[str, Any]] = {
    # nanoGPT's CPU shape (4 x 128, block 64) trained to the validation loss of a faithful
    # float32 nanoGPT run (bench/train_to_loss.py: 1.920 on its fixed windows) in as little
    # wall time as we found on 2 CPU cores: batch 32 instead of nanoGPT's 12, a 4x larger
    # peak learning rate, a short warm-up and a cosine decay over 700 steps. Steps to 1.92
    # (checked every 25): batch 32 at 4e-3, 550 (1.13M tokens); batch 48 at 5e-3, 425
    # (1.31M); batch 64 at 5e-3, 375 (1.54M). Timed quietly, batch 64 took 36-45 s and
    # batch 32 27 s for nanoGPT's 70-90 s.
    "gpt-char-fast": dict(
        seq_len=64,
        batch_size=32,
        lr=4e-3,
        min_lr=4e-4,
        warmup_steps=50,
        max_steps=700,
        betas=(0.9, 0.99),
        weight_decay=0.1,
        grad_clip=1.0,
        precision="auto",
        seed=1337,
    ),
    # The same size in Llama's parts (rotary positions, RMSNorm, SwiGLU): steps to 1.92 at
    # batch 32 and 4e-3, checked every 25: 450 with rotary positions alone, 375 with all
    # three over a 700-step cosine, 325 over 500 steps, 300 over 400 or 350 steps (1.907
    # at step 300 over 350). The shortest cosine that still lands there is the fastest.
    "llama-char-fast": dict(
        seq_len=64,
        batch_size=32,
        lr=4e-3,
        min_lr=4e-4,
        warmup_steps=50,
        max_steps=350,
        betas=(0.9, 0.99),
        weight_decay=0.1,
        grad_clip=1.0,
        precision="auto",
        seed=1337,
    ),
}


def preset_training(preset: str) -> dict[str, Any]:
    """The trainer settings recorded for ``preset`` (empty when it has none)."""
    return dict(RECIPES.get(preset, {}))


def with_recipe(config: TrainConfig, preset: Any, given: dict[str, Any]) -> TrainConfig:
    """``config`` with ``preset``'s recipe filled in wherever ``given`` (the settings the user
    named) is silent. A model that is not a preset name, or has no recipe, changes nothing."""
    recipe = preset_training(preset) if isinstance(preset, str) else {}
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = set(recipe) - fields
    if unknown:  # a recipe is code: a misspelt field is a bug, not user input
        raise ConfigError(f"recipe {preset!r} sets unknown trainer fields {sorted(unknown)}")
    return dataclasses.replace(config, **{k: v for k, v in recipe.items() if k not in given})
