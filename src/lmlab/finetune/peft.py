"""The PEFT structure of a model as JSON, so a checkpoint of a model under fine-tuning
(LoRA layers, adapters, a soft prompt or prefix around it) rebuilds anywhere.

config.json keeps ``"model"``, the spec of the plain lmlab model inside, and adds
``"peft"``: the methods applied to it, innermost first::

    [{"method": "lora", "r": 8, "alpha": 16.0, "dropout": 0.0,
      "targets": ["blocks.0.attn.q_proj", ...]},
     {"method": "prompt", "n_tokens": 20}]

``lmlab.checkpoint.io.load_model`` builds the plain model (or takes the base a PEFT
checkpoint names), applies these in order with ``apply_peft``, then loads the weights,
whose names are the wrapped model's, and finally folds LoRA over a float base into its
weights (``finish_peft``: the same model, as fast as the base). BitFit and named subsets
change what trains, not the structure: they need no entry. checkpoint/ sits below
finetune/, so this module registers the three functions with it (``register_structure``)
instead of being imported by it.

QLoRA's entry records how its base was quantized (``lmlab.quant.quantization_config``, the
layer names those of the plain model), so a rebuild quantizes the float base to the same
NF4 codes before adding LoRA::

    {"method": "qlora", "r": 8, ..., "quantization": {"method": "nf4", "options": {...},
     "layers": ["blocks.0.attn.q_proj", ...]}}
"""

from __future__ import annotations

from typing import Any

from torch import nn

from lmlab.checkpoint.io import register_structure
from lmlab.errors import CheckpointError, ConfigError
from lmlab.finetune.adapters import WithAdapter, apply_adapters
from lmlab.finetune.lora import LoRAConfig, apply_lora, lora_config, lora_layers, unload_lora
from lmlab.finetune.prompts import PrefixTuning, PromptTuning
from lmlab.models import base_model
from lmlab.quant.quantize import (
    QUANTIZED_LAYERS,
    dequantize_model,
    quantization_config,
    quantize_model,
)

_WRAPPERS = (PromptTuning, PrefixTuning)
__all__ = ["apply_peft", "base_model", "merged_model", "peft_spec"]


def peft_spec(model: nn.Module) -> list[dict[str, Any]]:
    """The PEFT methods applied to ``model``, innermost first ([] for a plain model)."""
    wrappers = []
    while isinstance(model, _WRAPPERS):
        wrappers.append(model)
        model = model.model
    spec: list[dict[str, Any]] = []
    if lora_layers(model):
        config = lora_config(model)
        entry = {
            "method": "lora",
            "r": config.r,
            "alpha": config.alpha,
            "dropout": config.dropout,
            "targets": list(config.targets),
        }
        if any(isinstance(m, QUANTIZED_LAYERS) for m in model.modules()):
            entry["method"] = "qlora"
            entry["quantization"] = _base_quantization(model)
        spec.append(entry)
    adapters = [m.adapter for m in model.modules() if isinstance(m, WithAdapter)]
    if adapters:
        first = adapters[0]
        spec.append(
            {
                "method": "adapter",
                "bottleneck": first.down.out_features,
                "activation": first.activation,
            }
        )
    for wrapper in reversed(wrappers):  # innermost first
        if isinstance(wrapper, PromptTuning):
            spec.append({"method": "prompt", "n_tokens": wrapper.n_tokens})
        else:
            hidden = None if wrapper.mlp is None else wrapper.mlp[0].out_features
            spec.append({"method": "prefix", "n_tokens": wrapper.n_tokens, "hidden": hidden})
    return spec


def _base_quantization(model: nn.Module) -> dict[str, Any]:
    """``quantization_config`` of a model under QLoRA, its layer names the plain model's
    (a LoRA-wrapped layer ``q_proj.base`` is the plain model's ``q_proj``)."""
    config = quantization_config(model)
    wrapped = {f"{name}.base": name for name in lora_layers(model)}
    return {**config, "layers": [wrapped.get(name, name) for name in config["layers"]]}


def apply_peft(model: nn.Module, spec: list[dict[str, Any]], where: str = "peft") -> nn.Module:
    """Rebuild the structure ``peft_spec`` described around a plain ``model``."""
    for entry in spec:
        method = entry.get("method") if isinstance(entry, dict) else None
        if method == "qlora" and isinstance(entry.get("quantization"), dict):
            quant = entry["quantization"]
            model = quantize_model(
                model, quant["method"], targets=quant["layers"], skip=(), **quant["options"]
            )
            method = "lora"
        if method == "lora":
            config = LoRAConfig(
                r=entry["r"],
                alpha=entry["alpha"],
                dropout=entry["dropout"],
                targets=tuple(entry["targets"]),
            )
            model = apply_lora(model, config)
        elif method == "adapter":
            model = apply_adapters(model, entry["bottleneck"], entry["activation"])
        elif method == "prompt":
            model = PromptTuning(model, n_tokens=entry["n_tokens"])
        elif method == "prefix":
            model = PrefixTuning(model, n_tokens=entry["n_tokens"], hidden=entry["hidden"])
        elif method == "qlora":
            raise CheckpointError(
                f"{where}: this QLoRA checkpoint (from an older lmlab) does not record how its "
                "base was quantized; load the float base and apply the adapter saved beside "
                "it (lmlab.finetune.load_adapter)"
            )
        else:
            raise CheckpointError(
                f"{where}: unknown PEFT entry {entry!r}; valid methods: lora, adapter, "
                "prompt, prefix"
            )
    return model


def finish_peft(model: nn.Module, spec: list[dict[str, Any]]) -> nn.Module:
    """A loaded model's LoRA over float layers folded into their weights (``unload_lora``):
    what the fine-tuning run itself hands back, as fast as the base and ready for another
    LoRA on top. LoRA over a quantized base (QLoRA) stays as trained."""
    layers = lora_layers(model)
    if layers and all(type(layer.base) is nn.Linear for layer in layers.values()):
        unload_lora(model, merge=True)
    return model


def merged_model(model: nn.Module) -> nn.Module:
    """``model`` as a plain family model with every weight float, in place: quantized
    layers dequantized to float32 (QLoRA's NF4 base among them), then LoRA merged into
    them and unloaded. Adapters and soft prompts have no plain form: a ConfigError."""
    if peft_spec(model) and any(e["method"] not in ("lora", "qlora") for e in peft_spec(model)):
        methods = ", ".join(e["method"] for e in peft_spec(model))
        raise ConfigError(
            f"a model under {methods} has no plain form to merge into (only LoRA folds into "
            "the weights); use it with lmlab (lmlab.load, lmlab chat)"
        )
    return unload_lora(dequantize_model(model), merge=True)


register_structure("peft", peft_spec, apply_peft, finish_peft)
