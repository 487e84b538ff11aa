"""A decoder-only transformer covering the GPT-2 and Llama families.

GPT-2 (Radford et al. 2019): learned absolute positions, LayerNorm, GELU MLP, multi-head
attention, biases, input and output embeddings tied. Llama (Touvron et al. 2023): rotary
position embeddings (RoPE, Su et al. 2021), RMSNorm, SwiGLU MLP (Shazeer 2020),
grouped-query attention (Ainslie et al. 2023), no biases. Both are pre-norm: each block
computes ``x + attn(norm(x))`` then ``x + mlp(norm(x))``. One config chooses the variant.

For teaching, the parts can also be taken out: positions can be the fixed sinusoids of the
original transformer (Vaswani et al. 2017) or none at all (``pos``), the norms removed
(``norm="none"``) and the residual connections cut (``residual=False``, each block then
computes ``attn(norm(x))`` and ``mlp(norm(...))`` alone, as a plain deep network would).

Parity: ``tests/models/test_transformer.py`` compares logits with transformers'
GPT2LMHeadModel and LlamaForCausalLM on random weights copied by ``lmlab.checkpoint.hf``.

Shapes: B batch, T new tokens, S cached + new tokens (keys), V vocabulary, D d_model,
H query heads, Hkv key/value heads, Dh head size.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from lmlab.devices import return_free_memory
from lmlab.errors import ConfigError
from lmlab.models.attention import decode_attention
from lmlab.models.attention import load as load_decode_attention
from lmlab.models.contract import Abilities
from lmlab.models.layers import (
    FixedTensors,
    HookPoint,
    RMSNorm,
    segment_mask,
    segment_positions,
    wide_float,
)
from lmlab.models.registry import register_family


@dataclass(frozen=True)
class TransformerConfig:
    vocab_size: int
    """Number of token ids."""
    d_model: int = 192
    """Width of the residual stream."""
    n_layers: int = 4
    """Number of transformer blocks."""
    n_heads: int = 6
    """Number of query heads."""
    n_kv_heads: int | None = None
    """Number of key/value heads (grouped-query attention); None means n_heads (MHA), 1 is MQA."""
    d_head: int | None = None
    """Size of each head; None means d_model // n_heads."""
    d_ff: int = 768
    """Hidden width of the MLP (for SwiGLU, of each of the gate and up projections)."""
    max_seq_len: int = 128
    """Context window: the most tokens the model attends over."""
    dropout: float = 0.0
    """Dropout on embeddings, attention weights and residual branches while training."""
    norm: Literal["layernorm", "rmsnorm", "none"] = "layernorm"
    """LayerNorm (GPT-2), RMSNorm (Llama), or none (no normalisation anywhere: for the
    residual-and-norm lesson)."""
    norm_eps: float = 1e-5
    """Epsilon inside the norms."""
    mlp: Literal["gelu", "gelu_tanh", "swiglu"] = "gelu_tanh"
    """MLP kind: GELU (exact), GELU with the tanh approximation (GPT-2), or SwiGLU (Llama)."""
    pos: Literal["learned", "rope", "sinusoidal", "none"] = "learned"
    """Learned absolute position embeddings (GPT-2), rotary embeddings (Llama), the fixed
    sinusoids of Vaswani et al. 2017 added to the token embeddings (not trained), or no
    positions at all (only the causal mask tells tokens apart by place)."""
    rope_theta: float = 10000.0
    """RoPE base period."""
    bias: bool = True
    """Biases in linear layers and LayerNorms (GPT-2) or none (Llama)."""
    qkv_bias: bool | None = None
    """Biases on the query, key and value projections alone (Qwen2: True with bias=False);
    None follows ``bias``."""
    residual: bool = True
    """Residual connections around attention and MLP (He et al. 2016); False cuts them, so
    each sublayer's output replaces the stream instead of being added to it."""
    tie_embeddings: bool = True
    """Share the token embedding matrix with the output projection."""
    init_std: float = 0.02
    """Standard deviation of the normal initialisation (residual projections are scaled
    down by 1/sqrt(2 * n_layers), as in GPT-2)."""

    def __post_init__(self):
        def bad(field: str, value, allowed: str):
            raise ConfigError(f"TransformerConfig.{field}={value!r} is invalid: {allowed}")

        if not isinstance(self.vocab_size, int) or self.vocab_size < 1:
            bad("vocab_size", self.vocab_size, "must be a positive integer")
        for field in ("d_model", "n_layers", "n_heads", "d_ff", "max_seq_len"):
            value = getattr(self, field)
            if not isinstance(value, int) or value < 1:
                bad(field, value, "must be a positive integer")
        kv = self.kv_heads
        if kv < 1 or self.n_heads % kv:
            bad("n_kv_heads", self.n_kv_heads, f"must divide n_heads={self.n_heads}")
        if self.d_head is None and self.d_model % self.n_heads:
            bad("n_heads", self.n_heads, f"must divide d_model={self.d_model} (or set d_head)")
        if self.pos == "rope" and self.head_size % 2:
            bad("d_head", self.head_size, "must be even for rotary embeddings")
        if self.pos == "sinusoidal" and self.d_model % 2:
            bad("d_model", self.d_model, "must be even for sinusoidal positions (sin, cos pairs)")
        if not 0.0 <= self.dropout < 1.0:
            bad("dropout", self.dropout, "must be in [0, 1)")
        for field, allowed in (
            ("norm", ("layernorm", "rmsnorm", "none")),
            ("mlp", ("gelu", "gelu_tanh", "swiglu")),
            ("pos", ("learned", "rope", "sinusoidal", "none")),
        ):
            if getattr(self, field) not in allowed:
                bad(field, getattr(self, field), f"choose one of {', '.join(allowed)}")

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def head_size(self) -> int:
        return self.d_head or self.d_model // self.n_heads


