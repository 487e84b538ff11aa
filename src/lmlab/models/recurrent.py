"""Recurrent language models: Elman RNN, GRU and LSTM, behind one config.

- ``rnn``: Elman (1990), "Finding Structure in Time": ``h_t = tanh(W_ih x_t + W_hh h_{t-1} + b)``.
- ``lstm``: Hochreiter & Schmidhuber (1997), "Long Short-Term Memory", with the forget gate
  of Gers, Schmidhuber & Cummins (2000): the cell state ``c`` is carried forward
  multiplied by the forget gate instead of squashed through a weight matrix, which is what
  lets gradients survive many steps.
- ``gru``: Cho et al. (2014), "Learning Phrase Representations using RNN Encoder-Decoder":
  reset and update gates, no separate cell state.

Each cell is written out below with its gates named as in the papers, and the same
parameters also run through torch's fused ``nn.RNN`` / ``nn.GRU`` / ``nn.LSTM`` (the fast
path, ``fused=True``). The parameters live in that torch module, in its layout
(``rnn.weight_ih_l{k}``, ``rnn.weight_hh_l{k}``, ``rnn.bias_ih_l{k}``, ``rnn.bias_hh_l{k}``;
gate order LSTM i, f, g, o and GRU r, z, n), so both paths read the same tensors and
``model.rnn.state_dict()`` loads into a plain torch module. The explicit path runs when
``fused=False``, when a ``layers.{k}.hook_hidden`` hook is registered (the fused module
hides the lower layers' outputs), and when a ``mask`` has any False (torch's modules
cannot hold the state through left padding). ``hidden_state_grad_norms`` uses it to show
vanishing gradients.

Parity: ``tests/models/test_recurrent.py`` checks the explicit cells against torch's fused
modules (float32, atol 1e-5), with and without a cache carried across calls.

Shapes: B batch, T tokens, V vocabulary, H d_model (embedding and hidden size),
L n_layers.
"""

from __future__ import annotations

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
class RecurrentConfig:
    vocab_size: int
    """Number of token ids."""
    cell: Literal["rnn", "gru", "lstm"] = "lstm"
    """Elman RNN (tanh), GRU or LSTM."""
    d_model: int = 128
    """Embedding size and hidden-state size (one width throughout, as in the transformer)."""
    n_layers: int = 1
    """Stacked recurrent layers; layer k reads layer k-1's hidden states."""
    dropout: float = 0.0
    """Dropout on the embeddings, between layers and before the output while training."""
    fused: bool = True
    """Run through torch's fused nn.RNN/GRU/LSTM (fast); False runs the explicit cells."""
    forget_bias: float = 1.0
    """LSTM only: initial forget-gate bias. 1 (Gers et al. 2000; Jozefowicz et al. 2015)
    starts the cell remembering (sigmoid(1) = 0.73) rather than half-forgetting each step."""

    def __post_init__(self):
        def bad(field: str, value, allowed: str):
            raise ConfigError(f"RecurrentConfig.{field}={value!r} is invalid: {allowed}")

        for field in ("vocab_size", "d_model", "n_layers"):
            value = getattr(self, field)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                bad(field, value, "must be a positive integer")
        if self.cell not in ("rnn", "gru", "lstm"):
            bad("cell", self.cell, "choose one of rnn, gru, lstm")
        if not isinstance(self.dropout, (int, float)) or not 0.0 <= self.dropout < 1.0:
            bad("dropout", self.dropout, "must be in [0, 1)")
        if not isinstance(self.fused, bool):
            bad("fused", self.fused, "must be true or false")
        if not isinstance(self.forget_bias, (int, float)) or isinstance(self.forget_bias, bool):
            bad("forget_bias", self.forget_bias, "must be a number")

    @property
    def max_seq_len(self) -> None:
        return None  # the state carries any length forward


# ----------------------------------------------------------------------------- cache


