import pytest
import torch

from lmlab.errors import ConfigError
from lmlab.finetune import apply_bitfit, apply_selective, describe_trainable, trainable_parameters
from lmlab.models import build_model, get_preset

LLAMA = dict(norm="rmsnorm", mlp="swiglu", pos="rope", bias=False, n_kv_heads=2)


def tiny_model(**overrides):
    spec = {**get_preset("gpt-char-tiny"), "vocab_size": 50, "d_model": 32, "n_layers": 2}
    return build_model({**spec, "n_heads": 4, "d_ff": 64, "max_seq_len": 32, **overrides}).eval()


def test_bitfit_trains_only_the_biases():
    model = apply_bitfit(tiny_model())  # GPT-2 layout
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {n for n, _ in model.named_parameters() if n.endswith("bias")}
    # per block: q, k, v, o (32 each), up (64), down (32), two LayerNorms (32 each); final norm
    assert trainable_parameters(model)[0] == 2 * (4 * 32 + 64 + 32 + 2 * 32) + 32
    ids = torch.randint(0, 50, (2, 8))
    model(ids).sum().backward()
    assert all((p.grad is not None) == p.requires_grad for p in model.parameters())


def test_bitfit_on_a_model_without_biases_suggests_a_subset():
    with pytest.raises(
        ConfigError, match=r"has none.*apply_selective\(model, \['\*norm.weight'\]\)"
    ):
        apply_bitfit(tiny_model(**LLAMA))


def test_selective_globs_and_regexes():
    model = apply_selective(tiny_model(**LLAMA), ["*norm.weight"])
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable == [
        "blocks.0.attn_norm.weight",
        "blocks.0.mlp_norm.weight",
        "blocks.1.attn_norm.weight",
        "blocks.1.mlp_norm.weight",
        "norm.weight",
    ]
    total = sum(p.numel() for p in model.parameters())
    assert describe_trainable(model) == f"trainable 160 of {total:,} parameters ({160 / total:.2%})"
    apply_selective(model, [r"^blocks\.1\.mlp\."], regex=True)  # re-selecting replaces
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"blocks.1.mlp.{p}_proj.weight" for p in ("gate", "up", "down")}


def test_a_pattern_matching_nothing_is_an_error():
    with pytest.raises(ConfigError, match=r"'\*adapter\*' matches no parameter; names look like"):
        apply_selective(tiny_model(), ["*adapter*"])
    with pytest.raises(ConfigError, match="invalid regular expression"):
        apply_selective(tiny_model(), ["("], regex=True)


def test_describe_trainable_format():
    model = torch.nn.Linear(1000, 1000)  # 1,001,000 parameters
    model.weight.requires_grad_(False)
    assert describe_trainable(model) == "trainable 1,000 of 1,001,000 parameters (0.10%)"
