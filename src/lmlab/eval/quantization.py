"""What quantization costs: size, held-out perplexity and weight error per layer, for each
weight format of one model (lesson 32, ``lmlab quantize --compare``).

The formats are ``lmlab.quant``'s (see ``lmlab/quant/quantize.py`` for how each stores a
weight) and two plain float ones:

    fp32   the model as loaded, float32: the reference
    bf16   every weight rounded to bfloat16 (8 bits of mantissa)
    int8   absmax per output row, 8 bits (LLM.int8()'s vector-wise quantization, Dettmers
           et al. 2022, without its outlier decomposition)
    int4   min/max per group of 32 inputs, 4 bits with a zero point (GPTQ's storage,
           Frantar et al. 2022, rounded to nearest rather than GPTQ's error feedback)
    nf4    4-bit NormalFloat per block of 64, with double quantization (QLoRA, Dettmers
           et al. 2023): 16 levels at the quantiles of a normal distribution

Only the linear layers are quantized (never the embeddings, nor the output head, as
``quantize_model`` does by default); the rest of the model stays float32, so the
perplexity differences come from the quantized weights alone.

For each format: ``size_bytes`` (``model_size_bytes``: the state dict, tied tensors once),
``perplexity`` on the first ``tokens`` tokens of the held-out 10% of Tiny Shakespeare
(``lmlab.generate.likelihood.perplexity``), and per quantized layer the relative weight
error ||W_q - W||_F / ||W||_F, W_q the dequantized weight. Tests:
``tests/eval/test_quantization.py`` (fp32's error is 0, the errors shrink with the bits,
int8's equals a hand computation of absmax rounding).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from lmlab.data import load_corpus
from lmlab.errors import ConfigError, closest
from lmlab.generate.likelihood import perplexity
from lmlab.quant import model_size_bytes, quantize_model
from lmlab.quant.quantize import QUANTIZED_LAYERS

FORMATS: tuple[str, ...] = ("fp32", "bf16", "int8", "int4", "nf4")
"""The weight formats ``compare_formats`` knows, from the most bits to the fewest."""


def check_formats(formats: Sequence[str] | str) -> list[str]:
    """``formats`` (a list or a comma-separated string) as a list of known names."""
    names = [f.strip() for f in formats.split(",")] if isinstance(formats, str) else list(formats)
    names = [n for n in names if n]
    if not names:
        raise ConfigError(f"no weight format given; choose from {', '.join(FORMATS)}")
    for name in names:
        if name not in FORMATS:
            raise ConfigError(
                f"unknown weight format {name!r}{closest(name, FORMATS)}; "
                f"valid: {', '.join(FORMATS)}"
            )
    return names


def held_out_ids(tokenizer: Any, tokens: int) -> list[int]:
    """The first ``tokens`` token ids of the last 10% of Tiny Shakespeare (the split the
    trainer validates on)."""
    if tokens < 2:
        raise ConfigError(f"tokens={tokens} is too few: perplexity needs at least 2 tokens")
    text = load_corpus("tinyshakespeare")
    held_out = text[int(0.9 * len(text)) :]
    # a token is at least one character: encoding 8 characters per token wanted is plenty
    return tokenizer.encode(held_out[: 8 * tokens])[:tokens]


def weight_errors(reference: nn.Module, model: nn.Module, names: Sequence[str]) -> list[float]:
    """||W_q - W||_F / ||W||_F of each linear layer ``names`` of ``model`` against the same
    layer of ``reference`` (float32); W_q is the dequantized weight of a quantized layer, or
    the layer's weight as stored (bf16) of a dense one."""
    errors = []
    for name in names:
        w = reference.get_submodule(name).weight.detach().float()
        layer = model.get_submodule(name)
        if isinstance(layer, QUANTIZED_LAYERS):
            stored = layer.dequantize(torch.float32)
        else:
            stored = layer.weight.detach().float()
        errors.append(float((stored - w).norm() / w.norm().clamp_min(1e-30)))
    return errors


def linear_layers(model: nn.Module) -> list[str]:
    """The names of the linear layers ``quantize_model`` quantizes (all but the head)."""
    layers = [n for n, m in model.named_modules() if type(m) is nn.Linear and n != "lm_head"]
    if not layers:
        raise ConfigError("the model has no linear layer to quantize (a transformer has many)")
    return layers


def as_format(model: nn.Module, name: str) -> nn.Module:
    """A copy of ``model`` (float32) in weight format ``name``."""
    copied = copy.deepcopy(model)
    if name == "bf16":
        return copied.to(torch.bfloat16)
    if name != "fp32":
        quantize_model(copied, name)
    return copied


def compare_formats(
    model: nn.Module,
    tokenizer: Any,
    formats: Sequence[str] | str = FORMATS,
    tokens: int = 4096,
    progress: bool = False,
) -> dict[str, Any]:
    """Size, held-out perplexity and per-layer weight error of ``model`` (float32) in each
    of ``formats`` -> ``{"layers": [name, ...], "tokens": n, "rows": [{"format",
    "size_bytes", "perplexity", "weight_error": [per layer], "mean_weight_error"}, ...]}``.
    ``model`` itself is left as it is (each format quantizes a copy)."""
    formats = check_formats(formats)
    model = model.float().eval()
    ids = held_out_ids(tokenizer, tokens)
    layers = linear_layers(model)
    rows = []
    for name in tqdm(formats, desc="weight formats", unit="format", disable=not progress):
        converted = as_format(model, name)
        with torch.no_grad():
            ppl = perplexity(converted, ids)
        errors = weight_errors(model, converted, layers)
        rows.append(
            {
                "format": name,
                "size_bytes": model_size_bytes(converted),
                "perplexity": ppl,
                "weight_error": errors,
                "mean_weight_error": sum(errors) / len(errors),
            }
        )
        del converted
    return {"layers": layers, "tokens": len(ids), "rows": rows}
