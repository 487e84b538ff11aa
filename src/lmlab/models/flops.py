"""Parameters and training FLOPs per token of a decoder transformer, counted from its config.

Two published ways of counting, for a model of ``L`` layers, width ``d``, attention width
``d_attn = H * Dh``, MLP width ``f``, vocabulary ``V``, trained on sequences of ``T`` tokens:

**Kaplan et al. 2020** (table 1): the forward pass costs ``2 N + 2 L T d_attn`` per token,
``N`` the non-embedding parameters (each weight is one multiply-add, and the attention
logits ``q k^T`` add ``2 L T d_attn``); the backward pass costs twice the forward, so

    C_kaplan = 6 N + 6 L T d_attn                       per training token

Kaplan's ``N = 2 d L (2 d_attn + f)`` leaves out biases and norms; here ``N`` is the exact
count of every non-embedding parameter (so ``N`` equals the model's ``numel`` minus its
embedding tables). Pearce and Song 2024 show that this choice (embeddings out) is what
moves Kaplan's compute-optimal exponent away from Chinchilla's, so both are offered:
``embeddings=True`` counts ``6 N_total`` (embeddings included) instead of ``6 N``.
Embedding parameters are the token table, the learned position table and an untied
output projection.

**Hoffmann et al. 2022** (Chinchilla, appendix F) count every matrix product of one
sequence, embeddings included, and the softmax:

    embeddings          2 T V d
    per layer  q, k, v  2 T d (H + 2 Hkv) Dh           (3 T d d_attn when Hkv = H)
               q k^T    2 T T d_attn
               softmax  3 H T T
               weights  2 T T d_attn                  (softmax @ values)
               output   2 T d_attn d
               MLP      2 T (2 d f)                   (2 T (3 d f) for SwiGLU: gate, up, down)
    logits              2 T d V
    forward = embeddings + L (attention + MLP) + logits;  training = 3 forward

    C_chinchilla = 3 forward / T                       per training token

(The grouped-query and SwiGLU terms generalise the paper's counts, which had neither.)
Both counts treat the attention as full ``T x T``, as both papers do, although a causal
mask leaves half of it unused.

>>> config = TransformerConfig(vocab_size=65, d_model=192, n_layers=4, n_heads=6, d_ff=768)
>>> count_parameters(config).non_embedding              # gpt-char-tiny
1779840
>>> kaplan_flops_per_token(config, seq_len=128)          # 6 * 1779840 + 6 * 4 * 128 * 192
11268864.0
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from lmlab.models.transformer import Transformer, TransformerConfig


@dataclass(frozen=True)
class ParameterCount:
    total: int
    """Every parameter (a tied output projection counted once), = sum(p.numel())."""
    embedding: int
    """Token table, learned position table and an untied output projection."""

    @property
    def non_embedding(self) -> int:
        """Kaplan's N: every parameter outside the embedding tables."""
        return self.total - self.embedding


def count_parameters(config: TransformerConfig) -> ParameterCount:
    """The parameters of ``Transformer(config)``, from its config alone."""
    d, f, V = config.d_model, config.d_ff, config.vocab_size
    H, Hkv, Dh = config.n_heads, config.kv_heads, config.head_size
    qkv_bias = config.bias if config.qkv_bias is None else config.qkv_bias
    norm = d * (2 if config.norm == "layernorm" and config.bias else 1)  # weight (+ bias)
    attention = d * (H + 2 * Hkv) * Dh + H * Dh * d  # q, k, v and output weights
    attention += (H + 2 * Hkv) * Dh * qkv_bias + d * config.bias
    n_in = 2 if config.mlp == "swiglu" else 1  # gate and up, or up alone
    mlp = n_in * (d * f + f * config.bias) + f * d + d * config.bias
    block = 2 * norm + attention + mlp
    embedding = V * d + (config.max_seq_len * d if config.pos == "learned" else 0)
    embedding += 0 if config.tie_embeddings else V * d
    return ParameterCount(total=embedding + config.n_layers * block + norm, embedding=embedding)


def kaplan_flops_per_token(
    config: TransformerConfig, seq_len: int, embeddings: bool = False
) -> float:
    """Training FLOPs per token as Kaplan et al. 2020 count them: 6 N + 6 L T d_attn, with N
    the non-embedding parameters (``embeddings=True``: all parameters)."""
    counts = count_parameters(config)
    n = counts.total if embeddings else counts.non_embedding
    d_attn = config.n_heads * config.head_size
    return 6.0 * n + 6.0 * config.n_layers * seq_len * d_attn


def chinchilla_flops_per_token(config: TransformerConfig, seq_len: int) -> float:
    """Training FLOPs per token as Hoffmann et al. 2022 (appendix F) count them (module doc)."""
    T, d, f, V = seq_len, config.d_model, config.d_ff, config.vocab_size
    H, Hkv, Dh = config.n_heads, config.kv_heads, config.head_size
    d_attn = H * Dh
    attention = (
        2 * T * d * (H + 2 * Hkv) * Dh  # q, k, v projections
        + 2 * T * T * d_attn  # q k^T logits
        + 3 * H * T * T  # softmax
        + 2 * T * T * d_attn  # softmax @ values
        + 2 * T * d_attn * d  # output projection
    )
    mlp = 2 * T * (3 if config.mlp == "swiglu" else 2) * d * f
    embed = logits = 2 * T * V * d
    forward = embed + config.n_layers * (attention + mlp) + logits
    return 3.0 * forward / T


def training_flops_per_token(model: nn.Module, seq_len: int) -> float | None:
    """What the trainer logs: Chinchilla's count for a decoder transformer whose every
    parameter trains, else None (other families, and frozen weights as under LoRA, whose
    backward pass skips the weight gradients, are not counted)."""
    if not isinstance(model, Transformer):
        return None
    if not all(p.requires_grad for p in model.parameters()):
        return None
    return chinchilla_flops_per_token(model.config, seq_len)
