"""Time to a validation loss: lmlab against nanoGPT's documented CPU run, in one invocation.

The reference is a faithful float32 reimplementation of nanoGPT's "I only have a MacBook"
run (bench/nanogpt_ref.py: 4 x 128, block 64, batch 12, 2000 iterations), which reaches a
validation loss of about 1.88 on Tiny Shakespeare. lmlab then trains the preset named by
``--preset`` through ``lmlab train``'s own code (its model, its training settings, the same
character tokenizer and the same split: the last 10% of the text is validation) until its
validation loss is at or below the reference's final one. Both are scored on the same
fixed validation windows (block 64, so no model gains from a longer context), evaluated
outside the timed part, and the time counted is the training steps' wall time.

It also prints the machine's float32 and bf16 matmul ceilings (``torch.mm`` at 1024 and
2048, all threads, median of several repetitions after a warm-up) and each run's model
FLOP/s against them. Rounds alternate reference and lmlab, so a slow spell of the machine
does not land on one side only.

Usage: python bench/train_to_loss.py [--preset llama-char-fast] [--rounds 2]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import numpy as np
import torch
import torch.nn.functional as F

from lmlab.data import CharTokenizer, load_corpus, split_text
from lmlab.models import build_model, get_preset
from lmlab.train import TrainConfig, train
from lmlab.train.recipes import preset_training
from machine import describe_machine
from nanogpt_ref import NanoConfig, train_nanogpt

EVAL_WINDOWS = 480
BLOCK = 64


def matmul_ceiling(n: int, dtype: torch.dtype, reps: int = 7) -> float:
    """Median FLOP/s of an n x n x n ``torch.mm`` in ``dtype`` on all threads."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    for _ in range(3):
        torch.mm(a, b)
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        torch.mm(a, b)
        times.append(time.perf_counter() - start)
    return 2 * n**3 / statistics.median(times)


def validation_windows(val_ids: np.ndarray) -> torch.Tensor:
    """Fixed random windows of BLOCK + 1 tokens from the validation text (seed 0)."""
    ids = torch.from_numpy(val_ids.astype(np.int64))
    starts = torch.randint(
        len(ids) - BLOCK - 1, (EVAL_WINDOWS,), generator=torch.Generator().manual_seed(0)
    )
    return torch.stack([ids[s : s + BLOCK + 1] for s in starts])


@torch.no_grad()
def val_loss(model, windows: torch.Tensor) -> float:
    was = model.training
    model.eval()
    losses = [
        F.cross_entropy(model(w[:, :-1]).float().flatten(0, 1), w[:, 1:].flatten(), reduction="sum")
        for w in windows.split(96)
    ]
    model.train(was)
    return (torch.stack(losses).sum() / windows[:, 1:].numel()).item()


def flops_per_token(n_params: int, n_layers: int, ctx: int, d: int) -> float:
    """Training FLOPs per token: 6 N plus attention's 12 L T D (Kaplan et al. 2020)."""
    return 6 * n_params + 12 * n_layers * ctx * d


def run_reference(train_ids: np.ndarray, vocab: int, windows: torch.Tensor) -> dict:
    config = NanoConfig(vocab_size=vocab)
    model, seconds = train_nanogpt(torch.from_numpy(train_ids.astype(np.int64)), config)
    n = sum(p.numel() for p in model.parameters()) - model.wpe.weight.numel()
    tokens = config.max_iters * config.batch_size * config.block_size
    flops = flops_per_token(n, config.n_layer, config.block_size, config.n_embd)
    return {
        "loss": val_loss(model, windows),
        "seconds": seconds,
        "tokens": tokens,
        "flops_per_s": flops * tokens / seconds,
    }


