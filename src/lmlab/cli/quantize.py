"""``lmlab quantize``: write a quantized checkpoint (``lmlab.api.quantize``), or compare
weight formats on one model (``--compare``, ``lmlab.eval.quantization``): size, held-out
perplexity, weight error per layer, and one layer's weights against each quantization grid.

lmlab quantize --model smollm2 --format nf4 --out runs/smollm2-nf4
lmlab quantize --model runs/gpt --compare fp32,bf16,int8,int4,nf4 --out runs/quant
"""

from __future__ import annotations

from pathlib import Path

import torch
from jsonargparse import ArgumentParser

from lmlab import api
from lmlab.errors import ConfigError, closest
from lmlab.eval.quantization import FORMATS, check_formats, compare_formats, linear_layers
from lmlab.fileio import atomic_write_json, atomic_write_with
from lmlab.lm import load
from lmlab.quant.nf4 import NF4_CODE


def add_arguments(parser: ArgumentParser) -> None:
    parser.add_argument(
        "--model",
        type=str,
        required=True,
        help="anything lmlab.load takes: a checkpoint or run directory, an HF folder, a .gguf "
        "file or a pretrained name (smollm2)",
    )
    parser.add_argument(
        "--format", type=str | None, default=None, help="int8, int4 or nf4 (lmlab.quant)"
    )
    parser.add_argument(
        "--out",
        type=str,
        required=True,
        help="the checkpoint folder to write (with --compare: the folder for the figures and JSON)",
    )
    parser.add_argument(
        "--compare",
        type=str | None,
        default=None,
        help="instead of writing a checkpoint, compare these weight formats (comma-separated: "
        "fp32, bf16, int8, int4, nf4): size, held-out perplexity, weight error per layer",
    )
    parser.add_argument(
        "--tokens", type=int, default=4096, help="with --compare: held-out tokens scored"
    )
    parser.add_argument(
        "--layer",
        type=str | None,
        default=None,
        help="with --compare: the linear layer whose weights are drawn against the grids "
        "(default: the first one, e.g. blocks.0.attn.q_proj)",
    )
    parser.add_argument("--progress", type=bool, default=True, help="show a progress bar")


def run(args) -> None:
    if args.compare is not None:
        return run_compare(args)
    if args.format is None:
        raise ConfigError("give --format (int8, int4 or nf4), or --compare FORMATS")
    out, sizes = api.quantize(args.model, args.format, args.out)
    mb = {k: v / 1e6 for k, v in sizes.items()}
    print(f"wrote {out}: weights {mb['before']:.1f} MB -> {mb['after']:.1f} MB ({args.format})")
    print(f"use it like any checkpoint: lmlab chat --model {out}")


# ----------------------------------------------------------------------------- --compare


def run_compare(args) -> None:
    formats = check_formats(args.compare)
    lm = load(args.model, dtype="float32", keep_quantized=False, device="cpu")
    layers = linear_layers(lm.model)
    layer = args.layer or layers[0]
    if layer not in layers:
        raise ConfigError(
            f"--layer {layer!r} is not a quantized linear layer{closest(layer, layers)}; "
            f"valid: {', '.join(layers[:6])}, ..."
        )
    result = compare_formats(lm.model, lm.tokenizer, formats, args.tokens, args.progress)
    weight = lm.model.get_submodule(layer).weight.detach().float()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "quant.json", {"model": args.model, "grid_layer": layer, **result})
    plot_formats(result, out / "quant.png", f"{args.model}: {result['tokens']} held-out tokens")
    plot_grids(weight, out / "grid.png", layer)
    fp32 = next((r for r in result["rows"] if r["format"] == "fp32"), None)
    print(f"{'format':<6} {'size':>10} {'perplexity':>11} {'vs fp32':>8} {'weight error':>13}")
    for row in result["rows"]:
        delta = f"{row['perplexity'] / fp32['perplexity'] - 1:+.2%}" if fp32 else "-"
        print(
            f"{row['format']:<6} {row['size_bytes'] / 1e6:8.2f}MB {row['perplexity']:11.4f} "
            f"{delta:>8} {row['mean_weight_error']:13.2e}"
        )
    print(f"{len(result['layers'])} linear layers quantized; weight error: mean over them of "
          "||W_q - W|| / ||W||")  # fmt: skip
    for name in ("quant.json", "quant.png", "grid.png"):
        print(f"wrote {out / name}")


