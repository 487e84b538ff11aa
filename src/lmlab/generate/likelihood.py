"""The likelihood a causal LM gives to a token sequence: per-token surprisal and perplexity.

Texts longer than the context are scored with a sliding window (as in Hugging Face's
perplexity guide): each window holds up to ``max_seq_len`` tokens and moves by ``stride``;
only the tokens not scored by an earlier window count, so every token after the first is
scored exactly once, with up to ``max_seq_len - stride`` tokens of extra left context.

    nll_i = -log p(x_i | x_<i within its window)      (nats)
    perplexity = exp(mean_i nll_i)

These two functions sit with decoding because everything above them (the ``LM`` handle,
evaluation, fine-tuning) scores with them; ``lmlab.eval.perplexity`` builds per-token
tables, bits per byte and plots on top. Parity: ``tests/eval/test_perplexity.py`` checks
token_nll against direct cross-entropy of the whole window.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from lmlab.devices import model_device
from lmlab.errors import ConfigError
from lmlab.models.contract import require_causal_lm


@torch.inference_mode()
def token_nll(
    model: nn.Module,
    ids: Sequence[int] | torch.Tensor,
    stride: int | None = None,
    batch_size: int = 16,
    context: int | None = None,
    progress: bool | None = None,
) -> torch.Tensor:
    """Surprisal in nats of every token after the first: float32 [N - 1].

    A window holds ``context + 1`` tokens: ``context`` inputs, each predicting the next.
    ``context`` defaults to the model's ``max_seq_len`` (families without a fixed context,
    such as recurrent models and n-grams, then score the whole text in one pass; give
    ``context`` to score them in windows like the others). ``stride`` (how far each window
    moves, 1..context) defaults to half the context, so every scored token sees at least
    half a window of left context; ``stride=context`` gives non-overlapping windows,
    exactly the training windows. The model runs in eval mode (no dropout).
    ``progress``: a progress bar over the windows (a whole validation split takes a
    while); None shows it only on a terminal. A model with a ``log_prob(ids, targets)``
    method (the n-gram family) is asked for the targets' log-probabilities directly.
    """
    require_causal_lm(model, "perplexity")
    if isinstance(ids, np.ndarray):  # e.g. a read-only memmap of uint16 token ids
        ids = torch.from_numpy(ids.astype(np.int64))
    ids = torch.as_tensor(ids, dtype=torch.long).flatten()
    n = ids.numel()
    if n < 2:
        raise ConfigError(f"perplexity needs at least 2 tokens, got {n}")
    device = model_device(model)
    context = min(context or getattr(model.config, "max_seq_len", None) or n - 1, n - 1)
    window = context + 1
    stride = stride or max(context // 2, 1)
    if not 1 <= stride <= context:
        raise ConfigError(f"stride={stride} is invalid: must be in [1, {context}] (the context)")
    # Window w covers ids[start : start + window] and scores its targets from `first` on.
    starts = list(range(0, max(n - window, 0) + 1, stride))
    if starts[-1] + window < n:
        starts.append(n - window)
    out = torch.empty(n - 1, dtype=torch.float32)
    scored = 1  # ids[0] has no prediction
    # A model that scores given targets without [V] rows (NGramLM.log_prob) does so.
    gather = getattr(model, "log_prob", None)
    was_training = model.training
    model.eval()
    try:
        batches = range(0, len(starts), batch_size)
        bar = tqdm(batches, desc="scoring", unit="batch", disable=_hidden(progress), leave=False)
        for b in bar:
            chunk = starts[b : b + batch_size]
            x = torch.stack([ids[s : s + window] for s in chunk]).to(device)  # (B, W)
            if gather is not None:  # an n-gram: only the probabilities of the targets
                nll = -gather(x[:, :-1], x[:, 1:]).float().cpu()  # (B, W - 1)
            else:
                logits = model(x[:, :-1]).float()  # (B, W - 1, V)
                nll = F.cross_entropy(logits.transpose(1, 2), x[:, 1:], reduction="none").cpu()
            for row, s in enumerate(chunk):
                end = s + window  # targets ids[s + 1 : end] are at nll[row, 0 : window - 1]
                if end <= scored:
                    continue
                out[scored - 1 : end - 1] = nll[row, scored - s - 1 :]
                scored = end
    finally:
        model.train(was_training)
    return out


def _hidden(progress: bool | None) -> bool | None:
    """tqdm's ``disable``: None (auto) hides the bar when stderr is not a terminal."""
    return None if progress is None else not progress


def perplexity(
    model: nn.Module, ids: Sequence[int] | torch.Tensor, stride: int | None = None
) -> float:
    """exp(mean surprisal) of ``ids`` under ``model``; see ``token_nll``."""
    return math.exp(token_nll(model, ids, stride).mean().item())
