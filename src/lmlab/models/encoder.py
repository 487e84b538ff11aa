"""A bidirectional transformer encoder: the BERT family.

BERT (Devlin et al. 2019): token + learned absolute position + token-type (segment)
embeddings, summed and normalised; then post-norm blocks, each computing
``x = norm(x + attn(x))`` then ``x = norm(x + mlp(x))``; every position attends to every
non-padding position (no causal mask). Sentence encoders such as all-MiniLM-L6-v2 (Wang et
al. 2020; Reimers & Gurevych 2019) are this model followed by mean pooling (``pool``).

Unlike the decoder families, ``Encoder.forward`` returns hidden states [B, T, D], not
next-token logits: an encoder sees the whole sequence at every position, so it has no
next-token distribution, and it cannot be trained or sampled as a causal language model.
With ``mlm_head=True`` the model also carries BERT's masked-language-model head, and
``mlm_logits(hidden)`` maps hidden states to logits over the vocabulary [B, T, V] for the
masked positions (``model.mlm_logits(model(ids))``).

Parity: ``tests/checkpoint/test_bert.py`` compares hidden states and MLM logits with
transformers' BertModel and BertForMaskedLM on random weights copied by
``lmlab.checkpoint.bert``, and sentence embeddings with the real all-MiniLM-L6-v2.

Shapes: B batch, T tokens, V vocabulary, D d_model, H heads, Dh head size.
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
class EncoderConfig:
    vocab_size: int
    """Number of token ids."""
    d_model: int = 384
    """Width of the residual stream (BERT's hidden_size)."""
    n_layers: int = 6
    """Number of encoder blocks."""
    n_heads: int = 12
    """Number of attention heads; must divide d_model."""
    d_ff: int = 1536
    """Hidden width of the MLP (BERT's intermediate_size)."""
    max_seq_len: int = 512
    """Number of learned positions: the longest input the model takes."""
    dropout: float = 0.0
    """Dropout on embeddings, attention weights and residual branches while training."""
    type_vocab_size: int = 2
    """Number of token types (segments: sentence A = 0, sentence B = 1)."""
    norm_eps: float = 1e-12
    """Epsilon inside the LayerNorms (BERT uses 1e-12)."""
    activation: Literal["gelu", "gelu_tanh"] = "gelu"
    """MLP activation: exact GELU (BERT) or its tanh approximation."""
    pad_id: int | None = 0
    """Id of the padding token; its embedding row starts at zero and gets no gradient
    (as in BERT). None when the vocabulary has no padding token."""
    pooling: Literal["mean", "cls"] = "mean"
    """How ``pool`` makes one vector per sequence by default: the mean over non-padding
    tokens (sentence-transformers) or the first ([CLS]) token's hidden state."""
    mlm_head: bool = False
    """Carry BERT's masked-language-model head (dense, activation, LayerNorm, then the
    token embedding matrix as output projection plus a bias); see ``mlm_logits``."""
    init_std: float = 0.02
    """Standard deviation of the normal initialisation of weights (BERT's initializer_range)."""
    pooler: bool = False
    """Carry BERT's pooler: tanh(dense(hidden of [CLS])), the input of the NSP and
    sequence-classification heads (``pooled``)."""
    nsp_head: bool = False
    """Carry the next-sentence-prediction head: 2 logits (is next, is random) from the
    pooled [CLS] (``nsp_logits``); needs ``pooler``."""
    head: Literal["none", "sequence", "token", "span"] = "none"
    """A fine-tuning head (``head_logits``): ``sequence`` classification from the pooled
    [CLS] (needs ``pooler``), ``token`` classification of every position (NER), or
    ``span`` start/end logits for extractive question answering."""
    n_labels: int = 2
    """Classes of the sequence or token head."""

    def __post_init__(self):
        def bad(field: str, value, allowed: str):
            raise ConfigError(f"EncoderConfig.{field}={value!r} is invalid: {allowed}")

        for field in (
            "vocab_size",
            "d_model",
            "n_layers",
            "n_heads",
            "d_ff",
            "max_seq_len",
            "type_vocab_size",
        ):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                bad(field, value, "must be a positive integer")
        if self.d_model % self.n_heads:
            bad("n_heads", self.n_heads, f"must divide d_model={self.d_model}")
        if not 0.0 <= self.dropout < 1.0:
            bad("dropout", self.dropout, "must be in [0, 1)")
        if not self.norm_eps > 0:
            bad("norm_eps", self.norm_eps, "must be positive")
        if self.pad_id is not None and (
            isinstance(self.pad_id, bool)
            or not isinstance(self.pad_id, int)
            or not 0 <= self.pad_id < self.vocab_size
        ):
            bad("pad_id", self.pad_id, f"must be None or an id in [0, {self.vocab_size})")
        for field, allowed in (("activation", ("gelu", "gelu_tanh")), ("pooling", ("mean", "cls"))):
            if getattr(self, field) not in allowed:
                bad(field, getattr(self, field), f"choose one of {', '.join(allowed)}")
        for field in ("mlm_head", "pooler", "nsp_head"):
            if not isinstance(getattr(self, field), bool):
                bad(field, getattr(self, field), "must be true or false")
        if self.head not in ("none", "sequence", "token", "span"):
            bad("head", self.head, "choose one of none, sequence, token, span")
        if (self.nsp_head or self.head == "sequence") and not self.pooler:
            bad(
                "pooler",
                self.pooler,
                "the NSP and sequence heads read the pooled [CLS]: set pooler=true",
            )
        if (
            isinstance(self.n_labels, bool)
            or not isinstance(self.n_labels, int)
            or self.n_labels < 1
        ):
            bad("n_labels", self.n_labels, "must be a positive integer")

    @property
    def head_size(self) -> int:
        return self.d_model // self.n_heads


# ----------------------------------------------------------------------------- blocks


class Attention(nn.Module):
    """Bidirectional multi-head self-attention over the non-padding keys.

    Two paths give the same result: the fast one calls ``scaled_dot_product_attention``;
    the explicit one materialises the pattern [B, H, T, T] so that ``hook_pattern`` can read
    or edit it. The explicit path runs when ``explicit`` is set or a hook is registered on
    ``hook_pattern``.
    """

    def __init__(self, config: EncoderConfig):
        super().__init__()
        self.n_heads, self.d_head = config.n_heads, config.head_size
        d = config.d_model
        self.q_proj = nn.Linear(d, d)
        self.k_proj = nn.Linear(d, d)
        self.v_proj = nn.Linear(d, d)
        self.o_proj = nn.Linear(d, d)
        self.dropout = config.dropout
        self.explicit = False
        self.hook_q, self.hook_k, self.hook_v = HookPoint(), HookPoint(), HookPoint()
        self.hook_pattern = HookPoint()  # (B, H, T, T) softmax weights, explicit path only
        self.hook_z = HookPoint()  # (B, T, H, Dh) per-head outputs before o_proj

    def forward(self, x, bias):
        """x: [B, T, D]; bias: [B, 1, 1, T] additive (0 for real keys, very negative for
        padding keys) or None when nothing is padded."""
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.d_head).transpose(1, 2)  # (B, H, T, Dh)
        k = self.k_proj(x).view(B, T, self.n_heads, self.d_head).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.n_heads, self.d_head).transpose(1, 2)
        q, k, v = self.hook_q(q), self.hook_k(k), self.hook_v(v)
        dropout = self.dropout if self.training else 0.0
        if self.explicit or self.hook_pattern.edited():
            pattern = self.hook_pattern(self._pattern(q, k, bias))
            if dropout:
                pattern = F.dropout(pattern, dropout)
            z = pattern @ v  # (B, H, T, Dh)
        else:
            z = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=dropout)
            if self.hook_pattern._forward_hooks:  # read-only hooks: show the pattern
                self.hook_pattern(self._pattern(q, k, bias))
        z = self.hook_z(z.transpose(1, 2))  # (B, T, H, Dh)
        return self.o_proj(z.reshape(B, T, self.n_heads * self.d_head))

    def _pattern(self, q, k, bias):
        """softmax(q k^T / sqrt(Dh) + bias) over the keys: [B, H, T, T]."""
        scores = (q / math.sqrt(self.d_head)) @ k.transpose(-2, -1)  # (B, H, T, T)
        if bias is not None:
            scores = scores + bias
        return scores.float().softmax(dim=-1).to(q.dtype)


