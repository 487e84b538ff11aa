"""``lmlab gradients``: the vanishing gradient of recurrent networks, measured
(``lmlab.interp.gradients``): the gradient of the last step's loss that reaches each
hidden state of a fresh RNN, GRU and LSTM, or of trained recurrent runs (``--models``).

lmlab gradients --out runs/gradients
lmlab gradients --models runs/rnn,runs/lstm --out runs/gradients-trained
"""

from __future__ import annotations

from pathlib import Path

from jsonargparse import ArgumentParser

from lmlab.data.corpus import load_corpus
from lmlab.errors import ConfigError
from lmlab.fileio import atomic_write_json
from lmlab.interp.gradients import plot_vanishing_gradients, trained_gradients, vanishing_gradients

CELLS = ("rnn", "gru", "lstm")


def add_arguments(parser: ArgumentParser) -> None:
    parser.add_argument("--out", type=str, default="runs/gradients", help="folder for the results")
    parser.add_argument(
        "--cells", type=str, default="rnn,gru,lstm", help="fresh models: comma-separated cells"
    )
    parser.add_argument(
        "--models",
        type=str,
        default=None,
        help="trained recurrent runs instead (comma-separated folders), measured on --data",
    )
    parser.add_argument(
        "--data", type=str, default="tinyshakespeare", help="text for --models: corpus or file"
    )
    parser.add_argument("--seq_len", type=int, default=100, help="steps back from the loss")
    parser.add_argument("--d_model", type=int, default=128, help="hidden size of fresh models")
    parser.add_argument("--batch_size", type=int, default=8, help="sequences measured together")
    parser.add_argument(
        "--forget_bias", type=float, default=1.0, help="the fresh LSTM's forget-gate bias"
    )
    parser.add_argument("--seed", type=int, default=0, help="tokens and initial weights")


def run(args) -> None:
    out = Path(args.out)
    if args.models:
        paths = [m.strip() for m in args.models.split(",") if m.strip()]
        names = [Path(p).name or p for p in paths]
        if len(set(names)) != len(names):
            names = paths
        norms = trained_gradients(
            dict(zip(names, paths)), load_corpus(args.data), args.seq_len, args.batch_size,
            args.seed,
        )  # fmt: skip
        title = "Gradient reaching each hidden state (trained models, real text)"
    else:
        cells = tuple(c.strip() for c in args.cells.split(",") if c.strip())
        bad = [c for c in cells if c not in CELLS]
        if bad or not cells:
            raise ConfigError(f"cells={args.cells!r} is invalid: choose from {', '.join(CELLS)}")
        norms = vanishing_gradients(
            cells, args.seq_len, d_model=args.d_model, batch_size=args.batch_size,
            seed=args.seed, forget_bias=args.forget_bias,
        )  # fmt: skip
        title = "Gradient reaching each hidden state (fresh models, random tokens)"
    out.mkdir(parents=True, exist_ok=True)
    plot_vanishing_gradients(out / "grads.png", norms, title)
    ratios = {name: (n[0] / n[-1]).item() for name, n in norms.items()}
    atomic_write_json(
        out / "grads.json",
        {
            "settings": {k: v for k, v in vars(args).items() if not k.startswith("_")},
            "norms": {name: n.tolist() for name, n in norms.items()},
            "first_over_last": ratios,
        },
    )
    steps = args.seq_len - 1
    print(f"{'model':>12s}  ||dL/dh_0|| / ||dL/dh_{steps}||")
    for name, ratio in ratios.items():
        print(f"{name:>12s}  {ratio:.1e}")
    print(f"saved: {out}/grads.png, grads.json")
