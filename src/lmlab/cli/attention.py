"""``lmlab attention``: attention maps and rollout of a prompt (``lmlab.interp.attention``).

lmlab attention --model smollm2 --prompt "The cat sat on the mat because it" --layer 3
"""

from __future__ import annotations

from jsonargparse import ArgumentParser

from lmlab.cli.args import add_model_arguments
from lmlab.interp.attention import attention_report


def add_arguments(parser: ArgumentParser) -> None:
    parser.add_argument(
        "--model",
        type=str,
        required=True,
        help="anything lmlab.load takes: a checkpoint or run directory, an HF folder, a .gguf "
        "file or a pretrained name (smollm2, minilm)",
    )
    parser.add_argument("--prompt", type=str, required=True, help="the text to look at")
    parser.add_argument(
        "--layer",
        type=int | None,
        default=None,
        help="show this layer's heads (from 0; negative counts from the end); "
        "default: every layer's mean over heads",
    )
    parser.add_argument(
        "--head", type=int | None, default=None, help="show only this head of --layer"
    )
    parser.add_argument(
        "--out", type=str, default="runs/attention", help="folder for the figures and JSON"
    )
    add_model_arguments(parser)
    # Interpretability reads exact numbers: float32 unless asked (SmolLM2 then loads at
    # about 1.1x its float32 weights in memory).
    parser.set_defaults(dtype="float32")


def run(args) -> None:
    result = attention_report(
        args.model, args.prompt, args.out, args.layer, args.head, args.dtype, args.device
    )
    maps = result["maps"]
    print(f"{len(result['tokens'])} tokens, {len(maps)} layers x {len(maps[0])} heads")
    for key in ("attention", "rollout", "json"):
        print(f"wrote {result['paths'][key]}")
