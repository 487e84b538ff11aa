import math

import pytest
import torch

from lmlab.models import build_model, get_preset
from lmlab.train import TrainConfig
from lmlab.train.optim import build_optimizer, lr_at, param_groups, parameter_kinds


def test_lr_at_warmup_then_cosine_hand_worked():
    """lr=1, min_lr=0.1, warmup 2, max_steps 6: warm-up (s+1)/2 -> 0.5, 1.0; then
    0.1 + 0.45 * (1 + cos(pi * t)) with t = (s - 2) / 4:
    t=0 -> 1.0, t=1/4 -> 0.1 + 0.45 * 1.70711 = 0.86820, t=1/2 -> 0.55,
    t=3/4 -> 0.1 + 0.45 * 0.29289 = 0.23180, t=1 -> 0.1."""
    config = TrainConfig(lr=1.0, min_lr=0.1, warmup_steps=2, max_steps=6)
    got = [lr_at(s, config) for s in range(8)]
    want = [0.5, 1.0, 1.0, 0.868198, 0.55, 0.231802, 0.1, 0.1]
    assert got == pytest.approx(want, abs=1e-6)


def test_lr_at_constant_and_no_warmup():
    config = TrainConfig(lr=0.3, min_lr=0.0, warmup_steps=0, lr_schedule="constant")
    assert [lr_at(s, config) for s in (0, 5, 10_000)] == [0.3, 0.3, 0.3]
    cosine = TrainConfig(lr=0.3, min_lr=0.0, warmup_steps=0, max_steps=10)
    assert lr_at(0, cosine) == 0.3
    assert lr_at(5, cosine) == pytest.approx(0.15)


def _names(model, group):
    ids = {id(p) for p in group["params"]}
    return sorted(n for n, p in model.named_parameters() if id(p) in ids)


def test_no_weight_decay_on_norms_biases_embeddings(make_toy):
    model = make_toy()
    groups = {g["name"]: g for g in param_groups(model, TrainConfig(weight_decay=0.1))}
    assert _names(model, groups["decay"]) == ["head.weight", "proj.weight"]
    assert _names(model, groups["no_decay"]) == [
        "emb.weight",
        "norm.bias",
        "norm.weight",
        "proj.bias",
    ]
    assert groups["decay"]["weight_decay"] == 0.1
    assert groups["no_decay"]["weight_decay"] == 0.0


def test_no_decay_is_configurable(make_toy):
    model = make_toy()
    groups = {g["name"]: g for g in param_groups(model, TrainConfig(no_decay=("bias",)))}
    assert _names(model, groups["no_decay"]) == ["norm.bias", "proj.bias"]
    everything = param_groups(model, TrainConfig(no_decay=()))
    assert [g["name"] for g in everything] == ["decay"]


def test_tied_embedding_counts_as_embedding_once():
    spec = {**get_preset("gpt-char-tiny"), "vocab_size": 32, "d_model": 32, "n_layers": 2}
    model = build_model({**spec, "n_heads": 2, "d_ff": 64, "max_seq_len": 16})
    assert parameter_kinds(model)["tok_emb.weight"] == {"embedding", "weight"}  # also lm_head
    groups = param_groups(model, TrainConfig())
    all_params = [p for g in groups for p in g["params"]]
    assert len(all_params) == len({id(p) for p in all_params}) == len(list(model.parameters()))
    no_decay = {g["name"]: g for g in groups}["no_decay"]
    assert any(p is model.tok_emb.weight for p in no_decay["params"])


def test_build_optimizer_adamw_and_sgd(make_toy):
    model = make_toy()
    adamw = build_optimizer(model, TrainConfig(lr=0.01, betas=(0.8, 0.9)))
    assert isinstance(adamw, torch.optim.AdamW)
    assert adamw.param_groups[0]["betas"] == (0.8, 0.9)
    sgd = build_optimizer(model, TrainConfig(optimizer="sgd", lr=0.01, momentum=0.5))
    assert isinstance(sgd, torch.optim.SGD)
    assert sgd.param_groups[0]["momentum"] == 0.5
    assert math.isclose(sgd.param_groups[0]["weight_decay"], 0.1)
