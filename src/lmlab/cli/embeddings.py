"""``lmlab embeddings``: nearest neighbours, analogies and a 2-D map of a model's input
embeddings (``lmlab.interp.embeddings``).

lmlab embeddings --model minilm --words king,queen,man,woman,paris,france,rome,italy \
    --analogies man:king:woman,france:paris:italy --out runs/embeddings/minilm
"""

from __future__ import annotations

from pathlib import Path

import torch
from jsonargparse import ArgumentParser

from lmlab.cli.args import MODEL_HELP, add_model_arguments
from lmlab.errors import ConfigError
from lmlab.fileio import atomic_write_json
from lmlab.interp.embeddings import EmbeddingSpace, project_2d
from lmlab.lm import load


def add_arguments(parser: ArgumentParser) -> None:
    parser.add_argument(
        "--model",
        type=str,
        required=True,
        help=MODEL_HELP,
    )
    parser.add_argument(
        "--words",
        type=str,
        default="king,queen,man,woman,prince,princess,paris,france,rome,italy,berlin,germany",
        help="comma-separated words: their neighbours are listed and they are drawn on the map",
    )
    parser.add_argument(
        "--analogies",
        type=str,
        default="man:king:woman,france:paris:italy",
        help="comma-separated a:b:c, read 'a is to b as c is to ?'",
    )
    parser.add_argument("--k", type=int, default=5, help="neighbours and answers to list")
    parser.add_argument(
        "--out", type=str, default="runs/embeddings", help="folder for embeddings.png and .json"
    )
    add_model_arguments(parser)
    parser.set_defaults(dtype="float32")


def parse_analogies(text: str) -> list[tuple[str, str, str]]:
    out = []
    for item in filter(None, (s.strip() for s in text.split(","))):
        parts = [p.strip() for p in item.split(":")]
        if len(parts) != 3 or not all(parts):
            raise ConfigError(
                f"--analogies item {item!r} is invalid: write a:b:c (a is to b as c is to ?), "
                "e.g. man:king:woman"
            )
        out.append(tuple(parts))
    return out


def run(args) -> None:
    words = [w.strip() for w in args.words.split(",") if w.strip()]
    if len(words) < 2:
        raise ConfigError(f"--words {args.words!r} is invalid: give at least two words")
    analogies = parse_analogies(args.analogies)
    lm = load(args.model, dtype=args.dtype, device=args.device)
    space = EmbeddingSpace.of(lm.model, lm.tokenizer)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    summary = {"model": args.model, "neighbours": {}, "analogies": [], "pieces": {}}
    for word in words:
        pieces = space.pieces(word)
        summary["pieces"][word] = [space.tokens[i] for i in pieces]
        neighbours = space.nearest(word, args.k)
        summary["neighbours"][word] = neighbours
        split = "" if len(pieces) == 1 else f" (mean of {len(pieces)} pieces)"
        print(f"{word}{split}: " + ", ".join(f"{t} {s:.2f}" for t, s in neighbours))
    for a, b, c in analogies:
        answers = space.analogy(a, b, c, args.k)
        summary["analogies"].append({"a": a, "b": b, "c": c, "answers": answers})
        print(f"{a} : {b} :: {c} : " + ", ".join(f"{t} {s:.2f}" for t, s in answers))

    from matplotlib.figure import Figure  # deferred: slow to import, only for plots

    points = project_2d(torch.stack([space.vector(w) for w in words]))
    fig = Figure(figsize=(7, 6))
    ax = fig.subplots()
    ax.scatter(points[:, 0], points[:, 1], s=12)
    where = {w: points[i] for i, w in enumerate(words)}
    for w, p in where.items():
        ax.annotate(
            w, (p[0].item(), p[1].item()), fontsize=9, xytext=(3, 3), textcoords="offset points"
        )
    for a, b, c in analogies:  # the a -> b offset, drawn again from c
        if {a, b, c} <= set(where):
            for start, end in ((a, b), (c, None)):
                tail = where[start]
                head = where[end] if end else where[c] + (where[b] - where[a])
                ax.annotate(
                    "",
                    xy=(head[0].item(), head[1].item()),
                    xytext=(tail[0].item(), tail[1].item()),
                    arrowprops=dict(arrowstyle="->", color="tab:red" if end else "tab:grey"),
                )
    ax.set(
        title=f"input embeddings of {Path(args.model).name}: first two principal components",
        xlabel="PC 1",
        ylabel="PC 2",
    )
    fig.tight_layout()
    fig.savefig(out / "embeddings.png", dpi=120)
    atomic_write_json(out / "embeddings.json", summary)
    print(f"wrote {out / 'embeddings.png'} and {out / 'embeddings.json'}")
