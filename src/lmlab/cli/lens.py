"""``lmlab lens``: the logit lens (and a tuned lens) on one prompt, as figures and JSON.

lmlab lens --model smollm2 --prompt "The Eiffel Tower is in the city of" --out runs/lens
"""

from __future__ import annotations

from pathlib import Path

import torch
from jsonargparse import ArgumentParser

from lmlab.cli.args import add_model_arguments
from lmlab.errors import ConfigError
from lmlab.fileio import atomic_write_json
from lmlab.interp.lens import TunedLens, logit_lens, plot_kl_per_layer, plot_lens, tuned_lens
from lmlab.lm import load


def add_arguments(parser: ArgumentParser) -> None:
    parser.add_argument(
        "--model", type=str, required=True, help="a run, checkpoint, HF folder, .gguf or smollm2"
    )
    parser.add_argument("--prompt", type=str, required=True, help="the text to read")
    parser.add_argument(
        "--tuned", type=str | None, default=None, help="a tuned lens file from lmlab lens-train"
    )
    parser.add_argument(
        "--target",
        type=str | None,
        default=None,
        help="a token (e.g. ' Paris') whose rank to track at every position; default: each "
        "position's next prompt token",
    )
    parser.add_argument(
        "--out", type=str, default="runs/lens", help="folder for the figures and JSON"
    )
    add_model_arguments(parser)


def token_labels(tokenizer, ids: list[int]) -> list[str]:
    """How each token of a prompt prints on a figure's axis."""
    return [tokenizer.decode([i]) for i in ids]


def one_token(tokenizer, text: str, what: str) -> int:
    ids = tokenizer.encode(text)
    if len(ids) != 1:
        raise ConfigError(
            f"--{what} {text!r} is {len(ids)} tokens; give one (often with its space)"
        )
    return ids[0]


def run(args) -> None:
    lm = load(args.model, dtype=args.dtype, device=args.device)
    tok = lm._text("the logit lens")
    ids = tok.encode(args.prompt)
    if not ids:
        raise ConfigError("--prompt is empty")
    x = torch.tensor([ids], device=next(lm.model.parameters()).device)
    target = one_token(tok, args.target, "target") if args.target is not None else None
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    labels = token_labels(tok, ids)

    def decode(i: int) -> str:
        return tok.decode([i])

    plain = logit_lens(lm.model, x, target)
    plot_lens(plain, labels, decode, out / "lens.png", title="logit lens")
    curves = {"logit lens": plain.kl_per_layer}
    report = {
        "model": args.model,
        "prompt": args.prompt,
        "tokens": labels,
        "logit_lens": plain.to_dict(),
    }
    written = [out / "lens.png"]
    if args.tuned:
        lens = TunedLens.load(args.tuned)
        tuned = tuned_lens(lm.model, x, lens, target)
        plot_lens(tuned, labels, decode, out / "tuned_lens.png", title="tuned lens")
        curves["tuned lens"] = tuned.kl_per_layer
        report["tuned_lens"] = tuned.to_dict()
        written.append(out / "tuned_lens.png")
    plot_kl_per_layer(curves, plain.labels, out / "lens_kl.png")
    atomic_write_json(out / "lens.json", report)
    last = [decode(int(i)) for i in plain.top_ids[:, -1]]
    print(f"top next token at the last position, layer by layer: {last}")
    for name, kl in curves.items():
        print(
            f"{name}: mean KL to the output per layer " + " ".join(f"{v:.2f}" for v in kl.tolist())
        )
    print("wrote " + ", ".join(str(p) for p in [*written, out / "lens_kl.png", out / "lens.json"]))
