"""Training the encoder-decoder with teacher forcing through lmlab's trainer.

Batches are generated on the fly (``lmlab.data.seq2seq_tasks``) from ``(seed, index)``
alone, so resume is exact; the loss is cross-entropy of the next target token given the
true previous ones (teacher forcing), over real target tokens only, with token accuracy in
the metrics. ``lmlab.eval.seq2seq`` measures what teacher forcing hides: accuracy when the
model must read its own outputs (free running).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lmlab.data.seq2seq_tasks import BOS, EOS, PAD, Seq2SeqVocab, seq2seq_pairs
from lmlab.errors import ConfigError
from lmlab.models import build_model, get_preset
from lmlab.seeds import seeded
from lmlab.train.batches import IndexedBatches, MetricMeans
from lmlab.train.config import TrainConfig
from lmlab.train.run import RunLock, StopSignals, ensure_run_dir
from lmlab.train.trainer import Supervised, TrainResult, train

IGNORE = -100


def collate_pairs(pairs: list[tuple[list[int], list[int]]]) -> dict[str, torch.Tensor]:
    """(source ids, target ids) pairs -> ``src`` [B, S], ``tgt_in`` [B, T] (BOS + target),
    ``tgt_out`` [B, T] (target + EOS; IGNORE on padding)."""
    S = max(len(s) for s, _ in pairs)
    T = max(len(t) for _, t in pairs) + 1
    src = torch.full((len(pairs), S), PAD, dtype=torch.long)
    tgt_in = torch.full((len(pairs), T), PAD, dtype=torch.long)
    tgt_out = torch.full((len(pairs), T), IGNORE, dtype=torch.long)
    for i, (s, t) in enumerate(pairs):
        src[i, : len(s)] = torch.tensor(s)
        tgt_in[i, : len(t) + 1] = torch.tensor([BOS, *t])
        tgt_out[i, : len(t) + 1] = torch.tensor([*t, EOS])
    n_tokens = torch.tensor(sum(len(s) + len(t) + 1 for s, t in pairs))  # fed: source + target
    return {"src": src, "tgt_in": tgt_in, "tgt_out": tgt_out, "n_tokens": n_tokens}


class Seq2SeqBatches(IndexedBatches):
    """Batches of a generated task, each a function of ``(seed, index)``."""

    def __init__(self, task: str, vocab: Seq2SeqVocab, batch_size: int, seed: int):
        self.task, self.vocab, self.batch_size, self.seed = task, vocab, batch_size, seed

    def batch(self, index: int) -> dict[str, torch.Tensor]:
        pairs = seq2seq_pairs(self.task, self.batch_size, seed=self.seed * 1_000_003 + index)
        return collate_pairs([(self.vocab.encode(s), self.vocab.encode(t)) for s, t in pairs])


class TeacherForcingLoss:
    """Summed next-token cross-entropy over real target tokens, and their count; token
    accuracy under teacher forcing in the metrics."""

    def __init__(self):
        self.means = MetricMeans()
        self.metrics = self.means.metrics

    def __call__(self, model, batch, autocast, keep=1.0):
        with autocast():
            logits = model(batch["src"], batch["tgt_in"])  # (B, T, V)
        target = batch["tgt_out"]
        loss = F.cross_entropy(
            logits.float().flatten(0, 1), target.flatten(), ignore_index=IGNORE, reduction="sum"
        )
        real = target != IGNORE
        accuracy = (logits.argmax(-1)[real] == target[real]).float().mean()
        self.means.add(torch.is_grad_enabled(), token_acc=accuracy)
        return loss, real.sum()


def train_seq2seq(
    task: str = "reverse",
    model: str | dict[str, Any] = "seq2seq-tiny",
    config: TrainConfig | None = None,
    on_eval: Callable[[nn.Module, dict[str, Any]], None] | None = None,
) -> TrainResult:
    """Train an encoder-decoder on a generated task with teacher forcing (see module doc).
    Held-out batches come from other seeds than the training stream's. ``on_eval(model,
    event)`` is called after each evaluation the trainer logs (``event``: its ``eval``
    line), e.g. to measure free-running accuracy as training goes."""
    config = config or TrainConfig(out_dir="runs/seq2seq")
    spec = dict(get_preset(model)) if isinstance(model, str) else dict(model)
    if spec.get("family") != "seq2seq":
        raise ConfigError(
            f"train_seq2seq needs an encoder-decoder preset (seq2seq-tiny, t5-tiny, bart-tiny), "
            f"got {model!r}"
        )
    vocab = Seq2SeqVocab.for_task(task)
    with RunLock(ensure_run_dir(config.out_dir)), StopSignals():
        with seeded(config.seed):
            net = build_model(
                {**spec, "vocab_size": vocab.vocab_size, "pad_id": PAD, "bos_id": BOS}
            )
        batches = Seq2SeqBatches(task, vocab, config.batch_size, config.seed)
        held_out = Seq2SeqBatches(task, vocab, config.batch_size, -1 - config.seed)
        val = [held_out.batch(i) for i in range(config.eval_batches)]
        callbacks = []
        if on_eval is not None:
            callbacks.append(
                lambda event: on_eval(net, event) if event["event"] == "eval" else None
            )
        return train(
            net,
            None,
            None,
            config,
            callbacks=callbacks,
            supervised=Supervised(batches, TeacherForcingLoss(), val),
        )
