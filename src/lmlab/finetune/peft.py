"""The PEFT structure of a model as JSON, so a checkpoint of a model under fine-tuning
(LoRA layers, adapters, a soft prompt or prefix around it) rebuilds anywhere.

config.json keeps ``"model"``, the spec of the plain lmlab model inside, and adds
``"peft"``: the methods applied to it, innermost first::

    [{"method": "lora", "r": 8, "alpha": 16.0, "dropout": 0.0,
      "targets": ["blocks.0.attn.q_proj", ...]},
     {"method": "prompt", "n_tokens": 20}]

``lmlab.checkpoint.io.load_model`` builds the plain model, applies these in order with
``apply_peft``, then loads the weights, whose names are the wrapped model's. BitFit and
named subsets change what trains, not the structure: they need no entry. checkpoint/ sits
below finetune/, so this module registers the two functions with it
(``register_structure``) instead of being imported by it.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from lmlab.checkpoint.io import register_structure
from lmlab.errors import CheckpointError
from lmlab.finetune.adapters import WithAdapter, apply_adapters
from lmlab.finetune.lora import LoRAConfig, apply_lora, lora_config, lora_layers
from lmlab.finetune.prompts import PrefixTuning, PromptTuning
from lmlab.models import base_model

_WRAPPERS = (PromptTuning, PrefixTuning)
__all__ = ["apply_peft", "base_model", "peft_spec"]


def peft_spec(model: nn.Module) -> list[dict[str, Any]]:
    """The PEFT methods applied to ``model``, innermost first ([] for a plain model)."""
    wrappers = []
    while isinstance(model, _WRAPPERS):
        wrappers.append(model)
        model = model.model
    spec: list[dict[str, Any]] = []
    if lora_layers(model):
        config = lora_config(model)
        quantized = any(type(m.base) is not nn.Linear for m in lora_layers(model).values())
        spec.append(
            {
                "method": "qlora" if quantized else "lora",
                "r": config.r,
                "alpha": config.alpha,
                "dropout": config.dropout,
                "targets": list(config.targets),
            }
        )
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


def apply_peft(model: nn.Module, spec: list[dict[str, Any]], where: str = "peft") -> nn.Module:
    """Rebuild the structure ``peft_spec`` described around a plain ``model``."""
    for entry in spec:
        method = entry.get("method") if isinstance(entry, dict) else None
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
                f"{where}: a QLoRA checkpoint holds an NF4 base; load the float base model "
                "and apply the adapter saved beside it (lmlab.finetune.load_adapter)"
            )
        else:
            raise CheckpointError(
                f"{where}: unknown PEFT entry {entry!r}; valid methods: lora, adapter, "
                "prompt, prefix"
            )
    return model


register_structure("peft", peft_spec, apply_peft)
