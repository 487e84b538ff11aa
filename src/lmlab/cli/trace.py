"""``lmlab trace``: causal tracing (Meng et al. 2022) of one prompt, as figures and JSON.

lmlab trace --model smollm2 --prompt "The Eiffel Tower is in the city of" \
            --subject "The Eiffel Tower" --answer " Paris" --out runs/trace
"""

from __future__ import annotations

from pathlib import Path

import torch
from jsonargparse import ArgumentParser

from lmlab.cli.args import add_model_arguments
from lmlab.cli.lens import one_token, token_labels
from lmlab.errors import ConfigError
from lmlab.fileio import atomic_write_json
from lmlab.interp.patching import causal_trace, plot_effect, subject_positions
from lmlab.lm import load


def add_arguments(parser: ArgumentParser) -> None:
    parser.add_argument(
        "--model", type=str, required=True, help="a run, checkpoint, HF folder, .gguf or smollm2"
    )
    parser.add_argument("--prompt", type=str, required=True, help="the prompt")
    parser.add_argument("--subject", type=str, required=True, help="words of the prompt to noise")
    parser.add_argument(
        "--answer",
        type=str | None,
        default=None,
        help="the token to trace; default: the model's top one",
    )
    parser.add_argument(
        "--kind",
        type=str,
        default="resid",
        help="restore resid, mlp, attn or all (each one figure)",
    )
    parser.add_argument("--samples", type=int, default=10, help="noise samples averaged")
    parser.add_argument(
        "--noise", type=float, default=3.0, help="noise std in units of the embeddings' std"
    )
    parser.add_argument(
        "--window", type=int, default=10, help="layers restored together for mlp and attn"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the noise")
    parser.add_argument("--progress", type=bool, default=True, help="show a progress bar")
    parser.add_argument(
        "--out", type=str, default="runs/trace", help="folder for the figures and JSON"
    )
    add_model_arguments(parser)


def run(args) -> None:
    kinds = ["resid", "mlp", "attn"] if args.kind == "all" else [args.kind]
    if any(k not in ("resid", "mlp", "attn") for k in kinds):
        raise ConfigError(f"--kind {args.kind!r}: choose resid, mlp, attn or all")
    lm = load(args.model, dtype=args.dtype, device=args.device)
    tok = lm._text("causal tracing")
    ids = tok.encode(args.prompt)
    subject = subject_positions(tok, args.prompt, args.subject)
    x = torch.tensor([ids], device=next(lm.model.parameters()).device)
    if args.answer is None:
        with torch.no_grad():
            answer = int(lm.model(x)[0, -1].argmax())
    else:
        answer = one_token(tok, args.answer, "answer")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    labels = token_labels(tok, ids)
    report = {
        "model": args.model,
        "prompt": args.prompt,
        "subject": args.subject,
        "answer": tok.decode([answer]),
        "tokens": labels,
    }
    written = []
    for kind in kinds:
        result = causal_trace(
            lm.model,
            x,
            answer,
            subject,
            kind,
            args.samples,
            args.noise,
            args.window,
            args.seed,
            progress=args.progress,
        )
        what = {
            "resid": "the residual stream after each layer",
            "mlp": f"MLP outputs ({args.window} layers around each)",
            "attn": f"attention outputs ({args.window} layers around each)",
        }[kind]
        plot_effect(
            result.probs,
            [str(i) for i in range(result.probs.shape[0])],
            labels,
            out / f"trace_{kind}.png",
            f"causal tracing: p({tok.decode([answer])!r}) with {what} restored\n"
            f"clean {result.p_clean:.3f}, subject noised {result.p_corrupt:.3f} "
            f"({args.samples} samples)",
            "token (* = subject, noised)",
            colorbar=f"p({tok.decode([answer])!r})",
            highlight=subject,
            centre=False,
        )
        report[kind] = result.to_dict()
        written.append(out / f"trace_{kind}.png")
        best = divmod(int(result.probs.argmax()), result.probs.shape[1])
        print(
            f"{kind}: p clean {result.p_clean:.3f}, noised {result.p_corrupt:.3f}; the best "
            f"restoration {result.probs.max():.3f} at layer {best[0]}, token {labels[best[1]]!r}"
        )
    atomic_write_json(out / "trace.json", report)
    print("wrote " + ", ".join(str(p) for p in [*written, out / "trace.json"]))
