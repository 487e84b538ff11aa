"""The encoder-decoder Transformer of Vaswani et al. (2017), "Attention Is All You Need".

An encoder reads the source with bidirectional self-attention; a decoder writes the
target one token at a time with causal self-attention and cross-attention to the
encoder's output (the "memory"). As in the paper: sinusoidal positions added to embeddings
scaled by sqrt(d_model), one embedding table shared by source, target and the output
projection, ReLU feed-forward layers, and post-norm residual blocks
(``x = norm(x + sublayer(x))``); ``norm="pre"`` gives the pre-norm variant most later
models use (``x = x + sublayer(norm(x))``, with a final norm), which trains more stably
without warm-up (Xiong et al. 2020).

The same model, with settings, is T5 (Raffel et al. 2020: pre-norm with RMS norms, no
biases, no sqrt(d) in attention or on the embeddings, a learned bias per bucket of
query-key offset shared by the layers of each stack, ReLU or gated-GELU feed-forward, the
output rescaled by d_model**-0.5 when tied) and BART (Lewis et al. 2020: learned positions
with an offset of 2, post-norm with a norm on the embeddings, GELU, biases, an output
bias). ``lmlab.checkpoint.seq2seq`` maps Hugging Face T5, BART, Marian (the paper's
layout) and Pegasus (its pre-norm variant) folders onto these settings and back; parity
with transformers: tests/checkpoint/test_seq2seq.py.

Training is teacher forcing: ``model(src, tgt_in)`` -> logits [B, T, V] for ``tgt_out``
(the target shifted by one). Decoding goes through lmlab's ordinary search code
(``lmlab.generate``): ``model.conditioned(src)`` is a causal LM over target tokens for
those sources, with a cache that holds the decoder's self-attention keys and values and
the cross-attention keys and values computed once from the memory, so greedy, sampling
and beam search all work unchanged (beam search reorders both).

Shapes: B batch, S source tokens, T target tokens, V vocabulary, D d_model, H heads.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from lmlab.errors import ConfigError
from lmlab.models.contract import Abilities
from lmlab.models.layers import HookPoint, RMSNorm
from lmlab.models.registry import register_family


@dataclass(frozen=True)
class Seq2SeqConfig:
    vocab_size: int
    """Token ids of the shared source/target vocabulary."""
    d_model: int = 128
    n_heads: int = 4
    n_encoder_layers: int = 2
    n_decoder_layers: int = 2
    d_ff: int = 512
    max_seq_len: int = 128
    """Longest source and longest target."""
    dropout: float = 0.0
    norm: Literal["post", "pre"] = "post"
    """post: the paper's norm(x + sublayer(x)); pre: x + sublayer(norm(x)) and a final norm."""
    pad_id: int = 0
    """Padding id of the source (masked out of every attention)."""
    bos_id: int = 1
    """The token the decoder starts from (Hugging Face's decoder_start_token_id)."""
    eos_id: int | None = None
    """The token that ends a target (decoding stops there); None: the caller says."""
    d_head: int | None = None
    """Size of each head; None means d_model // n_heads (T5 sets its own, d_kv)."""
    positions: Literal["sinusoidal", "learned", "relative"] = "sinusoidal"
    """sinusoidal: the paper's fixed table; learned: one table per stack (BART);
    relative: T5's learned attention bias per bucket of query-key offset."""
    position_offset: int = 0
    """learned: rows of the table before position 0 (BART keeps 2, never used)."""
    relative_buckets: int = 32
    """relative: number of offset buckets (half per direction in the encoder)."""
    relative_max_distance: int = 128
    """relative: offsets from this far on share the last bucket."""
    norm_kind: Literal["layernorm", "rmsnorm"] = "layernorm"
    """LayerNorm (the paper, BART) or RMSNorm without centring or bias (T5)."""
    norm_eps: float = 1e-5
    """Epsilon inside the norms."""
    activation: Literal["relu", "gelu", "gelu_tanh", "silu"] = "relu"
    """Feed-forward nonlinearity (gelu_tanh: GPT-2's approximation, HF's gelu_new)."""
    gated: bool = False
    """Gated feed-forward: down(act(gate(x)) * up(x)) (T5 v1.1's gated-gelu)."""
    bias: bool = True
    """Biases in the linear layers and LayerNorms."""
    scale_embeddings: bool = True
    """Multiply token embeddings by sqrt(d_model) (the paper; T5 does not)."""
    embed_norm: bool = False
    """A norm on the embeddings of each stack, before the first layer (BART)."""
    scale_attention: bool = True
    """Divide attention scores by sqrt(d_head) (T5 folds it into its initialisation)."""
    tie_output: bool = True
    """The output projection is the embedding matrix; False: a separate lm_head."""
    output_scale: float = 1.0
    """Factor on the decoder's last hidden state before the output projection (tied T5:
    d_model**-0.5)."""
    output_bias: bool = False
    """A bias on the logits (BART's final_logits_bias), a buffer: not trained."""

    def __post_init__(self):
        for field in (
            "vocab_size",
            "d_model",
            "n_heads",
            "n_encoder_layers",
            "n_decoder_layers",
            "d_ff",
            "max_seq_len",
        ):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(
                    f"Seq2SeqConfig.{field}={value!r} is invalid: must be a positive integer"
                )
        if self.d_head is None and self.d_model % self.n_heads:
            raise ConfigError(
                f"Seq2SeqConfig.n_heads={self.n_heads} must divide d_model={self.d_model} "
                "(or set d_head)"
            )
        for field, allowed in (
            ("norm", ("post", "pre")),
            ("positions", ("sinusoidal", "learned", "relative")),
            ("norm_kind", ("layernorm", "rmsnorm")),
            ("activation", ("relu", "gelu", "gelu_tanh", "silu")),
        ):
            if getattr(self, field) not in allowed:
                raise ConfigError(
                    f"Seq2SeqConfig.{field}={getattr(self, field)!r} is invalid: choose one "
                    f"of {', '.join(allowed)}"
                )
        for field, low in (
            ("d_head", 1),
            ("position_offset", 0),
            ("relative_buckets", 4),
            ("relative_max_distance", 1),
        ):
            value = getattr(self, field)
            if value is None and field == "d_head":
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ConfigError(
                    f"Seq2SeqConfig.{field}={value!r} is invalid: must be an integer >= {low}"
                )
        if self.relative_max_distance <= self.relative_buckets // 2:
            raise ConfigError(
                f"Seq2SeqConfig.relative_max_distance={self.relative_max_distance} is invalid: "
                f"must exceed relative_buckets // 2 = {self.relative_buckets // 2}"
            )
        for field in ("norm_eps", "output_scale"):
            value = getattr(self, field)
            if not isinstance(value, (int, float)) or not 0 < value < math.inf:
                raise ConfigError(
                    f"Seq2SeqConfig.{field}={value!r} is invalid: must be a positive number"
                )
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"Seq2SeqConfig.dropout={self.dropout} is invalid: must be in [0, 1)")
        for field in ("pad_id", "bos_id", "eos_id"):
            value = getattr(self, field)
            if field == "eos_id" and value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int):
                raise ConfigError(f"Seq2SeqConfig.{field}={value!r} is invalid: must be a token id")
            if not 0 <= value < self.vocab_size:
                raise ConfigError(
                    f"Seq2SeqConfig.{field} must be an id below vocab_size={self.vocab_size}"
                )

    @property
    def head_size(self) -> int:
        return self.d_head or self.d_model // self.n_heads


