"""The encoder-decoder Transformer of Vaswani et al. (2017), "Attention Is All You Need".

An encoder reads the source with bidirectional self-attention; a decoder writes the
target one token at a time with causal self-attention and cross-attention to the
encoder's output (the "memory"). As in the paper: sinusoidal positions added to embeddings
scaled by sqrt(d_model), one embedding table shared by source, target and the output
projection, ReLU feed-forward layers, and post-norm residual blocks
(``x = norm(x + sublayer(x))``); ``norm="pre"`` gives the pre-norm variant most later
models use (``x = x + sublayer(norm(x))``, with a final norm), which trains more stably
without warm-up (Xiong et al. 2020).

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
from lmlab.models.layers import HookPoint
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
    """The token the decoder starts from."""

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
        if self.d_model % self.n_heads:
            raise ConfigError(
                f"Seq2SeqConfig.n_heads={self.n_heads} must divide d_model={self.d_model}"
            )
        if self.norm not in ("post", "pre"):
            raise ConfigError(f"Seq2SeqConfig.norm={self.norm!r} is invalid: choose post or pre")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"Seq2SeqConfig.dropout={self.dropout} is invalid: must be in [0, 1)")
        for field in ("pad_id", "bos_id"):
            if not 0 <= getattr(self, field) < self.vocab_size:
                raise ConfigError(
                    f"Seq2SeqConfig.{field} must be an id below vocab_size={self.vocab_size}"
                )


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


class MultiHead(nn.Module):
    """Multi-head attention of queries from ``x`` over keys and values given (self or cross)."""

    def __init__(self, config: Seq2SeqConfig):
        super().__init__()
        d = config.d_model
        self.h, self.dh = config.n_heads, d // config.n_heads
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = (nn.Linear(d, d) for _ in range(4))
        self.dropout = config.dropout

    def split(self, x: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape
        return x.view(B, T, self.h, self.dh).transpose(1, 2)  # (B, H, T, Dh)

    def keys_values(self, memory: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.split(self.k_proj(memory)), self.split(self.v_proj(memory))

    def forward(self, x, k, v, mask=None, causal=False):
        """x [B, T, D]; k, v [B, H, S, Dh]; mask [B, 1, T|1, S] bool (True: may attend)."""
        q = self.split(self.q_proj(x))
        z = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=causal and mask is None,
            dropout_p=self.dropout if self.training else 0.0,
        )  # fmt: skip
        B, H, T, Dh = z.shape
        return self.o_proj(z.transpose(1, 2).reshape(B, T, H * Dh))


class FeedForward(nn.Module):
    def __init__(self, config: Seq2SeqConfig):
        super().__init__()
        self.up, self.down = (
            nn.Linear(config.d_model, config.d_ff),
            nn.Linear(config.d_ff, config.d_model),
        )

    def forward(self, x):
        return self.down(F.relu(self.up(x)))


class Sublayer(nn.Module):
    """A residual connection with its norm and dropout, post- or pre-norm."""

    def __init__(self, config: Seq2SeqConfig):
        super().__init__()
        self.norm = nn.LayerNorm(config.d_model)
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
        self.register_buffer(
            "positions", sinusoids(config.max_seq_len, config.d_model), persistent=False
        )
        self.drop = nn.Dropout(config.dropout)
        self.encoder = nn.ModuleList(EncoderLayer(config) for _ in range(config.n_encoder_layers))
        self.decoder = nn.ModuleList(
            DecoderLayer(config, i) for i in range(config.n_decoder_layers)
        )
        pre = config.norm == "pre"
        self.encoder_norm = nn.LayerNorm(config.d_model) if pre else nn.Identity()
        self.decoder_norm = nn.LayerNorm(config.d_model) if pre else nn.Identity()
        self.hook_memory = HookPoint()  # (B, S, D) the encoder's output
        nn.init.normal_(self.embed.weight, std=config.d_model**-0.5)

    def _embed(self, ids: torch.Tensor, start: int = 0) -> torch.Tensor:
        T = ids.shape[1]
        if start + T > self.config.max_seq_len:
            raise ConfigError(
                f"sequence of {start + T} tokens exceeds max_seq_len {self.config.max_seq_len}"
            )
        x = self.embed(ids) * math.sqrt(self.config.d_model) + self.positions[start : start + T]
        return self.drop(x)

    def source_mask(self, src: torch.Tensor) -> torch.Tensor:
        return (src != self.config.pad_id)[:, None, None, :]  # (B, 1, 1, S)

    def encode(self, src: torch.Tensor) -> torch.Tensor:
        """The memory [B, S, D] of source ids [B, S] (padding: ``pad_id``)."""
        mask = self.source_mask(src)
        x = self._embed(src)
        for layer in self.encoder:
            x = layer(x, mask)
        return self.hook_memory(self.encoder_norm(x))

    def decode(self, tgt, memory, src_mask, cache: Seq2SeqCache | None = None):
        """Logits [B, T, V] of target ids [B, T] given the memory (or a cache holding it)."""
        start = cache.length if cache is not None else 0
        x = self._embed(tgt, start)
        self_mask = None
        if cache is not None:  # new queries at slots start.. see every slot up to their own
            T, S = tgt.shape[1], start + tgt.shape[1]
            self_mask = torch.ones(T, S, dtype=torch.bool, device=tgt.device).tril(S - T)[
                None, None
            ]
        for layer in self.decoder:
            cross = (
                cache.cross[layer.index]
                if cache is not None
                else layer.cross_attn.keys_values(memory)
            )
            x = layer(x, cross, src_mask, self_mask, cache)
        if cache is not None:
            cache.length += tgt.shape[1]
        return F.linear(self.decoder_norm(x), self.embed.weight)  # (B, T, V), tied

    def forward(self, src: torch.Tensor, tgt: torch.Tensor) -> torch.Tensor:
        """Teacher forcing: logits [B, T, V] for every target position."""
        return self.decode(tgt, self.encode(src), self.source_mask(src))

    def new_cache(self, memory: torch.Tensor, src_mask: torch.Tensor, max_len: int) -> Seq2SeqCache:
        cross = [layer.cross_attn.keys_values(memory) for layer in self.decoder]
        B, c = memory.shape[0], self.config
        shape = (B, c.n_heads, max_len, c.d_model // c.n_heads)
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
