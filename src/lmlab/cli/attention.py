"""``lmlab attention``: attention maps and rollout of a prompt (``lmlab.interp.attention``),
or one layer's self-attention computed by hand and checked against the model's
(``--by_hand true``, ``lmlab.interp.selfattention``).

lmlab attention --model smollm2 --prompt "The cat sat on the mat because it" --layer 3
lmlab attention --model runs/gpt --prompt "ROMEO: But soft" --layer 0 --by_hand true
"""

from __future__ import annotations

import os
from pathlib import Path

from jsonargparse import ArgumentParser

from lmlab.cli.args import add_model_arguments
from lmlab.fileio import atomic_write_json, atomic_write_with
from lmlab.interp.attention import attention_report, prompt_ids, token_labels
from lmlab.interp.selfattention import AttentionSteps, attention_by_hand
from lmlab.lm import load


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
        "default: every layer's mean over heads (with --by_hand: layer 0)",
    )
    parser.add_argument(
        "--head", type=int | None, default=None, help="show only this head of --layer"
    )
    parser.add_argument(
        "--by_hand",
        type=bool,
        default=False,
        help="recompute --layer's attention step by step (Q, K, V, scores, mask, softmax, "
        "heads, output projection) from the weights, draw each step and print how far the "
        "hand result is from the model's own (decoder transformers)",
    )
    parser.add_argument(
        "--out", type=str, default="runs/attention", help="folder for the figures and JSON"
    )
    add_model_arguments(parser)
    # Interpretability reads exact numbers: float32 unless asked (SmolLM2 then loads at
    # about 1.1x its float32 weights in memory).
    parser.set_defaults(dtype="float32")


def run(args) -> None:
    if args.by_hand:
        return run_by_hand(args)
    result = attention_report(
        args.model, args.prompt, args.out, args.layer, args.head, args.dtype, args.device
    )
    maps = result["maps"]
    print(f"{len(result['tokens'])} tokens, {len(maps)} layers x {len(maps[0])} heads")
    for key in ("attention", "rollout", "json"):
        print(f"wrote {result['paths'][key]}")


# ----------------------------------------------------------------------------- by hand


def run_by_hand(args) -> None:
    lm = load(args.model, dtype=args.dtype, device=args.device)
    ids = prompt_ids(lm, args.prompt)
    steps = attention_by_hand(lm.model, ids, args.layer or 0)
    tokens = token_labels(lm.tokenizer, ids[0].tolist())
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    name = os.path.basename(os.path.normpath(str(args.model)))
    plot_steps(steps, tokens, out / "steps.png", f"{name}, layer {steps.layer}")
    plot_matrices(steps, tokens, out / "matrices.png", f"{name}, layer {steps.layer}")
    atomic_write_json(
        out / "by_hand.json",
        {
            "model": str(args.model),
            "prompt": args.prompt,
            "tokens": tokens,
            "layer": steps.layer,
            "max_abs_diff": steps.max_abs_diff,
            "max_weight_diff": steps.max_weight_diff,
            "scores": steps.scores.round(decimals=5).tolist(),
            "weights": steps.weights.round(decimals=5).tolist(),
            "out": steps.out.round(decimals=5).tolist(),
        },
    )
    H, T, Dh = steps.q.shape
    print(f"layer {steps.layer}: {T} tokens, {H} heads of size {Dh}, width {steps.x.shape[1]}")
    for label, tensor in [
        ("x (normed input)", steps.x), ("Q", steps.q), ("K", steps.k), ("V", steps.v),
        ("scores Q K^T / sqrt(Dh)", steps.scores), ("softmax weights", steps.weights),
        ("Z = weights V", steps.z), ("heads concatenated", steps.concat),
        ("output projection", steps.out),
    ]:  # fmt: skip
        print(f"  {label:<26} {list(tensor.shape)}")
    print(f"max |hand - model| attention output: {steps.max_abs_diff:.2e}")
    print(f"max |hand - model| attention weights: {steps.max_weight_diff:.2e}")
    for file in ("steps.png", "matrices.png", "by_hand.json"):
        print(f"wrote {out / file}")


