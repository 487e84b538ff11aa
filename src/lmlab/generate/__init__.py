"""Decoding: sampling settings, logits processors, greedy/sampling/beam search, streaming.

Usage, with any lmlab model and a tokenizer (``encode``, ``decode``, ``eos_id``)::

    from lmlab.generate import SamplingParams, generate_text, stream_text

    params = SamplingParams(temperature=0.8, top_p=0.9, seed=0, stop=("\\n\\n",))
    print(generate_text(model, tokenizer, "ROMEO:", params))
    for piece in stream_text(model, tokenizer, "ROMEO:", params):
        print(piece, end="", flush=True)
"""

from lmlab.generate.params import SamplingParams, check_ids
from lmlab.generate.processors import (
    apply_temperature,
    process_logits,
    repetition_penalty,
    seen_tokens,
    top_k_filter,
    top_p_filter,
)
from lmlab.generate.search import (
    BeamStep,
    Generation,
    Stream,
    beam_search_steps,
    generate,
    generate_ids,
    generate_text,
    stream_ids,
    stream_text,
)

__all__ = [
    "BeamStep",
    "Generation",
    "SamplingParams",
    "Stream",
    "apply_temperature",
    "beam_search_steps",
    "check_ids",
    "generate",
    "generate_ids",
    "generate_text",
    "process_logits",
    "repetition_penalty",
    "seen_tokens",
    "stream_ids",
    "stream_text",
    "top_k_filter",
    "top_p_filter",
]