# ----------------------------------------------------------------------------- KV cache


class KVCache:
    """Keys and values of every layer for the tokens seen so far, preallocated to max_len.

    Also remembers which key slots hold real tokens (``valid`` [B, max_len]; False for
    left padding) and each row's next position, so that rows with prompts of different
    lengths get the right positions and never attend to padding.
    """

    def __init__(self, config: TransformerConfig, batch_size: int, max_len: int, dtype, device):
        shape = (batch_size, config.kv_heads, max_len, config.head_size)  # (B, Hkv, S, Dh)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.n_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.n_layers)]
        self.valid = torch.zeros(batch_size, max_len, dtype=torch.bool, device=device)
        self.next_pos = torch.zeros(batch_size, dtype=torch.long, device=device)
        self.length = 0
        self.max_len = max_len
        self.padded = False  # True once any masked slot exists: attention then needs a mask
        if dtype == torch.bfloat16 and torch.device(device).type == "cpu":
            load_decode_attention()  # before any compiled step traces the attention

    def reorder(self, index: torch.Tensor) -> None:
        """Keep (or repeat) batch rows ``index`` [B'], e.g. the surviving beams."""
        self.k = [k.index_select(0, index) for k in self.k]
        self.v = [v.index_select(0, index) for v in self.v]
        self.valid = self.valid.index_select(0, index)
        self.next_pos = self.next_pos.index_select(0, index)


class _RopeTable(FixedTensors):
    """RoPE's cos and sin [P, Dh] for positions 0 .. P - 1 (``Transformer.prepare_decoding``),
    held fixed for torch.compile outside the module tree (``FixedTensors``)."""

    def __init__(self, cos: torch.Tensor, sin: torch.Tensor):
        super().__init__()
        self.cos, self.sin = cos, sin


# ----------------------------------------------------------------------------- blocks


