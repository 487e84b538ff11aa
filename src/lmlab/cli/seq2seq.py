"""``lmlab seq2seq``: train an encoder-decoder on a generated task with teacher forcing,
then score it on held-out pairs with teacher forcing and free running (exposure bias)."""

from __future__ import annotations

import json
from pathlib import Path

from jsonargparse import ArgumentParser

import lmlab
from lmlab.data.seq2seq_tasks import TASKS, Seq2SeqVocab, seq2seq_pairs
from lmlab.eval.seq2seq import evaluate_seq2seq
from lmlab.fileio import atomic_write_text
from lmlab.train import TrainConfig
from lmlab.train.seq2seq import train_seq2seq


def add_arguments(parser: ArgumentParser) -> None:
    parser.add_argument("--task", type=str, default="reverse", help=f"one of: {', '.join(TASKS)}")
    parser.add_argument(
        "--model", type=str, default="seq2seq-tiny", help="an encoder-decoder preset"
    )
    parser.add_argument("--eval_n", type=int, default=500, help="held-out pairs to score")
    parser.add_argument(
        "--num_beams", type=int, default=1, help="beam width of free-running decoding"
    )
    parser.add_class_arguments(TrainConfig, "train", help="the trainer's settings")
    parser.set_defaults(
        {
            "train.out_dir": "runs/seq2seq",
            "train.batch_size": 64,
            "train.lr": 1e-3,
            "train.max_steps": 1500,
        }
    )


def run(args) -> None:
    config = TrainConfig(**vars(args.train))
    result = train_seq2seq(args.task, args.model, config)
    model = lmlab.load(config.out_dir).model
    vocab = Seq2SeqVocab.for_task(args.task)
    held_out = seq2seq_pairs(args.task, args.eval_n, seed=-1_000_000 - config.seed)
    scores = evaluate_seq2seq(model, vocab, held_out, num_beams=args.num_beams)
    scores = {"task": args.task, "steps": result.step, "wall_s": result.wall_time_s, **scores}
    atomic_write_text(Path(config.out_dir) / "seq2seq.json", json.dumps(scores, indent=2) + "\n")
    print(f"trained {result.step} steps in {result.wall_time_s:.0f} s on {args.task}")
    print(
        f"teacher forcing: token accuracy {scores['tf_token_acc']:.3f}, whole target {scores['tf_exact']:.3f}"
    )
    print(
        f"free running:    exact match {scores['exact']:.3f}, BLEU {scores['bleu']:.1f}, chrF {scores['chrf']:.1f}"
    )
    for e in scores["examples"][:3]:
        print(f"  {e['source']!r} -> {e['output']!r} (want {e['target']!r})")
    print(f"wrote {config.out_dir}/seq2seq.json")
