"""Decoding settings, and the one place that decides whether they are valid.

``SamplingParams`` is what every decoding entry point takes: the library functions in
``lmlab.generate``, the ``lmlab generate`` command and the HTTP server all build one and let
its ``__post_init__`` reject bad values, so a setting is valid in one place exactly when it
is valid in the others (RELIABILITY.md item 18). ``check_ids`` rejects token ids outside the
vocabulary before any tensor is built from them (item 21): an embedding lookup with a bad id
is an opaque index error on CPU and a device-side assert on a GPU.

    >>> SamplingParams(temperature=0).sample        # temperature 0 means greedy
    False
    >>> SamplingParams(top_p=1.5)
    Traceback (most recent call last):
    ...
    lmlab.errors.DecodingError: top_p=1.5 is invalid: must be in (0, 1]
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from lmlab.errors import DecodingError, closest

DEFAULT_MAX_NEW_TOKENS = 200
"""The one default for new tokens: the library, ``lmlab generate`` and ``lmlab chat``."""


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    """Most tokens to generate per prompt (the stop token, if one is hit, included). Prompt
    + output may outgrow the model's context: the window then slides (the oldest tokens
    drop out of view), as in nanoGPT."""
    temperature: float = 1.0
    """Divides the logits before sampling: < 1 sharpens, > 1 flattens; 0 means greedy."""
    top_k: int = 0
    """Sample only among the k most likely tokens (ties broken by lower id); 0 = off."""
    top_p: float = 1.0
    """Nucleus sampling: sample among the smallest set of most likely tokens whose total
    probability is at least top_p (the most likely token always stays); 1 = off."""
    num_beams: int = 1
    """Beam search with this many beams when > 1 (never sampled)."""
    length_penalty: float = 1.0
    """Beam search ranks finished sequences by sum(log p) / n_new_tokens ** length_penalty:
    > 0 favours longer sequences, < 0 shorter ones, 0 compares raw log-probabilities."""
    early_stopping: bool = False
    """Beam search: True stops a prompt's search as soon as num_beams sequences have
    finished; False also stops it when the best running beam, scored at its current length,
    can no longer beat the worst finished one (Hugging Face's default heuristic)."""
    do_sample: bool | None = None
    """True samples, False decodes greedily (or by beam search); None (default) samples
    exactly when temperature > 0 and num_beams == 1."""
    seed: int | None = None
    """Seed of the generator that draws samples (never the global RNG); None = fresh entropy."""
    stop: tuple[str, ...] = ()
    """Stop strings: text output is cut before the first one, and generation ends once it
    appears. A single string is accepted and wrapped in a tuple."""
    stop_ids: tuple[int, ...] = ()
    """Token ids that end a sequence, in addition to eos_id."""
    eos_id: int | None = None
    """End-of-sequence token id; None uses the tokenizer's (text helpers) or none at all."""
    repetition_penalty: float = 1.0
    """CTRL's penalty (Keskar et al. 2019) on every token already in the prompt or output:
    a positive logit is divided by it, a negative one multiplied; 1 = off."""
    truncate_prompt: bool = False
    """When the prompt itself is longer than the model's context (max_seq_len), keep only
    its last max_seq_len tokens (and report how many were dropped) instead of raising an
    error."""
    compile: bool = False
    """Run the one-token steps with a KV cache through torch.compile (``lmlab.generate.
    compiled``): the same greedy tokens, less time per token once compiled; compiling costs
    seconds the first time (``compile_seconds`` in the result). Needs a C++ compiler on a
    CPU."""

    def __post_init__(self):
        # Accept lists (JSON, YAML) and a bare string for the tuple fields; store tuples so the
        # dataclass stays hashable and immutable.
        stop = (self.stop,) if isinstance(self.stop, str) else self.stop
        if isinstance(stop, list | tuple):
            object.__setattr__(self, "stop", tuple(stop))
        if isinstance(self.stop_ids, list | tuple):
            object.__setattr__(self, "stop_ids", tuple(self.stop_ids))
        self.validate()

    def validate(self) -> None:
        """Raise DecodingError naming the first invalid field, its value and what is allowed."""

        def bad(field: str, allowed: str):
            raise DecodingError(f"{field}={getattr(self, field)!r} is invalid: {allowed}")

        if not _is_int(self.max_new_tokens) or self.max_new_tokens < 1:
            bad("max_new_tokens", "must be an integer >= 1")
        if not _is_real(self.temperature) or not math.isfinite(self.temperature):
            bad("temperature", "must be a finite number >= 0 (0 means greedy)")
        if self.temperature < 0:
            bad("temperature", "must be a finite number >= 0 (0 means greedy)")
        if not _is_int(self.top_k) or self.top_k < 0:
            bad("top_k", "must be an integer >= 0 (0 turns it off)")
        if not _is_real(self.top_p) or not 0 < self.top_p <= 1:
            bad("top_p", "must be in (0, 1]")
        if not _is_int(self.num_beams) or self.num_beams < 1:
            bad("num_beams", "must be an integer >= 1")
        if not _is_real(self.length_penalty) or not math.isfinite(self.length_penalty):
            bad("length_penalty", "must be a finite number")
        if not isinstance(self.early_stopping, bool):
            bad("early_stopping", "must be true or false")
        if not isinstance(self.compile, bool):
            bad("compile", "must be true or false")
        if self.do_sample is not None and not isinstance(self.do_sample, bool):
            bad("do_sample", "must be true, false or None (sample iff temperature > 0)")
        if self.do_sample and self.temperature == 0:
            bad("do_sample", "cannot sample at temperature=0 (which means greedy)")
        if self.do_sample and self.num_beams > 1:
            bad("do_sample", f"beam search (num_beams={self.num_beams}) is never sampled")
        if self.seed is not None and (not _is_int(self.seed) or not 0 <= self.seed < 2**63):
            bad("seed", "must be None or an integer in [0, 2**63)")
        if not isinstance(self.stop, tuple) or not all(isinstance(s, str) and s for s in self.stop):
            bad("stop", "must be a list of non-empty strings")
        if not isinstance(self.stop_ids, tuple) or not all(
            _is_int(i) and i >= 0 for i in self.stop_ids
        ):
            bad("stop_ids", "must be a list of token ids (integers >= 0)")
        if self.eos_id is not None and (not _is_int(self.eos_id) or self.eos_id < 0):
            bad("eos_id", "must be None or a token id (an integer >= 0)")
        if (
            not _is_real(self.repetition_penalty)
            or not math.isfinite(self.repetition_penalty)
            or self.repetition_penalty <= 0
        ):
            bad("repetition_penalty", "must be a finite number > 0 (1 turns it off)")
        if not isinstance(self.truncate_prompt, bool):
            bad("truncate_prompt", "must be true or false")

    @property
    def sample(self) -> bool:
        """Whether tokens are drawn at random (else greedy, or beam search when num_beams > 1)."""
        if self.do_sample is not None:
            return self.do_sample
        return self.temperature > 0 and self.num_beams == 1

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> SamplingParams:
        """Build from a plain dict (a request, a YAML file); unknown keys name the closest field."""
        valid = [f.name for f in dataclasses.fields(cls)]
        for key in values:
            if key not in valid:
                raise DecodingError(
                    f"unknown sampling parameter {key!r}{closest(key, valid)}; "
                    f"valid: {', '.join(valid)}"
                )
        return cls(**values)


def check_ids(ids: Sequence[int], vocab_size: int, what: str) -> None:
    """Raise DecodingError if any of ``ids`` is not an integer in [0, vocab_size).

    ``what`` names the ids in the message ("prompt 2", "stop_ids"), e.g.
    ``check_ids([5, 70], 50, "prompt")`` raises "prompt has token id 70 at position 1;
    valid ids are 0..49 (vocab_size=50)".
    """
    if isinstance(ids, str | bytes) or not isinstance(ids, Sequence):
        raise DecodingError(f"{what} must be a list of token ids, got {type(ids).__name__}")
    for pos, i in enumerate(ids):
        if not _is_int(i):
            raise DecodingError(
                f"{what} has {i!r} ({type(i).__name__}) at position {pos}; token ids are integers"
            )
        if not 0 <= i < vocab_size:
            raise DecodingError(
                f"{what} has token id {i} at position {pos}; "
                f"valid ids are 0..{vocab_size - 1} (vocab_size={vocab_size})"
            )


def _is_int(x: object) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def _is_real(x: object) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool)
