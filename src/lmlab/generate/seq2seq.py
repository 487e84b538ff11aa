"""Decoding an encoder-decoder with the same search code as every causal LM.

``Seq2Seq.conditioned(src)`` binds the decoder to a batch of sources and speaks the
causal-LM interface (target ids plus a cache -> next-token logits), so greedy decoding,
sampling and beam search are ``lmlab.generate.generate`` itself: each row starts from the
model's ``bos_id`` and stops at the eos id or the stop strings in ``SamplingParams``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from lmlab.errors import DecodingError
from lmlab.generate.params import SamplingParams
from lmlab.generate.search import Generation, generate
from lmlab.models.seq2seq import Seq2Seq


def source_batch(model: Seq2Seq, sources: Sequence[Sequence[int]]) -> torch.Tensor:
    """Source id lists right-padded with the model's ``pad_id`` -> [B, S] int64."""
    if not sources or any(len(s) == 0 for s in sources):
        raise DecodingError("every source must hold at least one token")
    longest = max(len(s) for s in sources)
    if longest > model.config.max_seq_len:
        raise DecodingError(
            f"a source of {longest} tokens exceeds max_seq_len {model.config.max_seq_len}"
        )
    pad = model.config.pad_id
    device = model.embed.weight.device
    return torch.tensor([list(s) + [pad] * (longest - len(s)) for s in sources], device=device)


def seq2seq_generate(
    model: Seq2Seq,
    sources: Sequence[Sequence[int]],
    params: SamplingParams | None = None,
    tokenizer=None,
) -> Generation:
    """Decode one target per source (token id lists); ``tokenizer`` adds ``texts``."""
    view = model.conditioned(source_batch(model, sources))
    prompts = [[model.config.bos_id] for _ in sources]
    return generate(view, prompts, params, tokenizer)


def seq2seq_generate_text(
    model: Seq2Seq, tokenizer, sources: str | Sequence[str], params: SamplingParams | None = None
) -> str | list[str]:
    """Target text for a source string (-> str) or a list of them (-> list[str])."""
    single = isinstance(sources, str)
    texts = [sources] if single else list(sources)
    out = seq2seq_generate(model, [tokenizer.encode(t) for t in texts], params, tokenizer).texts
    return out[0] if single else out
