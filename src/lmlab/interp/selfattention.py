"""Self-attention step by step: one layer of a transformer recomputed by hand, checked
against the model's own output.

Vaswani et al. 2017 ("Attention Is All You Need", section 3.2), for one prompt of T tokens
and a layer with H heads of size Dh, reading ``x`` [T, D], the block's input after its
norm (pre-norm blocks, as in GPT-2 and Llama)::

    Q = x W_q^T + b_q,  K = x W_k^T + b_k,  V = x W_v^T + b_v     each split into heads
    (Q, K turned by RoPE first, where the model uses it)          [H, T, Dh]
    S = Q K^T / sqrt(Dh)                                          [H, T, T]  scores
    S[i, j] = -inf for j > i                                      causal mask
    A = softmax(S) row by row                                     [H, T, T]  weights
    Z = A V                                                       [H, T, Dh]
    out = concat_h(Z_h) W_o^T + b_o                               [T, D]

With grouped-query attention (Llama, SmolLM2) there are fewer key/value heads than query
heads; each key/value head serves ``H // Hkv`` query heads in turn.

Nothing here calls the model's attention: only its weights (``q_proj`` ... ``o_proj``) and
the norm in front of it are read, and the hook points give the block's input
(``blocks.{l}.hook_resid_pre``) and what the model itself computed
(``blocks.{l}.hook_attn_out``, ``blocks.{l}.attn.hook_pattern``) to compare with.
``tests/interp/test_selfattention.py`` asserts the two agree within 1e-5 in float32 on
random models (learned positions and RoPE, multi-head and grouped-query).

    >>> steps = attention_by_hand(model, ids, layer=0)
    >>> steps.max_abs_diff            # |out - model's attention output|, at most ~1e-6
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from lmlab.errors import ConfigError
from lmlab.interp.hooks import run_with_cache
from lmlab.models.contract import base_model, family_name
from lmlab.models.transformer import Attention, Transformer, apply_rope, rope_tables


@dataclass
class AttentionSteps:
    """Every intermediate of one attention layer on one prompt (float32, no batch axis)."""

    layer: int
    x: torch.Tensor
    """[T, D] the block's input after its norm: what the attention reads."""
    q: torch.Tensor
    """[H, T, Dh] queries (after RoPE where the model uses it)."""
    k: torch.Tensor
    """[H, T, Dh] keys, one per query head (a grouped key/value head repeated)."""
    v: torch.Tensor
    """[H, T, Dh] values, one per query head."""
    scores: torch.Tensor
    """[H, T, T] Q K^T / sqrt(Dh), before the mask."""
    masked: torch.Tensor
    """[H, T, T] the scores with -inf right of the diagonal (keys after the query)."""
    weights: torch.Tensor
    """[H, T, T] softmax of each row of ``masked``: the attention pattern."""
    z: torch.Tensor
    """[H, T, Dh] each head's weighted sum of the values."""
    concat: torch.Tensor
    """[T, H * Dh] the heads side by side."""
    out: torch.Tensor
    """[T, D] the output projection of ``concat``: the hand result."""
    model_out: torch.Tensor
    """[T, D] the model's own attention output (``hook_attn_out``)."""
    model_weights: torch.Tensor
    """[H, T, T] the model's own pattern (``hook_pattern``)."""

    @property
    def max_abs_diff(self) -> float:
        """Largest |hand - model| over the attention output."""
        return float((self.out - self.model_out).abs().max())

    @property
    def max_weight_diff(self) -> float:
        """Largest |hand - model| over the attention weights."""
        return float((self.weights - self.model_weights).abs().max())


