"""``lmlab icl``: in-context learning accuracy against k and prompt format on a bundled
multiple-choice task."""

from __future__ import annotations

from jsonargparse import ArgumentParser

from lmlab import api
from lmlab.cli.args import add_model_arguments
from lmlab.errors import ConfigError
from lmlab.prompting.fewshot import FORMATS, LAYOUTS, ORDERS, OVERFLOW, SELECTIONS
from lmlab.prompting.runs import icl_sweep


def add_arguments(parser: ArgumentParser) -> None:
    parser.add_argument("--model", type=str, default="smollm2", help="anything lmlab.load takes")
    parser.add_argument(
        "--task",
        type=str,
        default="sentiment",
        help="a bundled task (sentiment, world-facts) or a task file",
    )
    parser.add_argument(
        "--ks", type=str, default="0,1,2,4,8", help="comma-separated numbers of examples"
    )
    parser.add_argument(
        "--formats",
        type=str,
        default="qa,io,arrow",
        help=f"comma-separated, of: {', '.join(FORMATS)}, task",
    )
    parser.add_argument(
        "--selection",
        type=str,
        default="random",
        help=f"one of: {', '.join(SELECTIONS)} (nearest embeds with MiniLM)",
    )
    parser.add_argument("--order", type=str, default="given", help=f"one of: {', '.join(ORDERS)}")
    parser.add_argument("--layout", type=str, default="plain", help=f"one of: {', '.join(LAYOUTS)}")
    parser.add_argument(
        "--seeds",
        type=str,
        default="0,1,2",
        help="comma-separated seeds (each draws other examples)",
    )
    parser.add_argument(
        "--context",
        type=int | None,
        default=None,
        help="prompt budget in tokens (default: the model's context): a longer prompt drops "
        "its farthest examples, or fails with --on_overflow error",
    )
    parser.add_argument(
        "--on_overflow", type=str, default="drop", help=f"one of: {', '.join(OVERFLOW)}"
    )
    parser.add_argument("--out", type=str, default="runs/icl")
    add_model_arguments(parser)


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def run(args) -> None:
    if args.on_overflow not in OVERFLOW:
        raise ConfigError(
            f"unknown --on_overflow {args.on_overflow!r}; valid: {', '.join(OVERFLOW)}"
        )
    if args.context is not None and args.context < 1:
        raise ConfigError(f"--context must be a positive number of tokens, got {args.context}")
    lm = api.load(args.model, dtype=args.dtype, device=args.device)
    embed = api.load("minilm").embed if args.selection == "nearest" else None
    formats = [f.strip() for f in args.formats.split(",") if f.strip()]
    table = icl_sweep(
        lm, args.out, args.task, _ints(args.ks), formats, args.selection, args.order,
        args.layout, _ints(args.seeds), embed, args.context, args.on_overflow,
    )  # fmt: skip
    print(f"{'format':8s} {'k':>3s}  accuracy (per seed)")
    for fmt in formats:
        for k in _ints(args.ks):
            accs = [r["accuracy"] for r in table["rows"] if r["format"] == fmt and r["k"] == k]
            dropped = sum(r["dropped"] for r in table["rows"] if r["format"] == fmt and r["k"] == k)
            note = f"  ({dropped} examples dropped to fit the context)" if dropped else ""
            print(f"{fmt:8s} {k:3d}  " + " ".join(f"{a:.3f}" for a in accs) + note)
    print(f"wrote {args.out}/icl.json and icl.png")