class RecurrentCache:
    """The state after the tokens seen so far: ``h`` [L, B, H] (and ``c`` [L, B, H], LSTM).

    Unlike a KV cache it does not grow: the whole past is summarised in the state.
    """

    def __init__(self, h: torch.Tensor, c: torch.Tensor | None):
        self.h, self.c = h, c
        self.length = 0

    def reorder(self, index: torch.Tensor) -> None:
        """Keep (or repeat) batch rows ``index`` [B'], e.g. the surviving beams."""
        self.h = self.h.index_select(1, index)
        if self.c is not None:
            self.c = self.c.index_select(1, index)


# ----------------------------------------------------------------------------- cells
# Each cell takes the input projection gi = W_ih x_t + b_ih and the recurrent projection
# gh = W_hh h_{t-1} + b_hh, both [B, G*H] for G gates in torch's order, and the old state.


def rnn_cell(gi, gh, h):
    """Elman: h_t = tanh(W_ih x_t + b_ih + W_hh h_{t-1} + b_hh)."""
    return torch.tanh(gi + gh), None


def lstm_cell(gi, gh, h, c):
    """LSTM with a forget gate; gates in torch's order i, f, g, o."""
    i, f, g, o = (gi + gh).chunk(4, dim=-1)  # (B, H) each
    input_gate = torch.sigmoid(i)  # how much of the candidate to write
    forget_gate = torch.sigmoid(f)  # how much of the old cell to keep (Gers et al. 2000)
    candidate = torch.tanh(g)  # the new content, g in torch, c~ in the papers
    output_gate = torch.sigmoid(o)  # how much of the cell to expose as h
    c = forget_gate * c + input_gate * candidate  # additive update: the gradient highway
    return output_gate * torch.tanh(c), c


def gru_cell(gi, gh, h):
    """GRU; gates in torch's order r, z, n. The reset gate multiplies W_hn h + b_hn (torch's
    and cuDNN's variant; Cho et al. apply it to h before the matrix)."""
    i_r, i_z, i_n = gi.chunk(3, dim=-1)  # (B, H) each
    h_r, h_z, h_n = gh.chunk(3, dim=-1)
    reset = torch.sigmoid(i_r + h_r)  # how much of the past the candidate may read
    update = torch.sigmoid(i_z + h_z)  # how much of the old state to keep
    candidate = torch.tanh(i_n + reset * h_n)
    return (1 - update) * candidate + update * h, None


CELLS = {"rnn": rnn_cell, "gru": gru_cell, "lstm": lstm_cell}
FUSED = {"rnn": nn.RNN, "gru": nn.GRU, "lstm": nn.LSTM}


class LayerHooks(nn.Module):
    """Hook points of one recurrent layer, so they are named ``layers.{k}.hook_hidden``."""

    def __init__(self):
        super().__init__()
        self.hook_hidden = HookPoint()  # (B, T, H) the layer's hidden state at every step


# ----------------------------------------------------------------------------- model


