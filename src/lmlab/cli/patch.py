"""``lmlab patch``: activation patching sweeps on clean/corrupted prompts, as figures and JSON.

lmlab patch --model smollm2 --clean "When Mary and John went to the store, John gave a drink to" \
            --corrupt "When Mary and John went to the store, Mary gave a drink to" \
            --answer " Mary" --wrong " John" --sweep both --out runs/patch
lmlab patch --model smollm2 --task ioi --pairs 8 --out runs/patch-ioi
"""

from __future__ import annotations

from pathlib import Path

import torch
from jsonargparse import ArgumentParser

from lmlab.cli.args import add_model_arguments
from lmlab.cli.lens import token_labels
from lmlab.errors import ConfigError
from lmlab.fileio import atomic_write_json
from lmlab.interp.patching import (
    POINTS,
    ioi_pairs,
    logit_diff,
    make_pairs,
    patch_heads,
    patch_residual,
    plot_effect,
)
from lmlab.lm import load


def add_arguments(parser: ArgumentParser) -> None:
    parser.add_argument(
        "--model", type=str, required=True, help="a run, checkpoint, HF folder, .gguf or smollm2"
    )
    parser.add_argument("--clean", type=str | None, default=None, help="the clean prompt")
    parser.add_argument(
        "--corrupt", type=str | None, default=None, help="the corrupted prompt (same token count)"
    )
    parser.add_argument(
        "--answer",
        type=str | None,
        default=None,
        help="the clean prompt's answer token, e.g. ' Mary'",
    )
    parser.add_argument(
        "--wrong", type=str | None, default=None, help="the corrupted prompt's answer token"
    )
    parser.add_argument(
        "--task",
        type=str | None,
        default=None,
        help="instead of one pair: 'ioi', indirect-object prompts (Wang et al. 2022) with the "
        "second name swapped",
    )
    parser.add_argument("--pairs", type=int, default=8, help="how many pairs --task makes")
    parser.add_argument("--sweep", type=str, default="both", help="resid, heads or both")
    parser.add_argument(
        "--point", type=str, default="resid_pre", help="residual point: " + ", ".join(POINTS)
    )
    parser.add_argument(
        "--noising", type=bool, default=False, help="patch corrupted activations into the clean run"
    )
    parser.add_argument("--seed", type=int, default=0, help="which names --task draws")
    parser.add_argument("--progress", type=bool, default=True, help="show a progress bar")
    parser.add_argument(
        "--out", type=str, default="runs/patch", help="folder for the figures and JSON"
    )
    add_model_arguments(parser)


def run(args) -> None:
    if args.sweep not in ("resid", "heads", "both"):
        raise ConfigError(f"--sweep {args.sweep!r}: choose resid, heads or both")
    lm = load(args.model, dtype=args.dtype, device=args.device)
    tok = lm._text("activation patching")
    if args.task is not None:
        if args.task != "ioi":
            raise ConfigError(f"--task {args.task!r}: the one task is ioi")
        pairs, texts = ioi_pairs(tok, args.pairs, args.seed)
    else:
        given = {
            "clean": args.clean,
            "corrupt": args.corrupt,
            "answer": args.answer,
            "wrong": args.wrong,
        }
        missing = [f"--{k}" for k, v in given.items() if v is None]
        if missing:
            raise ConfigError(f"give {', '.join(missing)} (or --task ioi)")
        pairs = make_pairs(tok, args.clean, args.corrupt, args.answer, args.wrong)
        texts = [(args.clean, args.corrupt)]
    with torch.no_grad():
        device = next(lm.model.parameters()).device
        clean_ld = logit_diff(
            lm.model(pairs.clean.to(device)), pairs.answer.to(device), pairs.wrong.to(device)
        )
    accuracy = float((clean_ld > 0).float().mean())
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    first = pairs.clean[0].tolist()
    differ = [t for t in range(len(first)) if first[t] != pairs.corrupt[0, t]]
    labels = token_labels(tok, first)
    report = {
        "model": args.model,
        "pairs": [{"clean": c, "corrupt": d} for c, d in texts],
        "answers": [tok.decode([i]) for i in pairs.answer.tolist()],
        "wrong": [tok.decode([i]) for i in pairs.wrong.tolist()],
        "clean_accuracy": accuracy,
        "clean_logit_diffs": clean_ld.tolist(),
    }
    print(f"the model prefers the answer on {accuracy:.0%} of the {len(texts)} clean prompt(s)")
    how = "corrupted into clean (noising)" if args.noising else "clean into corrupted (denoising)"
    written = []
    if args.sweep in ("resid", "both"):
        result = patch_residual(lm.model, pairs, args.point, args.noising, progress=args.progress)
        result.cols = [f"{t}:{label}" for t, label in enumerate(labels)]
        plot_effect(
            result.effect,
            result.rows,
            result.cols,
            out / "patch_resid.png",
            f"patching {args.point}, {how}\nlogit diff{len(texts) > 1 and ', mean over pairs' or ''}"
            f" (clean {result.clean_diff:.2f}, corrupt {result.corrupt_diff:.2f})",
            "position: token of the (first) clean prompt (* = differs in the corrupted one)",
            highlight=differ,
        )
        report["resid"] = result.to_dict()
        written.append(out / "patch_resid.png")
        best = divmod(int(result.effect.argmax()), result.effect.shape[1])
        print(
            f"resid ({args.point}): largest effect {result.effect.max():.2f} at layer {best[0]}, "
            f"position {result.cols[best[1]]!r}"
        )
    if args.sweep in ("heads", "both"):
        result = patch_heads(lm.model, pairs, args.noising, progress=args.progress)
        plot_effect(
            result.effect,
            result.rows,
            result.cols,
            out / "patch_heads.png",
            f"patching each head's output (hook_z, all positions), {how}",
            "head",
        )
        report["heads"] = result.to_dict()
        written.append(out / "patch_heads.png")
        top = torch.topk(result.effect.flatten(), k=min(3, result.effect.numel()))
        H = result.effect.shape[1]
        heads = ", ".join(
            f"L{int(i) // H}H{int(i) % H} {v:.2f}"
            for v, i in zip(top.values, top.indices, strict=True)
        )
        print(f"heads: largest effects {heads}")
    atomic_write_json(out / "patch.json", report)
    print("wrote " + ", ".join(str(p) for p in [*written, out / "patch.json"]))