def _dense(layer: nn.Module, name: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(W [out, in], b [out] or None) of a plain linear layer, in float32."""
    if type(layer) is not nn.Linear:
        raise ConfigError(
            f"{name} is a {type(layer).__name__}, not a plain nn.Linear: the hand computation "
            "reads float weights (load the model unquantized, with LoRA merged)"
        )
    bias = None if layer.bias is None else layer.bias.detach().float()
    return layer.weight.detach().float(), bias


def _project(x: torch.Tensor, layer: nn.Module, name: str, heads: int) -> torch.Tensor:
    """x [T, D] -> (x W^T + b) split into heads: [heads, T, Dh]."""
    weight, bias = _dense(layer, name)
    y = x @ weight.T  # (T, heads * Dh)
    if bias is not None:
        y = y + bias
    return y.view(x.shape[0], heads, -1).transpose(0, 1)  # (heads, T, Dh)


def attention_by_hand(model: nn.Module, ids: torch.Tensor, layer: int = 0) -> AttentionSteps:
    """Recompute ``layer``'s self-attention of ``model`` on ``ids`` ([T] or [1, T] int64)
    step by step (see the module docstring), beside the model's own result.

    ``model``: an lmlab decoder transformer (gpt, llama, smollm2) in eval mode.
    """
    inner = base_model(model)
    if not isinstance(inner, Transformer):
        raise ConfigError(
            f"{family_name(model)} is not a decoder transformer: self-attention by hand takes "
            "gpt, llama or smollm2 (an lmlab checkpoint of the transformer family)"
        )
    L = inner.config.n_layers
    if not -L <= layer < L:
        raise ConfigError(f"layer {layer} is out of range: the model has layers 0..{L - 1}")
    layer %= L
    ids = ids[None] if ids.dim() == 1 else ids
    if ids.shape[0] != 1:
        raise ConfigError(
            f"attention by hand takes one prompt (ids [1, T]), got {tuple(ids.shape)}"
        )
    block = inner.blocks[layer]
    attn: Attention = block.attn
    names = [f"blocks.{layer}.hook_resid_pre", f"blocks.{layer}.hook_attn_out"]
    names.append(f"blocks.{layer}.attn.hook_pattern")
    with torch.no_grad():
        _, cache = run_with_cache(model, ids, names=names)
        x = block.attn_norm(cache[names[0]])[0].float()  # (T, D)
    T = x.shape[0]
    H, Hkv, Dh = attn.n_heads, attn.n_kv_heads, attn.d_head
    prefix = f"blocks.{layer}.attn"
    q = _project(x, attn.q_proj, f"{prefix}.q_proj", H)  # (H, T, Dh)
    k = _project(x, attn.k_proj, f"{prefix}.k_proj", Hkv)  # (Hkv, T, Dh)
    v = _project(x, attn.v_proj, f"{prefix}.v_proj", Hkv)
    if inner.config.pos == "rope":  # rotary positions turn q and k, not x
        cos, sin = rope_tables(torch.arange(T, device=x.device)[None], Dh, inner.config.rope_theta)
        q, k = apply_rope(q[None], cos, sin)[0], apply_rope(k[None], cos, sin)[0]
    # grouped-query: key/value head g serves query heads g * H/Hkv .. (g + 1) * H/Hkv - 1
    k = k.repeat_interleave(H // Hkv, dim=0)  # (H, T, Dh)
    v = v.repeat_interleave(H // Hkv, dim=0)
    scores = q @ k.transpose(-2, -1) / math.sqrt(Dh)  # (H, T, T)
    future = torch.ones(T, T, dtype=torch.bool, device=x.device).triu(1)  # key j after query i
    masked = scores.masked_fill(future, float("-inf"))
    weights = masked.softmax(dim=-1)  # (H, T, T), each row sums to 1
    z = weights @ v  # (H, T, Dh)
    concat = z.transpose(0, 1).reshape(T, H * Dh)  # (T, H * Dh): head h in columns h*Dh..
    w_o, b_o = _dense(attn.o_proj, f"{prefix}.o_proj")
    out = concat @ w_o.T + (b_o if b_o is not None else 0.0)  # (T, D)
    return AttentionSteps(
        layer=layer,
        x=x,
        q=q,
        k=k,
        v=v,
        scores=scores,
        masked=masked,
        weights=weights,
        z=z,
        concat=concat,
        out=out,
        model_out=cache[names[1]][0].float(),
        model_weights=cache[names[2]][0].float(),
    )
