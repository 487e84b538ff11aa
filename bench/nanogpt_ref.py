"""A faithful float32 reimplementation of nanoGPT's documented CPU run, the reference that
bench/train_to_loss.py races against.

nanoGPT's README, "I only have a MacBook" (config/train_shakespeare_char.py with the
command-line overrides it gives): character-level Tiny Shakespeare, the first 90% of the
text for training and the last 10% for validation; 4 layers, 4 heads, 128 wide, block 64,
no biases, no dropout, exact GELU, tied input/output embeddings, weights N(0, 0.02) with the
residual projections at 0.02 / sqrt(2 n_layer); batch 12 of random windows; AdamW
(betas 0.9 / 0.99, weight decay 0.1 on the matrices only), lr 1e-3 with 100 linear warm-up
steps then cosine to 1e-4 at step 2000; gradient norm clipped at 1.0; 2000 iterations.
It reaches a validation loss of about 1.88.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class NanoConfig:
    vocab_size: int
    block_size: int = 64
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    batch_size: int = 12
    max_iters: int = 2000
    learning_rate: float = 1e-3
    min_lr: float = 1e-4
    warmup_iters: int = 100
    lr_decay_iters: int = 2000
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.99
    grad_clip: float = 1.0


class Block(nn.Module):
    def __init__(self, c: NanoConfig):
        super().__init__()
        d = c.n_embd
        self.n_head = c.n_head
        self.ln_1 = nn.LayerNorm(d, bias=False)
        self.c_attn = nn.Linear(d, 3 * d, bias=False)
        self.attn_proj = nn.Linear(d, d, bias=False)
        self.ln_2 = nn.LayerNorm(d, bias=False)
        self.c_fc = nn.Linear(d, 4 * d, bias=False)
        self.mlp_proj = nn.Linear(4 * d, d, bias=False)

    def forward(self, x):
        B, T, D = x.shape
        q, k, v = self.c_attn(self.ln_1(x)).split(D, dim=2)
        q, k, v = (t.view(B, T, self.n_head, D // self.n_head).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.attn_proj(y.transpose(1, 2).reshape(B, T, D))
        return x + self.mlp_proj(F.gelu(self.c_fc(self.ln_2(x))))


class NanoGPT(nn.Module):
    def __init__(self, c: NanoConfig):
        super().__init__()
        self.wte = nn.Embedding(c.vocab_size, c.n_embd)
        self.wpe = nn.Embedding(c.block_size, c.n_embd)
        self.h = nn.ModuleList(Block(c) for _ in range(c.n_layer))
        self.ln_f = nn.LayerNorm(c.n_embd, bias=False)
        self.lm_head = nn.Linear(c.n_embd, c.vocab_size, bias=False)
        self.wte.weight = self.lm_head.weight
        for name, p in self.named_parameters():
            if p.dim() == 2:
                std = 0.02 / math.sqrt(2 * c.n_layer) if name.endswith("proj.weight") else 0.02
                nn.init.normal_(p, 0.0, std)

    def forward(self, idx):
        x = self.wte(idx) + self.wpe(torch.arange(idx.shape[1]))
        for block in self.h:
            x = block(x)
        return self.lm_head(self.ln_f(x))


def lr_at(it: int, c: NanoConfig) -> float:
    if it < c.warmup_iters:
        return c.learning_rate * (it + 1) / (c.warmup_iters + 1)
    if it > c.lr_decay_iters:
        return c.min_lr
    ratio = (it - c.warmup_iters) / (c.lr_decay_iters - c.warmup_iters)
    return c.min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (c.learning_rate - c.min_lr)


def train_nanogpt(train_ids: torch.Tensor, c: NanoConfig, seed: int = 1337, on_eval=None):
    """Train as nanoGPT does; returns (model, seconds of training steps).

    ``on_eval(model, iteration)`` is called every 250 iterations and at the end, outside the
    timed part (nanoGPT evaluates at the same points)."""
    torch.manual_seed(seed)
    model = NanoGPT(c)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    other = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": c.weight_decay}, {"params": other, "weight_decay": 0}],
        lr=c.learning_rate,
        betas=(c.beta1, c.beta2),
    )
    seconds = 0.0
    for it in range(c.max_iters):
        if on_eval and it % 250 == 0 and it:
            on_eval(model, it)
        start = time.perf_counter()
        for group in opt.param_groups:
            group["lr"] = lr_at(it, c)
        ix = torch.randint(len(train_ids) - c.block_size, (c.batch_size,))
        x = torch.stack([train_ids[i : i + c.block_size] for i in ix])
        y = torch.stack([train_ids[i + 1 : i + 1 + c.block_size] for i in ix])
        loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), c.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        seconds += time.perf_counter() - start
    if on_eval:
        on_eval(model, c.max_iters)
    return model, seconds
