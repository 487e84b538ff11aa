"""BERT pretraining through lmlab's trainer: the loss (masked-LM cross-entropy over the
chosen positions only, plus next-sentence-prediction cross-entropy over every pair),
resumable batches of masked sentence pairs, and the supervised loss the trainer calls.
``lmlab.data.mlm`` masks and packs; ``lmlab.api.pretrain_encoder`` puts it together.
"""

from __future__ import annotations

import os
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from lmlab.data.corpus import load_corpus, split_text
from lmlab.data.mlm import (
    IGNORE,
    PairBatch,
    mask_tokens,
    pack_pairs,
    segment_pairs,
    sentence_pairs,
)
from lmlab.data.tokenizers import BPETokenizer
from lmlab.errors import ConfigError
from lmlab.models import build_model, get_preset
from lmlab.seeds import seeded
from lmlab.train.batches import IndexedBatches, MetricMeans
from lmlab.train.config import TrainConfig
from lmlab.train.metrics import read_metrics
from lmlab.train.run import RunLock, StopSignals, ensure_run_dir
from lmlab.train.trainer import Supervised, TrainResult, train


def pretraining_loss(
    model: nn.Module, batch: PairBatch, inputs: torch.Tensor, labels: torch.Tensor
) -> dict[str, torch.Tensor]:
    """``loss`` = MLM loss + NSP loss on one batch, with both parts and their accuracies.

    ``inputs`` and ``labels`` come from ``mask_tokens(batch.ids, ...)``; positions whose
    label is ``IGNORE`` add nothing to the MLM loss (nor to its accuracy).
    """
    hidden = model(inputs, batch.attention_mask, batch.token_type_ids)
    logits = model.mlm_logits(hidden)  # (B, T, V)
    mlm = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=IGNORE)
    nsp_logits = model.nsp_logits(hidden)  # (B, 2)
    nsp = F.cross_entropy(nsp_logits.float(), batch.nsp_labels)
    chosen = labels != IGNORE
    with torch.no_grad():
        mlm_acc = (logits.argmax(-1)[chosen] == labels[chosen]).float().mean()
        nsp_acc = (nsp_logits.argmax(-1) == batch.nsp_labels).float().mean()
    return {
        "loss": mlm + nsp,
        "mlm_loss": mlm,
        "nsp_loss": nsp,
        "mlm_acc": mlm_acc,
        "nsp_acc": nsp_acc,
    }


# ----------------------------------------------------------------------------- training data

SPECIALS = ("[PAD]", "[CLS]", "[SEP]", "[MASK]")
"""BERT's special tokens, in the ids a pretraining tokenizer gives them (0 to 3)."""


def documents_from_text(text: str, tokenizer: Any) -> list[list[list[int]]]:
    """Documents (blank-line-separated blocks: Tiny Shakespeare's speeches) of sentences
    (their non-empty lines, each with its line break), tokenized."""
    documents = []
    for block in text.split("\n\n"):
        lines = [tokenizer.encode(line + "\n") for line in block.split("\n") if line.strip()]
        if lines:
            documents.append(lines)
    return documents


