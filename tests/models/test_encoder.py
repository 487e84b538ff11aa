"""Tests for lmlab.models.encoder: config checks, invariants, hooks, registry and save/load.

Parity with transformers' BERT lives in tests/checkpoint/test_bert.py (it goes through the
converter in lmlab.checkpoint.bert).
"""

import dataclasses
import re

import pytest
import torch

from lmlab.checkpoint.io import load_model, save_checkpoint
from lmlab.errors import ConfigError
from lmlab.models import build_model, families, model_spec
from lmlab.models.encoder import Encoder, EncoderConfig, pool


def tiny_spec(**overrides):
    spec = dict(
        family="encoder",
        vocab_size=50,
        d_model=32,
        n_layers=2,
        n_heads=4,
        d_ff=48,
        max_seq_len=16,
    )
    return {**spec, **overrides}


def tiny_model(**overrides) -> Encoder:
    model = build_model(tiny_spec(**overrides)).eval()
    # Non-trivial norms and biases, so the tests exercise them (init makes them 1 and 0).
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(0.1 * torch.randn_like(p))
    return model


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("vocab_size", 0),
        ("d_model", -4),
        ("n_heads", 5),  # does not divide d_model=32
        ("type_vocab_size", 0),
        ("dropout", 1.0),
        ("norm_eps", 0.0),
        ("pad_id", 50),
        ("activation", "relu"),
        ("pooling", "max"),
        ("mlm_head", "yes"),
    ],
)
def test_config_errors_name_the_field_and_value(field, value):
    fields = {k: v for k, v in tiny_spec().items() if k != "family"}
    with pytest.raises(
        ValueError, match=rf"EncoderConfig\.{field}={re.escape(repr(value))}"
    ) as info:
        EncoderConfig(**{**fields, field: value})
    assert isinstance(info.value, ConfigError)  # the CLI prints it as one line


def test_config_error_lists_the_allowed_choices():
    with pytest.raises(ConfigError, match="choose one of gelu, gelu_tanh"):
        build_model(tiny_spec(activation="swiglu"))
    with pytest.raises(ConfigError, match="did you mean 'd_model'"):
        build_model(tiny_spec(d_modle=3))


def test_forward_shapes_and_context_limit():
    model = tiny_model()
    ids = torch.randint(1, 50, (3, 7))
    assert model(ids).shape == (3, 7, 32)
    with pytest.raises(ConfigError, match="max_seq_len 16"):
        model(torch.ones(1, 17, dtype=torch.long))
    with pytest.raises(ConfigError, match="no masked-LM head"):
        model.mlm_logits(model(ids))


def test_mlm_head_gives_logits_over_the_vocabulary():
    model = tiny_model(mlm_head=True)
    ids = torch.randint(1, 50, (2, 5))
    assert model.mlm_logits(model(ids)).shape == (2, 5, 50)


