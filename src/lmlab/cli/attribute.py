"""``lmlab attribute``: which prompt tokens a decoder's next-token prediction rests on
(``lmlab.interp.attribution.attribute_prompt``).

lmlab attribute --model smollm2 --prompt "The capital of France is" --target " Paris"

Writes ``attribution.png`` (tokens coloured by each method), ``attribution.html`` (the
same, self-contained, exact values in tooltips) and ``attribution.json`` into ``--out``.
"""

from __future__ import annotations

from pathlib import Path

from jsonargparse import ArgumentParser

from lmlab import api
from lmlab.cli.args import add_model_arguments
from lmlab.fileio import atomic_write_json
from lmlab.interp.attribution import METHODS, QUADRATURES, attribute_prompt
from lmlab.interp.heatmap import plot_heatmap, save_heatmap_html


def add_arguments(parser: ArgumentParser) -> None:
    parser.add_argument(
        "--model",
        type=str,
        default="runs/demo",
        help="a decoder lmlab.load takes: a checkpoint or run directory, an HF folder, a .gguf "
        "file or a pretrained name (smollm2)",
    )
    parser.add_argument("--prompt", type=str, required=True, help="the text to attribute")
    parser.add_argument(
        "--target",
        type=str | None,
        default=None,
        help="the next token to explain, as text of one token (mind a leading space: ' Paris'); "
        "default: the model's most likely next token",
    )
    parser.add_argument(
        "--method",
        type=str,
        default="all",
        help=f"all, or comma-separated: {', '.join(METHODS)} (ig: integrated gradients; gxi: "
        "gradient x input)",
    )
    parser.add_argument(
        "--score",
        type=str,
        default="logprob",
        help="what is attributed: logprob (the target's log-probability) or logit",
    )
    parser.add_argument("--steps", type=int, default=50, help="integrated gradients' steps")
    parser.add_argument(
        "--baseline",
        type=str,
        default="zeros",
        help="for ig and occlusion: zeros (a zero embedding), eos (the end token's embedding) "
        "or a token id",
    )
    parser.add_argument(
        "--quadrature",
        type=str,
        default="gausslegendre",
        help=f"integrated gradients' rule: {', '.join(QUADRATURES)}",
    )
    parser.add_argument("--window", type=int, default=1, help="occlusion window, in tokens")
    parser.add_argument(
        "--internal_batch_size",
        type=int,
        default=16,
        help="rows per forward/backward pass (ig steps, occlusion windows): bounds memory",
    )
    parser.add_argument(
        "--out", type=str, default="runs/attribute", help="folder for the PNG, HTML and JSON"
    )
    add_model_arguments(parser)
    # float32 by default: bf16 gradients are too coarse for IG's completeness check
    parser.set_defaults(dtype="float32")


def run(args) -> None:
    lm = api.load(args.model, dtype=args.dtype, device=args.device)
    result = attribute_prompt(
        lm,
        args.prompt,
        target=args.target,
        methods=args.method,
        score=args.score,
        steps=args.steps,
        baseline=args.baseline,
        quadrature=args.quadrature,
        window=args.window,
        internal_batch_size=args.internal_batch_size,
        progress=True,
    )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = {name: r.values.tolist() for name, r in result.results.items()}
    title = f"{args.score} of {result.target!r} after the prompt, attributed to its tokens"
    png = plot_heatmap(out / "attribution.png", result.tokens, rows, title)
    page = save_heatmap_html(out / "attribution.html", result.tokens, rows, title)
    atomic_write_json(out / "attribution.json", {"model": args.model, **result.to_dict()})
    score = next(iter(result.results.values())).score
    print(f"target {result.target!r} (id {result.target_id}): {args.score} {score:.4f}")
    for name, r in result.results.items():
        top = sorted(range(len(r.values)), key=lambda i: -abs(float(r.values[i])))[:3]
        shown = ", ".join(f"{result.tokens[i]!r} {float(r.values[i]):+.3g}" for i in top)
        extra = f" (completeness delta {r.delta:+.2e})" if r.delta is not None else ""
        print(f"  {name:<9} top tokens: {shown}{extra}")
    ig = result.results.get("ig")
    if ig is not None and abs(ig.delta) > 0.05 * abs(ig.score - ig.baseline_score):
        print(
            f"note: integrated gradients' completeness delta is {ig.delta:+.3g} against a "
            f"score change of {ig.score - ig.baseline_score:+.3g}: the integral has not "
            "converged; raise --steps or try another --baseline"
        )
    print(f"wrote {png}, {page} and {out / 'attribution.json'}")