def _ticks(ax, tokens: list[str], rows: bool, cols: bool) -> None:
    ax.set_xticks(range(len(tokens)), tokens if cols else [], rotation=90, fontsize=7)
    ax.set_yticks(range(len(tokens)), tokens if rows else [], fontsize=7)


def plot_steps(steps: AttentionSteps, tokens: list[str], png: Path, title: str) -> None:
    """One column per head: the scores, the scores after the causal mask (-inf blank) and
    the softmax weights (rows: queries, columns: keys)."""
    from matplotlib.figure import Figure  # deferred: slow to import, only for plots

    H = steps.scores.shape[0]
    side = max(2.0, 0.13 * len(tokens) + 0.9)
    fig = Figure(figsize=(side * H + 1.2, side * 3 + 0.6), layout="constrained")
    axes = fig.subplots(3, H, squeeze=False)
    limit = float(steps.scores.abs().max()) or 1.0
    rows = [
        ("Q K^T / sqrt(Dh)", steps.scores, "RdBu_r", -limit, limit),
        ("+ causal mask", steps.masked, "RdBu_r", -limit, limit),
        ("softmax", steps.weights, "viridis", 0.0, 1.0),
    ]
    for r, (label, tensor, cmap, low, high) in enumerate(rows):
        for h in range(H):
            ax = axes[r, h]
            matrix = tensor[h].cpu().numpy()
            matrix[~(matrix > float("-inf"))] = float("nan")  # masked: drawn blank
            image = ax.imshow(matrix, cmap=cmap, vmin=low, vmax=high)
            ax.set_title(f"head {h}: {label}", fontsize=8)
            _ticks(ax, tokens, rows=h == 0, cols=r == 2)
        fig.colorbar(image, ax=axes[r, -1], shrink=0.9)
    fig.suptitle(f"{title}: scores, mask and softmax per head (rows: queries, columns: keys)")
    atomic_write_with(png, lambda tmp: fig.savefig(tmp, format="png", dpi=90, bbox_inches="tight"))


def plot_matrices(steps: AttentionSteps, tokens: list[str], png: Path, title: str) -> None:
    """The path of one prompt through the layer, head 0's pieces: x, Q, K, V, Z, the heads
    concatenated, the output by hand, the model's output and their difference."""
    from matplotlib.figure import Figure  # deferred: slow to import, only for plots

    diff = steps.out - steps.model_out
    panels = [
        ("x (after the norm)", steps.x), ("Q, head 0", steps.q[0]), ("K, head 0", steps.k[0]),
        ("V, head 0", steps.v[0]), ("Z = softmax V, head 0", steps.z[0]),
        ("heads concatenated", steps.concat), ("out = concat W_o", steps.out),
        ("the model's output", steps.model_out),
        (f"hand - model (max {steps.max_abs_diff:.1e})", diff),
    ]  # fmt: skip
    fig = Figure(figsize=(15, 2.2 + 0.16 * len(tokens)), layout="constrained")
    axes = fig.subplots(1, len(panels))
    for k, (ax, (label, tensor)) in enumerate(zip(axes, panels)):
        matrix = tensor.detach().cpu().float()
        limit = float(matrix.abs().max()) or 1.0
        ax.imshow(matrix.numpy(), cmap="RdBu_r", vmin=-limit, vmax=limit, aspect="auto")
        ax.set_title(f"{label}\n{list(matrix.shape)}", fontsize=8)
        ax.set_yticks(range(len(tokens)), tokens if k == 0 else [], fontsize=7)
        ax.set_xticks([])
    fig.suptitle(f"{title}: one prompt through the attention (rows: tokens, columns: features)")
    atomic_write_with(png, lambda tmp: fig.savefig(tmp, format="png", dpi=90, bbox_inches="tight"))
