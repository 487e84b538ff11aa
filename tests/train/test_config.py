import dataclasses
import json

import pytest

from lmlab.errors import ConfigError
from lmlab.train import TrainConfig


def test_defaults_are_valid_and_json_serialisable():
    config = TrainConfig()
    assert json.loads(json.dumps(dataclasses.asdict(config)))["optimizer"] == "adamw"


def test_lists_from_json_become_tuples():
    config = TrainConfig(betas=[0.9, 0.99], no_decay=["bias"])
    assert config.betas == (0.9, 0.99)
    assert config.no_decay == ("bias",)
    hash(config)  # frozen and hashable


@pytest.mark.parametrize(
    ("field", "value", "allowed"),
    [
        ("max_steps", 0, ">= 1"),
        ("batch_size", 2.5, "integer"),
        ("grad_accum", True, "integer"),
        ("lr", -1.0, "> 0"),
        ("lr", float("nan"), "finite"),
        ("min_lr", 1.0, "at most lr"),
        ("warmup_steps", -1, ">= 0"),
        ("weight_decay", -0.1, ">= 0"),
        ("betas", (0.9, 1.0), "[0, 1)"),
        ("grad_clip", 0.0, "> 0"),
        ("spike_factor", 0.5, "> 1"),
        ("keep_last", 0, ">= 1"),
        ("time_budget_s", 0, "> 0"),
        ("progress", "yes", "true or false"),
        ("resume", "", "auto"),
    ],
)
def test_invalid_field_names_field_value_and_allowed(field, value, allowed):
    with pytest.raises(ConfigError) as info:
        TrainConfig(**{field: value})
    message = str(info.value)
    assert f"TrainConfig.{field}={value!r}" in message
    assert allowed in message


def test_unknown_choice_lists_choices_and_suggests_closest():
    with pytest.raises(ConfigError, match=r"adamw, sgd \(did you mean 'adamw'\?\)"):
        TrainConfig(optimizer="adam")
    with pytest.raises(ConfigError, match="auto, bf16, fp32"):
        TrainConfig(precision="fp16")
    with pytest.raises(ConfigError, match=r"'norms' is not one of bias, norm, embedding"):
        TrainConfig(no_decay=("norms",))


def test_resume_together_with_init_from_is_an_error():
    with pytest.raises(ConfigError, match="resume='auto' and init_from='ckpt'.*choose one"):
        TrainConfig(resume="auto", init_from="ckpt")
    TrainConfig(resume="never", init_from="ckpt")  # init_from alone is fine
