"""Selective fine-tuning: train a chosen subset of the model's own parameters, freeze the rest.

BitFit (Ben Zaken et al. 2021) trains only the bias terms, about 0.1% of a BERT's
parameters; ``apply_selective`` trains any subset named by glob (or regex) patterns over
``model.named_parameters()``, e.g. the norms of a bias-free Llama, or the last block.

Also here, for every fine-tuning method: how many parameters train.

    >>> model = build_model({**get_preset("llama-small"), "vocab_size": 65})
    >>> apply_bitfit(model)
    ConfigError: BitFit trains biases, and this model has none (bias=False, as in Llama); ...
    >>> describe_trainable(apply_selective(model, ["*norm.weight"]))   # 13 RMSNorms of 256
    'trainable 3,328 of 4,263,680 parameters (0.08%)'

Tests: tests/finetune/test_selective.py.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Sequence

from torch import nn

from lmlab.errors import ConfigError


def apply_selective(model: nn.Module, patterns: Sequence[str], regex: bool = False) -> nn.Module:
    """Train exactly the parameters whose name matches one of ``patterns``; freeze the rest.

    In place; returns ``model``. Patterns are globs (``"blocks.*.attn_norm.weight"``,
    ``"*.bias"``) matched against the whole name, or, with ``regex=True``, regular
    expressions searched for in it (``r"blocks\\.[23]\\."``). A pattern matching no
    parameter raises ConfigError. A tied parameter has one name, its first
    (``tok_emb.weight``, not ``lm_head.weight``).
    """
    if isinstance(patterns, str):
        patterns = [patterns]
    if not patterns:
        raise ConfigError("patterns is empty: name at least one parameter pattern")
    names = [name for name, _ in model.named_parameters()]
    if regex:
        try:
            compiled = [re.compile(p) for p in patterns]
        except re.error as e:
            raise ConfigError(f"invalid regular expression in patterns: {e}") from e
        match = lambda i, name: compiled[i].search(name) is not None
    else:
        match = lambda i, name: fnmatch.fnmatchcase(name, patterns[i])
    chosen = set()
    for i, pattern in enumerate(patterns):
        hits = [name for name in names if match(i, name)]
        if not hits:
            example = ", ".join(names[:6]) + (", ..." if len(names) > 6 else "")
            raise ConfigError(
                f"pattern {pattern!r} matches no parameter; names look like: {example}"
            )
        chosen.update(hits)
    for name, param in model.named_parameters():
        param.requires_grad_(name in chosen)
    return model


def apply_bitfit(model: nn.Module) -> nn.Module:
    """BitFit: train only the biases (parameters named ``*bias``). In place; returns ``model``.

    A model without biases (Llama, Qwen's MLP) raises ConfigError suggesting a named subset.
    """
    if not any(name.endswith("bias") for name, _ in model.named_parameters()):
        raise ConfigError(
            "BitFit trains biases, and this model has none (bias=False, as in Llama); "
            "train another small subset instead, e.g. the norms: "
            "apply_selective(model, ['*norm.weight'])"
        )
    return apply_selective(model, ["*bias"])


def trainable_parameters(model: nn.Module) -> tuple[int, int, float]:
    """(trainable, total, trainable / total) parameter counts; shared tensors count once.

    A quantized linear layer (in_features and out_features, weights kept in buffers rather
    than a float ``weight`` parameter) counts as in_features * out_features frozen
    parameters, so a QLoRA share compares with the unquantized model's.
    """
    params = list(model.parameters())
    trainable = sum(p.numel() for p in params if p.requires_grad)
    total = sum(p.numel() for p in params)
    for module in model.modules():
        weight = getattr(module, "weight", None)
        if hasattr(module, "in_features") and not isinstance(weight, nn.Parameter):
            total += module.in_features * module.out_features
    return trainable, total, trainable / total if total else 0.0


def describe_trainable(model: nn.Module) -> str:
    """One line, e.g. ``"trainable 294,912 of 135,000,000 parameters (0.22%)"``."""
    trainable, total, share = trainable_parameters(model)
    return f"trainable {trainable:,} of {total:,} parameters ({share:.2%})"