def test_a_padded_row_equals_the_row_run_alone():
    """Right padding must not change a real token's hidden state (keys are masked)."""
    model = tiny_model()
    short, long = torch.randint(1, 50, (1, 4)), torch.randint(1, 50, (1, 9))
    ids = torch.zeros(2, 9, dtype=torch.long)
    ids[0, :4], ids[1] = short[0], long[0]
    mask = torch.tensor([[1] * 4 + [0] * 5, [1] * 9])
    types = torch.tensor([[0, 0, 1, 1] + [0] * 5, [0] * 5 + [1] * 4])
    with torch.no_grad():
        batch = model(ids, attention_mask=mask, token_type_ids=types)
        alone_short = model(short, token_type_ids=types[:1, :4])
        alone_long = model(long, token_type_ids=types[1:])
    # fp32 on CPU: the padded row reduces over more (masked) keys, so sums round differently.
    torch.testing.assert_close(batch[0, :4], alone_short[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(batch[1], alone_long[0], atol=1e-5, rtol=1e-5)
    pooled = pool(batch, mask)
    torch.testing.assert_close(pooled[0], pool(alone_short)[0], atol=1e-5, rtol=1e-5)


def test_an_all_padding_row_gives_finite_states():
    model = tiny_model()
    out = model(
        torch.zeros(2, 4, dtype=torch.long), attention_mask=torch.tensor([[0] * 4, [1] * 4])
    )
    assert torch.isfinite(out).all()
    assert torch.isfinite(pool(out, torch.tensor([[0] * 4, [1] * 4]))).all()


def test_pool_worked_example():
    hidden = torch.tensor([[[1.0, 2.0], [3.0, 4.0], [9.0, 9.0]]])
    mask = torch.tensor([[1, 1, 0]])
    torch.testing.assert_close(
        pool(hidden, mask, "mean", normalize=False), torch.tensor([[2.0, 3.0]])
    )
    torch.testing.assert_close(
        pool(hidden, mask, "cls", normalize=False), torch.tensor([[1.0, 2.0]])
    )
    torch.testing.assert_close(pool(hidden, mask, "cls"), torch.tensor([[1.0, 2.0]]) / 5**0.5)
    with pytest.raises(ConfigError, match="mean, cls"):
        pool(hidden, mask, "max")


def test_explicit_attention_matches_the_fast_path():
    model = tiny_model()
    ids = torch.randint(1, 50, (2, 6))
    mask = torch.tensor([[1] * 6, [1] * 3 + [0] * 3])
    with torch.no_grad():
        fast = model(ids, attention_mask=mask)
        model.use_explicit_attention()
        explicit = model(ids, attention_mask=mask)
    # fp32: the two paths differ only in summation order.
    torch.testing.assert_close(explicit, fast, atol=1e-5, rtol=1e-5)


def test_hooks_fire_with_their_shapes_and_can_edit():
    model = tiny_model()
    ids = torch.randint(1, 50, (2, 6))
    mask = torch.tensor([[1] * 6, [1] * 4 + [0] * 2])
    seen = {}
    handles = [
        module.register_forward_hook(lambda m, i, o, name=name: seen.__setitem__(name, o.shape))
        for name, module in model.named_modules()
        if name.rpartition(".")[2].startswith("hook_")
    ]
    with torch.no_grad():
        base = model(ids, attention_mask=mask)
    for h in handles:
        h.remove()
    assert seen["hook_embed"] == seen["hook_pos_embed"] == seen["hook_type_embed"] == (2, 6, 32)
    for name in ("resid_pre", "attn_out", "resid_mid", "mlp_out", "resid_post"):
        assert seen[f"blocks.1.hook_{name}"] == (2, 6, 32)
    assert seen["blocks.0.attn.hook_q"] == (2, 4, 6, 8)  # (B, H, T, Dh)
    assert seen["blocks.0.attn.hook_z"] == (2, 6, 4, 8)  # (B, T, H, Dh)
    assert seen["blocks.0.attn.hook_pattern"] == (2, 4, 6, 6)  # a hook turns on the explicit path
    # the last block's output is the model's output
    out = {}
    h = model.blocks[1].hook_resid_post.register_forward_hook(
        lambda m, i, o: out.__setitem__("x", o)
    )
    with torch.no_grad():
        model(ids, attention_mask=mask)
    h.remove()
    torch.testing.assert_close(out["x"], base)
    # the pattern gives no weight to padding keys, and rows sum to 1
    pattern = {}
    h = model.blocks[0].attn.hook_pattern.register_forward_hook(
        lambda m, i, o: pattern.__setitem__("p", o)
    )
    with torch.no_grad():
        model(ids, attention_mask=mask)
    h.remove()
    assert torch.all(pattern["p"][1, :, :, 4:] == 0)
    torch.testing.assert_close(pattern["p"].sum(-1), torch.ones(2, 4, 6))
    # editing: zeroing an MLP output changes the states
    h = model.blocks[0].hook_mlp_out.register_forward_hook(lambda m, i, o: torch.zeros_like(o))
    with torch.no_grad():
        assert not torch.allclose(model(ids, attention_mask=mask), base)
    h.remove()


def test_registry_builds_it_and_the_spec_round_trips():
    assert "encoder" in families()
    model = build_model(tiny_spec(mlm_head=True, pooling="cls"))
    assert isinstance(model, Encoder)
    defaults = {f.name: f.default for f in dataclasses.fields(EncoderConfig)}
    assert model_spec(model) == {**defaults, **tiny_spec(mlm_head=True, pooling="cls")}
    assert build_model(model_spec(model)).config == model.config


def test_padding_row_of_the_embedding_starts_at_zero():
    model = build_model(tiny_spec(pad_id=3))
    assert torch.all(model.tok_emb.weight[3] == 0)
    assert model.tok_emb.padding_idx == 3


@pytest.mark.parametrize("mlm_head", [False, True])
def test_save_then_load_is_bit_exact(tmp_path, mlm_head):
    model = tiny_model(mlm_head=mlm_head)
    ids = torch.randint(1, 50, (2, 5))
    save_checkpoint(tmp_path / "ckpt", model)
    loaded, tokenizer, config = load_model(tmp_path / "ckpt")
    assert tokenizer is None and config["model"]["family"] == "encoder"
    assert isinstance(loaded, Encoder) and loaded.config == model.config
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name
    with torch.no_grad():
        assert torch.equal(loaded(ids), model(ids))
        if mlm_head:
            assert torch.equal(loaded.mlm_logits(loaded(ids)), model.mlm_logits(model(ids)))


def test_dropout_is_active_only_in_training():
    model = build_model(tiny_spec(dropout=0.5))
    ids = torch.randint(1, 50, (2, 5))
    model.train()
    assert not torch.equal(model(ids), model(ids))
    model.eval()
    assert torch.equal(model(ids), model(ids))