def regions_from_text(text: str, tokenizer: Any, lines: int = 100) -> list[list[list[int]]]:
    """Documents for text without document boundaries (Tiny Shakespeare is one stream of
    plays): consecutive regions of ``lines`` non-empty lines (speaker names included), each
    line a sentence, tokenized with its line break (so a segment keeps the text's layout:
    a speaker's name on its own line, then the speech; without the breaks the lines run
    together, "EXETER:Hark, hark"). A region's random partner is then a distant passage. A
    text of fewer than ``2 * lines`` lines is cut into two regions (of at least 2 lines
    each)."""
    if lines < 2:
        raise ConfigError(f"region_lines={lines} is invalid: a region needs at least 2 lines")
    encoded = [tokenizer.encode(line + "\n") for line in text.split("\n") if line.strip()]
    lines = max(2, min(lines, len(encoded) // 2))
    return [encoded[i : i + lines] for i in range(0, len(encoded), lines)]


NSP_PAIRS = ("segments", "sentences")


class PairBatches(IndexedBatches):
    """Masked next-sentence batches drawn afresh for each batch index from ``(seed, index)``
    alone, so a resumed run draws exactly what it would have (``state_dict``: the index).
    ``pairs``: "segments" (``segment_pairs``, filling ``max_len``) or single "sentences"."""

    def __init__(
        self,
        documents: Sequence[Sequence[Sequence[int]]],
        batch_size: int,
        max_len: int,
        vocab_size: int,
        seed: int,
        rate: float = 0.15,
        whole_word: bool = False,
        pairs: Literal["segments", "sentences"] = "segments",
    ):
        if pairs not in NSP_PAIRS:
            raise ConfigError(f"nsp_pairs={pairs!r} is invalid: choose {' or '.join(NSP_PAIRS)}")
        self.documents, self.batch_size, self.max_len = documents, batch_size, max_len
        self.pairs = pairs
        self.vocab_size, self.seed, self.rate = vocab_size, seed, rate
        if whole_word:
            raise ConfigError(
                "whole-word masking needs word boundaries; this corpus path gives none yet"
            )

    def batch(self, index: int) -> dict[str, torch.Tensor]:
        rng = random.Random(self.seed * 1_000_003 + index)
        if self.pairs == "segments":  # [CLS] A [SEP] B [SEP]: 3 specials
            pairs = segment_pairs(self.documents, self.batch_size, rng, self.max_len - 3)
        else:
            pairs = sentence_pairs(self.documents, self.batch_size, rng)
        packed = pack_pairs(pairs, CLS_ID, SEP_ID, PAD_ID, self.max_len)
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + index)
        inputs, labels = mask_tokens(
            packed.ids,
            MASK_ID,
            self.vocab_size,
            packed.special,
            self.rate,
            g,
            random_low=len(SPECIALS),
        )
        return {
            "ids": inputs,
            "labels": labels,
            "token_type_ids": packed.token_type_ids,
            "attention_mask": packed.attention_mask,
            "nsp_labels": packed.nsp_labels,
        }


PAD_ID, CLS_ID, SEP_ID, MASK_ID = range(4)


class PretrainingLoss:
    """The trainer's supervised loss for BERT pretraining: MLM + NSP per batch (counted as
    one unit per row, so the trainer's division gives the batch mean), with MLM and NSP
    accuracy reported in the ``train`` and ``eval`` events."""

    def __init__(self):
        self.means = MetricMeans()
        self.metrics = self.means.metrics

    def __call__(self, model, batch, autocast, keep=1.0):
        pairs = PairBatch(
            batch["ids"],
            batch["token_type_ids"],
            batch["attention_mask"],
            None,
            batch["nsp_labels"],
        )
        with autocast():
            out = pretraining_loss(model, pairs, batch["ids"], batch["labels"])
        names = ("mlm_loss", "nsp_loss", "mlm_acc", "nsp_acc")
        self.means.add(torch.is_grad_enabled(), **{k: out[k] for k in names})
        rows = batch["ids"].shape[0]
        return out["loss"] * rows, torch.tensor(rows, device=out["loss"].device)


def pretrain_encoder(
    model: str | dict[str, Any] = "bert-tiny",
    data: str = "tinyshakespeare",
    vocab_size: int = 1024,
    max_len: int = 64,
    val_fraction: float = 0.1,
    mask_rate: float = 0.15,
    nsp_pairs: Literal["segments", "sentences"] = "segments",
    region_lines: int = 100,
    config: TrainConfig | None = None,
) -> TrainResult:
    """Pretrain a BERT encoder from scratch with MLM and NSP through lmlab's trainer.

    The text (a bundled corpus name or a path) is split into train and validation parts;
    a byte-level BPE tokenizer with BERT's special tokens is trained on the train part.
    ``nsp_pairs="segments"`` (BERT's construction): documents are regions of
    ``region_lines`` lines, A a run of lines and B the lines after it or a run from another
    region, together filling ``max_len``. ``"sentences"``: documents are the blank-line
    blocks (Tiny Shakespeare's speeches), A one line and B the next line of its speech or a
    line of another speech; a speech is a speaker's name and a few lines, so this task is
    much harder (and with half its pairs being a name and a line, partly trivial). The run's
    metrics carry ``mlm_loss``, ``nsp_loss``, ``mlm_acc`` and ``nsp_acc`` (``val_`` ones at
    each evaluation, on fixed held-out pairs); resume, guards and checkpoints are the
    trainer's.
    """
    config = config or TrainConfig(out_dir="runs/bert")
    if nsp_pairs not in NSP_PAIRS:
        raise ConfigError(f"nsp_pairs={nsp_pairs!r} is invalid: choose {' or '.join(NSP_PAIRS)}")
    spec = dict(get_preset(model)) if isinstance(model, str) else dict(model)
    if spec.get("family") != "encoder":
        raise ConfigError(
            f"pretraining with MLM and NSP needs an encoder preset (bert-tiny), got {model!r}"
        )
    spec.update(mlm_head=True, pooler=True, nsp_head=True, pad_id=PAD_ID)
    if max_len > spec.get("max_seq_len", 512):
        raise ConfigError(
            f"max_len={max_len} exceeds the encoder's max_seq_len {spec['max_seq_len']}"
        )
    with RunLock(ensure_run_dir(config.out_dir)), StopSignals():
        train_text, val_text = split_text(load_corpus(data), val_fraction)
        tok = BPETokenizer.train(train_text, vocab_size, eos_token=None, special_tokens=SPECIALS)
        if [tok.tokenizer.token_to_id(t) for t in SPECIALS] != [PAD_ID, CLS_ID, SEP_ID, MASK_ID]:
            raise ConfigError("the tokenizer did not give BERT's special tokens the ids 0-3")
        if nsp_pairs == "segments":
            train_docs = regions_from_text(train_text, tok, region_lines)
            val_docs = regions_from_text(val_text, tok, region_lines)
        else:
            train_docs, val_docs = (
                documents_from_text(train_text, tok),
                documents_from_text(val_text, tok),
            )
        with seeded(config.seed):
            net = build_model({**spec, "vocab_size": tok.vocab_size})
        batches = PairBatches(
            train_docs, config.batch_size, max_len, tok.vocab_size, config.seed, mask_rate,
            pairs=nsp_pairs,
        )  # fmt: skip
        held_out = PairBatches(
            val_docs, config.batch_size, max_len, tok.vocab_size, config.seed + 1, mask_rate,
            pairs=nsp_pairs,
        )  # fmt: skip
        val = [held_out.batch(i) for i in range(config.eval_batches)]
        supervised = Supervised(batches, PretrainingLoss(), val)
        result = train(net, None, None, config, tokenizer=tok, supervised=supervised)
    plot_pretraining(config.out_dir)
    return result


def plot_pretraining(run_dir: str | os.PathLike) -> Path:
    """``pretraining.png`` in the run folder: MLM loss, and MLM and NSP accuracy (training
    batches and held-out pairs) against steps."""
    from matplotlib.figure import Figure  # deferred: slow to import, only for plots

    run_dir = Path(run_dir)
    events = read_metrics(run_dir / "metrics.jsonl")
    train_ev = [e for e in events if e["event"] == "train" and "mlm_loss" in e]
    eval_ev = [e for e in events if e["event"] == "eval" and "val_mlm_acc" in e]
    fig = Figure(figsize=(11, 4))
    left, right = fig.subplots(1, 2)
    for events_, prefix, style in ((train_ev, "", "-"), (eval_ev, "val_", "o-")):
        steps = [e["step"] for e in events_]
        left.plot(
            steps,
            [e[prefix + "mlm_loss"] for e in events_],
            style,
            label=f"MLM loss ({prefix or 'train '}batches)".replace("val_", "held-out "),
        )
        right.plot(
            steps,
            [e[prefix + "mlm_acc"] for e in events_],
            style,
            label=f"MLM accuracy{' (held out)' if prefix else ''}",
        )
        right.plot(
            steps,
            [e[prefix + "nsp_acc"] for e in events_],
            style,
            label=f"NSP accuracy{' (held out)' if prefix else ''}",
        )
    right.axhline(0.5, color="grey", lw=0.8, ls=":", label="NSP chance")
    left.set(xlabel="step", ylabel="cross-entropy (nats)", title="masked-LM loss")
    right.set(
        xlabel="step", ylabel="accuracy", ylim=(0, 1), title="masked tokens and next sentence"
    )
    for ax in (left, right):
        ax.legend(fontsize=8)
        if not train_ev:
            ax.text(0.5, 0.5, "no training steps logged yet", ha="center", transform=ax.transAxes)
    fig.tight_layout()
    path = run_dir / "pretraining.png"
    fig.savefig(path, dpi=100)
    return path
