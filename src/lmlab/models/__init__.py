"""Language-model families behind one interface (the contract: ``models/contract.py``).

Every causal LM maps token ids to next-token logits::

    logits = model(ids)                      # ids [B, T] int64 -> logits [B, T, V]
    logits = model(ids, mask=mask)           # mask [B, T] bool, False on left padding
    cache = model.new_cache(B, max_len)      # families that can cache (transformer: KV)
    logits = model(ids, cache=cache)         # appends ids after what the cache holds

``model.config`` is a frozen dataclass with at least ``vocab_size`` and ``max_seq_len``
(``None`` when the family has no fixed context). A cache exposes ``length`` (tokens held)
and ``reorder(index)`` (keep batch rows ``index``, for beam search). Families without a
cache have no ``new_cache``; decoding then recomputes the whole prefix each step. The
encoder family maps ids to hidden states [B, T, D] instead. Each family states its kind and
abilities (``model.abilities``), and ``require_causal_lm(model, what)`` is the one check
that every entry point needing next-token logits makes.
"""

# Importing a family module registers it with the registry.
from lmlab.models import encoder, mlp, ngram, recurrent, seq2seq, transformer  # noqa: F401
from lmlab.models.contract import (
    Abilities,
    abilities,
    base_model,
    require_causal_lm,
    require_gradients,
)
from lmlab.models.registry import PRESETS, build_model, families, get_preset, model_spec

__all__ = [
    "PRESETS",
    "Abilities",
    "abilities",
    "base_model",
    "build_model",
    "families",
    "get_preset",
    "model_spec",
    "require_causal_lm",
    "require_gradients",
]
