"""Vanishing gradients in recurrent networks, measured and plotted.

For a loss at the last step T, the gradient reaching the hidden state h_t is
``dL/dh_t = dL/dh_T * prod_{s=t+1..T} dh_s/dh_{s-1}``. In an Elman RNN every factor is
``diag(1 - h_s^2) W_hh``, so the product shrinks roughly geometrically with T - t
(Bengio, Simard & Frasconi 1994; Pascanu, Mikolov & Bengio 2013). An LSTM carries its cell
state forward additively, scaled by a forget gate near 1, so far more of the gradient
survives (Hochreiter & Schmidhuber 1997). ``hidden_state_grad_norms`` in
``lmlab.models.recurrent`` measures ``||dL/dh_t||``; this module runs it for several cells
on the same random sequence and draws the picture; ``trained_gradients`` measures trained
recurrent runs on text. ``lmlab gradients`` (``lmlab.cli.gradients``) is the command.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from lmlab.errors import ConfigError, DataError
from lmlab.fileio import atomic_write_with
from lmlab.lm import load
from lmlab.models import build_model
from lmlab.models.recurrent import RecurrentLM, hidden_state_grad_norms


def vanishing_gradients(
    cells: tuple[str, ...] = ("rnn", "gru", "lstm"),
    seq_len: int = 100,
    vocab_size: int = 65,
    d_model: int = 128,
    batch_size: int = 8,
    seed: int = 0,
    forget_bias: float = 1.0,
) -> dict[str, torch.Tensor]:
    """cell -> ``||dL_T/dh_t||`` for t = 0..seq_len-1, float64 [seq_len], for freshly
    initialised one-layer models on the same random token sequence. ``forget_bias`` is the
    LSTM's initial forget-gate bias (``RecurrentConfig``).

    Float64 because the RNN's early gradients fall below float32's range at T = 100.
    """
    _check_sizes(seq_len=seq_len, batch_size=batch_size, vocab_size=vocab_size)
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab_size, (batch_size, seq_len), generator=g)
    norms = {}
    for cell in cells:
        torch.manual_seed(seed)
        spec = dict(family="recurrent", vocab_size=vocab_size, cell=cell, d_model=d_model)
        if cell == "lstm":
            spec["forget_bias"] = forget_bias
        model = build_model(spec).double()
        norms[cell] = hidden_state_grad_norms(model, ids).detach()
    return norms


def _check_sizes(**sizes: int) -> None:
    """seq_len and vocab_size at least 2 (a first and a last step, two tokens to draw),
    batch_size at least 1."""
    for name, value in sizes.items():
        low = 1 if name == "batch_size" else 2
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ConfigError(f"{name}={value!r} is invalid: must be an integer >= {low}")


def trained_gradients(
    models: dict[str, str | os.PathLike],
    text: str,
    seq_len: int = 100,
    batch_size: int = 8,
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """name -> ``||dL_T/dh_t||`` (float64 [seq_len]) of each trained recurrent model (a run
    or checkpoint folder, anything ``lmlab.load`` reads), on ``batch_size`` windows of
    ``seq_len`` tokens of ``text`` at seeded random offsets, in each model's tokenizer. The
    loss is the cross-entropy of the token that follows each window."""
    _check_sizes(seq_len=seq_len, batch_size=batch_size)
    norms = {}
    for name, path in models.items():
        lm = load(path, dtype="float32")
        if not isinstance(lm.model, RecurrentLM):
            kind = type(lm.model).__name__
            raise ConfigError(
                f"model {str(path)!r} is a {kind}: gradients measures recurrent models "
                "(rnn-char, gru-char, lstm-char runs)"
            )
        ids = torch.as_tensor(lm._text("gradients").encode(text), dtype=torch.long)
        if len(ids) < seq_len + 1:
            raise DataError(
                f"the text is {len(ids)} tokens for {name!r}: need at least seq_len + 1 = "
                f"{seq_len + 1}"
            )
        g = torch.Generator().manual_seed(seed)
        starts = torch.randint(0, len(ids) - seq_len, (batch_size,), generator=g)
        windows = torch.stack([ids[s : s + seq_len + 1] for s in starts.tolist()])
        model = lm.model.double()
        norms[name] = hidden_state_grad_norms(model, windows[:, :-1], windows[:, -1]).detach()
    return norms


def plot_vanishing_gradients(
    png: str | os.PathLike,
    norms: dict[str, torch.Tensor] | None = None,
    title: str = "Gradient reaching each hidden state (fresh models, random tokens)",
    **kwargs,
) -> dict[str, torch.Tensor]:
    """Plot ``norms`` (default: ``vanishing_gradients(**kwargs)``) on a log scale, relative
    to the last step, and save it as ``png``. Returns the norms."""
    from matplotlib.figure import Figure  # deferred: slow to import, only for plots

    norms = vanishing_gradients(**kwargs) if norms is None else norms
    fig = Figure(figsize=(6.4, 4))
    ax = fig.add_subplot()
    for cell, n in norms.items():
        T = len(n)
        # distance back from the loss on the x axis; 1e-300 keeps log(0) off the plot
        label = cell.upper() if cell in ("rnn", "gru", "lstm") else cell
        ax.semilogy(range(T - 1, -1, -1), (n / n[-1]).clamp_min(1e-300).numpy(), label=label)
    ax.set_xlabel("steps back from the loss (T - t)")
    ax.set_ylabel("||dL/dh_t|| / ||dL/dh_T||")
    ax.set_title(title)
    ax.grid(True, which="major", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    Path(png).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_with(png, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    return norms
