"""The model contract: what an lmlab model is, what each family can do, one check for both.

Two kinds of model live in lmlab:

- a **causal LM** maps token ids ``[B, T]`` int64 (plus an optional cache and a ``[B, T]``
  bool mask, False on left padding) to next-token logits ``[B, T, V]``; its ``config``
  states ``vocab_size`` and ``max_seq_len`` (None when the family has no fixed context);
- an **encoder** maps ids ``[B, T]`` (plus an attention mask) to hidden states
  ``[B, T, D]`` and carries named heads (``mlm_logits`` for the masked-LM head).

Each family class states its kind and what it can do in one ``abilities`` attribute::

    class Transformer(nn.Module):
        abilities = Abilities("causal_lm", gradients=True, cache=True, hooks=True)

and every entry point that needs a causal LM (decoding, perplexity, scoring, multiple
choice, fine-tuning, DPO, PPO) calls ``require_causal_lm(model, "what it does")`` first,
so that a model that cannot do it fails in one line naming its family, never with a
TypeError from deep inside or, worse, a number computed from hidden states read as logits:

    >>> require_causal_lm(encoder, "perplexity")
    ConfigError: perplexity needs a causal language model (ids -> next-token logits);
    the encoder family (Encoder) is an encoder (ids -> hidden states) ...

Wrappers that put something around a family model (a soft prompt, a prefix) expose the
model inside as ``wrapped``; layer swaps (LoRA, adapters, quantized layers) keep the
family's class, so both keep its abilities. A module that states nothing (a test double, a
hand-written model) is taken for a causal LM, and its abilities are read off its
structure: it has a cache if it has ``new_cache``, gradients if it has parameters.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from torch import nn

from lmlab.errors import ConfigError

Kind = Literal["causal_lm", "encoder", "seq2seq"]


@dataclass(frozen=True)
class Abilities:
    """What a model family is and can do."""

    kind: Kind
    """``causal_lm`` (ids -> next-token logits), ``encoder`` (ids -> hidden states) or
    ``seq2seq`` (source and target ids -> next-target-token logits)."""
    gradients: bool = True
    """Trained by back-propagation (False: fitted by counting, like an n-gram table)."""
    cache: bool = False
    """Has ``new_cache``: decoding one more token does not recompute the prefix."""
    hooks: bool = False
    """Exposes named hook points (residual stream, attention, MLP outputs)."""


def base_model(model: nn.Module) -> nn.Module:
    """The family model inside wrappers (``model.wrapped``), or ``model`` itself."""
    while isinstance(getattr(model, "wrapped", None), nn.Module):
        model = model.wrapped
    return model


def abilities(model: nn.Module) -> Abilities:
    """The abilities ``model``'s family states, or those read off an undeclared module."""
    inner = base_model(model)
    declared = getattr(type(inner), "abilities", None)
    if isinstance(declared, Abilities):
        return declared
    if not isinstance(inner, nn.Module):
        raise ConfigError(
            f"expected a model (a torch nn.Module), got {type(model).__name__}; load one with "
            "lmlab.load(path) and pass lm.model"
        )
    return Abilities(
        "causal_lm",
        gradients=any(True for _ in inner.parameters()),
        cache=hasattr(inner, "new_cache"),
        hooks=False,
    )


def family_name(model: nn.Module) -> str:
    """How an error names a model: ``the encoder family (Encoder)``."""
    inner = base_model(model)
    family = getattr(type(inner), "family", None)
    name = type(inner).__name__
    return f"the {family} family ({name})" if family else f"{name}"


def require_causal_lm(model: nn.Module, what: str) -> Abilities:
    """Raise one clear ``ConfigError`` unless ``model`` is a causal LM; else its abilities.

    ``what`` says what needed it, e.g. ``"perplexity"`` or ``"generating text"``.
    """
    found = abilities(model)
    if found.kind == "seq2seq":
        raise ConfigError(
            f"{what} needs a causal language model (ids -> next-token logits); "
            f"{family_name(model)} is an encoder-decoder (source and target ids -> logits): "
            "decode it with lmlab.generate.seq2seq_generate (model.conditioned(src))"
        )
    if found.kind != "causal_lm":
        raise ConfigError(
            f"{what} needs a causal language model (ids -> next-token logits); "
            f"{family_name(model)} is an {found.kind} (ids -> hidden states): use it for "
            "embeddings (lm.embed) or its masked-LM head instead"
        )
    return found


def require_gradients(model: nn.Module, what: str) -> Abilities:
    """Like ``require_causal_lm``, and the family must train by back-propagation."""
    found = require_causal_lm(model, what)
    if not found.gradients:
        raise ConfigError(
            f"{what} needs a model trained by gradients; {family_name(model)} is fitted by "
            "counting and has no parameters to tune (fine-tune a neural family instead)"
        )
    return found
