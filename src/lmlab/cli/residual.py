"""``lmlab residual``: a deep, thin transformer trained with and without residual
connections and layer norm, with the gradient norm of every block
(``lmlab.train.ablations.compare_depth``).

lmlab residual --out runs/residual
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import torch
from jsonargparse import ArgumentParser

from lmlab.cli.args import options
from lmlab.data.corpus import load_corpus
from lmlab.data.tokenizers import train_tokenizer
from lmlab.fileio import atomic_write_json
from lmlab.train.ablations import DepthConfig, compare_depth


def add_arguments(parser: ArgumentParser) -> None:
    parser.add_class_arguments(DepthConfig, as_group=False)
    parser.add_argument(
        "--data", type=str, default="tinyshakespeare", help="a corpus name or a text file"
    )
    parser.add_argument("--out", type=str, default="runs/residual", help="folder for the results")


def run(args) -> None:
    from matplotlib.figure import Figure  # deferred: slow to import, only for plots

    config = DepthConfig(**options(args, skip=("out", "data")))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    text = load_corpus(args.data)
    tok = train_tokenizer("char", text)
    ids = torch.as_tensor(tok.encode(text), dtype=torch.long)
    report = compare_depth(config, ids, tok.vocab_size)
    atomic_write_json(out / "residual.json", {"config": dataclasses.asdict(config), **report})

    names = list(report["losses"])
    fig = Figure(figsize=(12, 4))
    ax_init, ax_late, ax_loss = fig.subplots(1, 3)
    layers = range(1, config.n_layers + 1)
    for name in names:
        records = report["grad_norms"][name]
        line = ax_init.plot(layers, records[0][1], marker=".", label=name)[0]
        ax_late.plot(layers, records[-1][1], marker=".", color=line.get_color(), label=name)
        ax_loss.plot(report["losses"][name], color=line.get_color(), lw=1, label=name)
    last = report["grad_norms"][names[0]][-1][0]
    for ax, title in ((ax_init, "at initialisation"), (ax_late, f"after {last} steps")):
        ax.set(
            title=f"gradient norm per block, {title}",
            xlabel="block (1 = nearest the input)",
            yscale="log",
        )
    ax_loss.axhline(math.log(tok.vocab_size), color="grey", ls=":", lw=1)
    ax_loss.set(title=f"training loss, {config.n_layers} blocks of width {config.d_model}")
    ax_loss.set(xlabel="step", ylabel="cross-entropy (nats/char)")
    ax_init.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "residual.png", dpi=100)

    print(f"{'model':22s} {'first/last block grad (init)':>30s} {'final loss':>10s}")
    for name in names:
        norms, tail = report["grad_norms"][name][0][1], report["losses"][name][-20:]
        loss = sum(tail) / len(tail)  # the last 20 steps, for less noise
        print(f"{name:22s} {norms[0]:14.2e} / {norms[-1]:.2e} {loss:10.3f}")
    print(f"saved: {out}/residual.json, residual.png")