def rope_tables(positions: torch.Tensor, head_size: int, theta: float):
    """cos and sin of the rotation angles, each [B, 1, T, Dh], for integer ``positions`` [B, T].

    Pair i of a head (dimensions i and i + Dh/2, the half-split layout of Hugging Face's
    Llama) rotates by angle ``position * theta ** (-2i / Dh)``.

    Computed in float64 and rounded to float32 once (``_cos_sin``): a compiled decoding
    step (``torch.compile``) evaluates cos and sin with other vector code than eager
    PyTorch, which in float32 gives other last bits for about 5% of the angles (8,192
    positions, 64 dimensions); bf16 queries and keys then round differently now and
    then, and (with RMSNorm's sums) SmolLM2's greedy ids parted after 4 to 17 tokens. In
    float64 the two differ by less than float32 can show: none of about 9M values
    differed once rounded (32,768 positions, four head sizes and thetas);
    tests/generate/test_compiled.py checks 8,192 positions for two.
    """
    wide = wide_float(positions.device)
    inv_freq = theta ** (
        -torch.arange(0, head_size, 2, device=positions.device, dtype=wide) / head_size
    )
    angles = positions.to(wide)[..., None] * inv_freq  # (B, T, Dh/2)
    angles = torch.cat([angles, angles], dim=-1)[:, None]  # (B, 1, T, Dh)
    return _cos_sin(angles)


