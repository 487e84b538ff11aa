"""quantize_model and model_size_bytes on a tiny Llama, and Int4Linear.from_float (the
quantizer added for this module). Saving and loading: tests/checkpoint/test_quantized.py."""

import pytest
import torch
from torch import nn

from builders import logits, tiny_llama
from lmlab.errors import ConfigError
from lmlab.models import build_model, get_preset
from lmlab.quant import (
    Int4Linear,
    Int8Linear,
    NF4Linear,
    model_size_bytes,
    quantization_config,
    quantize_model,
)

LAYERS = {"int8": Int8Linear, "int4": Int4Linear, "nf4": NF4Linear}
# Relative L2 error of the logits of the tiny random model below, about twice what this
# seed gives (int8 0.016, int4 0.14, nf4 0.20: per-weight errors of ~0.7%, 8% and 9%,
# compounded over 14 layers). A wrong layout or scale gives errors near 1 or above.
LOGIT_RTOL = {"int8": 0.04, "int4": 0.3, "nf4": 0.4}


def rel_err(a, b):
    return ((a - b).norm() / b.norm()).item()


# ----------------------------------------------------------------------------- Int4Linear


def test_int4_from_float_worked_example():
    linear = nn.Linear(4, 1, bias=False).requires_grad_(False)
    linear.weight.copy_(torch.tensor([[-1.0, -0.5, 0.0, 0.5]]))
    layer = Int4Linear.from_float(linear, group_size=4)
    assert layer.unpacked().tolist() == [[0, 5, 10, 15]]
    assert layer.scale.float().tolist() == [[0.10009765625]]  # 0.1 in bf16
    assert layer.zero.float().tolist() == [[-0.19921875]]  # -1 + 8 s in bf16


def test_int4_from_float_error_is_at_most_half_a_step():
    torch.manual_seed(0)
    linear = nn.Linear(96, 40).requires_grad_(False)
    linear.weight[5, :32] = 0.25  # a constant group: stored exactly (scale 0)
    layer = Int4Linear.from_float(linear, group_size=32)
    assert torch.equal(layer.bias, linear.bias)
    s = layer.scale.float().repeat_interleave(32, 1)  # (N, K)
    z = layer.zero.float().repeat_interleave(32, 1)
    err = (layer.dequantize() - linear.weight).abs()
    # Round to nearest: s / 2; at the group's ends the bf16 rounding of s and z (relative
    # 2^-9 each) can move the representable range by up to 2^-9 (|z| + 8 s).
    assert (err <= s / 2 + 2**-9 * (z.abs() + 8 * s) + 1e-7).all()
    assert torch.equal(layer.dequantize()[5, :32], torch.full((32,), 0.25))
    with pytest.raises(ConfigError, match="group_size=64 must divide in_features=96"):
        Int4Linear.from_float(linear, group_size=64)


# ----------------------------------------------------------------------------- quantize_model


@pytest.mark.parametrize("method", ["int8", "int4", "nf4"])
def test_quantized_model_stays_close_and_shrinks(method):
    model = tiny_llama()
    reference, size = logits(model), model_size_bytes(model)
    quantize_model(model, method)
    kinds = {name: type(m) for name, m in model.named_modules()}
    assert kinds["blocks.0.attn.q_proj"] is LAYERS[method]
    assert kinds["blocks.1.mlp.down_proj"] is LAYERS[method]
    assert kinds["lm_head"] is nn.Linear and kinds["tok_emb"] is nn.Embedding  # kept dense
    assert rel_err(logits(model), reference) < LOGIT_RTOL[method]
    # The 14 linear layers hold 1.41M of the 1.44M float32 weights (5.8 MB); the embedding
    # and the head (2 x 64 x 256) and the norms stay float32.
    assert model_size_bytes(model) < {"int8": 0.3, "int4": 0.2, "nf4": 0.16}[method] * size


def test_targets_and_skip_choose_the_layers():
    model = quantize_model(tiny_llama(), "int8", targets=["q_proj", "attn.v_proj"], skip=[])
    quantized = sorted(n for n, m in model.named_modules() if isinstance(m, Int8Linear))
    assert quantized == [f"blocks.{i}.attn.{p}" for i in (0, 1) for p in ("q_proj", "v_proj")]
    model = quantize_model(tiny_llama(), "int8", skip=["lm_head", "blocks.0.mlp.up_proj"])
    assert type(model.get_submodule("blocks.0.mlp.up_proj")) is nn.Linear
    assert type(model.get_submodule("blocks.1.mlp.up_proj")) is Int8Linear


def test_head_is_quantized_when_not_skipped():
    model = quantize_model(tiny_llama(), "nf4", skip=())
    assert isinstance(model.lm_head, NF4Linear)


def test_bad_arguments_are_named():
    with pytest.raises(ConfigError, match="'nf5' is invalid .*did you mean 'nf4'"):
        quantize_model(tiny_llama(), "nf5")
    with pytest.raises(ConfigError, match="unknown option.*group_sise.*valid: group_size"):
        quantize_model(tiny_llama(), "int4", group_sise=32)
    with pytest.raises(ConfigError, match="no nn.Linear layer of the model matches"):
        quantize_model(tiny_llama(), "int8", targets=["wq"])
    with pytest.raises(ConfigError, match="no quantized layer"):
        quantization_config(tiny_llama())


def test_dtype_casts_the_dense_rest_but_not_the_quantized_scales():
    model = quantize_model(tiny_llama(), "int8", dtype=torch.bfloat16)
    assert model.tok_emb.weight.dtype == torch.bfloat16
    assert model.lm_head.weight.dtype == torch.bfloat16
    q = model.get_submodule("blocks.0.attn.q_proj")
    assert q.scale.dtype == torch.float32 and q.qweight.dtype == torch.int8
    assert logits(model).dtype == torch.float32  # .float() in logits(); runs in bf16


def test_tied_head_stays_tied_under_dtype():
    spec = {**get_preset("llama-small"), "vocab_size": 64, "n_layers": 1, "tie_embeddings": True}
    model = quantize_model(build_model(spec), "int4", dtype=torch.bfloat16)
    assert model.lm_head.weight is model.tok_emb.weight


# ----------------------------------------------------------------------------- save and load
