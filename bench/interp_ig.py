"""Integrated gradients on SmolLM2: lmlab against Captum on the same weights.

50 steps (Gauss-Legendre, the default of both), a 20-token prompt, token 0's embedding at
every position as the baseline (Captum's layer method takes baselines as ids), the
log-probability of the model's most likely next token, steps in batches of 10 rows for
both (``internal_batch_size``). Captum runs as its users run it on a language model:
``LayerIntegratedGradients`` on the token-embedding layer with a forward function over
ids. lmlab runs ``lmlab.interp.attribution.integrated_gradients`` (embeddings put in
through the ``hook_embed`` hook point). Both in float32 on the CPU.

Prints the seconds of each (median of ``--repeats``), the ratio Captum / lmlab (above 1:
lmlab is faster), the peak memory each adds above the loaded model (resident memory
sampled every 2 ms: CPU tensors live there), how far the two attributions are apart, and
the CPU model, its vector flags and the thread count.

``--quick``: a tiny random Llama-shaped model and 8 steps instead, for a smoke run in
seconds (no SmolLM2 needed).

Usage: python bench/interp_ig.py [--quick] [--repeats 3] [--threads N]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import threading
import time
from pathlib import Path

import torch
from captum.attr import LayerIntegratedGradients

from lmlab.interp.attribution import integrated_gradients, next_token_score

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/machine.py, also when imported
from machine import describe_machine  # noqa: E402

PROMPT = (
    "The old lighthouse keeper climbed the narrow stairs every evening, lit the great lamp, "
    "and watched the ships pass safely through the dark water toward the"
)


def _rss() -> int:
    """Resident memory of this process, in bytes (Linux; 0 elsewhere)."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
    except (OSError, IndexError, ValueError):
        return 0
    return pages * os.sysconf("SC_PAGE_SIZE")


def peak_rss_above_start(fn) -> tuple[object, int]:
    """(fn(), the highest resident memory seen while it ran minus that at its start)."""
    start, peak, done = _rss(), [0], threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], _rss())
            time.sleep(0.002)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        out = fn()
    finally:
        done.set()
        thread.join()
    return out, max(peak[0], _rss()) - start


def timed(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def _model_and_ids(quick: bool):
    if quick:
        from lmlab.models import build_model, get_preset

        torch.manual_seed(0)
        spec = {**get_preset("llama-small"), "vocab_size": 256, "n_layers": 2}
        model = build_model({**spec, "d_model": 64, "n_heads": 4}).eval()
        return model, torch.randint(0, 256, (1, 8)), "random llama-small (2 layers, d 64)"
    import lmlab

    lm = lmlab.load("smollm2", dtype="float32", device="cpu")
    ids = torch.tensor([lm.tokenizer.encode(PROMPT)[:20]])
    return lm.model, ids, "SmolLM2-135M-Instruct (float32)"


def main(quick: bool = False, repeats: int = 3) -> dict:
    """Run the comparison; returns the numbers it prints."""
    model, ids, name = _model_and_ids(quick)
    steps, batch = (8, 4) if quick else (50, 10)
    repeats = 1 if quick else repeats
    with torch.no_grad():
        target = int(model(ids)[0, -1].argmax())
    score_fn = next_token_score(target)

    # Captum's LayerIntegratedGradients takes its baseline as ids: token 0 at every position
    # (SmolLM2's <|endoftext|>) for both, so both integrate along the same path.
    base_id = 0

    def ours():
        return integrated_gradients(
            model, ids, score_fn, baseline=base_id, steps=steps, internal_batch_size=batch
        )

    lig = LayerIntegratedGradients(lambda rows: score_fn(model, rows), model.tok_emb)

    def captum():
        return lig.attribute(
            ids, baselines=torch.full_like(ids, base_id), n_steps=steps, internal_batch_size=batch
        )

    ours(), captum()  # warm-up: allocator pools, oneDNN kernel choice
    ours_result, ours_mem = peak_rss_above_start(ours)
    theirs_result, theirs_mem = peak_rss_above_start(captum)
    diff = float((ours_result.elements - theirs_result[0].detach()).abs().max())
    t_ours = timed(ours, repeats)
    t_theirs = timed(captum, repeats)
    result = {
        "model": name,
        "tokens": ids.shape[1],
        "steps": steps,
        "internal_batch_size": batch,
        "lmlab_s": t_ours,
        "captum_s": t_theirs,
        "ratio_captum_over_lmlab": t_theirs / t_ours,
        "lmlab_peak_mib": ours_mem / 2**20,
        "captum_peak_mib": theirs_mem / 2**20,
        "max_abs_difference": diff,
        "completeness_delta": ours_result.delta,
        "cpu": describe_machine(),
    }
    print(
        f"integrated gradients, {name}, {ids.shape[1]}-token prompt, {steps} steps "
        f"(Gauss-Legendre), internal batch {batch}, baseline: token {base_id}'s embedding"
    )
    print(result["cpu"])
    print(f"  lmlab   {t_ours:8.2f} s   peak +{result['lmlab_peak_mib']:7.1f} MiB")
    print(f"  captum  {t_theirs:8.2f} s   peak +{result['captum_peak_mib']:7.1f} MiB")
    print(
        f"attributions agree to {diff:.1e} (max abs); lmlab's completeness delta {ours_result.delta:+.2e}"
    )
    print(
        f"ratio (Captum time / lmlab time, above 1: lmlab faster): {result['ratio_captum_over_lmlab']:.2f}x"
    )
    return result


if __name__ == "__main__":
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--quick", action="store_true", help="tiny random model, 8 steps")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    main(args.quick, args.repeats)
