"""``lmlab export``: write a model as a Hugging Face folder that transformers loads."""

from __future__ import annotations

from jsonargparse import ArgumentParser

from lmlab import api


def add_arguments(parser: ArgumentParser) -> None:
    parser.add_argument(
        "--model",
        type=str,
        default="runs/demo",
        help="anything lmlab.load takes: a checkpoint or run directory, an HF folder, a .gguf "
        "file or a pretrained name (smollm2)",
    )
    parser.add_argument("--out", type=str, required=True, help="the folder to write")
    parser.add_argument(
        "--merge",
        action="store_true",
        help="write quantized layers (QLoRA's NF4 base, a quantized checkpoint) dequantized "
        "to float32 with LoRA merged in",
    )


def run(args) -> None:
    out, notes = api.export_hf(args.model, args.out, merge=args.merge)
    print(f"wrote {out} (load it with transformers.AutoModelForCausalLM.from_pretrained)")
    for note in notes:
        print(f"note: {note}")
