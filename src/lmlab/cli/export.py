"""``lmlab export``: write a model as a Hugging Face folder that transformers loads, as
a GGUF file that llama.cpp runs, or an n-gram model as an ARPA file that KenLM reads."""

from __future__ import annotations

from typing import Literal

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
    parser.add_argument(
        "--out",
        type=str,
        required=True,
        help="the folder (hf), .gguf file (gguf) or .arpa file (arpa) to write",
    )
    parser.add_argument(
        "--format",
        type=Literal["hf", "gguf", "arpa"],
        default="hf",
        help="hf: a Hugging Face folder (transformers: a decoder for AutoModelForCausalLM, a "
        "T5- or BART-like encoder-decoder for AutoModelForSeq2SeqLM); gguf: one file for "
        "llama.cpp (Llama-layout models); arpa: an n-gram model for KenLM and SRILM",
    )
    parser.add_argument(
        "--merge",
        action="store_true",
        help="hf: write quantized layers (QLoRA's NF4 base, a quantized checkpoint) "
        "dequantized to float32 with LoRA merged in",
    )
    parser.add_argument(
        "--gguf_type",
        type=Literal["f32", "f16", "q8_0", "q4_0"],
        default="f16",
        help="with --format gguf: how the weight matrices are stored",
    )


def run(args) -> None:
    if args.format == "arpa":
        out, notes = api.export_arpa(args.model, args.out)
        print(f"wrote {out} (load it with kenlm.Model, or lmlab.load)")
    elif args.format == "gguf":
        out, notes = api.export_gguf(args.model, args.out, args.gguf_type)
        print(f"wrote {out} ({args.gguf_type}; run it with llama.cpp, or lmlab.load)")
    else:
        out, notes = api.export_hf(args.model, args.out, merge=args.merge)
        print(f"wrote {out} (load it with transformers' from_pretrained)")
    for note in notes:
        print(f"note: {note}")
