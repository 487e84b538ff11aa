"""``lmlab lens-train``: train a tuned lens for a model on a corpus (``lmlab.interp.lens``).

lmlab lens-train --model smollm2 --steps 60 --out runs/lens/smollm2-tuned.safetensors
"""

from __future__ import annotations

from pathlib import Path

import torch
from jsonargparse import ArgumentParser

from lmlab.cli.args import add_model_arguments
from lmlab.data import load_corpus
from lmlab.data.corpus import split_text
from lmlab.fileio import atomic_write_json
from lmlab.interp.lens import (
    corpus_windows,
    lens_points,
    mean_kl_per_layer,
    plot_kl_per_layer,
    row_labels,
    train_tuned_lens,
)
from lmlab.lm import load


def add_arguments(parser: ArgumentParser) -> None:
    parser.add_argument(
        "--model", type=str, required=True, help="a run, checkpoint, HF folder, .gguf or smollm2"
    )
    parser.add_argument(
        "--data", type=str, default="tinyshakespeare", help="corpus: a name or a text file"
    )
    parser.add_argument(
        "--chars", type=int, default=200_000, help="characters of the corpus to use"
    )
    parser.add_argument("--steps", type=int, default=100, help="optimizer steps")
    parser.add_argument("--batch_size", type=int, default=4, help="windows per step")
    parser.add_argument("--seq_len", type=int, default=64, help="tokens per window")
    parser.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate")
    parser.add_argument(
        "--eval_windows", type=int, default=8, help="held-out windows for the KL report"
    )
    parser.add_argument("--seed", type=int, default=0, help="windows drawn and their order")
    parser.add_argument("--progress", type=bool, default=True, help="show a progress bar")
    parser.add_argument(
        "--out",
        type=str,
        default="runs/lens/tuned.safetensors",
        help="the tuned lens file to write",
    )
    add_model_arguments(parser)
    # Gradients flow through the unembedding: train in float32 unless told otherwise.
    parser.set_defaults(dtype="float32")


def run(args) -> None:
    lm = load(args.model, dtype=args.dtype, device=args.device)
    tok = lm._text("training a tuned lens")
    train_text, val_text = split_text(load_corpus(args.data)[: args.chars])
    train_ids = torch.tensor(tok.encode(train_text))
    val_ids = torch.tensor(tok.encode(val_text))
    windows = corpus_windows(
        train_ids, args.seq_len, max(64, args.steps * args.batch_size), args.seed
    )
    lens, losses = train_tuned_lens(
        lm.model, windows, args.steps, args.batch_size, args.lr, args.seed, args.progress
    )
    held_out = corpus_windows(val_ids, args.seq_len, args.eval_windows, args.seed + 1)
    logit_kl = mean_kl_per_layer(lm.model, held_out)
    tuned_kl = mean_kl_per_layer(lm.model, held_out, lens)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    labels = row_labels(lens_points(lm.model)[0])
    meta = {"model": args.model, "data": args.data, "steps": args.steps, "seed": args.seed}
    lens.save(out, meta)
    plot_kl_per_layer(
        {"logit lens": logit_kl, "tuned lens": tuned_kl}, labels, out.with_suffix(".png")
    )
    report = {
        **meta,
        "rows": labels,
        "held_out_kl_logit_lens": logit_kl.tolist(),
        "held_out_kl_tuned_lens": tuned_kl.tolist(),
        "train_loss": losses,
    }
    atomic_write_json(out.with_suffix(".json"), report)
    lower = int((tuned_kl[:-1] < logit_kl[:-1]).sum())
    print(
        f"held-out mean KL to the output (nats), logit lens -> tuned lens, lower at {lower} of "
        f"{len(labels) - 1} layers:"
    )
    print(
        "  "
        + "  ".join(
            f"{r}: {a:.2f}->{b:.2f}" for r, a, b in zip(labels, logit_kl, tuned_kl, strict=True)
        )
    )
    print(f"wrote {out}, {out.with_suffix('.png')}, {out.with_suffix('.json')}")