class MLP(nn.Module):
    """down(gelu(up(x)))."""

    def __init__(self, config: EncoderConfig):
        super().__init__()
        self.up_proj = nn.Linear(config.d_model, config.d_ff)
        self.down_proj = nn.Linear(config.d_ff, config.d_model)
        self.approximate = "tanh" if config.activation == "gelu_tanh" else "none"

    def forward(self, x):
        return self.down_proj(F.gelu(self.up_proj(x), approximate=self.approximate))


class Block(nn.Module):
    """Post-norm block: x = norm(x + attn(x)), then x = norm(x + mlp(x))."""

    def __init__(self, config: EncoderConfig):
        super().__init__()
        self.attn = Attention(config)
        self.attn_norm = nn.LayerNorm(config.d_model, eps=config.norm_eps)
        self.mlp = MLP(config)
        self.mlp_norm = nn.LayerNorm(config.d_model, eps=config.norm_eps)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.hook_resid_pre = HookPoint()  # (B, T, D) each
        self.hook_attn_out = HookPoint()
        self.hook_resid_mid = HookPoint()  # after the attention sub-layer's norm
        self.hook_mlp_out = HookPoint()
        self.hook_resid_post = HookPoint()  # after the MLP sub-layer's norm

    def forward(self, x, bias):
        x = self.hook_resid_pre(x)
        attn_out = self.hook_attn_out(self.attn(x, bias))
        x = self.hook_resid_mid(self.attn_norm(x + self.resid_dropout(attn_out)))
        mlp_out = self.hook_mlp_out(self.mlp(x))
        return self.hook_resid_post(self.mlp_norm(x + self.resid_dropout(mlp_out)))


