"""Language-model families behind one interface.

Every model maps token ids to next-token logits::

    logits = model(ids)                      # ids [B, T] int64 -> logits [B, T, V]
    logits = model(ids, mask=mask)           # mask [B, T] bool, False on left padding
    cache = model.new_cache(B, max_len)      # families that can cache (transformer: KV)
    logits = model(ids, cache=cache)         # appends ids after what the cache holds

``model.config`` is a frozen dataclass with at least ``vocab_size`` and ``max_seq_len``
(``None`` when the family has no fixed context). A cache exposes ``length`` (tokens held)
and ``reorder(index)`` (keep batch rows ``index``, for beam search). Families without a
cache have no ``new_cache``; decoding then recomputes the whole prefix each step.
"""

from lmlab.models.registry import PRESETS, build_model, families, get_preset, model_spec

__all__ = ["PRESETS", "build_model", "families", "get_preset", "model_spec"]
