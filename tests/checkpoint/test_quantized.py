"""save_quantized / load_quantized on a tiny Llama: save then load is bit-exact, and a
corrupt or mismatched file is a clear error naming the file and the tensor."""

import json

import pytest
import torch

from builders import logits, tiny_llama
from lmlab.checkpoint.io import CONFIG_FILE, WEIGHTS_FILE
from lmlab.checkpoint.quantized import load_quantized, save_quantized
from lmlab.data.tokenizers import CharTokenizer
from lmlab.errors import CheckpointError
from lmlab.quant import model_size_bytes, quantize_model


@pytest.mark.parametrize(
    ("method", "options", "dtype"),
    [
        ("int8", {}, None),
        ("int8", {}, torch.bfloat16),  # the int8 kernel reads the loaded (file) buffers
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