class MLMHead(nn.Module):
    """BERT's masked-LM head: norm(gelu(dense(h))) @ tok_emb^T + bias -> logits [B, T, V].

    The output projection is the token embedding matrix (tied, as in BERT), passed in.
    """

    def __init__(self, config: EncoderConfig):
        super().__init__()
        self.dense = nn.Linear(config.d_model, config.d_model)
        self.norm = nn.LayerNorm(config.d_model, eps=config.norm_eps)
        self.bias = nn.Parameter(torch.zeros(config.vocab_size))
        self.approximate = "tanh" if config.activation == "gelu_tanh" else "none"

    def forward(self, hidden, embedding):
        h = self.norm(F.gelu(self.dense(hidden), approximate=self.approximate))
        return F.linear(h, embedding, self.bias)  # (B, T, V)


# ----------------------------------------------------------------------------- model


class Encoder(nn.Module):
    """Token ids [B, T] -> contextual hidden states [B, T, D] (see the module docstring)."""

    abilities = Abilities("encoder", hooks=True)

    def __init__(self, config: EncoderConfig):
        super().__init__()
        self.config = config
        self.tok_emb = nn.Embedding(config.vocab_size, config.d_model, padding_idx=config.pad_id)
        self.pos_emb = nn.Embedding(config.max_seq_len, config.d_model)
        self.type_emb = nn.Embedding(config.type_vocab_size, config.d_model)
        self.emb_norm = nn.LayerNorm(config.d_model, eps=config.norm_eps)
        self.emb_dropout = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layers))
        self.mlm = MLMHead(config) if config.mlm_head else None
        D = config.d_model
        self.pooler = nn.Linear(D, D) if config.pooler else None
        self.nsp = nn.Linear(D, 2) if config.nsp_head else None
        outputs = {"none": 0, "sequence": config.n_labels, "token": config.n_labels, "span": 2}
        self.head = nn.Linear(D, outputs[config.head]) if config.head != "none" else None
        self.head_dropout = nn.Dropout(config.dropout)
        self.hook_embed = HookPoint()  # (B, T, D) token embeddings
        self.hook_pos_embed = HookPoint()  # (B, T, D) position embeddings
        self.hook_type_embed = HookPoint()  # (B, T, D) token-type embeddings
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """BERT's initialisation: weights N(0, init_std), biases 0, norms 1, padding row 0."""
        for name, p in self.named_parameters():
            if p.dim() >= 2:
                nn.init.normal_(p, std=self.config.init_std)
            elif name.endswith("bias"):
                nn.init.zeros_(p)
            else:
                nn.init.ones_(p)
        if self.config.pad_id is not None:
            with torch.no_grad():
                self.tok_emb.weight[self.config.pad_id].zero_()

    def use_explicit_attention(self, explicit: bool = True) -> None:
        """Route attention through the path that materialises the pattern (for inspection)."""
        for block in self.blocks:
            block.attn.explicit = explicit

    def forward(
        self,
        ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """ids: [B, T] int64; attention_mask: [B, T], 1/True on real tokens and 0/False on
        padding (None: nothing is padded); token_type_ids: [B, T] int64 (None: all 0).
        -> hidden states [B, T, D].

        Padding keys are masked out, so a real token's hidden state does not depend on how
        much padding its row has; hidden states at padding positions are computed but
        meaningless (``pool`` leaves them out).
        """
        B, T = ids.shape
        if T > self.config.max_seq_len:
            raise ConfigError(
                f"sequence of {T} tokens exceeds the encoder's max_seq_len {self.config.max_seq_len}"
            )
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(ids)
        positions = torch.arange(T, device=ids.device)  # right padding: positions from 0
        x = (
            self.hook_embed(self.tok_emb(ids))
            + self.hook_pos_embed(self.pos_emb(positions).expand(B, T, -1))
            + self.hook_type_embed(self.type_emb(token_type_ids))
        )  # (B, T, D)
        x = self.emb_dropout(self.emb_norm(x))
        bias = None
        if attention_mask is not None:
            # An additive bias rather than a boolean mask: a row with no real token at all
            # then attends uniformly instead of producing NaN (BERT does the same).
            keep = attention_mask.to(torch.bool)[:, None, None, :]  # (B, 1, 1, T)
            bias = torch.zeros(keep.shape, dtype=x.dtype, device=x.device)
            bias = bias.masked_fill(~keep, torch.finfo(x.dtype).min)
        for block in self.blocks:
            x = block(x, bias)
        return x

    def mlm_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden: [B, T, D] from ``forward`` -> masked-LM logits [B, T, V]."""
        if self.mlm is None:
            raise ConfigError(
                "this encoder has no masked-LM head (EncoderConfig.mlm_head=False); build it "
                "with mlm_head=True or load a checkpoint that has one (BertForMaskedLM)"
            )
        return self.mlm(hidden, self.tok_emb.weight)

    def pooled(self, hidden: torch.Tensor) -> torch.Tensor:
        """BERT's pooled output: tanh(dense(hidden[:, 0])) -> [B, D]."""
        if self.pooler is None:
            raise ConfigError("this encoder has no pooler (EncoderConfig.pooler=False)")
        return torch.tanh(self.pooler(hidden[:, 0]))

    def nsp_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Next-sentence prediction logits [B, 2]: index 0 "B follows A", 1 "B is random"."""
        if self.nsp is None:
            raise ConfigError("this encoder has no NSP head (EncoderConfig.nsp_head=False)")
        return self.nsp(self.pooled(hidden))

    def head_logits(self, hidden: torch.Tensor):
        """The fine-tuning head on hidden states [B, T, D]: ``sequence`` -> [B, n_labels];
        ``token`` -> [B, T, n_labels]; ``span`` -> (start [B, T], end [B, T])."""
        kind = self.config.head
        if self.head is None:
            raise ConfigError(
                "this encoder has no fine-tuning head (EncoderConfig.head='none'); build it with "
                "head='sequence', 'token' or 'span'"
            )
        if kind == "sequence":
            return self.head(self.head_dropout(self.pooled(hidden)))
        if kind == "token":
            return self.head(self.head_dropout(hidden))
        start, end = self.head(hidden).unbind(dim=-1)
        return start, end


def pool(
    hidden: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    kind: Literal["mean", "cls"] = "mean",
    normalize: bool = True,
) -> torch.Tensor:
    """One vector per sequence from hidden states [B, T, D] -> [B, D].

    ``"mean"`` averages the hidden states of the real tokens (``attention_mask`` [B, T], 1
    on real tokens; None means all are real), as sentence-transformers' mean pooling does;
    ``"cls"`` takes the first token's. ``normalize`` scales each vector to unit L2 norm, so
    that dot products are cosine similarities.

        hidden [[[1, 2], [3, 4], [9, 9]]], mask [[1, 1, 0]], "mean", normalize=False -> [[2, 3]]
    """
    if kind == "mean":
        if attention_mask is None:
            pooled = hidden.mean(dim=1)
        else:
            m = attention_mask.to(hidden.dtype)[..., None]  # (B, T, 1)
            # clamp as sentence-transformers does: an all-padding row gives 0, not NaN
            pooled = (hidden * m).sum(dim=1) / m.sum(dim=1).clamp(min=1e-9)
    elif kind == "cls":
        pooled = hidden[:, 0]
    else:
        raise ConfigError(f"pooling kind {kind!r} is invalid: choose one of mean, cls")
    return F.normalize(pooled, p=2, dim=-1) if normalize else pooled  # (B, D)


register_family("encoder", EncoderConfig, Encoder)
