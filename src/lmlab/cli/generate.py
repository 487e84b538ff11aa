"""``lmlab generate``: continue a prompt with a trained model, with any decoding method."""

from __future__ import annotations

import dataclasses
import sys

from jsonargparse import ArgumentParser

from lmlab import api
from lmlab.generate import SamplingParams


def add_arguments(parser: ArgumentParser) -> None:
    parser.add_argument("prompt", type=str, help="the text to continue")
    parser.add_argument("--ckpt", type=str, default="runs/demo", help="checkpoint or run directory")
    parser.add_argument(
        "--dtype",
        type=str | None,
        default="auto",
        help="float32, bfloat16, auto (bf16 where the CPU/GPU computes it natively: about "
        "1.6x faster decoding) or null (as saved)",
    )
    parser.add_argument(
        "--no_stream", type=bool, default=False, help="print the text only when done"
    )
    parser.add_argument(
        "--device",
        type=str,
        default="auto",
        help="where the model runs: auto (CUDA, then MPS, then the CPU), cpu, cuda, cuda:N, mps",
    )
    parser.add_class_arguments(SamplingParams, nested_key=None)
    parser.set_defaults(max_new_tokens=200)


def run(args) -> None:
    lm = api.load(args.ckpt, dtype=args.dtype, device=args.device)
    names = {f.name for f in dataclasses.fields(SamplingParams)}
    decoding = {k: v for k, v in vars(args).items() if k in names}
    print(args.prompt, end="", flush=True)
    if (
        args.no_stream or decoding["num_beams"] > 1
    ):  # beam search knows its best beam only at the end
        print(lm.generate(args.prompt, **decoding))
        return
    for piece in lm.stream(args.prompt, **decoding):
        sys.stdout.write(piece)
        sys.stdout.flush()
    print()