def sinusoids(length: int, d_model: int) -> torch.Tensor:
    """The paper's positional encodings [length, d_model]: PE(pos, 2i) = sin(pos / 10000^(2i/d)),
    PE(pos, 2i+1) = cos(pos / 10000^(2i/d))."""
    pos = torch.arange(length, dtype=torch.float32)[:, None]
    rate = torch.exp(
        -math.log(10000.0) * torch.arange(0, d_model, 2, dtype=torch.float32) / d_model
    )
    table = torch.zeros(length, d_model)
    table[:, 0::2] = torch.sin(pos * rate)
    table[:, 1::2] = torch.cos(pos * rate[: d_model // 2])
    return table


def relative_bucket(
    offset: torch.Tensor, bidirectional: bool, n_buckets: int, max_distance: int
) -> torch.Tensor:
    """T5's bucket of each key-minus-query offset (int64, same shape as ``offset``).

    Half the buckets (the encoder: per direction) hold the small offsets one each; the
    rest cover larger ones on a log scale up to ``max_distance``, beyond which all share the
    last bucket. The decoder (``bidirectional=False``) only looks back, so later keys (a
    positive offset) fall in bucket 0 with the query itself. With 8 buckets, distance 16:

        offsets      [-20, -9, -5, -3, -1, 0, 1, 3, 9]
        encoder  ->  [  3,  3,  2,  2,  1, 0, 5, 6, 7]
        decoder  ->  [  7,  6,  4,  3,  1, 0, 0, 0, 0]
    """
    bucket = torch.zeros_like(offset)
    if bidirectional:
        n_buckets //= 2
        bucket += (offset > 0).long() * n_buckets  # later keys: the upper half
        distance = offset.abs()
    else:
        distance = (-offset).clamp(min=0)
    exact = n_buckets // 2
    # log-spaced buckets from `exact` to max_distance (distances below `exact` never use it)
    log_ratio = torch.log(distance.float().clamp(min=1) / exact) / math.log(max_distance / exact)
    large = (exact + (log_ratio * (n_buckets - exact)).long()).clamp(max=n_buckets - 1)
    return bucket + torch.where(distance < exact, distance, large)


class RelativeBias(nn.Module):
    """T5's position scheme: a learned scalar per head and offset bucket, added to the
    attention scores of every self-attention layer of one stack."""

    def __init__(self, config: Seq2SeqConfig, bidirectional: bool):
        super().__init__()
        self.bidirectional = bidirectional
        self.n_buckets, self.max_distance = config.relative_buckets, config.relative_max_distance
        self.embed = nn.Embedding(config.relative_buckets, config.n_heads)

    def forward(self, start: int, T: int, S: int) -> torch.Tensor:
        """The bias [1, H, T, S] of queries at positions start..start+T-1 over keys 0..S-1."""
        device = self.embed.weight.device
        query = torch.arange(start, start + T, device=device)[:, None]
        key = torch.arange(S, device=device)[None, :]
        buckets = relative_bucket(
            key - query, self.bidirectional, self.n_buckets, self.max_distance
        )
        return self.embed(buckets).permute(2, 0, 1)[None]  # (1, H, T, S)


def with_mask(bias: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """An additive attention mask: ``bias`` where ``allowed`` (bool, broadcast), else the
    dtype's lowest value (not -inf, so that a row with no allowed key gives no NaN)."""
    return bias.masked_fill(~allowed, torch.finfo(bias.dtype).min)


def make_norm(config: Seq2SeqConfig) -> nn.Module:
    if config.norm_kind == "rmsnorm":
        return RMSNorm(config.d_model, eps=config.norm_eps)
    return nn.LayerNorm(config.d_model, eps=config.norm_eps, bias=config.bias)


class MultiHead(nn.Module):
    """Multi-head attention of queries from ``x`` over keys and values given (self or cross)."""

    def __init__(self, config: Seq2SeqConfig):
        super().__init__()
        d, inner = config.d_model, config.n_heads * config.head_size
        self.h, self.dh = config.n_heads, config.head_size
        self.q_proj, self.k_proj, self.v_proj = (
            nn.Linear(d, inner, bias=config.bias) for _ in range(3)
        )
        self.o_proj = nn.Linear(inner, d, bias=config.bias)
        self.dropout = config.dropout
        self.scale = None if config.scale_attention else 1.0  # None: SDPA's 1/sqrt(Dh)

    def split(self, x: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape
        return x.view(B, T, self.h, self.dh).transpose(1, 2)  # (B, H, T, Dh)

    def keys_values(self, memory: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.split(self.k_proj(memory)), self.split(self.v_proj(memory))

    def forward(self, x, k, v, mask=None, causal=False):
        """x [B, T, D]; k, v [B, H, S, Dh]; mask [B|1, 1|H, T|1, S], bool (True: may attend)
        or float (added to the scores: T5's position bias with the padding folded in)."""
        q = self.split(self.q_proj(x))
        z = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=causal and mask is None,
            dropout_p=self.dropout if self.training else 0.0, scale=self.scale,
        )  # fmt: skip
        B, H, T, Dh = z.shape
        return self.o_proj(z.transpose(1, 2).reshape(B, T, H * Dh))


_ACTIVATIONS = {
    "relu": F.relu,
    "gelu": F.gelu,
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "silu": F.silu,
}


class FeedForward(nn.Module):
    """down(act(up(x))), or gated: down(act(gate(x)) * up(x))."""

    def __init__(self, config: Seq2SeqConfig):
        super().__init__()
        self.up, self.down = (
            nn.Linear(config.d_model, config.d_ff, bias=config.bias),
            nn.Linear(config.d_ff, config.d_model, bias=config.bias),
        )
        if config.gated:
            self.gate = nn.Linear(config.d_model, config.d_ff, bias=config.bias)
        self.act = _ACTIVATIONS[config.activation]

    def forward(self, x):
        if hasattr(self, "gate"):
            return self.down(self.act(self.gate(x)) * self.up(x))
        return self.down(self.act(self.up(x)))


class Sublayer(nn.Module):
    """A residual connection with its norm and dropout, post- or pre-norm."""

    def __init__(self, config: Seq2SeqConfig):
        super().__init__()
        self.norm = make_norm(config)
        self.drop = nn.Dropout(config.dropout)
        self.pre = config.norm == "pre"

    def forward(self, x, fn):
        if self.pre:
            return x + self.drop(fn(self.norm(x)))
        return self.norm(x + self.drop(fn(x)))


class EncoderLayer(nn.Module):
    def __init__(self, config: Seq2SeqConfig):
        super().__init__()
        self.attn, self.ff = MultiHead(config), FeedForward(config)
        self.sub_attn, self.sub_ff = Sublayer(config), Sublayer(config)
        self.hook_resid_post = HookPoint()

    def forward(self, x, src_mask):
        x = self.sub_attn(x, lambda h: self.attn(h, *self.attn.keys_values(h), mask=src_mask))
        return self.hook_resid_post(self.sub_ff(x, self.ff))


class DecoderLayer(nn.Module):
    def __init__(self, config: Seq2SeqConfig, index: int):
        super().__init__()
        self.index = index
        self.self_attn, self.cross_attn, self.ff = (
            MultiHead(config),
            MultiHead(config),
            FeedForward(config),
        )
        self.sub_self, self.sub_cross, self.sub_ff = (
            Sublayer(config),
            Sublayer(config),
            Sublayer(config),
        )
        self.hook_resid_post = HookPoint()

    def forward(self, x, cross_kv, src_mask, self_mask, cache: Seq2SeqCache | None):
        """``self_mask`` None: plain causal attention over the target given."""

        def self_attention(h):
            k, v = self.self_attn.keys_values(h)
            if cache is None:
                return self.self_attn(h, k, v, mask=self_mask, causal=True)
            start, T = cache.length, h.shape[1]
            cache.k[self.index][:, :, start : start + T] = k
            cache.v[self.index][:, :, start : start + T] = v
            k, v = cache.k[self.index][:, :, : start + T], cache.v[self.index][:, :, : start + T]
            return self.self_attn(h, k, v, mask=self_mask)

        x = self.sub_self(x, self_attention)
        x = self.sub_cross(x, lambda h: self.cross_attn(h, *cross_kv, mask=src_mask))
        return self.hook_resid_post(self.sub_ff(x, self.ff))


class Seq2SeqCache:
    """What decoding the target needs to keep: the memory's cross-attention keys and values
    per decoder layer (computed once), the source mask, and the decoder's self-attention
    keys and values for the target tokens so far."""

    def __init__(
        self,
        cross: list[tuple[torch.Tensor, torch.Tensor]],
        src_mask,
        shape,
        max_len,
        dtype,
        device,
    ):
        self.cross, self.src_mask = cross, src_mask
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in cross]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in cross]
        self.length, self.max_len = 0, max_len

    def reorder(self, index: torch.Tensor) -> None:
        self.cross = [(k.index_select(0, index), v.index_select(0, index)) for k, v in self.cross]
        self.src_mask = self.src_mask.index_select(0, index)
        self.k = [k.index_select(0, index) for k in self.k]
        self.v = [v.index_select(0, index) for v in self.v]


class Seq2Seq(nn.Module):
    """(source ids [B, S], target input ids [B, T]) -> next-target-token logits [B, T, V]."""

    abilities = Abilities("seq2seq", hooks=True)  # not a causal LM: conditioned() is one

    def __init__(self, config: Seq2SeqConfig):
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.d_model)
        if config.positions == "sinusoidal":
            self.register_buffer(
                "positions", sinusoids(config.max_seq_len, config.d_model), persistent=False
            )
        elif config.positions == "learned":  # one table per stack, as BART has
            rows = config.max_seq_len + config.position_offset
            self.encoder_positions = nn.Embedding(rows, config.d_model)
            self.decoder_positions = nn.Embedding(rows, config.d_model)
        else:  # computed in the first layer of each stack and shared by all (T5)
            self.encoder_relative = RelativeBias(config, bidirectional=True)
            self.decoder_relative = RelativeBias(config, bidirectional=False)
        if config.embed_norm:
            self.encoder_embed_norm, self.decoder_embed_norm = make_norm(config), make_norm(config)
        self.drop = nn.Dropout(config.dropout)
        self.encoder = nn.ModuleList(EncoderLayer(config) for _ in range(config.n_encoder_layers))
        self.decoder = nn.ModuleList(
            DecoderLayer(config, i) for i in range(config.n_decoder_layers)
        )
        pre = config.norm == "pre"
        self.encoder_norm = make_norm(config) if pre else nn.Identity()
        self.decoder_norm = make_norm(config) if pre else nn.Identity()
        if not config.tie_output:
            self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        if config.output_bias:
            self.register_buffer("final_logits_bias", torch.zeros(config.vocab_size))
        self.hook_memory = HookPoint()  # (B, S, D) the encoder's output
        nn.init.normal_(self.embed.weight, std=config.d_model**-0.5)

    def _embed(self, ids: torch.Tensor, stack: str, start: int = 0) -> torch.Tensor:
        """Token embeddings [B, T, D] of ``stack`` ("encoder" or "decoder") at positions
        start.., with absolute positions added and the embedding norm applied."""
        c, T = self.config, ids.shape[1]
        if start + T > c.max_seq_len:
            raise ConfigError(f"sequence of {start + T} tokens exceeds max_seq_len {c.max_seq_len}")
        x = self.embed(ids)
        if c.scale_embeddings:
            x = x * math.sqrt(c.d_model)
        if c.positions == "sinusoidal":
            x = x + self.positions[start : start + T]
        elif c.positions == "learned":
            table = getattr(self, f"{stack}_positions").weight
            x = x + table[c.position_offset + start : c.position_offset + start + T]
        if c.embed_norm:
            x = getattr(self, f"{stack}_embed_norm")(x)
        return self.drop(x)

    def source_mask(self, src: torch.Tensor) -> torch.Tensor:
        return (src != self.config.pad_id)[:, None, None, :]  # (B, 1, 1, S)

    def encode(self, src: torch.Tensor) -> torch.Tensor:
        """The memory [B, S, D] of source ids [B, S] (padding: ``pad_id``)."""
        mask = self.source_mask(src)
        x = self._embed(src, "encoder")
        if self.config.positions == "relative":
            S = src.shape[1]
            mask = with_mask(self.encoder_relative(0, S, S).to(x.dtype), mask)  # (B, H, S, S)
        for layer in self.encoder:
            x = layer(x, mask)
        return self.hook_memory(self.encoder_norm(x))

    def _decoder_self_mask(self, T: int, start: int, cached: bool, dtype) -> torch.Tensor | None:
        """The decoder's self-attention mask for T new targets at slots start..: None for
        plain causal attention over the whole target (no cache, no position bias); else a
        bool [1, 1, T, start + T], or T5's bias with the causal mask folded in."""
        relative = self.config.positions == "relative"
        if not cached and not relative:
            return None
        S = start + T
        device = self.embed.weight.device
        # new queries at slots start.. see every slot up to their own
        allowed = torch.ones(T, S, dtype=torch.bool, device=device).tril(start)[None, None]
        if not relative:
            return allowed
        return with_mask(self.decoder_relative(start, T, S).to(dtype), allowed)

    def decode(self, tgt, memory, src_mask, cache: Seq2SeqCache | None = None):
        """Logits [B, T, V] of target ids [B, T] given the memory (or a cache holding it)."""
        start = cache.length if cache is not None else 0
        x = self._embed(tgt, "decoder", start)
        self_mask = self._decoder_self_mask(tgt.shape[1], start, cache is not None, x.dtype)
        for layer in self.decoder:
            cross = (
                cache.cross[layer.index]
                if cache is not None
                else layer.cross_attn.keys_values(memory)
            )
            x = layer(x, cross, src_mask, self_mask, cache)
        if cache is not None:
            cache.length += tgt.shape[1]
        return self.logits(self.decoder_norm(x))

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """The output projection of the decoder's last states [B, T, D] -> [B, T, V]."""
        c = self.config
        if c.output_scale != 1.0:
            x = x * c.output_scale
        weight = self.embed.weight if c.tie_output else self.lm_head.weight
        logits = F.linear(x, weight)  # (B, T, V)
        return logits + self.final_logits_bias if c.output_bias else logits

    def forward(self, src: torch.Tensor, tgt: torch.Tensor) -> torch.Tensor:
        """Teacher forcing: logits [B, T, V] for every target position."""
        return self.decode(tgt, self.encode(src), self.source_mask(src))

    def new_cache(self, memory: torch.Tensor, src_mask: torch.Tensor, max_len: int) -> Seq2SeqCache:
        cross = [layer.cross_attn.keys_values(memory) for layer in self.decoder]
        B, c = memory.shape[0], self.config
        shape = (B, c.n_heads, max_len, c.head_size)
        return Seq2SeqCache(cross, src_mask, shape, max_len, memory.dtype, memory.device)

    def conditioned(self, src: torch.Tensor) -> Conditioned:
        """A causal LM over target tokens for these sources (one row each), for decoding."""
        return Conditioned(self, src)


class ConditionedConfig:
    def __init__(self, vocab_size: int, max_seq_len: int):
        self.vocab_size, self.max_seq_len = vocab_size, max_seq_len


class Conditioned(nn.Module):
    """The decoder of a ``Seq2Seq`` bound to a batch of sources: target ids [B, T] (plus a
    cache) -> next-token logits [B, T, V], the causal-LM interface lmlab's decoding uses."""

    abilities = Abilities("causal_lm", gradients=False, cache=True, hooks=False)

    def __init__(self, model: Seq2Seq, src: torch.Tensor):
        super().__init__()
        self.model = model
        with torch.inference_mode():
            self.src_mask = model.source_mask(src)
            self.memory = model.encode(src)
        self.config = ConditionedConfig(model.config.vocab_size, model.config.max_seq_len)
        self.train(model.training)  # decoding switches modes and back: keep the model's

    def new_cache(self, batch_size: int, max_len: int | None = None, dtype=None) -> Seq2SeqCache:
        if batch_size != self.memory.shape[0]:
            raise ConfigError(
                f"decoding {batch_size} rows for {self.memory.shape[0]} sources: give one "
                "decoder prompt per source"
            )
        return self.model.new_cache(self.memory, self.src_mask, max_len or self.config.max_seq_len)

    def forward(self, ids, cache: Seq2SeqCache | None = None, mask=None):
        if mask is not None and not bool(mask.all()):
            raise ConfigError(
                "decoder prompts of different lengths are not supported: start every row "
                "from the same prefix (usually the bos token alone)"
            )
        if cache is None:
            return self.model.decode(ids, self.memory, self.src_mask)
        return self.model.decode(ids, None, cache.src_mask, cache=cache)


register_family("seq2seq", Seq2SeqConfig, Seq2Seq)
