"""Training recipes: a preset's tuned settings apply where the user is silent, and only there."""

import json

import pytest

from lmlab.cli.main import main
from lmlab.errors import ConfigError
from lmlab.models import PRESETS
from lmlab.train import TrainConfig
from lmlab.train.recipes import RECIPES, preset_training, with_recipe


def test_every_recipe_names_a_preset_and_real_trainer_fields():
    for name, recipe in RECIPES.items():
        assert name in PRESETS
        TrainConfig(**recipe)  # every field exists and validates


def test_a_recipe_fills_only_what_the_user_did_not_name():
    recipe = preset_training("gpt-char-fast")
    config = with_recipe(TrainConfig(lr=0.5, out_dir="x"), "gpt-char-fast", {"lr": 0.5})
    assert config.lr == 0.5 and config.out_dir == "x"
    for field, value in recipe.items():
        if field != "lr":
            assert getattr(config, field) == value, field
    assert with_recipe(TrainConfig(), "gpt-char-tiny", {}) == TrainConfig()
    assert with_recipe(TrainConfig(), {"family": "transformer"}, {}) == TrainConfig()
    preset_training("gpt-char-fast")["lr"] = 9.0  # a copy: the recipe itself is unchanged
    assert RECIPES["gpt-char-fast"]["lr"] != 9.0


def test_a_misspelt_recipe_field_is_refused(monkeypatch):
    monkeypatch.setitem(RECIPES, "gpt-char-tiny", {"learning_rate": 1.0})
    with pytest.raises(ConfigError, match="learning_rate"):
        with_recipe(TrainConfig(), "gpt-char-tiny", {})


def test_lmlab_train_runs_a_preset_with_its_recipe(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("to be or not to be, that is the question. " * 200)
    out = tmp_path / "run"
    flags = ["train", "--model", "gpt-char-fast", "--data", str(corpus)]
    flags += ["--train.out_dir", str(out), "--train.max_steps", "2", "--train.batch_size", "4"]
    assert main([*flags, "--train.progress", "false"]) == 0
    record = json.loads((out / "config.json").read_text())["train"]
    recipe = preset_training("gpt-char-fast")
    assert (record["max_steps"], record["batch_size"]) == (2, 4)  # named: kept
    assert (record["lr"], record["seq_len"], record["warmup_steps"]) == (
        recipe["lr"],
        recipe["seq_len"],
        recipe["warmup_steps"],
    )
