"""A full layer x position activation-patching sweep: lmlab's batched sweep vs patching by hand.

The sweep of issue 17: SmolLM2-135M (float32), a 15-token prompt pair (IOI: the second name
swapped), ``blocks.{l}.hook_resid_pre`` patched clean -> corrupted at every layer and
position (30 x 15 = 450 patched runs), metric = the normalised logit difference.

- lmlab: ``lmlab.interp.patching.patch_residual``, one batched forward per layer (all the
  positions of a layer as rows of one batch).
- by hand: what TransformerLens' ``patching.get_act_patch_resid_pre`` does, one forward per
  (layer, position) with a replace hook on the corrupted prompt, written with
  ``lmlab.interp.hooks``.

TransformerLens itself is not timed: the installed TransformerLens 4.x has no
``HookedTransformer`` (it was removed; its from-config model is the TransformerBridge's
native one), and loading SmolLM2 there needs its Hugging Face hub files, which this offline
machine does not have. So the reference is the same loop TL runs, on the same weights;
both sides' numbers must agree (checked, atol 1e-3 on values ~1, float32).

Usage: python bench/interp_patch.py [--quick] [--threads N]
``--quick``: a tiny random Llama instead of SmolLM2 (a smoke run, seconds).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from lmlab.interp.hooks import hooks, run_with_cache
from lmlab.interp.patching import PromptPairs, logit_diff, make_pairs, patch_residual

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/machine.py, also when imported
from machine import describe_machine  # noqa: E402

CLEAN = "Then, when Mary and John went to the store, John gave a drink to"
CORRUPT = "Then, when Mary and John went to the store, Mary gave a drink to"


def by_hand(model, pairs: PromptPairs) -> torch.Tensor:
    """One forward per (layer, position), as TransformerLens' patching loop runs."""
    L, T = model.config.n_layers, pairs.clean.shape[1]
    names = [f"blocks.{i}.hook_resid_pre" for i in range(L)]
    with torch.no_grad():
        clean = logit_diff(model(pairs.clean), pairs.answer, pairs.wrong).mean()
        _, cache = run_with_cache(model, pairs.corrupt, names=names)
        corrupt = logit_diff(model(pairs.corrupt), pairs.answer, pairs.wrong).mean()
        _, source = run_with_cache(model, pairs.clean, names=names)
        out = torch.zeros(L, T)
        for layer, name in enumerate(names):
            for p in range(T):
                value = cache[name].clone()
                value[:, p] = source[name][:, p]
                with hooks(model, replace={name: value}):
                    ld = logit_diff(model(pairs.corrupt), pairs.answer, pairs.wrong).mean()
                out[layer, p] = (ld - corrupt) / (clean - corrupt)
    return out


def setup(quick: bool):
    if quick:
        from lmlab.models import build_model, get_preset

        torch.manual_seed(0)
        spec = {**get_preset("llama-small"), "vocab_size": 64, "n_layers": 2, "d_model": 32}
        model = build_model(spec).eval()
        g = torch.Generator().manual_seed(0)
        clean = torch.randint(0, 64, (1, 15), generator=g)
        corrupt = clean.clone()
        corrupt[0, 5] = (corrupt[0, 5] + 1) % 64
        return (
            "tiny random llama (quick)",
            model,
            PromptPairs(clean, corrupt, torch.tensor([1]), torch.tensor([2])),
        )
    from lmlab.lm import load

    lm = load("smollm2", dtype="float32", device="cpu")
    pairs = make_pairs(lm.tokenizer, CLEAN, CORRUPT, " Mary", " John")
    return "SmolLM2-135M float32", lm.model, pairs


def main(quick: bool = False) -> dict:
    what, model, pairs = setup(quick)
    L, T = model.config.n_layers, pairs.clean.shape[1]
    # warm-up, untimed: allocations, kernel selection for both batch shapes
    patch_residual(model, pairs, "resid_pre")
    with torch.no_grad(), hooks(model, edit={"blocks.0.hook_resid_pre": lambda a, n: a}):
        model(pairs.corrupt)
    t0 = time.perf_counter()
    ours = patch_residual(model, pairs, "resid_pre")
    t_ours = time.perf_counter() - t0
    t0 = time.perf_counter()
    theirs = by_hand(model, pairs)
    t_hand = time.perf_counter() - t0
    agree = torch.allclose(ours.effect, theirs, atol=1e-3, rtol=0)
    result = {
        "model": what,
        "sweep": f"resid_pre, {L} layers x {T} positions",
        "lmlab_s": t_ours,
        "by_hand_s": t_hand,
        "speedup": t_hand / t_ours,
        "same_numbers": agree,
        "cpu": describe_machine(),
        "threads": torch.get_num_threads(),
    }
    print(f"activation patching sweep, {what}: {result['sweep']} ({L * T} patched runs)")
    print(result["cpu"])
    print(f"  lmlab patch_residual (batched per layer)   {t_ours:8.2f} s")
    print(f"  by hand, one forward per cell (TL's loop)  {t_hand:8.2f} s")
    print(f"ratio: lmlab is {result['speedup']:.2f}x as fast; same numbers (atol 1e-3): {agree}")
    return result


if __name__ == "__main__":
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    main(args.quick)
