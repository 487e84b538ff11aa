"""How well an encoder-decoder does a generated task, with teacher forcing and without.

Under teacher forcing every target position is predicted from the true previous tokens;
free running (how the model is used) feeds it its own previous outputs, so one early
mistake can derail the rest: the gap between the two is exposure bias (Ranzato et al.
2016; Bengio et al. 2015).

- ``tf_token_acc``: next-token accuracy given the true prefix;
- ``free_token_acc``: the same positions (each target token and the end), scored on the
  greedy (or beam) output: is its i-th token the target's i-th token? (``position_accuracy``);
- ``tf_exact``: every token of the target right given the true prefix;
- ``exact``: the greedy (or beam) output equals the target, decoding freely;
- ``bleu`` and ``chrf``: sacrebleu's corpus scores of the free-running outputs. BLEU
  counts word n-grams up to 4, so a one-word target (a reversed string, a date) scores 0
  even when right: where no reference has a space, BLEU is taken over characters
  (sacrebleu's ``tokenize="char"``; ``bleu_tokenize`` in the scores says which).

``train_and_score`` also measures the teacher-forced and free-running scores of a few
held-out pairs at every evaluation of the run, so the gap can be watched as it opens and
closes (``seq2seq.png``).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from lmlab.checkpoint.io import load_model
from lmlab.data.seq2seq_tasks import EOS, Seq2SeqVocab, seq2seq_pairs
from lmlab.errors import ConfigError
from lmlab.eval.text import bleu, chrf
from lmlab.fileio import atomic_write_json
from lmlab.generate.params import SamplingParams
from lmlab.generate.seq2seq import seq2seq_generate
from lmlab.models.seq2seq import Seq2Seq
from lmlab.train import TrainConfig
from lmlab.train.seq2seq import IGNORE, collate_pairs, train_seq2seq


def position_accuracy(
    outputs: Sequence[Sequence[int]], targets: Sequence[Sequence[int]], eos_id: int
) -> float:
    """Share of the target positions (every target token and the end, ``eos_id``) where
    the output holds the same token at the same position; ``outputs`` are generated ids
    (with the eos that ended them, if any), ``targets`` ids without eos::

        outputs [[5, 6, 2]], targets [[5, 7]] -> 5 = 5, 6 != 7, 2 = eos: 2/3
        outputs [[5]],       targets [[5, 7]] -> 5 = 5, then nothing: 1/3
    """
    if len(outputs) != len(targets):
        raise ValueError(f"{len(outputs)} outputs for {len(targets)} targets")
    right = total = 0
    for output, target in zip(outputs, targets):
        wanted = [*target, eos_id]
        right += sum(o == t for o, t in zip(output, wanted))
        total += len(wanted)
    return right / total if total else 0.0


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
    generated_ids: list[list[int]] = []
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
        generated_ids += generated
        for (_, target), ids in zip(chunk, generated):
            text = vocab.decode(ids)
            outputs.append(text)
            exact += text == target
    model.train(was_training)
    references = [t for _, t in pairs]
    tokenize = "13a" if any(" " in t for t in references) else "char"
    n = len(pairs)
    return {
        "n": n,
        "tf_token_acc": right_tokens / total_tokens,
        "free_token_acc": position_accuracy(
            generated_ids, [vocab.encode(t) for _, t in pairs], EOS
        ),
        "tf_exact": tf_exact / n,
        "exact": exact / n,
        "bleu": bleu(outputs, references, tokenize=tokenize).score,
        "bleu_tokenize": tokenize,
        "chrf": chrf(outputs, references).score,
        "examples": [
            {"source": s, "target": t, "output": o} for (s, t), o in list(zip(pairs, outputs))[:5]
        ],
    }


CURVE_KEYS = ("tf_token_acc", "free_token_acc", "tf_exact", "exact")


def train_and_score(
    task: str = "reverse",
    model: str = "seq2seq-tiny",
    eval_n: int = 500,
    num_beams: int = 1,
    track_n: int = 100,
    config: TrainConfig | None = None,
) -> dict[str, Any]:
    """Train an encoder-decoder on ``task`` (``train_seq2seq``), score it on ``eval_n``
    held-out pairs (seeds the training stream never draws) with and without teacher
    forcing, and write ``seq2seq.json`` and ``seq2seq.png`` into the run folder -> the
    scores. At each of the run's evaluations, ``track_n`` other held-out pairs are scored
    both ways too (greedy): the scores' ``curve`` (steps of this call only; 0: off)."""
    if track_n < 0 or eval_n < 1:
        raise ConfigError(
            f"eval_n={eval_n} and track_n={track_n} are invalid: eval_n >= 1, track_n >= 0"
        )
    config = config or TrainConfig(out_dir="runs/seq2seq")
    vocab = Seq2SeqVocab.for_task(task)
    tracked = seq2seq_pairs(task, track_n, seed=-2_000_000 - config.seed) if track_n else []
    curve: list[dict[str, float]] = []

    def track(net, event):
        scores = evaluate_seq2seq(net, vocab, tracked)
        curve.append({"step": event["step"], **{k: scores[k] for k in CURVE_KEYS}})

    result = train_seq2seq(task, model, config, on_eval=track if tracked else None)
    trained = load_model(config.out_dir)[0]
    held_out = seq2seq_pairs(task, eval_n, seed=-1_000_000 - config.seed)
    scores = evaluate_seq2seq(trained, vocab, held_out, num_beams=num_beams)
    scores = {
        "task": task,
        "steps": result.step,
        "wall_s": result.wall_time_s,
        **scores,
        "curve": curve,
    }
    atomic_write_json(Path(config.out_dir) / "seq2seq.json", scores)
    plot_exposure(scores, Path(config.out_dir) / "seq2seq.png")
    return scores


def plot_exposure(scores: dict[str, Any], path: str | os.PathLike) -> Path:
    """Teacher-forced against free-running accuracy over training (``scores["curve"]``):
    per token on the left, whole targets on the right; the final held-out scores as stars."""
    from matplotlib.figure import Figure  # deferred: slow to import, only for plots

    curve = scores.get("curve", [])
    steps = [c["step"] for c in curve]
    fig = Figure(figsize=(11, 4))
    axes = fig.subplots(1, 2)
    panels = (
        ("tf_token_acc", "free_token_acc", "token accuracy"),
        ("tf_exact", "exact", "whole target right (exact match)"),
    )
    for ax, (forced, free, title) in zip(axes, panels):
        for key, label, colour in ((forced, "teacher forcing", "C0"), (free, "free running", "C3")):
            ax.plot(steps, [c[key] for c in curve], "o-", color=colour, label=label, ms=3)
            if "steps" in scores:
                ax.plot(scores["steps"], scores[key], "*", color=colour, ms=12)
        ax.set(xlabel="step", ylabel="accuracy", ylim=(0, 1.02), title=title)
        ax.legend(fontsize=8, loc="lower right")
        if not curve:
            ax.text(0.5, 0.5, "no evaluations tracked", ha="center", transform=ax.transAxes)
    fig.suptitle(
        f"{scores.get('task', 'seq2seq')}: held-out accuracy with the true prefix "
        "and with the model's own outputs (stars: final scores)",
        fontsize=10,
    )
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=100)
    return path
