"""Quantized checkpoints: save a model from ``lmlab.quant.quantize_model`` and load it back.

The directory is an lmlab checkpoint (``checkpoint.io``: config.json, model.safetensors,
COMPLETE, written atomically; never pickled) whose config.json adds a ``"quantization"``
entry (``lmlab.quant.quantization_config``):

    {"method": "nf4", "options": {"block_size": 64, "double_quant": true,
     "double_block": 256}, "layers": ["blocks.0.attn.q_proj", ...]}

``load_quantized`` builds the model from its spec without initialising it, swaps in the
listed layers built from the file's tensors, and fills everything else.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import nn

from lmlab.checkpoint.gguf import place_side_by_side
from lmlab.checkpoint.io import (
    FLOAT_DTYPES,
    WEIGHTS_FILE,
    load_weights,
    read_config,
    read_safetensors_header,
    resolve_checkpoint,
    save_checkpoint,
)
from lmlab.data.tokenizers import load_tokenizer
from lmlab.errors import CheckpointError, ConfigError
from lmlab.models import build_model
from lmlab.quant.int4 import Int4Linear
from lmlab.quant.int8 import Int8Linear
from lmlab.quant.nf4 import NF4Linear
from lmlab.quant.q8 import Q8_0Embedding, Q8_0Linear
from lmlab.quant.quantize import METHODS, Q8_0_ONLY, quantization_config, set_submodule


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
    methods = (*METHODS, Q8_0_ONLY)
    if (
        not isinstance(quant, dict)
        or quant.get("method") not in methods
        or (quant["method"] == Q8_0_ONLY and not isinstance(quant.get("q8_0"), dict))
    ):
        raise CheckpointError(
            f"{str(ckpt / 'config.json')!r} has no valid 'quantization' entry "
            f"(method one of {', '.join(methods)}; {Q8_0_ONLY!r} with a 'q8_0' entry); is it "
            "a quantized checkpoint?"
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
                set_submodule(model, name, layer)
            _rebuild_q8_0(model, quant.get("q8_0"), f, header, ckpt)
            # Dense tensors take their saved dtype (load_weights would cast to the model's).
            for name, tensor in model.state_dict(keep_vars=True).items():
                saved = header.get(name, {}).get("dtype")
                if saved in FLOAT_DTYPES and tensor.is_floating_point():
                    _retype(model, name, FLOAT_DTYPES[saved])
    except CheckpointError:
        raise
    except Exception as e:  # safetensors' own errors on a corrupt file
        raise CheckpointError(f"cannot read weights from {str(file)!r}: {e}") from e
    load_weights(model, ckpt)  # checks every name, shape and extra tensor, then copies
    place_side_by_side(model)  # a Q8_0 file's layers: fused calls again, as when loaded
    model.eval()
    tokenizer = None
    if (ckpt / "tokenizer.json").is_file():
        tokenizer = load_tokenizer(ckpt)
    return model, tokenizer, config


_TABLE_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def _rebuild_q8_0(model: nn.Module, entry: Any, f: Any, header: dict, ckpt: Path) -> None:
    """The layers kept in Q8_0 blocks (``quantization_config``'s ``"q8_0"`` entry) and the
    embeddings that read an output layer's rows, from the open weights file ``f``."""
    if entry is None:
        return
    where = str(ckpt / "config.json")
    layers, tables = entry.get("layers"), entry.get("embeddings", {})
    floats = entry.get("float_outputs", layers)  # saved before layers inside the model
    if not (
        isinstance(layers, list)
        and all(isinstance(n, str) for n in layers)
        and isinstance(floats, list)
        and set(floats) <= set(layers)
        and isinstance(tables, dict)
        and all(isinstance(t, dict) and set(t) == {"head", "dtype"} for t in tables.values())
    ):
        raise CheckpointError(
            f"{where!r}: the 'q8_0' entry must be {{'layers': [names], 'float_outputs': "
            f"[some of those names], 'embeddings': {{name: {{'head': name, 'dtype': name}}}}}}, "
            f"got {entry!r}"
        )
    for name in layers:
        dense = _dense_layer(model, name, ckpt)
        try:
            layer = Q8_0Linear.packed(
                f.get_tensor(f"{name}.qweight"), f.get_tensor(f"{name}.scale")
            )
        except (ConfigError, KeyError, TypeError, RuntimeError) as e:
            raise CheckpointError(
                f"{str(ckpt / WEIGHTS_FILE)!r}: cannot rebuild Q8_0 layer {name!r} from "
                f"{sorted(k for k in header if k.startswith(name + '.'))}: {e}"
            ) from e
        if (layer.out_features, layer.in_features) != (dense.out_features, dense.in_features):
            raise CheckpointError(
                f"{str(ckpt / WEIGHTS_FILE)!r}: Q8_0 layer {name!r} is {layer.out_features}x"
                f"{layer.in_features}, the model's {dense.out_features}x{dense.in_features}"
            )
        layer.float_output = name in floats
        set_submodule(model, name, layer)
    for name, table in tables.items():
        head = table["head"]
        dtype = _TABLE_DTYPES.get(table["dtype"])
        if head not in layers or dtype is None:
            raise CheckpointError(
                f"{where!r}: embeddings {name!r} must read one of the Q8_0 layers {layers} in "
                f"bfloat16, float16 or float32; got {table!r}"
            )
        set_submodule(model, name, Q8_0Embedding(model.get_submodule(head), dtype))


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
