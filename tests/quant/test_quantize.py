"""quantize_model, model_size_bytes, save_quantized / load_quantized on a tiny Llama, and
Int4Linear.from_float (the quantizer added for this module)."""

import json

import pytest
import torch
from torch import nn

from lmlab.checkpoint.io import CONFIG_FILE, WEIGHTS_FILE
from lmlab.data.tokenizers import CharTokenizer
from lmlab.errors import CheckpointError, ConfigError
from lmlab.models import build_model, get_preset
from lmlab.quant import (
    Int4Linear,
    Int8Linear,
    NF4Linear,
    load_quantized,
    model_size_bytes,
    quantization_config,
    quantize_model,
    save_quantized,
)

LAYERS = {"int8": Int8Linear, "int4": Int4Linear, "nf4": NF4Linear}
# Relative L2 error of the logits of the tiny random model below, about twice what this
# seed gives (int8 0.016, int4 0.14, nf4 0.20: per-weight errors of ~0.7%, 8% and 9%,
# compounded over 14 layers). A wrong layout or scale gives errors near 1 or above.
LOGIT_RTOL = {"int8": 0.04, "int4": 0.3, "nf4": 0.4}


def tiny_llama(seed=0):
    torch.manual_seed(seed)
    spec = {**get_preset("llama-small"), "vocab_size": 64, "n_layers": 2}
    return build_model(spec).eval()


def logits(model, seed=1):
    ids = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model(ids).float()


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


@pytest.mark.parametrize(
    ("method", "options", "dtype"),
    [
        ("int8", {}, None),
        ("int4", {"group_size": 64}, torch.bfloat16),
        ("nf4", {}, None),
        ("nf4", {"double_quant": False, "block_size": 32}, torch.bfloat16),
    ],
)
def test_save_then_load_is_bit_exact(tmp_path, method, options, dtype):
    model = quantize_model(tiny_llama(), method, dtype=dtype, **options)
    tokenizer = CharTokenizer.train("to be or not to be")
    save_quantized(model, tmp_path / "q", tokenizer)
    loaded, tok, config = load_quantized(tmp_path / "q")
    assert config["quantization"]["method"] == method
    assert config["quantization"]["options"].items() >= options.items()
    assert tok.encode("to be") == tokenizer.encode("to be")
    before, after = model.state_dict(), loaded.state_dict()
    assert before.keys() == after.keys()
    for name in before:
        assert before[name].dtype == after[name].dtype, name
        assert torch.equal(before[name], after[name]), name
    assert torch.equal(logits(loaded), logits(model))
    assert model_size_bytes(loaded) == model_size_bytes(model)


def test_saved_file_holds_the_quantized_tensors(tmp_path):
    model = quantize_model(tiny_llama(), "nf4")
    path = save_quantized(model, tmp_path / "q")
    config = json.loads((path / CONFIG_FILE).read_text())
    assert config["model"]["family"] == "transformer"
    quant = config["quantization"]
    assert quant["options"] == {"block_size": 64, "double_quant": True, "double_block": 256}
    assert len(quant["layers"]) == 14 and "lm_head" not in quant["layers"]
    # NF4 at ~4.13 bits per quantized weight: the file is about the state dict's size.
    assert abs((path / WEIGHTS_FILE).stat().st_size - model_size_bytes(model)) < 20_000


def test_corrupt_file_is_a_clear_error(tmp_path):
    path = save_quantized(quantize_model(tiny_llama(), "int4"), tmp_path / "q")
    weights = path / WEIGHTS_FILE
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match="model.safetensors"):
        load_quantized(path)


def test_tensor_that_does_not_fit_is_named(tmp_path):
    path = save_quantized(quantize_model(tiny_llama(), "nf4"), tmp_path / "q")
    config = json.loads((path / CONFIG_FILE).read_text())
    config["quantization"]["options"]["block_size"] = 32  # disagrees with the tensors
    (path / CONFIG_FILE).write_text(json.dumps(config))
    with pytest.raises(CheckpointError) as info:
        load_quantized(path)
    message = str(info.value)
    assert "model.safetensors" in message and "'blocks.0.attn.q_proj'" in message
    assert "qweight" in message


def test_missing_tensor_and_unquantized_checkpoint_are_named(tmp_path):
    model = quantize_model(tiny_llama(), "int8")
    path = save_quantized(model, tmp_path / "q")
    config = json.loads((path / CONFIG_FILE).read_text())
    config["quantization"]["layers"].remove("blocks.0.attn.q_proj")  # loaded as dense
    (path / CONFIG_FILE).write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="has no tensor 'blocks.0.attn.q_proj.weight'"):
        load_quantized(path)
    del config["quantization"]
    (path / CONFIG_FILE).write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="no valid 'quantization' entry"):
        load_quantized(path)
