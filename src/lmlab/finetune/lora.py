"""LoRA: low-rank adaptation of frozen linear layers (Hu et al. 2021).

A frozen layer ``y = base(x)`` gets a trainable low-rank update (eq. 3 of the paper):

    y = base(x) + (alpha / r) * dropout(x) A^T B^T        A: [r, in], B: [out, r]

A starts Kaiming-uniform (as an ``nn.Linear`` weight, peft's default), B at zero, so a fresh
LoRA leaves the model's outputs exactly unchanged; only A and B train. Since the update is
linear it can be folded into the weight, ``W' = W + (alpha / r) B A`` ("merge"), which makes
inference as cheap as the base model, and taken out again ("unmerge").

``base`` is any module mapping [.., in] -> [.., out] that exposes ``in_features`` and
``out_features``: an ``nn.Linear``, or a quantized linear (``Int4Linear``, an NF4 layer), in
which case this is QLoRA (Dettmers et al. 2023): the frozen base stays quantized and A, B
train in float32 (or bf16) on top. A quantized base cannot be merged into.

    >>> spec = {**get_preset("gpt-char-tiny"), "vocab_size": 65}   # D = 192, 4 blocks
    >>> model = apply_lora(build_model(spec), LoRAConfig(r=8, alpha=16))
    >>> describe_trainable(model)        # 4 blocks x (q, v) x (A [8, 192] + B [192, 8])
    'trainable 24,576 of 1,841,472 parameters (1.33%)'
    >>> save_adapter(model, "run/adapter")                # A and B only, plus the config
    >>> load_adapter(build_model(spec), "run/adapter")    # applies LoRA, then loads A and B

Parity: tests/finetune/test_lora.py compares logits and the gradients of A and B with
peft's LoRA on a transformers Llama holding the same weights (copied by
``lmlab.checkpoint.hf.from_transformers``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import json
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from lmlab.errors import CheckpointError, ConfigError, closest
from lmlab.fileio import atomic_write_json, atomic_write_with

ADAPTER_WEIGHTS = "adapter.safetensors"
ADAPTER_CONFIG = "adapter_config.json"


@dataclass(frozen=True)
class LoRAConfig:
    r: int = 8
    """Rank of the update B A."""
    alpha: float = 16.0
    """Scale: the update is multiplied by alpha / r, so changing r keeps its size similar."""
    dropout: float = 0.0
    """Dropout on the input of the low-rank path (not on the frozen path) while training."""
    targets: tuple[str, ...] = ("q_proj", "v_proj")
    """Linear layers to adapt: a last name component ("q_proj", matching every block's) or
    a full module name ("blocks.0.attn.q_proj")."""

    def __post_init__(self):
        if isinstance(self.targets, (list, str)):  # from JSON; a lone name means one target
            targets = (self.targets,) if isinstance(self.targets, str) else tuple(self.targets)
            object.__setattr__(self, "targets", targets)
        if not isinstance(self.r, int) or self.r < 1:
            raise ConfigError(f"LoRAConfig.r={self.r!r} is invalid: must be a positive integer")
        if not self.alpha > 0:
            raise ConfigError(f"LoRAConfig.alpha={self.alpha!r} is invalid: must be positive")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"LoRAConfig.dropout={self.dropout!r} is invalid: must be in [0, 1)")
        if not self.targets or not all(isinstance(t, str) and t for t in self.targets):
            raise ConfigError(
                f"LoRAConfig.targets={self.targets!r} is invalid: must be a non-empty list of "
                "module names such as ('q_proj', 'v_proj')"
            )


class LoRALinear(nn.Module):
    """base(x) + (alpha / r) * dropout(x) A^T B^T, with ``base`` frozen.

    x: [.., in] -> [.., out]. A: [r, in] Kaiming-uniform, B: [out, r] zeros. A and B take
    the base weight's dtype when it is a float (fp32 otherwise, e.g. over a quantized
    base), and the low-rank path runs in that dtype.
    """

    def __init__(self, base: nn.Module, r: int, alpha: float, dropout: float = 0.0):
        super().__init__()
        if not hasattr(base, "in_features") or not hasattr(base, "out_features"):
            raise ConfigError(
                f"LoRA needs a linear layer exposing in_features and out_features; "
                f"got {type(base).__name__}"
            )
        self.base = base.requires_grad_(False)
        self.r, self.alpha, self.scaling = r, alpha, alpha / r
        weight = getattr(base, "weight", None)
        float_weight = isinstance(weight, torch.Tensor) and weight.is_floating_point()
        dtype = weight.dtype if float_weight else torch.float32
        tensor = next(itertools.chain(base.parameters(), base.buffers()), None)
        device = None if tensor is None else tensor.device
        self.lora_A = nn.Parameter(torch.empty(r, base.in_features, dtype=dtype, device=device))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, r, dtype=dtype, device=device))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # as nn.Linear and peft
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.merged = False
        self.disabled = False  # set by ``disabled_lora``: the base layer alone

    def delta_weight(self) -> torch.Tensor:
        """The update to the weight, (alpha / r) B A: [out, in]."""
        return (self.lora_B @ self.lora_A) * self.scaling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)  # (.., out)
        if self.merged or self.disabled:
            return y
        h = F.linear(self.dropout(x.to(self.lora_A.dtype)), self.lora_A)  # (.., r)
        return y + (F.linear(h, self.lora_B) * self.scaling).to(y.dtype)

    def merge(self) -> None:
        """Fold the update into the base weight: W <- W + (alpha / r) B A."""
        if self.merged:
            return
        self._check_mergeable()
        with torch.no_grad():
            self.base.weight += self.delta_weight().to(self.base.weight.dtype)
        self.merged = True

    def unmerge(self) -> None:
        """Take the update out again: W <- W - (alpha / r) B A (equal up to rounding)."""
        if not self.merged:
            return
        with torch.no_grad():
            self.base.weight -= self.delta_weight().to(self.base.weight.dtype)
        self.merged = False

    def _check_mergeable(self) -> None:
        if not isinstance(self.base, nn.Linear):
            raise ConfigError(
                f"cannot merge LoRA into its {type(self.base).__name__} base: only an "
                "nn.Linear has a float weight to add B A to; keep the adapter unmerged over a "
                "quantized base (QLoRA), or dequantize the base first"
            )

    def extra_repr(self) -> str:
        return f"r={self.r}, alpha={self.alpha}, merged={self.merged}"


# ----------------------------------------------------------------------------- whole models


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    """The model's LoRA layers by module name, e.g. {"blocks.0.attn.q_proj": LoRALinear}."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def _linear_names(model: nn.Module) -> dict[str, nn.Module]:
    """Modules that look linear (in_features and out_features), by name."""
    return {
        name: m
        for name, m in model.named_modules()
        if hasattr(m, "in_features") and hasattr(m, "out_features") and name
    }


