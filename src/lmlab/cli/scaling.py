"""``lmlab scaling``: a grid of GPT sizes x token budgets, trained resumably, then Kaplan and
Chinchilla fits with compute-optimal plans (``lmlab.sweep.scaling``)."""

from __future__ import annotations

from jsonargparse import ArgumentParser

from lmlab.cli.args import options
from lmlab.sweep import scaling


def add_arguments(parser: ArgumentParser) -> None:
    parser.add_function_arguments(scaling, as_group=False)


def run(args) -> None:
    result = scaling(**options(args))
    print()
    print("| run | params | non-emb. | tokens | FLOPs | val loss | CPU s |")
    print("|---|--:|--:|--:|--:|--:|--:|")
    for r in result.runs:
        print(
            f"| {r.name} | {r.params:,} | {r.params_non_embedding:,} | {r.tokens:,} | "
            f"{r.flops:.2e} | {r.val_loss:.4f} | {r.cpu_s:.0f} |"
        )
    print(f"total CPU time {sum(r.cpu_s for r in result.runs) / 60:.1f} min")
    fits = result.fits
    print()
    for key, law in fits["kaplan"].items():
        if key != "frontier" and law:
            print(f"Kaplan {key}: exponent {law['exponent']:.3f}, scale {law['scale']:.3g}")
    for key in ("chinchilla", "chinchilla_non_embedding"):
        fit = fits.get(key)
        if not fit:
            continue
        terms = ", ".join(
            f"{p} {fit[p]:.3g}{_interval(fit['intervals'], p)}"
            for p in ("E", "A", "B", "alpha", "beta")
        )
        print(f"L(N, D), N = {fit['N']}: {terms}")
        if not fit["compute_optimal"]:
            print("  no compute-optimal split: an exponent is not positive")
        for plan in fit["compute_optimal"]:
            print(
                f"  C = {plan['compute']:.2e} FLOPs: N_opt {plan['n']:,.0f}, D_opt "
                f"{plan['d']:,.0f} ({plan['d'] / plan['n']:.1f} tokens per parameter), "
                f"loss {plan['loss']:.3f}"
            )
    held = fits.get("holdout")
    if held and "predicted" in held:
        print(
            f"\nheld out {held['run']}: predicted {held['predicted']:.4f}, measured "
            f"{held['actual']:.4f}, error {100 * held['error']:+.2f}%"
        )
    elif held:
        print(f"\nholdout {held['run']}: {held['note']}")
    print(f"\nsaved: {result.files['json']}, {result.files['plot']}; runs in {result.out_dir}/runs")


def _interval(intervals: dict, name: str) -> str:
    """`` [low, high]`` of a bootstrap interval, or nothing without a bootstrap."""
    if name not in intervals:
        return ""
    low, high = intervals[name]
    return f" [{low:.3g}, {high:.3g}]"