def _cos_sin(angles: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of ``angles`` (float64), each rounded to float32 (see ``rope_tables``)."""
    return angles.cos().float(), angles.sin().float()


def sinusoidal_table(positions: torch.Tensor, d_model: int) -> torch.Tensor:
    """Vaswani et al. (2017, section 3.5) position encodings [B, T, D] float32 for integer
    ``positions`` [B, T]: PE[pos, 2i] = sin(pos / 10000^(2i/D)), PE[pos, 2i+1] = cos(same).

    Each pair (2i, 2i+1) turns at its own speed, from one radian per position (i = 0) to a
    full turn every 10000 * 2 pi positions, so PE[pos + k] is a fixed rotation of PE[pos]
    whatever pos is. Computed on the fly: nothing is trained or stored.

    >>> sinusoidal_table(torch.tensor([[0, 1]]), 4).round(decimals=4).tolist()
    [[[0.0, 1.0, 0.0, 1.0], [0.8415, 0.5403, 0.01, 1.0]]]
    """
    wide = wide_float(positions.device)
    inv_freq = 10000.0 ** (
        -torch.arange(0, d_model, 2, device=positions.device, dtype=wide) / d_model
    )
    angles = positions.to(wide)[..., None] * inv_freq  # (B, T, D/2), float64 as in rope_tables
    cos, sin = _cos_sin(angles)
    # (B, T, D/2, 2) -> (B, T, D): sin in the even dimensions, cos in the odd ones
    return torch.stack([sin, cos], dim=-1).flatten(-2)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate each (x_i, x_{i+Dh/2}) pair of ``x`` [B, H, T, Dh] by the tabled angles."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return (x * cos + rotated * sin).to(x.dtype)


def fused_projection(owner: nn.Module, names: tuple[str, ...], x: torch.Tensor):
    """The outputs of ``owner``'s projections ``names`` on ``x``, concatenated on the last
    dimension, from one call, or None (then each projection runs on its own).

    A decoding step is many small matrix-vector products; three (q, k, v) or two (gate,
    up) that read the same input cost one call instead when their class offers ``fuse``
    (``lmlab.quant.Int4Linear``, ``lmlab.quant.Q8_0Linear``: the same numbers, tested)
    and nothing could tell the difference: ``owner.fast`` on, no hook on the projections,
    and no gradient needed. The fused call is made on first use and remade if a
    projection is replaced (LoRA) or it handed its weights back to the projections (or,
    for Q8_0 layers, their blocks moved).
    """
    if not owner.fast:
        return None
    layers = [getattr(owner, n) for n in names]
    fuse = getattr(type(layers[0]), "fuse", None)
    if fuse is None or any(m._forward_hooks or m._forward_pre_hooks for m in layers):
        return None
    made = owner._fused.get(names)
    # remade when a projection was replaced, or the fused copy gave its weights back
    # (``Int4Matmul.release``: the layers were saved or moved)
    stale = made is None or any(a is not b for a, b in zip(made[0], layers))
    if stale or (made[1] is not None and made[1].packed is None):
        made = owner._fused[names] = (layers, fuse(layers))
    kernel = made[1]
    return kernel(x) if kernel is not None and kernel.applies(x) else None


class Attention(nn.Module):
    """Causal self-attention with optional grouped-query heads and a KV cache.

    Two paths give the same result: the fast one calls ``scaled_dot_product_attention``;
    the explicit one materialises the attention pattern [B, H, T, S] so that
    ``hook_pattern`` can read or edit it. The explicit path runs when ``explicit`` is set
    or when a hook that may edit it is registered on ``hook_pattern`` (a read-only hook gets
    the pattern computed beside the fast path, so reading changes nothing), and also for bf16 training on a CPU,
    where it is the faster one: torch 2.13's CPU flash-attention backward in bf16 takes
    3.6x as long as in fp32; with the explicit path gpt-char-tiny trains about 1.7-1.8x as
    fast as a plain float32 loop (bench/train_throughput.py).
    """

    def __init__(self, config: TransformerConfig, layer: int):
        super().__init__()
        self.layer = layer
        self.n_heads, self.n_kv_heads, self.d_head = (
            config.n_heads,
            config.kv_heads,
            config.head_size,
        )
        d = config.d_model
        qkv_bias = config.bias if config.qkv_bias is None else config.qkv_bias
        self.q_proj = nn.Linear(d, self.n_heads * self.d_head, bias=qkv_bias)
        self.k_proj = nn.Linear(d, self.n_kv_heads * self.d_head, bias=qkv_bias)
        self.v_proj = nn.Linear(d, self.n_kv_heads * self.d_head, bias=qkv_bias)
        self.o_proj = nn.Linear(self.n_heads * self.d_head, d, bias=config.bias)
        self.dropout = config.dropout
        self.explicit = False
        self.fast = True  # q, k, v in one call where their class allows (fused_projection)
        self._fused: dict = {}
        self.hook_q, self.hook_k, self.hook_v = HookPoint(), HookPoint(), HookPoint()
        self.hook_pattern = HookPoint()  # (B, H, T, S) softmax weights, explicit path only
        self.hook_z = HookPoint()  # (B, T, H, Dh) per-head outputs before o_proj

    def forward(self, x, rope, attn_mask, cache: KVCache | None):
        B, T, _ = x.shape
        H, Hkv, Dh = self.n_heads, self.n_kv_heads, self.d_head
        qkv = fused_projection(self, ("q_proj", "k_proj", "v_proj"), x)
        if qkv is not None:
            # (B, H + 2 Hkv, T, Dh): q, k and v heads side by side; RoPE turns q and k at once
            qkv = qkv.view(B, T, H + 2 * Hkv, Dh).transpose(1, 2)
            qk = qkv[:, : H + Hkv]
            qk = apply_rope(qk, *rope) if rope is not None else qk
            q, k, v = qk[:, :H], qk[:, H:], qkv[:, H + Hkv :]
        else:
            q = self.q_proj(x).view(B, T, H, Dh).transpose(1, 2)  # (B, H, T, Dh)
            k = self.k_proj(x).view(B, T, Hkv, Dh).transpose(1, 2)  # (B, Hkv, T, Dh)
            v = self.v_proj(x).view(B, T, Hkv, Dh).transpose(1, 2)
            if rope is not None:
                q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        q, k, v = self.hook_q(q), self.hook_k(k), self.hook_v(v)
        if cache is not None:
            start = cache.length
            cache.k[self.layer][:, :, start : start + T] = k
            cache.v[self.layer][:, :, start : start + T] = v
            k = cache.k[self.layer][:, :, : start + T]  # (B, Hkv, S, Dh)
            v = cache.v[self.layer][:, :, : start + T]
        dropout = self.dropout if self.training else 0.0
        if self.explicit or self.hook_pattern.edited() or _bf16_cpu_training(q):
            z = self._explicit(q, k, v, attn_mask, dropout)
        elif T == 1 and (H != Hkv or (attn_mask is None and not dropout)):
            # One new token (a decoding step): the H // Hkv query heads that share a
            # key/value head become that head's rows of queries, (B, Hkv, H // Hkv, Dh), so
            # attention runs without grouped-query broadcasting, about 3x faster on a CPU
            # (67-78 us -> 21-24 us per call for SmolLM2's 9 and 3 heads), and in bf16 on a
            # CPU without a mask through lmlab's kernel (lmlab.models.attention: 23 -> 11
            # us a call at 160 keys, bench/attention.py). Neither gives the same bits as
            # the broadcasting call (SmolLM2's logits moved by up to 0.4 after a few
            # steps), so this is the one-token path for both settings of ``fast``.
            grouped = q.reshape(B, Hkv, H // Hkv, Dh)
            z = decode_attention(grouped, k, v) if attn_mask is None and not dropout else None
            if z is None:
                z = F.scaled_dot_product_attention(
                    grouped, k, v, attn_mask=attn_mask, dropout_p=dropout
                )
            z = z.view(B, H, 1, Dh)
            if self.hook_pattern._forward_hooks:
                self.hook_pattern(self._pattern(q, k, attn_mask))
        else:
            z = F.scaled_dot_product_attention(
                q,
                k,
                v,
                attn_mask=attn_mask,
                dropout_p=dropout,
                is_causal=attn_mask is None and T > 1 and cache is None,
                enable_gqa=self.n_kv_heads != self.n_heads,
            )
            if self.hook_pattern._forward_hooks:  # read-only hooks: show the pattern
                self.hook_pattern(self._pattern(q, k, attn_mask))
        z = self.hook_z(z.transpose(1, 2))  # (B, T, H, Dh)
        return self.o_proj(z.reshape(B, T, self.n_heads * self.d_head))

    def _explicit(self, q, k, v, attn_mask, dropout):
        """softmax(q k^T / sqrt(Dh) + mask) v, with the pattern passed through hook_pattern."""
        pattern = self.hook_pattern(self._pattern(q, k, attn_mask))
        if dropout:
            pattern = F.dropout(pattern, dropout)
        v = v.repeat_interleave(self.n_heads // self.n_kv_heads, dim=1)  # (B, H, S, Dh)
        return pattern @ v  # (B, H, T, Dh)

    def _pattern(self, q, k, attn_mask):
        """The attention pattern softmax(q k^T / sqrt(Dh) + mask): [B, H, T, S]."""
        # (B, H, S, Dh): each kv head serves n_heads // n_kv_heads query heads
        k = k.repeat_interleave(self.n_heads // self.n_kv_heads, dim=1)
        T, S = q.shape[2], k.shape[2]
        scores = (q / math.sqrt(self.d_head)) @ k.transpose(-2, -1)  # (B, H, T, S)
        if attn_mask is None:  # plain causal: query i (at slot S - T + i) sees slots <= its own
            attn_mask = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(S - T)
        # The mask is added (0 or -inf) rather than filled in, and the softmax reads the
        # scores' own dtype (it accumulates in float32 either way): the same numbers as a
        # masked_fill and a float32 softmax, and bf16 training on the CPU runs the attention
        # about twice as fast, with no masked_fill or casts to differentiate.
        bias = torch.zeros(attn_mask.shape, dtype=scores.dtype, device=q.device)
        return (scores + bias.masked_fill_(~attn_mask, float("-inf"))).softmax(dim=-1)


def _bf16_cpu_training(q: torch.Tensor) -> bool:
    return q.dtype == torch.bfloat16 and q.device.type == "cpu" and torch.is_grad_enabled()


class MLP(nn.Module):
    """GPT-2: down(gelu(up(x))). Llama (SwiGLU): down(silu(gate(x)) * up(x))."""

    def __init__(self, config: TransformerConfig):
        super().__init__()
        d, f = config.d_model, config.d_ff
        self.kind = config.mlp
        self.up_proj = nn.Linear(d, f, bias=config.bias)
        self.gate_proj = nn.Linear(d, f, bias=config.bias) if self.kind == "swiglu" else None
        self.down_proj = nn.Linear(f, d, bias=config.bias)
        self.fast = True  # gate and up in one call where their class allows (fused_projection)
        self._fused: dict = {}

    def forward(self, x):
        if self.kind == "swiglu":
            gate_up = fused_projection(self, ("gate_proj", "up_proj"), x)
            if gate_up is not None:
                gate, up = gate_up.chunk(2, dim=-1)
                h = F.silu(gate) * up
            else:
                h = F.silu(self.gate_proj(x)) * self.up_proj(x)
        else:
            h = F.gelu(self.up_proj(x), approximate="tanh" if self.kind == "gelu_tanh" else "none")
        return self.down_proj(h)


def make_norm(config: TransformerConfig) -> nn.Module:
    if config.norm == "none":
        return nn.Identity()
    if config.norm == "rmsnorm":
        return RMSNorm(config.d_model, eps=config.norm_eps)
    return nn.LayerNorm(config.d_model, eps=config.norm_eps, bias=config.bias)


class Block(nn.Module):
    """Pre-norm block: x + attn(norm(x)), then x + mlp(norm(x)) (without the ``x +`` when
    ``residual`` is off)."""

    def __init__(self, config: TransformerConfig, layer: int):
        super().__init__()
        self.residual = config.residual
        self.attn_norm = make_norm(config)
        self.attn = Attention(config, layer)
        self.mlp_norm = make_norm(config)
        self.mlp = MLP(config)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.hook_resid_pre = HookPoint()  # (B, T, D) each
        self.hook_attn_out = HookPoint()
        self.hook_resid_mid = HookPoint()
        self.hook_mlp_out = HookPoint()
        self.hook_resid_post = HookPoint()

    def forward(self, x, rope, attn_mask, cache):
        x = self.hook_resid_pre(x)
        attn_out = self.hook_attn_out(self.attn(self.attn_norm(x), rope, attn_mask, cache))
        x = self.hook_resid_mid(self._add(x, self._dropout(attn_out)))
        mlp_out = self.hook_mlp_out(self.mlp(self.mlp_norm(x)))
        return self.hook_resid_post(self._add(x, self._dropout(mlp_out)))

    def _add(self, x, out):
        return x + out if self.residual else out

    def _dropout(self, x):
        return self.resid_dropout(x) if self.training else x  # eval: no call at all


# ----------------------------------------------------------------------------- model


class Transformer(nn.Module):
    """Token ids [B, T] -> next-token logits [B, T, V]."""

    abilities = Abilities("causal_lm", cache=True, hooks=True)

    def __init__(self, config: TransformerConfig):
        super().__init__()
        self.config = config
        # Built on the meta device (to load weights into), skip the embeddings' own normal_:
        # on meta it imports torch._dynamo, ~60 MB, and reset_parameters redraws them anyway.
        meta = torch.empty(0).is_meta
        self.tok_emb = nn.Embedding(
            config.vocab_size,
            config.d_model,
            _weight=torch.empty(config.vocab_size, config.d_model) if meta else None,
        )
        self.pos_emb = (
            nn.Embedding(
                config.max_seq_len,
                config.d_model,
                _weight=torch.empty(config.max_seq_len, config.d_model) if meta else None,
            )
            if config.pos == "learned"
            else None
        )
        self.emb_dropout = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config, i) for i in range(config.n_layers))
        self.norm = make_norm(config)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight
        self.hook_embed = HookPoint()  # (B, T, D) token embeddings
        self.hook_pos_embed = HookPoint()  # (B, T, D) learned or sinusoidal positions
        self.hook_resid_final = HookPoint()  # (B, T, D) after the final norm
        self.reset_parameters()

    def reset_parameters(self) -> None:
        if self.tok_emb.weight.is_meta:  # built to be loaded into: no values to draw
            return
        std = self.config.init_std
        for name, p in self.named_parameters():
            if p.dim() < 2:  # norm weights stay 1, biases 0
                nn.init.zeros_(p) if name.endswith("bias") else nn.init.ones_(p)
            elif name.endswith(("o_proj.weight", "down_proj.weight")):
                nn.init.normal_(p, std=std / math.sqrt(2 * self.config.n_layers))
            else:
                nn.init.normal_(p, std=std)

    def new_cache(self, batch_size: int, max_len: int | None = None, dtype=None) -> KVCache:
        """An empty KV cache for ``batch_size`` rows and at most ``max_len`` tokens."""
        max_len = max_len or self.config.max_seq_len
        # a table kept quantized (lmlab.quant.Q8_0Embedding) tells its rows' dtype without
        # making its weight
        like = getattr(self.tok_emb, "like", None)
        ref = self.tok_emb.weight if like is None else like
        return KVCache(self.config, batch_size, max_len, dtype or ref.dtype, ref.device)

    def prepare_decoding(self, device: torch.device | str) -> None:
        """Make what a compiled decoding step reads instead of evaluating it at every
        step (``lmlab.generate.compiled`` calls this before tracing): RoPE's cos and sin
        for positions 0 .. min(max_seq_len, 8192) - 1, each [P, Dh] float32
        (``rope_tables``' numbers, so eager steps may read them too), used for unpadded
        rows whose cache fits. Module state, not a buffer: neither saved nor cast by
        ``.to(dtype)``; SmolLM2: 4 MB, made 1,024 positions at a time."""
        if self.config.pos != "rope":
            return
        table = getattr(self, "_rope_table", None)
        if table is not None and table.cos.device == torch.device(device):
            return
        P, Dh = min(self.config.max_seq_len, 8192), self.config.head_size
        cos, sin = (torch.empty(P, Dh, device=device) for _ in range(2))
        for a in range(0, P, 1024):
            slots = torch.arange(a, min(a + 1024, P), device=device)[None]
            c, s = rope_tables(slots, Dh, self.config.rope_theta)
            cos[a : a + 1024], sin[a : a + 1024] = c[0, 0], s[0, 0]
        self.__dict__["_rope_table"] = _RopeTable(cos, sin)  # not a submodule

    def use_fast_decoding(self, fast: bool = True) -> None:
        """Take the decoding shortcuts that give the same numbers (the default): projections
        that read the same input in one call where their class allows (``fused_projection``).
        ``False`` runs the plain path the tests compare them with: each projection
        computed alone (a fused copy made for the shortcut is undone where the class
        offers ``unfuse``, as ``lmlab.quant.Int4Linear`` does)."""
        for block in self.blocks:
            block.attn.fast = block.mlp.fast = fast
            if fast:
                continue
            attn, mlp = block.attn, block.mlp
            for layer in (attn.q_proj, attn.k_proj, attn.v_proj, mlp.gate_proj, mlp.up_proj):
                unfuse = getattr(layer, "unfuse", None)
                if unfuse is not None:
                    unfuse()
        if not fast:
            return_free_memory()  # the unfused copies' temporaries, freed into the C heap

    def use_explicit_attention(self, explicit: bool = True) -> None:
        """Route attention through the path that materialises the pattern (for inspection)."""
        for block in self.blocks:
            block.attn.explicit = explicit

    def forward(
        self,
        ids: torch.Tensor,
        cache: KVCache | None = None,
        mask: torch.Tensor | None = None,
        segments: torch.Tensor | None = None,
        logits_to_keep: int = 0,
    ) -> torch.Tensor:
        """ids: [B, T] int64; mask: [B, T] bool, False on left padding; -> logits [B, T, V].

        With a cache, ``ids`` continue the sequences it holds, and the cache is updated.
        ``segments`` [B, T] int64 number the examples packed into each row (from 1; 0 on
        padding): each token then attends only within its own example and positions
        restart at each, so a packed row computes what its examples would alone.
        ``logits_to_keep`` > 0 computes the logits of the last that many positions only
        ([B, logits_to_keep, V]; as in transformers): decoding needs the last one, and a
        prompt's pass then skips the output layer's product for the others.
        """
        B, T = ids.shape
        if segments is not None and (cache is not None or mask is not None):
            raise ConfigError("segments (packed training rows) take no cache and no mask")
        start = cache.length if cache is not None else 0
        limit = cache.max_len if cache is not None else self.config.max_seq_len
        if start + T > limit:
            raise ConfigError(
                f"sequence of {start + T} tokens exceeds the "
                f"{'cache size' if cache is not None else 'context window (max_seq_len)'} {limit}"
            )
        # unpadded rows with a cache: the new tokens' positions are columns start.. start + T
        columns = cache is not None and mask is None and not cache.padded
        if segments is not None:
            positions, attn_mask = segment_positions(segments), segment_mask(segments)
        else:
            positions, attn_mask = self._positions_and_mask(ids, cache, mask)
        x = self.hook_embed(self.tok_emb(ids))  # (B, T, D)
        rope = None
        if self.pos_emb is not None:
            x = x + self.hook_pos_embed(self.pos_emb(positions))
        elif self.config.pos == "sinusoidal":
            # Vaswani et al. (section 3.4) scale the embeddings by sqrt(D) before adding the
            # table, whose entries are of size 1: else the positions drown the tokens
            pe = sinusoidal_table(positions, self.config.d_model).to(x.dtype)  # (B, T, D)
            x = x * math.sqrt(self.config.d_model) + self.hook_pos_embed(pe)
        elif self.config.pos == "rope":
            table = getattr(self, "_rope_table", None)  # made by prepare_decoding
            # (decided by the cache's size, not its length: a compiled step checks its
            # guards once per run, and the length grows within one)
            if columns and table is not None and cache.max_len <= len(table.cos):
                # their rows of the table: the same numbers, not evaluated again (a
                # compiled step evaluated them in float64 in every layer's kernel)
                rows = slice(start, start + T)
                rope = tuple(t[rows].expand(B, 1, T, -1) for t in (table.cos, table.sin))
            else:
                rope = rope_tables(positions, self.config.head_size, self.config.rope_theta)
        x = self.emb_dropout(x)
        for block in self.blocks:
            x = block(x, rope, attn_mask, cache)
        if cache is not None:
            cache.length += T
        x = self.hook_resid_final(self.norm(x))
        if logits_to_keep > 0:
            x = x[:, -logits_to_keep:]
        return self.lm_head(x)  # (B, T, V)

    def _positions_and_mask(self, ids, cache, mask):
        """Positions [B, T] of the new tokens and a boolean attention mask [B, 1, T, S] (or
        None when plain causal attention is right, the fast path)."""
        B, T = ids.shape
        device = ids.device
        if mask is None and (cache is None or not cache.padded):
            # No padding anywhere (training, or decoding unpadded rows): positions follow
            # on, and plain causal attention is right. No host-device sync on this path.
            start = cache.length if cache is not None else 0
            positions = torch.arange(start, start + T, device=device).expand(B, T)
            if cache is not None:
                cache.valid[:, start : start + T] = True
                cache.next_pos = cache.next_pos + T
                if T > 1:  # prefill: query i sees slots <= start + i
                    causal = torch.ones(T, start + T, dtype=torch.bool, device=device).tril(start)
                    return positions, causal
            return positions, None
        # No mask: every new token is real (a decoding step after a padded prompt), which
        # needs no look at the values (no host sync: a compiled step stays one graph).
        all_real = mask is None
        if mask is None:
            mask = torch.ones(B, T, dtype=torch.bool, device=device)
        mask = mask.to(torch.bool)
        start = cache.length if cache is not None else 0
        first = (
            cache.next_pos if cache is not None else torch.zeros(B, dtype=torch.long, device=device)
        )
        # Position = number of real tokens before this one in its row; padding sits at 0.
        positions = (first[:, None] + mask.long().cumsum(1) - 1).clamp(min=0)  # (B, T)
        if cache is not None:
            cache.valid[:, start : start + T] = mask
            cache.next_pos = first + mask.long().sum(1)
            cache.padded = cache.padded or not (all_real or bool(mask.all()))
            if not cache.padded and T == 1:
                return positions, None  # one new token, nothing masked: it sees every slot
            valid = cache.valid[:, : start + T]  # (B, S)
        else:
            if bool(mask.all()):
                return positions, None
            valid = mask
        S = start + T
        # Query i sits at slot start + i. Built from comparisons (not tril(start)), so that a
        # compiled step keeps start symbolic instead of recompiling for every cache length.
        slots = torch.arange(S, device=device)  # (S,)
        query_slot = torch.arange(start, S, device=device)[:, None]  # (T, 1)
        attn_mask = (slots <= query_slot) & valid[:, None, :]  # (B, T, S)
        # A padding query would see no key at all (softmax of all -inf is NaN): let every
        # query see its own slot. Outputs at padding positions are never used.
        attn_mask = attn_mask | (slots == query_slot)
        return positions, attn_mask[:, None]  # (B, 1, T, S)


register_family("transformer", TransformerConfig, Transformer)
