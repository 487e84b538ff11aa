"""Layers shared by the model families: hook points and RMSNorm.

Hook points follow TransformerLens: an identity module with a stable name, placed on every
activation a user may want to read or edit (residual stream, q/k/v, attention pattern,
attention and MLP outputs). With no hook registered it costs one Python call; with a
forward hook registered (``module.register_forward_hook``) the hook sees the activation
and may return a replacement. Interpretability tools (``lmlab.interp``) find them by name
with ``model.named_modules()``.
"""

from __future__ import annotations

import torch
from torch import nn


class FixedTensors(nn.Module):
    """Base of objects that hold tensors for a model without being part of it (a kernel's
    packed weights, a table a decoding step reads): never registered as a submodule (the
    owner keeps it in its ``__dict__``), so nothing saves, counts or casts it.

    The class is marked static for torch.compile (what ``torch._dynamo.mark_static`` does
    to a module class, set here without importing dynamo): a compiled step takes the
    tensors it holds as fixed in shape and place, as it takes parameters. Held by a plain
    object, their sizes and storage offsets became symbols of the graph, read and wrapped
    at every call (131 for SmolLM2's 4- or 8-bit weights: about 0.4 ms a token; tested in
    tests/generate/test_compiled.py)."""

    _dynamo_marked_static = True


class HookPoint(nn.Module):
    """Identity on a named activation, so hooks can read or replace it.

    ``readers`` counts the hooks that promise to only read (``lmlab.interp.hooks`` registers
    them so): a model may then keep its fast path and hand the hook a copy of what the slow
    path would have made (the attention pattern), so reading changes no output bit.
    """

    def __init__(self):
        super().__init__()
        self.readers = 0

    def edited(self) -> bool:
        """True when some hook registered here may replace the activation."""
        return len(self._forward_hooks) > self.readers

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        # With no hook anywhere, the identity skips nn.Module's call machinery: a decoding
        # step passes about 300 hook points (SmolLM2), ~1 ms of its ~24 on one CPU thread.
        if self._forward_hooks or self._forward_pre_hooks or _global_hooks():
            return super().__call__(x)
        return x


def _global_hooks() -> bool:
    """Whether a hook registered for every module (``register_module_forward_hook``) exists."""
    m = torch.nn.modules.module
    return bool(m._global_forward_hooks or m._global_forward_pre_hooks)


def wide_float(device: torch.device) -> torch.dtype:
    """float64, where sums and angles are computed so that eager and compiled code round
    alike (``RMSNorm``, ``rope_tables``); Apple's GPU (MPS) has no float64: float32 there."""
    return torch.float32 if device.type == "mps" else torch.float64


class RMSNorm(nn.Module):
    """Root-mean-square norm (Zhang & Sennrich 2019): x / rms(x) * weight, no centring.

    Computed in float32 whatever the input dtype, as Llama does, then cast back; the
    squares are summed in float64, and the mean square's inverse square root rounded to
    float32 once. A sum in float32 depends on its order, and a compiled step
    (``torch.compile``) sums in another order than eager PyTorch: now and then a bf16
    output rounds the other way, and greedy decoding parts (SmolLM2: after 4 to 17
    tokens). Summed in float64, the order changes nothing float32 can show, so both give
    the same bits (tests/generate/test_compiled.py), at no measurable cost per token.
    Apple's GPU (MPS) has no float64: float32 there.
    """

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        mean_square = (xf * xf).sum(-1, keepdim=True, dtype=wide_float(x.device)) / x.shape[-1]
        normed = xf * torch.rsqrt(mean_square + self.eps).float()
        return self.weight * normed.to(x.dtype)


def segment_mask(segments: torch.Tensor) -> torch.Tensor:
    """Attention mask [B, 1, T, T] bool (True: may attend) from ``segments`` [B, T]:
    causal, and only within the same packed example (padding, segment 0, sees itself
    only, so no row of the mask is empty).

        segments [[1, 1, 2]] -> [[1, 0, 0],
                                 [1, 1, 0],
                                 [0, 0, 1]]
    """
    T = segments.shape[-1]
    causal = torch.ones(T, T, dtype=torch.bool, device=segments.device).tril()
    same = segments[:, :, None] == segments[:, None, :]  # (B, T, T)
    own = torch.eye(T, dtype=torch.bool, device=segments.device)
    return ((same & causal) | own)[:, None]  # (B, 1, T, T)


def segment_positions(segments: torch.Tensor) -> torch.Tensor:
    """Positions [B, T] int64 that restart at 0 where each packed example starts.

    segments [[1, 1, 2, 2, 2, 0]] -> [[0, 1, 0, 1, 2, 0]]
    """
    B, T = segments.shape
    index = torch.arange(T, device=segments.device).expand(B, T)
    starts = torch.ones_like(segments, dtype=torch.bool)
    starts[:, 1:] = segments[:, 1:] != segments[:, :-1]
    first = torch.where(starts, index, 0).cummax(dim=1).values  # (B, T) start of each run
    return index - first
