"""A toy model family for the trainer tests: embedding -> LayerNorm -> dropout -> linear
(with bias) -> output layer, a bigram model that learns ``next = token + 1`` in a few steps.
"""

from dataclasses import dataclass

import pytest
import torch
from torch import nn

from lmlab.models import build_model, registry


@dataclass(frozen=True)
class ToyConfig:
    vocab_size: int = 16
    d_model: int = 8
    max_seq_len: int = 16
    dropout: float = 0.0


class Toy(nn.Module):
    def __init__(self, config: ToyConfig):
        super().__init__()
        self.config = config
        self.emb = nn.Embedding(config.vocab_size, config.d_model)
        self.norm = nn.LayerNorm(config.d_model)
        self.drop = nn.Dropout(config.dropout)
        self.proj = nn.Linear(config.d_model, config.d_model)
        self.head = nn.Linear(config.d_model, config.vocab_size, bias=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.emb(ids)  # (B, T, D)
        x = x + torch.tanh(self.proj(self.drop(self.norm(x))))
        return self.head(x)  # (B, T, V)


@pytest.fixture
def make_toy(monkeypatch):
    """``make_toy(dropout=0.0, seed=0)``: a freshly initialised toy model (registered)."""
    monkeypatch.setitem(registry._FAMILIES, "toy", (ToyConfig, Toy))

    def make(dropout: float = 0.0, seed: int = 0) -> nn.Module:
        torch.manual_seed(seed)
        return build_model({"family": "toy", "dropout": dropout})

    return make
