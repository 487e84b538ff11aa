"""How well an encoder-decoder does a generated task, with teacher forcing and without.

Under teacher forcing every target position is predicted from the true previous tokens;
free running (how the model is used) feeds it its own previous outputs, so one early
mistake can derail the rest: the gap between the two is exposure bias (Ranzato et al.
2016; Bengio et al. 2015).

- ``tf_token_acc``: next-token accuracy given the true prefix;
- ``tf_exact``: every token of the target right given the true prefix;
- ``exact``: the greedy (or beam) output equals the target, decoding freely;
- ``bleu`` and ``chrf``: sacrebleu's corpus scores of the free-running outputs.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from lmlab.checkpoint.io import load_model
from lmlab.data.seq2seq_tasks import EOS, Seq2SeqVocab, seq2seq_pairs
from lmlab.eval.text import bleu, chrf
from lmlab.fileio import atomic_write_json
from lmlab.generate.params import SamplingParams
from lmlab.generate.seq2seq import seq2seq_generate
from lmlab.models.seq2seq import Seq2Seq
from lmlab.train import TrainConfig
from lmlab.train.seq2seq import IGNORE, collate_pairs, train_seq2seq


@torch.inference_mode()
def evaluate_seq2seq(
    model: Seq2Seq,
    vocab: Seq2SeqVocab,
    pairs: Sequence[tuple[str, str]],
    batch_size: int = 64,
    num_beams: int = 1,
    max_new_tokens: int | None = None,
) -> dict[str, Any]:
    """The scores of the module docstring on (source, target) text pairs, and a few
    examples of free-running outputs."""
    was_training = model.training
    model.eval()
    device = model.embed.weight.device
    right_tokens = total_tokens = tf_exact = exact = 0
    outputs: list[str] = []
    longest = max(len(vocab.encode(t)) for _, t in pairs) + 1
    params = SamplingParams(
        max_new_tokens=max_new_tokens or longest + 4, temperature=0, num_beams=num_beams, eos_id=EOS
    )
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start : start + batch_size]
        encoded = [(vocab.encode(s), vocab.encode(t)) for s, t in chunk]
        batch = {k: v.to(device) for k, v in collate_pairs(encoded).items()}
        predicted = model(batch["src"], batch["tgt_in"]).argmax(-1)
        real = batch["tgt_out"] != IGNORE
        right = (predicted == batch["tgt_out"]) & real
        right_tokens += int(right.sum())
        total_tokens += int(real.sum())
        tf_exact += int((right | ~real).all(dim=1).sum())
        generated = seq2seq_generate(model, [s for s, _ in encoded], params).ids
        for (_, target), ids in zip(chunk, generated):
            text = vocab.decode(ids)
            outputs.append(text)
            exact += text == target
    model.train(was_training)
    references = [t for _, t in pairs]
    n = len(pairs)
    return {
        "n": n,
        "tf_token_acc": right_tokens / total_tokens,
        "tf_exact": tf_exact / n,
        "exact": exact / n,
        "bleu": bleu(outputs, references).score,
        "chrf": chrf(outputs, references).score,
        "examples": [
            {"source": s, "target": t, "output": o} for (s, t), o in list(zip(pairs, outputs))[:5]
        ],
    }


def train_and_score(
    task: str = "reverse",
    model: str = "seq2seq-tiny",
    eval_n: int = 500,
    num_beams: int = 1,
    config: TrainConfig | None = None,
) -> dict[str, Any]:
    """Train an encoder-decoder on ``task`` (``train_seq2seq``), score it on ``eval_n``
    held-out pairs (seeds the training stream never draws) with and without teacher
    forcing, and write ``seq2seq.json`` into the run folder -> the scores."""
    config = config or TrainConfig(out_dir="runs/seq2seq")
    result = train_seq2seq(task, model, config)
    trained = load_model(config.out_dir)[0]
    held_out = seq2seq_pairs(task, eval_n, seed=-1_000_000 - config.seed)
    scores = evaluate_seq2seq(trained, Seq2SeqVocab.for_task(task), held_out, num_beams=num_beams)
    scores = {"task": task, "steps": result.step, "wall_s": result.wall_time_s, **scores}
    atomic_write_json(Path(config.out_dir) / "seq2seq.json", scores)
    return scores
