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

A quantized model saves as an lmlab checkpoint directory (``lmlab.checkpoint.io``:
config.json, model.safetensors, COMPLETE, written atomically; never pickled) whose
config.json has an extra ``"quantization"`` entry:

    {"method": "nf4", "options": {"block_size": 64, "double_quant": true,
     "double_block": 256}, "layers": ["blocks.0.attn.q_proj", ...]}

``load_quantized`` builds the model from its spec without initialising it, swaps in the
listed layers built from the file's tensors, and fills everything else.

    >>> model = build_model({**get_preset("llama-small"), "vocab_size": 64})
    >>> before = model_size_bytes(model)
    >>> model = quantize_model(model, "nf4")
    >>> model_size_bytes(model) < before / 2
    True

Tests: tests/quant/test_quantize.py (logits stay close, the model shrinks, save then load
is bit-exact, corrupt files are named).
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors import safe_open
from torch import nn

from lmlab.checkpoint.io import (
    WEIGHTS_FILE,
    load_weights,
    read_config,
    read_safetensors_header,
    resolve_checkpoint,
    save_checkpoint,
)
from lmlab.errors import CheckpointError, ConfigError, closest
from lmlab.models import build_model
from lmlab.quant.int4 import Int4Linear
from lmlab.quant.int8 import Int8Linear
from lmlab.quant.nf4 import NF4Linear

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
    scales. The quantized layers return their input's dtype.
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
    for name in chosen:
        _set_submodule(model, name, cls.from_float(model.get_submodule(name), **options))
    if dtype is not None:
        _cast_dense(model, dtype)
    return model


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
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
    buffers), each tied or shared tensor counted once. Caches a layer builds at run time
    (the int4 kernel's repacked weight, RoPE tables kept out of the state dict) are not
    counted: measure process memory for those."""
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
    if not found:
        raise ConfigError("the model has no quantized layer; call quantize_model first")
    if len(found) > 1:
        raise ConfigError(
            f"the model mixes quantization settings ({'; '.join(found)}); "
            "save_quantized needs one method with one set of options"
        )
    entry, names = next(iter(found.values()))
    return {**entry, "layers": names}


def save_quantized(
    model: nn.Module, directory: str | os.PathLike, tokenizer: Any | None = None
) -> Path:
    """Save a quantized lmlab model (and its tokenizer) as a checkpoint directory.

    Atomic: written in a temporary directory renamed into place. Returns the path.
    """
    config = quantization_config(model)
    return save_checkpoint(directory, model, tokenizer, extra_config={"quantization": config})


def load_quantized(directory: str | os.PathLike) -> tuple[nn.Module, Any | None, dict[str, Any]]:
    """Rebuild a model saved by ``save_quantized`` -> ``(model, tokenizer or None, config)``.

    Every tensor keeps the dtype it was saved in, so save then load is bit-exact. A file
    that is truncated or corrupt, lacks a tensor or holds one of the wrong shape raises a
    ``CheckpointError`` naming the file and the tensor.
    """
    ckpt = resolve_checkpoint(directory)
    config = read_config(ckpt)
    file = ckpt / WEIGHTS_FILE
    quant = config.get("quantization")
    if not isinstance(quant, dict) or quant.get("method") not in METHODS:
        raise CheckpointError(
            f"{str(ckpt / 'config.json')!r} has no valid 'quantization' entry "
            f"(method one of {', '.join(METHODS)}); is it a quantized checkpoint?"
        )
    try:
        model = build_model(config["model"], empty=True)
    except Exception as e:
        raise CheckpointError(
            f"{str(ckpt / 'config.json')!r}: cannot build the model from its spec: {e}"
        ) from e
    header = read_safetensors_header(file)
    method, options = quant["method"], dict(quant.get("options", {}))
    try:
        with safe_open(str(file), framework="pt", device="cpu") as f:
            for name in quant.get("layers", []):
                dense = _dense_layer(model, name, ckpt)
                prefix = name + "."
                stored = {
                    key[len(prefix) :]: f.get_tensor(key)
                    for key in header
                    if key.startswith(prefix) and "." not in key[len(prefix) :]
                }
                try:
                    layer = _rebuild(method, options, dense, stored)
                except (ConfigError, KeyError, TypeError) as e:
                    raise CheckpointError(
                        f"{str(file)!r}: cannot rebuild quantized layer {name!r} "
                        f"({method}) from its tensors {sorted(stored)}: {e}"
                    ) from e
                _set_submodule(model, name, layer)
            # Dense tensors take their saved dtype (load_weights would cast to the model's).
            for name, tensor in model.state_dict(keep_vars=True).items():
                saved = header.get(name, {}).get("dtype")
                if saved in _SAFETENSORS_DTYPES and tensor.is_floating_point():
                    _retype(model, name, _SAFETENSORS_DTYPES[saved])
    except CheckpointError:
        raise
    except Exception as e:  # safetensors' own errors on a corrupt file
        raise CheckpointError(f"cannot read weights from {str(file)!r}: {e}") from e
    load_weights(model, ckpt)  # checks every name, shape and extra tensor, then copies
    model.eval()
    tokenizer = None
    if (ckpt / "tokenizer.json").is_file():
        from lmlab.data.tokenizers import load_tokenizer

        tokenizer = load_tokenizer(ckpt)
    return model, tokenizer, config


_SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "BF16": torch.bfloat16,
    "F16": torch.float16,
}


def _dense_layer(model: nn.Module, name: str, ckpt: Path) -> nn.Linear:
    try:
        dense = model.get_submodule(name)
    except AttributeError:
        dense = None
    if type(dense) is not nn.Linear:
        raise CheckpointError(
            f"{str(ckpt / 'config.json')!r} lists quantized layer {name!r}, but the model "
            "built from its spec has no nn.Linear of that name"
        )
    return dense


def _rebuild(
    method: str, options: dict[str, Any], dense: nn.Linear, stored: dict[str, torch.Tensor]
) -> nn.Module:
    """A quantized layer with the shape of ``dense``, from its saved tensors."""
    bias = stored.get("bias")
    if (bias is None) != (dense.bias is None):
        raise ConfigError("the saved layer and the model disagree on having a bias")
    N, K = dense.out_features, dense.in_features
    if method == "int8":
        layer = Int8Linear(stored["qweight"], stored["scale"], bias)
    elif method == "int4":
        packed = stored["qweight"]  # (N, K/2): low nibble first, as Int4Linear stores it
        q = torch.stack([packed & 0x0F, packed >> 4], dim=-1).view(packed.shape[0], -1)
        layer = Int4Linear(q, stored["scale"], stored["zero"], bias)
    else:
        tensors = {k: v for k, v in stored.items() if k != "bias"}
        layer = NF4Linear(
            K,
            N,
            bias=bias,
            block_size=options["block_size"],
            double_block=options["double_block"],
            **tensors,
        )
    if (layer.out_features, layer.in_features) != (N, K):
        raise ConfigError(
            f"its weight is {layer.out_features}x{layer.in_features}, the model's {N}x{K}"
        )
    return layer


def _retype(model: nn.Module, name: str, dtype: torch.dtype) -> None:
    owner, _, leaf = name.rpartition(".")
    module = model.get_submodule(owner) if owner else model
    if leaf in module._parameters:
        p = module._parameters[leaf]
        if p.dtype != dtype:
            p.data = p.data.to(dtype)
    elif module._buffers.get(leaf) is not None and module._buffers[leaf].dtype != dtype:
        module._buffers[leaf] = module._buffers[leaf].to(dtype)
