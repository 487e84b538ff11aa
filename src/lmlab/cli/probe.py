"""``lmlab probe``: linear and MLP probes per layer, with control tasks and selectivity
(``lmlab.interp.probing.probe_model``).

lmlab probe --model smollm2 --task pos --layers 0,6,12,18,24,30 --out runs/probe/smollm2-pos
"""

from __future__ import annotations

from pathlib import Path

from jsonargparse import ArgumentParser

from lmlab.cli.args import MODEL_HELP, add_model_arguments
from lmlab.data.probing import PROBING_TASKS
from lmlab.errors import ConfigError
from lmlab.interp.probing import POOLS, ProbeConfig, probe_model


def add_arguments(parser: ArgumentParser) -> None:
    parser.add_argument(
        "--model",
        type=str,
        required=True,
        help=MODEL_HELP,
    )
    parser.add_argument(
        "--task", type=str, default="pos", help="a bundled task: " + ", ".join(PROBING_TASKS)
    )
    parser.add_argument(
        "--layers",
        type=str | None,
        default=None,
        help="comma-separated layers to probe (0 = the embeddings, k = after block k); "
        "default: all",
    )
    parser.add_argument(
        "--points",
        type=str | None,
        default=None,
        help="probe these hook points instead of --layers (a name or pattern, e.g. "
        "'blocks.*.hook_attn_out')",
    )
    parser.add_argument("--probe", type=str, default="both", help="linear, mlp or both")
    parser.add_argument(
        "--n", type=int | None, default=None, help="texts in the task (default: the task's own)"
    )
    parser.add_argument(
        "--pool",
        type=str,
        default="last",
        help="a word of several tokens is its " + ", ".join(POOLS) + " token(s)",
    )
    parser.add_argument("--hidden", type=int, default=256, help="the MLP probe's hidden width")
    parser.add_argument("--weight_decay", type=float, default=0.0, help="the probes' weight decay")
    parser.add_argument("--seed", type=int, default=0, help="task, split, control task, probes")
    parser.add_argument("--batch_size", type=int, default=32, help="texts per forward pass")
    parser.add_argument(
        "--out", type=str | None, default=None, help="folder for probe.png and probe.json "
        "(default: runs/probe/MODEL-TASK)",
    )  # fmt: skip
    parser.add_argument("--progress", type=bool, default=True, help="show progress bars")
    add_model_arguments(parser)


def parse_layers(text: str | None) -> list[int] | None:
    """``"0,4,8"`` -> [0, 4, 8]; None or "all" -> None (every layer)."""
    if text is None or text.strip() == "all":
        return None
    try:
        return [int(part) for part in str(text).split(",") if part.strip()]
    except ValueError:
        raise ConfigError(
            f"--layers {text!r} is invalid: give comma-separated layer numbers such as 0,4,8"
        ) from None


def run(args) -> None:
    if args.probe not in ("linear", "mlp", "both"):
        raise ConfigError(f"--probe {args.probe!r} is invalid: linear, mlp or both")
    probes = ("linear", "mlp") if args.probe == "both" else (args.probe,)
    out = args.out or str(Path("runs") / "probe" / f"{Path(args.model).name}-{args.task}")
    config = ProbeConfig(hidden=args.hidden, weight_decay=args.weight_decay, seed=args.seed)
    result = probe_model(
        args.model,
        args.task,
        layers=parse_layers(args.layers),
        points=args.points,
        probes=probes,
        n=args.n,
        pool=args.pool,
        config=config,
        seed=args.seed,
        out=out,
        dtype=args.dtype,
        device=args.device,
        batch_size=args.batch_size,
        progress=args.progress,
    )
    print(
        f"{result.task}: {result.n_words} words of {result.n_types} types; majority label "
        f"{result.majority:.3f} (test accuracy)"
    )
    print(f"{'layer':>5}  {'point':<28} {'probe':<6} {'task':>6} {'control':>7} {'select.':>7}")
    for r in result.rows:
        print(
            f"{r.layer:>5}  {r.point:<28} {r.probe:<6} {r.accuracy:>6.3f} "
            f"{r.control_accuracy:>7.3f} {r.selectivity:>7.3f}"
        )
    print(f"wrote {out}/probe.png and {out}/probe.json")