class RecurrentLM(nn.Module):
    """Token ids [B, T] -> next-token logits [B, T, V] through a stack of recurrent layers."""

    abilities = Abilities("causal_lm", cache=True, hooks=True)

    def __init__(self, config: RecurrentConfig):
        super().__init__()
        self.config = config
        H, L = config.d_model, config.n_layers
        self.tok_emb = nn.Embedding(config.vocab_size, H)
        # torch warns about inter-layer dropout with one layer, where it does nothing anyway.
        self.rnn = FUSED[config.cell](
            H, H, L, batch_first=True, dropout=config.dropout if L > 1 else 0.0
        )
        self.dropout = nn.Dropout(config.dropout)
        self.lm_head = nn.Linear(H, config.vocab_size)
        self.hook_embed = HookPoint()  # (B, T, H) token embeddings
        self.layers = nn.ModuleList(LayerHooks() for _ in range(L))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """torch's defaults (uniform in +-1/sqrt(H) for the recurrent weights), and for the
        LSTM the forget-gate bias set to ``forget_bias`` (split as all on bias_ih)."""
        self.rnn.reset_parameters()
        if self.config.cell == "lstm":
            H = self.config.d_model
            with torch.no_grad():
                for k in range(self.config.n_layers):
                    getattr(self.rnn, f"bias_ih_l{k}")[H : 2 * H] = self.config.forget_bias
                    getattr(self.rnn, f"bias_hh_l{k}")[H : 2 * H] = 0.0

    def new_cache(self, batch_size: int, max_len: int | None = None, dtype=None) -> RecurrentCache:
        """A zero state for ``batch_size`` rows; ``max_len`` is accepted and ignored (the
        state does not grow)."""
        param = self.lm_head.weight
        shape = (self.config.n_layers, batch_size, self.config.d_model)  # (L, B, H)
        h = torch.zeros(shape, dtype=dtype or param.dtype, device=param.device)
        return RecurrentCache(h, torch.zeros_like(h) if self.config.cell == "lstm" else None)

    def forward(
        self,
        ids: torch.Tensor,
        cache: RecurrentCache | None = None,
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """ids: [B, T] int64; mask: [B, T] bool, False on left padding -> logits [B, T, V].

        With a cache, ``ids`` continue the sequences it holds, and the cache is updated.
        Masked positions leave the state unchanged, so a left-padded row equals the row alone.
        """
        x = self.dropout(self.hook_embed(self.tok_emb(ids)))  # (B, T, H)
        state = None if cache is None else (cache.h, cache.c)
        if mask is not None:
            mask = mask.bool()
            if bool(mask.all()):
                mask = None  # nothing masked: the fused path is still right
        out, (h, c) = self._run(x, state, mask)
        if cache is not None:
            cache.h, cache.c = h, c
            cache.length += ids.shape[1]
        return self.lm_head(self.dropout(out))  # (B, T, V)

    def _run(self, x, state, mask, record: list | None = None):
        """-> (top layer's hidden states [B, T, H], (h [L, B, H], c [L, B, H] or None))."""
        if not self.config.fused or mask is not None or record is not None:
            return self._explicit(x, state, mask, record)
        if any(layer.hook_hidden._forward_hooks for layer in self.layers[:-1]):
            return self._fused_by_layer(x, state)
        return self._fused(x, state)

    def _fused(self, x, state):
        if state is not None and self.config.cell != "lstm":
            state = state[0]  # nn.RNN / nn.GRU take h alone; nn.LSTM the (h, c) pair
        out, final = self.rnn(x, state)  # out (B, T, H)
        h, c = final if self.config.cell == "lstm" else (final, None)
        out = self.layers[-1].hook_hidden(out)
        return out, (h, c)

    def _fused_by_layer(self, x, state):
        """The fused kernel one layer at a time, so each layer's hook sees (and may edit) its
        hidden states: the same numbers, to the bit, as the stacked call."""
        lstm, L = self.config.cell == "lstm", self.config.n_layers
        single = FUSED[self.config.cell](
            self.config.d_model, self.config.d_model, 1, batch_first=True
        )
        finals_h, finals_c = [], []
        for k in range(L):
            params = {
                f"{name}_l0": getattr(self.rnn, f"{name}_l{k}")
                for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")
            }
            layer_state = None
            if state is not None:
                layer_state = (
                    (state[0][k : k + 1], state[1][k : k + 1]) if lstm else state[0][k : k + 1]
                )
            x, final = torch.func.functional_call(single, params, (x, layer_state))
            h, c = final if lstm else (final, None)
            finals_h.append(h[0])
            finals_c.append(c[0] if lstm else None)
            x = self.layers[k].hook_hidden(x)  # (B, T, H)
            if k < L - 1:
                x = F.dropout(x, self.config.dropout, self.training)  # as torch's modules do
        c_out = torch.stack(finals_c) if lstm else None
        return x, (torch.stack(finals_h), c_out)

    def _explicit(self, x, state, mask, record):
        """The cells applied step by step, layer by layer. ``record``, if a list, receives the
        top layer's hidden state [B, H] at every step (for gradient diagnostics)."""
        B, T, H = x.shape
        L = self.config.n_layers
        lstm = self.config.cell == "lstm"
        cell = CELLS[self.config.cell]
        if state is None:
            h0 = x.new_zeros(L, B, H)
            state = (h0, torch.zeros_like(h0) if lstm else None)
        finals_h, finals_c = [], []
        for k in range(L):
            w_ih, w_hh = getattr(self.rnn, f"weight_ih_l{k}"), getattr(self.rnn, f"weight_hh_l{k}")
            b_ih, b_hh = getattr(self.rnn, f"bias_ih_l{k}"), getattr(self.rnn, f"bias_hh_l{k}")
            # The input projection does not depend on the state: one matmul for all steps.
            gi_all = F.linear(x, w_ih, b_ih)  # (B, T, G*H)
            h = state[0][k]  # (B, H)
            c = state[1][k] if lstm else None
            outputs = []
            for t in range(T):
                gh = F.linear(h, w_hh, b_hh)  # (B, G*H)
                h_new, c_new = cell(gi_all[:, t], gh, h, c) if lstm else cell(gi_all[:, t], gh, h)
                if mask is not None:  # padding: keep the old state
                    keep = mask[:, t, None]  # (B, 1)
                    h_new = torch.where(keep, h_new, h)
                    if lstm:
                        c_new = torch.where(keep, c_new, c)
                h, c = h_new, c_new
                outputs.append(h)
                if record is not None and k == L - 1:
                    record.append(h)
            finals_h.append(h)
            finals_c.append(c)
            x = self.layers[k].hook_hidden(torch.stack(outputs, dim=1))  # (B, T, H)
            if k < L - 1:
                x = F.dropout(x, self.config.dropout, self.training)  # as torch's modules do
        c_out = torch.stack(finals_c) if lstm else None
        return x, (torch.stack(finals_h), c_out)  # (B, T, H), ((L, B, H), (L, B, H))


def hidden_state_grad_norms(
    model: RecurrentLM, ids: torch.Tensor, target: torch.Tensor | None = None
) -> torch.Tensor:
    """||d loss_T / d h_t|| for every step t: the vanishing-gradient picture.

    ids: [B, T] int64; target: [B] int64, the token the last position is scored against
    (default: each row's first token; any fixed target will do, the picture is how the
    gradient's size shrinks going back in time). loss_T is the summed cross-entropy of the
    last position's logits; h_t is the top layer's hidden state [B, H] after step t, and the
    norm is taken over the whole batch. Runs the explicit cells in eval mode (no dropout).
    -> [T] in the parameters' dtype.

    For an Elman RNN the norms shrink roughly geometrically with T - t (at T=100 the early
    ones can fall below float32's range: run the model in float64 to measure them); an
    LSTM's additive cell update, scaled by a forget gate near 1, keeps them much larger.
    """
    was_training = model.training
    model.eval()
    try:
        steps: list[torch.Tensor] = []
        with torch.enable_grad():
            x = model.tok_emb(ids)  # (B, T, H)
            out, _ = model._run(x, None, None, record=steps)
            logits = model.lm_head(out[:, -1])  # (B, V)
            target = ids[:, 0] if target is None else target
            loss = F.cross_entropy(logits, target, reduction="sum")
            # autograd.grad rather than retain_grad + backward: the parameters' .grad stay
            # untouched, so the diagnostic can run in the middle of training.
            grads = torch.autograd.grad(loss, steps)  # T tensors (B, H)
        return torch.stack([g.norm() for g in grads])  # (T,)
    finally:
        model.train(was_training)


register_family("recurrent", RecurrentConfig, RecurrentLM)
