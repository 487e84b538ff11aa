"""``lmlab prompt``: direct, chain-of-thought, self-consistency, PAL and ReAct answering
compared on generated word problems (PAL's programs and the agent's python tool run in the
sandbox)."""

from __future__ import annotations

from jsonargparse import ArgumentParser

from lmlab import api
from lmlab.cli.args import add_model_arguments
from lmlab.errors import ConfigError, closest
from lmlab.prompting.models import LMCompleter, OpenAICompleter
from lmlab.prompting.reasoning import ALL_METHODS, LAYOUTS, METHODS
from lmlab.prompting.runs import compare_methods


def add_arguments(parser: ArgumentParser) -> None:
    parser.add_argument(
        "--model",
        type=str,
        default="smollm2",
        help="anything lmlab.load takes (or the model name at --base_url)",
    )
    parser.add_argument(
        "--base_url",
        type=str | None,
        default=None,
        help="an OpenAI-compatible endpoint (.../v1) instead of a local model",
    )
    parser.add_argument(
        "--methods",
        type=str,
        default=",".join(METHODS),
        help=f"comma-separated, of: {', '.join(ALL_METHODS)} (react: an agent with a "
        "calculator and the Python sandbox)",
    )
    parser.add_argument("--n", type=int, default=200, help="word problems (generated, seeded)")
    parser.add_argument(
        "--shots", type=int, default=4, help="worked examples in each prompt (0: zero-shot)"
    )
    parser.add_argument(
        "--samples", type=int, default=5, help="chains of thought per question for self-consistency"
    )
    parser.add_argument(
        "--temperature", type=float, default=0.7, help="sampling temperature for self-consistency"
    )
    parser.add_argument(
        "--layout",
        type=str,
        default="plain",
        help=f"one of: {', '.join(LAYOUTS)} (chat: a system line, the examples as turns, "
        "rendered by the model's chat template)",
    )
    parser.add_argument(
        "--max_tokens", type=int, default=160, help="new tokens per reply (per step for react)"
    )
    parser.add_argument("--max_steps", type=int, default=6, help="react: the step budget")
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=str, default="runs/prompt")
    add_model_arguments(parser)


def run(args) -> None:
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    for method in methods:  # before loading a model: a typo fails at once
        if method not in ALL_METHODS:
            raise ConfigError(
                f"unknown method {method!r}{closest(method, list(ALL_METHODS))}; "
                f"valid: {', '.join(ALL_METHODS)}"
            )
    if args.layout not in LAYOUTS:
        raise ConfigError(f"unknown layout {args.layout!r}; valid: {', '.join(LAYOUTS)}")
    if not methods or min(args.n, args.samples, args.max_steps, args.max_tokens) < 1:
        raise ConfigError(
            "give at least one method, and --n, --samples, --max_steps, --max_tokens >= 1"
        )
    if args.base_url:
        model = OpenAICompleter(args.base_url, args.model)
    else:
        model = LMCompleter(api.load(args.model, dtype=args.dtype, device=args.device), args.model)
    summary = compare_methods(
        model, args.out, methods, args.n, args.shots, args.samples, args.temperature,
        args.max_tokens, args.seed, args.batch_size, args.layout, args.max_steps,
    )  # fmt: skip
    print(f"{'method':18s} {'strict':>18s} {'flexible':>18s}")
    for method, s in summary["methods"].items():
        cells = [
            f"{s[h]['accuracy']:.3f} [{s[h]['ci95'][0]:.2f}, {s[h]['ci95'][1]:.2f}]"
            for h in ("strict", "flexible")
        ]
        print(f"{method:18s} {cells[0]:>18s} {cells[1]:>18s}")
    traces = ", trace.jsonl, trace.md" if "react" in methods else ""
    print(f"wrote {args.out}/methods.json, attempts.jsonl{traces} and methods.png")