def plot_formats(result: dict, png: Path, title: str) -> None:
    """Left: size against held-out perplexity, one point per format. Right: the relative
    weight error of each linear layer, per format (log scale)."""
    from matplotlib.figure import Figure  # deferred: slow to import, only for plots

    fig = Figure(figsize=(13, 4.6), layout="constrained")
    left, right = fig.subplots(1, 2, width_ratios=[1, 1.6])
    for k, row in enumerate(result["rows"]):
        color = f"C{FORMATS.index(row['format'])}"  # one colour per format in both panels
        left.scatter(row["size_bytes"] / 1e6, row["perplexity"], s=50, color=color)
        left.annotate(row["format"], (row["size_bytes"] / 1e6, row["perplexity"]),
                      xytext=(6, 6 if k % 2 else -12), textcoords="offset points")  # fmt: skip
    left.set(xlabel="size of the weights (MB)", ylabel="held-out perplexity",
             title="smaller weights, higher perplexity?")  # fmt: skip
    x = range(len(result["layers"]))
    for row in result["rows"]:
        if row["format"] == "fp32":
            continue  # the reference: no error
        color = f"C{FORMATS.index(row['format'])}"
        right.plot(x, row["weight_error"], "o-", markersize=3, label=row["format"], color=color)
    right.set_yscale("log")
    short = [name.replace("blocks.", "").replace(".attn", "").replace(".mlp", "")
             for name in result["layers"]]  # fmt: skip
    every = -(-len(short) // 40)  # at most 40 labels: SmolLM2 has 210 layers
    right.set_xticks(list(x)[::every], short[::every], rotation=90, fontsize=7)
    right.set(ylabel="||W_q - W|| / ||W||", title="weight error per linear layer")
    right.legend(fontsize=8)
    fig.suptitle(title)
    atomic_write_with(png, lambda tmp: fig.savefig(tmp, format="png", dpi=90))


def plot_grids(weight: torch.Tensor, png: Path, layer: str) -> None:
    """One layer's weights against the grids of int4 and NF4, each in its own units:
    left, w / absmax of its NF4 block of 64 with NF4's 16 levels (and int4-like uniform
    levels for contrast); right, (w - min) / (max - min) of its int4 group of 32 with the
    16 uniform levels int4 rounds to."""
    from matplotlib.figure import Figure  # deferred: slow to import, only for plots

    flat = weight.flatten()
    blocks = flat[: flat.numel() // 64 * 64].view(-1, 64)  # (L/64, 64), NF4's blocks
    scaled = (blocks / blocks.abs().amax(1, keepdim=True).clamp_min(1e-30)).flatten()
    groups = weight[:, : weight.shape[1] // 32 * 32].reshape(-1, 32)  # int4's groups of 32
    low, high = groups.amin(1, keepdim=True), groups.amax(1, keepdim=True)
    unit = ((groups - low) / (high - low).clamp_min(1e-30)).flatten()
    fig = Figure(figsize=(13, 4.2), layout="constrained")
    left, right = fig.subplots(1, 2)
    left.hist(scaled.numpy(), bins=200, color="0.6")
    for k, level in enumerate(NF4_CODE):
        left.axvline(level, color="C3", lw=1, label="NF4's 16 levels" if k == 0 else None)
    for k in range(-7, 8):
        left.axvline(
            k / 7, color="C0", lw=0.8, ls=":", label="15 uniform levels" if k == -7 else None
        )
    left.set(xlabel="w / absmax of its block of 64", ylabel="weights",
             title="NF4: levels where the weights are (normal quantiles)")  # fmt: skip
    left.legend(fontsize=8, loc="upper left")
    right.hist(unit.numpy(), bins=200, color="0.6")
    for k in range(16):
        right.axvline(k / 15, color="C0", lw=1, label="int4's 16 levels" if k == 0 else None)
    right.set(xlabel="(w - min) / (max - min) of its group of 32",
              title="int4: 16 evenly spaced levels from min to max")  # fmt: skip
    right.legend(fontsize=8, loc="upper left")
    fig.suptitle(f"{layer}: {weight.numel():,} weights against the quantization grids")
    atomic_write_with(png, lambda tmp: fig.savefig(tmp, format="png", dpi=90))
