"""``lmlab quantize``: write a quantized checkpoint (``lmlab.api.quantize``).

lmlab quantize --model smollm2 --format nf4 --out runs/smollm2-nf4
"""

from __future__ import annotations

from jsonargparse import ArgumentParser

from lmlab import api


def add_arguments(parser: ArgumentParser) -> None:
    parser.add_argument(
        "--model",
        type=str,
        required=True,
        help="anything lmlab.load takes: a checkpoint or run directory, an HF folder, a .gguf "
        "file or a pretrained name (smollm2)",
    )
    parser.add_argument("--format", type=str, required=True, help="int8, int4 or nf4 (lmlab.quant)")
    parser.add_argument("--out", type=str, required=True, help="the checkpoint folder to write")


def run(args) -> None:
    out, sizes = api.quantize(args.model, args.format, args.out)
    mb = {k: v / 1e6 for k, v in sizes.items()}
    print(f"wrote {out}: weights {mb['before']:.1f} MB -> {mb['after']:.1f} MB ({args.format})")
    print(f"use it like any checkpoint: lmlab chat --model {out}")