def run_lmlab(preset: str, train_ids, vocab: int, windows, target: float, every: int) -> dict:
    """Train the preset with its recorded settings; stop at the first evaluation <= target."""
    spec = {**get_preset(preset), "vocab_size": vocab}
    settings = preset_training(preset)
    torch.manual_seed(settings.get("seed", 1337))
    model = build_model(spec)
    state = {"eval_s": 0.0, "hit": None, "curve": []}

    def on_event(event):
        if event["event"] != "train" or event["step"] % every:
            return
        # elapsed_s counts the earlier evaluations (they ran inside the run): take them out
        seconds = event["elapsed_s"] - state["eval_s"]
        start = time.perf_counter()
        loss = val_loss(model, windows)
        state["eval_s"] += time.perf_counter() - start
        state["curve"].append((event["step"], seconds, loss))
        if loss <= target and state["hit"] is None:
            state["hit"] = (event["step"], seconds, loss, event["tokens"])
            raise _Reached

    with tempfile.TemporaryDirectory() as out:
        config = TrainConfig(
            **{
                **settings,
                "out_dir": out,
                "log_interval": every,
                "eval_interval": 10**9,
                "ckpt_interval": 10**9,
                "progress": False,
            }
        )
        try:
            train(model, train_ids, None, config, callbacks=[on_event])
        except _Reached:
            pass
    n = sum(p.numel() for p in model.parameters()) - (
        model.pos_emb.weight.numel() if getattr(model, "pos_emb", None) is not None else 0
    )
    c = model.config
    result = {"curve": state["curve"], "settings": settings, "params": n}
    if state["hit"]:
        step, seconds, loss, tokens = state["hit"]
        flops = flops_per_token(n, c.n_layers, config.seq_len, c.d_model)
        result.update(
            step=step,
            seconds=seconds,
            loss=loss,
            tokens=tokens,
            flops_per_s=flops * tokens / seconds,
        )
    return result


class _Reached(Exception):
    """Raised from the callback to stop lmlab's run at the target loss."""


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--preset", default="llama-char-fast")
    ap.add_argument("--rounds", type=int, default=2, help="alternating rounds (reference, lmlab)")
    ap.add_argument("--every", type=int, default=25, help="lmlab steps between evaluations")
    args = ap.parse_args()
    print(describe_machine())
    ceilings = {
        (dtype, n): matmul_ceiling(n, dtype)
        for dtype in (torch.float32, torch.bfloat16)
        for n in (1024, 2048)
    }
    for (dtype, n), flops in ceilings.items():
        print(
            f"  torch.mm {n}^3 {str(dtype).split('.')[-1]:8s} {flops / 1e9:7.0f} GFLOP/s (median of 7)"
        )
    fp32_peak = max(v for (d, _), v in ceilings.items() if d == torch.float32)
    bf16_peak = max(v for (d, _), v in ceilings.items() if d == torch.bfloat16)

    text = load_corpus("tinyshakespeare")
    tok = CharTokenizer.train(text)
    train_text, val_text = split_text(text)
    train_ids = np.asarray(tok.encode(train_text), dtype=np.uint16)
    windows = validation_windows(np.asarray(tok.encode(val_text), dtype=np.uint16))

    refs, ours = [], []
    for r in range(args.rounds):
        ref = run_reference(train_ids, tok.vocab_size, windows)
        refs.append(ref)
        print(
            f"round {r + 1}: nanoGPT reference  val loss {ref['loss']:.4f} after 2000 steps in "
            f"{ref['seconds']:.1f} s ({ref['flops_per_s'] / 1e9:.2f} GFLOP/s = "
            f"{ref['flops_per_s'] / fp32_peak:.3f} of the fp32 ceiling)"
        )
        mine = run_lmlab(args.preset, train_ids, tok.vocab_size, windows, ref["loss"], args.every)
        ours.append(mine)
        if "seconds" not in mine:
            last = mine["curve"][-1]
            print(
                f"round {r + 1}: lmlab {args.preset} did not reach {ref['loss']:.4f}: {last[2]:.4f} at step {last[0]}"
            )
            continue
        print(
            f"round {r + 1}: lmlab {args.preset:14s} val loss {mine['loss']:.4f} at step {mine['step']} in "
            f"{mine['seconds']:.1f} s ({mine['tokens']:,} tokens; {mine['flops_per_s'] / 1e9:.2f} GFLOP/s = "
            f"{mine['flops_per_s'] / fp32_peak:.3f} of fp32, {mine['flops_per_s'] / bf16_peak:.3f} of bf16)"
        )
    reached = [m for m in ours if "seconds" in m]
    if len(reached) == len(ours):
        ref_s = statistics.median(r["seconds"] for r in refs)
        our_s = statistics.median(m["seconds"] for m in ours)
        print(
            f"time to nanoGPT's loss: lmlab {our_s:.1f} s vs reference {ref_s:.1f} s = "
            f"{our_s / ref_s:.2f} of its time (target <= 0.33; medians of {args.rounds} rounds)"
        )
    print(f"lmlab settings ({args.preset}): {ours[0]['settings']}")


if __name__ == "__main__":
    main()
