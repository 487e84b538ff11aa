"""Vanishing gradients in recurrent networks, measured and plotted.

For a loss at the last step T, the gradient reaching the hidden state h_t is
``dL/dh_t = dL/dh_T * prod_{s=t+1..T} dh_s/dh_{s-1}``. In an Elman RNN every factor is
``diag(1 - h_s^2) W_hh``, so the product shrinks roughly geometrically with T - t
(Bengio, Simard & Frasconi 1994; Pascanu, Mikolov & Bengio 2013). An LSTM carries its cell
state forward additively, scaled by a forget gate near 1, so far more of the gradient
survives (Hochreiter & Schmidhuber 1997). ``hidden_state_grad_norms`` in
``lmlab.models.recurrent`` measures ``||dL/dh_t||``; this module runs it for several cells
on the same random sequence and draws the picture.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from lmlab.models import build_model
from lmlab.models.recurrent import hidden_state_grad_norms


def vanishing_gradients(
    cells: tuple[str, ...] = ("rnn", "gru", "lstm"),
    seq_len: int = 100,
    vocab_size: int = 65,
    d_model: int = 128,
    batch_size: int = 8,
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """cell -> ``||dL_T/dh_t||`` for t = 0..seq_len-1, float64 [seq_len], for freshly
    initialised one-layer models on the same random token sequence.

    Float64 because the RNN's early gradients fall below float32's range at T = 100.
    """
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab_size, (batch_size, seq_len), generator=g)
    norms = {}
    for cell in cells:
        torch.manual_seed(seed)
        spec = dict(family="recurrent", vocab_size=vocab_size, cell=cell, d_model=d_model)
        model = build_model(spec).double()
        norms[cell] = hidden_state_grad_norms(model, ids).detach()
    return norms


def plot_vanishing_gradients(png: str | os.PathLike, **kwargs) -> dict[str, torch.Tensor]:
    """Plot ``vanishing_gradients(**kwargs)`` on a log scale, relative to the last step, and
    save it as ``png``. Returns the norms."""
    from matplotlib.figure import Figure  # deferred: slow to import, only for plots

    norms = vanishing_gradients(**kwargs)
    fig = Figure(figsize=(6.4, 4))
    ax = fig.add_subplot()
    for cell, n in norms.items():
        T = len(n)
        # distance back from the loss on the x axis; 1e-300 keeps log(0) off the plot
        ax.semilogy(range(T - 1, -1, -1), (n / n[-1]).clamp_min(1e-300).numpy(), label=cell.upper())
    ax.set_xlabel("steps back from the loss (T - t)")
    ax.set_ylabel("||dL/dh_t|| / ||dL/dh_T||")
    ax.set_title("Gradient reaching each hidden state (fresh models, random tokens)")
    ax.grid(True, which="major", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    Path(png).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=100)
    return norms