def apply_lora(model: nn.Module, config: LoRAConfig) -> nn.Module:
    """Freeze every parameter of ``model`` and wrap each target layer in a LoRALinear.

    In place; returns ``model``. A target matches a module whose name is the target or
    ends with "." + target. A target matching nothing raises ConfigError listing the
    linear layers there are.
    """
    if lora_layers(model):
        raise ConfigError("LoRA is already applied to this model; load or merge it instead")
    linears = _linear_names(model)
    chosen: list[str] = []
    for target in config.targets:
        found = [n for n in linears if n == target or n.endswith("." + target)]
        if not found:
            short = sorted({n.rsplit(".", 1)[-1] for n in linears})
            raise ConfigError(
                f"LoRA target {target!r} matches no linear layer{closest(target, short)}; "
                f"valid: {', '.join(short)} (or a full module name)"
            )
        chosen += [n for n in found if n not in chosen]
    model.requires_grad_(False)
    for name in chosen:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, child, LoRALinear(linears[name], config.r, config.alpha, config.dropout))
    return model


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every LoRA update into its base weight (in place; returns ``model``).

    The merged model computes what the unmerged one does (up to rounding), without the
    extra matmuls. Raises ConfigError, before changing anything, if a base is not an
    ``nn.Linear`` (a quantized one).
    """
    layers = lora_layers(model)
    for layer in layers.values():
        layer._check_mergeable()
    for layer in layers.values():
        layer.merge()
    return model


def unmerge_lora(model: nn.Module) -> nn.Module:
    """Undo ``merge_lora`` (in place; returns ``model``): A and B train separately again."""
    for layer in lora_layers(model).values():
        layer.unmerge()
    return model


@contextlib.contextmanager
def disabled_lora(model: nn.Module) -> Iterator[nn.Module]:
    """Within the block, ``model`` computes its base model alone (every update off).

    The frozen reference of DPO and PPO for free: policy = base + adapter, reference =
    the same module with the adapter disabled, so no second copy of the weights.

        >>> with disabled_lora(policy):
        ...     ref_logits = policy(ids)

    Raises ConfigError if an update is merged (the base weight then holds it).
    """
    layers = list(lora_layers(model).values())
    if any(layer.merged for layer in layers):
        raise ConfigError("cannot disable LoRA while it is merged; call unmerge_lora first")
    for layer in layers:
        layer.disabled = True
    try:
        yield model
    finally:
        for layer in layers:
            layer.disabled = False


def unload_lora(model: nn.Module, merge: bool = True) -> nn.Module:
    """Replace every LoRALinear by its base layer, merged first unless ``merge=False``.

    Gives back a plain lmlab model (the original parameter names, so ``to_hf`` and
    ``save_checkpoint`` work on it); its parameters stay frozen.
    """
    if merge:
        merge_lora(model)
    for name, layer in lora_layers(model).items():
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, layer.base)
    return model


def lora_config(model: nn.Module) -> LoRAConfig:
    """The LoRAConfig that reproduces the model's LoRA layers (targets by full name)."""
    layers = lora_layers(model)
    if not layers:
        raise ConfigError("the model has no LoRA layers; call apply_lora first")
    settings = {(m.r, m.alpha, getattr(m.dropout, "p", 0.0)) for m in layers.values()}
    if len(settings) > 1:
        raise ConfigError(f"the model's LoRA layers differ in (r, alpha, dropout): {settings}")
    r, alpha, dropout = settings.pop()
    return LoRAConfig(r=r, alpha=alpha, dropout=dropout, targets=tuple(layers))


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Only the adapter tensors: {"blocks.0.attn.q_proj.lora_A": [r, in], ...lora_B: [out, r]}."""
    return {
        f"{name}.{part}": getattr(layer, part).detach()
        for name, layer in lora_layers(model).items()
        for part in ("lora_A", "lora_B")
    }


def save_adapter(model: nn.Module, directory: str | os.PathLike) -> Path:
    """Write ``adapter.safetensors`` (A and B only) and ``adapter_config.json``; -> directory."""
    if any(layer.merged for layer in lora_layers(model).values()):
        raise ConfigError("the LoRA layers are merged; call unmerge_lora before save_adapter")
    config = lora_config(model)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.contiguous() for k, v in lora_state_dict(model).items()}
    atomic_write_with(directory / ADAPTER_WEIGHTS, lambda tmp: save_file(tensors, str(tmp)))
    atomic_write_json(directory / ADAPTER_CONFIG, {"kind": "lora", **dataclasses.asdict(config)})
    return directory


def load_adapter(model: nn.Module, directory: str | os.PathLike) -> nn.Module:
    """Load a saved LoRA adapter into ``model`` (in place; returns it).

    A model without LoRA layers gets them first, from the saved config. Raises
    CheckpointError for missing files, and for a tensor that is missing, unexpected or
    of the wrong shape (named).
    """
    directory = Path(directory)
    for file in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):
        if not (directory / file).is_file():
            raise CheckpointError(f"{directory} is not a LoRA adapter: {file} is missing")
    saved = json.loads((directory / ADAPTER_CONFIG).read_text())
    if saved.pop("kind", "lora") != "lora":
        raise CheckpointError(f"{directory / ADAPTER_CONFIG} is not a LoRA adapter config")
    if not lora_layers(model):
        try:
            apply_lora(model, LoRAConfig(**saved))
        except (ConfigError, TypeError) as e:
            raise CheckpointError(f"cannot apply the adapter in {directory}: {e}") from e
    if any(layer.merged for layer in lora_layers(model).values()):
        raise ConfigError("the LoRA layers are merged; call unmerge_lora before load_adapter")
    tensors = load_file(str(directory / ADAPTER_WEIGHTS))
    ours = lora_state_dict(model)
    if extra := sorted(tensors.keys() - ours.keys()):
        raise CheckpointError(f"adapter tensor {extra[0]!r} has no LoRA layer in the model")
    if missing := sorted(ours.keys() - tensors.keys()):
        raise CheckpointError(f"adapter tensor {missing[0]!r} is missing from {directory}")
    for name, tensor in tensors.items():
        if tensor.shape != ours[name].shape:
            raise CheckpointError(
                f"adapter tensor {name!r} has shape {tuple(tensor.shape)}, the model's "
                f"{tuple(ours[name].shape)}"
            )
    with torch.no_grad():
        for name, tensor in tensors.items():
            ours[name].copy_(tensor)
    return model
