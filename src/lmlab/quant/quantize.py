"""Quantize a model's linear layers, measure it, save it and load it back.

``quantize_model`` swaps ``nn.Linear`` layers for one of three stored-in-fewer-bits layers:

    method  layer       bits per weight (stored)          error per weight
    int8    Int8Linear  8 + 32 / K (a float32 per row)    <= scale / 2
    int4    Int4Linear  4 + 32 / G (bf16 scale and zero)  <= scale / 2 (+ bf16 rounding)
    nf4     NF4Linear   4.127 (double quantization)       <= absmax * 0.139 (half the
                                                             widest NF4 gap) + s2 / 2

Embeddings are never quantized, and ``lm_head`` is skipped by default: in many models
(GPT-2, SmolLM2) it is the token embedding itself (tied weights), so quantizing it would
either store that matrix twice or quantize the embedding too, and the logits are where
rounding hurts most (see ``Float32Head``).

A quantized model saves as an lmlab checkpoint directory whose config.json has an extra
``"quantization"`` entry (``quantization_config`` here; the files are written and read by
``lmlab.checkpoint.quantized``, where weight formats live):

    {"method": "nf4", "options": {"block_size": 64, "double_quant": true,
     "double_block": 256}, "layers": ["blocks.0.attn.q_proj", ...]}

    >>> model = build_model({**get_preset("llama-small"), "vocab_size": 64})
    >>> before = model_size_bytes(model)
    >>> model = quantize_model(model, "nf4")
    >>> model_size_bytes(model) < before / 2
    True

Tests: tests/quant/test_quantize.py (logits stay close, the model shrinks) and
tests/checkpoint/test_quantized.py (save then load is bit-exact, corrupt files are named).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Literal

import torch
from torch import nn
from tqdm.auto import tqdm

from lmlab.errors import ConfigError, closest
from lmlab.quant.int4 import Int4Linear
from lmlab.quant.int8 import Int8Linear
from lmlab.quant.nf4 import NF4Linear
from lmlab.quant.q8 import Q8_0Embedding, Q8_0Linear

Method = Literal["int8", "int4", "nf4"]

# method -> (layer class, its options with their defaults)
METHODS: dict[str, tuple[type[nn.Module], dict[str, Any]]] = {
    "int8": (Int8Linear, {}),
    "int4": (Int4Linear, {"group_size": 32}),
    "nf4": (NF4Linear, {"block_size": 64, "double_quant": True, "double_block": 256}),
}
QUANTIZED_LAYERS = (Int8Linear, Int4Linear, NF4Linear)


def _matches(name: str, patterns: Iterable[str]) -> bool:
    """A module name matches a pattern equal to it or to its last dotted parts:
    ``"blocks.0.attn.q_proj"`` matches ``"q_proj"``, ``"attn.q_proj"`` and itself."""
    return any(name == p or name.endswith("." + p) for p in patterns)


def quantize_model(
    model: nn.Module,
    method: Method,
    targets: Iterable[str] | None = None,
    skip: Iterable[str] = ("lm_head",),
    dtype: torch.dtype | None = None,
    progress: bool = False,
    **options: Any,
) -> nn.Module:
    """Replace ``model``'s ``nn.Linear`` layers by quantized ones, in place; returns it.

    ``targets``: names of the layers to quantize (a full module name or its last dotted
    parts, e.g. ``("q_proj", "v_proj")``); None means every ``nn.Linear``. ``skip`` wins
    over ``targets`` (default: the output head, see the module docstring). ``options``
    are the method's (``group_size`` for int4; ``block_size``, ``double_quant``,
    ``double_block`` for nf4). The weights are quantized from their current values (best
    from float32).

    ``dtype`` casts the rest of the model (embeddings, norms, the head) to a float dtype,
    e.g. bf16, the dtype the int8 and int4 kernels compute in. Use it instead of calling
    ``model.to(dtype)`` afterwards, which would also round the quantized layers' float32
    scales. The quantized layers return their input's dtype. ``progress`` shows a bar
    (one tick per layer).
    """
    if method not in METHODS:
        raise ConfigError(
            f"quantization method {method!r} is invalid{closest(str(method), list(METHODS))}; "
            f"valid: {', '.join(METHODS)}"
        )
    cls, defaults = METHODS[method]
    unknown = set(options) - set(defaults)
    if unknown:
        raise ConfigError(
            f"unknown option(s) {', '.join(sorted(unknown))} for {method}; "
            f"valid: {', '.join(defaults) or 'none'}"
        )
    options = {**defaults, **options}
    skip = tuple(skip)
    targets = None if targets is None else tuple(targets)
    chosen = [
        name
        for name, module in model.named_modules()
        if type(module) is nn.Linear
        and not _matches(name, skip)
        and (targets is None or _matches(name, targets))
    ]
    if targets is not None and not chosen:
        raise ConfigError(f"no nn.Linear layer of the model matches targets {list(targets)}")
    for name in tqdm(chosen, desc=f"quantizing to {method}", unit="layer", disable=not progress):
        set_submodule(model, name, cls.from_float(model.get_submodule(name), **options))
    if dtype is not None:
        _cast_dense(model, dtype)
    return model


def dequantize_model(model: nn.Module, dtype: torch.dtype = torch.float32) -> nn.Module:
    """Replace every quantized layer of ``model`` by the ``nn.Linear`` holding its
    dequantized weight (in ``dtype``), in place; returns ``model``. The inverse of
    ``quantize_model`` up to the quantization error: the dense model computes what the
    quantized one does, up to float rounding."""
    tables = [(n, m) for n, m in model.named_modules() if type(m) is Q8_0Embedding]
    layers = [
        (n, m) for n, m in model.named_modules() if isinstance(m, (*QUANTIZED_LAYERS, Q8_0Linear))
    ]
    for name, layer in layers:
        weight = layer.dequantize(dtype)  # (N, K)
        dense = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None)
        dense = dense.to(device=weight.device, dtype=dtype).requires_grad_(False)
        with torch.no_grad():
            dense.weight.copy_(weight)
            if layer.bias is not None:
                dense.bias.copy_(layer.bias)
        set_submodule(model, name, dense)
        for table_name, table in tables:  # embeddings reading a Q8_0 layer: tied to it again
            if table.head is layer:
                embedding = nn.Embedding(*weight.shape, _weight=weight, _freeze=True)
                embedding.weight = dense.weight  # the same Parameter, as tied models have
                set_submodule(model, table_name, embedding)
    return model


def set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    owner, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(owner) if owner else model, leaf, module)


def _cast_dense(model: nn.Module, dtype: torch.dtype) -> None:
    """Cast the float parameters and buffers of every module except the quantized ones.

    ``p.data`` is replaced rather than the Parameter, so tied weights stay one tensor.
    """
    for module in model.modules():
        if isinstance(module, QUANTIZED_LAYERS):
            continue
        for p in module.parameters(recurse=False):
            if p.is_floating_point():
                p.data = p.data.to(dtype)
        for name, b in module.named_buffers(recurse=False):
            if b is not None and b.is_floating_point():
                module._buffers[name] = b.to(dtype)


def model_size_bytes(model: nn.Module) -> int:
    """Bytes of the tensors a model stores: its state dict (parameters and persistent
    buffers), each tied or shared tensor counted once. Tensors kept out of the state dict
    (RoPE tables) are not counted: measure process memory for those. An ``Int4Linear``
    whose weights the kernel's packed copy holds is counted in its saved form
    (``Int4Linear.canonical``)."""
    seen: set[tuple] = set()
    total = 0
    for tensor in model.state_dict().values():
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tensor.shape)
        if tensor.numel() and key not in seen:
            seen.add(key)
            total += tensor.numel() * tensor.element_size()
    return total


def quantization_config(model: nn.Module) -> dict[str, Any]:
    """The ``"quantization"`` entry that describes ``model``'s quantized layers.

    All of them must share one method and its options (as ``quantize_model`` makes them).
    """
    found: dict[str, tuple[dict[str, Any], list[str]]] = {}  # settings -> (entry, names)
    for name, module in model.named_modules():
        for method, (cls, defaults) in METHODS.items():
            if type(module) is cls:
                entry = {"method": method, "options": {k: getattr(module, k) for k in defaults}}
                found.setdefault(repr(entry), (entry, []))[1].append(name)
    if not found and (q8_0 := _q8_0_entry(model)):
        # only layers kept in a GGUF file's Q8_0 blocks (a Q8_0 file loaded in 8 bits)
        return {"method": Q8_0_ONLY, "options": {}, "layers": [], **q8_0}
    if not found:
        raise ConfigError("the model has no quantized layer; call quantize_model first")
    if len(found) > 1:
        raise ConfigError(
            f"the model mixes quantization settings ({'; '.join(found)}); "
            "save_quantized needs one method with one set of options"
        )
    entry, names = next(iter(found.values()))
    return {**entry, "layers": names, **_q8_0_entry(model)}


Q8_0_ONLY = "q8_0"
"""``quantization_config``'s method for a model whose quantized layers are all Q8_0 ones."""


def _q8_0_entry(model: nn.Module) -> dict[str, Any]:
    """The layers a GGUF load keeps in the file's Q8_0 blocks (``lmlab.quant.q8``: the
    output layer of a 4-bit load, every fitting layer of a Q8_0 file), which of them give
    float32 outputs, and the embeddings that read them: ``{"q8_0": {"layers": [names],
    "float_outputs": [names], "embeddings": {name: {"head": layer name, "dtype":
    "bfloat16"}}}}``, or nothing."""
    names = {m: name for name, m in model.named_modules()}
    layers = [name for m, name in names.items() if type(m) is Q8_0Linear]
    if not layers:
        return {}
    floats = [name for m, name in names.items() if type(m) is Q8_0Linear and m.float_output]
    embeddings = {
        name: {"head": names[m.head], "dtype": str(m.like.dtype).removeprefix("torch.")}
        for m, name in names.items()
        if type(m) is Q8_0Embedding
    }
    return {"q8_0": {"layers": layers, "float_outputs": floats, "embeddings": embeddings}}
