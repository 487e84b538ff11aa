"""The three transformer architectures compared on the same problems, from scratch, with
the same budget and similar sizes: an encoder (BERT-like, bidirectional), a decoder (GPT,
causal) and an encoder-decoder (Vaswani et al. 2017).

**A seq2seq task** (``lmlab.data.seq2seq_tasks``, characters as tokens):

- encoder-decoder: the encoder reads the source, the decoder writes the target (teacher
  forcing; greedy decoding);
- decoder: one causal sequence ``source [SEP] target [EOS]``, the loss on the target and
  its end only; decoding continues the prompt ``source [SEP]`` greedily (lmlab.generate);
- encoder: non-autoregressive, one output per input position (a token head over the
  vocabulary at every position). That only works when every target is as long as its
  source (reverse, copy); for the others (dates: "5 Mar 2021" -> "2021-03-05") the encoder
  has no way to say how long the output is, and its row says so instead of a score.

**Sentence classification** on the bundled sentiment TSV (40 sentences, words as tokens),
scored by k-fold cross-validation (every sentence is held out once):

- encoder: ``[CLS] words`` and BERT's sequence head on the pooled [CLS];
- decoder: ``words [SEP]`` and the label as the next token (the two label tokens compared);
- encoder-decoder: source ``words``, target the label token.

Each model has its own small training loop here (AdamW, warm-up and cosine decay from
``lmlab.train.optim``), the same number of steps and batch size for the three; parameters
are counted and reported. Scores: free-running exact match (and per-token accuracy) on
held-out pairs; cross-validated accuracy.
"""

from __future__ import annotations

import math
import os
import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from lmlab.data.seq2seq_tasks import BOS, EOS, PAD, TASKS, Seq2SeqVocab, seq2seq_pairs
from lmlab.devices import resolve_device
from lmlab.errors import ConfigError, DataError
from lmlab.eval.seq2seq import position_accuracy
from lmlab.fileio import atomic_write_json, atomic_write_text
from lmlab.generate.params import SamplingParams
from lmlab.generate.search import generate
from lmlab.generate.seq2seq import seq2seq_generate
from lmlab.models import build_model
from lmlab.seeds import seeded
from lmlab.train.config import TrainConfig
from lmlab.train.optim import build_optimizer, lr_at
from lmlab.train.seq2seq import IGNORE, collate_pairs

ARCHITECTURES = ("encoder", "decoder", "encoder-decoder")
SENTIMENT = Path(__file__).parent / "tasks" / "sentiment.tsv"


@dataclass(frozen=True)
class ArchitecturesConfig:
    task: str = "reverse"
    """The seq2seq task (reverse, copy, dates, number-words, toy-translation)."""
    steps: int = 600
    """Optimizer steps of each model on the seq2seq task."""
    classify_steps: int = 100
    """Optimizer steps of each model on each cross-validation fold of the sentiment task."""
    folds: int = 5
    """Cross-validation folds of the sentiment sentences."""
    batch_size: int = 64
    """Rows per step (the sentiment folds: at most the training fold's size, 32 by default)."""
    lr: float = 2e-3
    """Peak learning rate (warm-up over the first tenth, then cosine to a tenth of it)."""
    d_model: int = 64
    n_heads: int = 4
    d_ff: int = 256
    n_layers: int = 4
    """Blocks of the encoder and of the decoder; the encoder-decoder gets half in each
    stack (its decoder blocks are larger: they add cross-attention)."""
    eval_n: int = 300
    """Held-out pairs of the seq2seq task to score."""
    seed: int = 0
    """Seeds the weights and the data of every model."""
    device: str = "auto"
    progress: bool = True

    def __post_init__(self):
        if self.task not in TASKS:
            raise ConfigError(f"task={self.task!r} is invalid: choose one of {', '.join(TASKS)}")
        for name in ("steps", "classify_steps", "batch_size", "d_model", "n_heads", "d_ff"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name}={value!r} is invalid: must be a positive integer")
        if self.n_layers < 2 or self.n_layers % 2:
            raise ConfigError(
                f"n_layers={self.n_layers} is invalid: an even number >= 2 (the "
                "encoder-decoder splits it between its two stacks)"
            )
        if not 2 <= self.folds <= 40:
            raise ConfigError(f"folds={self.folds} is invalid: from 2 to 40 (40 sentences)")
        if self.eval_n < 1:
            raise ConfigError(f"eval_n={self.eval_n} is invalid: must be at least 1")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ConfigError(f"lr={self.lr} is invalid: must be a positive number")


def build(arch: str, vocab_size: int, config: ArchitecturesConfig, **head) -> nn.Module:
    """A fresh model of one architecture at the config's width, from its seed."""
    c = config
    common = dict(vocab_size=vocab_size, d_model=c.d_model, n_heads=c.n_heads, d_ff=c.d_ff)
    common["max_seq_len"] = 64
    if arch == "encoder":
        spec = dict(family="encoder", n_layers=c.n_layers, pad_id=PAD, **common, **head)
    elif arch == "decoder":
        spec = dict(family="transformer", n_layers=c.n_layers, **common)
    else:
        half = c.n_layers // 2
        spec = dict(family="seq2seq", n_encoder_layers=half, n_decoder_layers=half, **common)
        spec.update(norm="pre", pad_id=PAD, bos_id=BOS)
    with seeded(c.seed):
        return build_model(spec)


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def fit(
    model: nn.Module,
    batch: Callable[[int], dict[str, torch.Tensor]],
    loss: Callable[[nn.Module, dict[str, torch.Tensor]], torch.Tensor],
    steps: int,
    config: ArchitecturesConfig,
    bar: Any = None,
) -> list[float]:
    """``steps`` AdamW steps on ``loss(model, batch(step))`` -> the losses."""
    schedule = TrainConfig(
        lr=config.lr, min_lr=config.lr / 10, warmup_steps=max(1, steps // 10), max_steps=steps
    )
    optimizer = build_optimizer(model, schedule)
    device = next(model.parameters()).device
    model.train()
    losses = []
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, schedule)
        value = loss(model, {k: v.to(device) for k, v in batch(step).items()})
        optimizer.zero_grad(set_to_none=True)
        value.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        losses.append(float(value.detach()))
        if bar is not None:
            bar.update(1)
    model.eval()
    return losses


def _pad(rows: list[list[int]], value: int) -> torch.Tensor:
    out = torch.full((len(rows), max(len(r) for r in rows)), value, dtype=torch.long)
    for i, row in enumerate(rows):
        out[i, : len(row)] = torch.tensor(row, dtype=torch.long)
    return out


# ----------------------------------------------------------------------------- seq2seq task


def decoder_rows(pairs: list[tuple[list[int], list[int]]]) -> dict[str, torch.Tensor]:
    """``source SEP target EOS`` rows for a causal LM -> ``ids`` [B, T] and ``targets``
    [B, T], the next token wherever it belongs to the target or its end, else IGNORE::

        source [5, 6], target [7]: ids [5, 6, SEP, 7], targets [-, -, 7, EOS]
    """
    ids, targets = [], []
    for source, target in pairs:
        ids.append([*source, BOS, *target])  # BOS serves as the separator
        targets.append([IGNORE] * len(source) + [*target, EOS])
    return {"ids": _pad(ids, PAD), "targets": _pad(targets, IGNORE)}


def encoder_rows(pairs: list[tuple[list[int], list[int]]]) -> dict[str, torch.Tensor]:
    """The source, and at each of its positions the target token there (same lengths)."""
    if any(len(s) != len(t) for s, t in pairs):
        raise DataError("an encoder predicts one token per source position: lengths differ")
    return {
        "ids": _pad([s for s, _ in pairs], PAD),
        "targets": _pad([t for _, t in pairs], IGNORE),
    }


def _ce(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.flatten(0, -2).float(), targets.flatten(), ignore_index=IGNORE)


SEQ2SEQ_LOSS = {
    "encoder": lambda m, b: _ce(m.head_logits(m(b["ids"], b["ids"] != PAD)), b["targets"]),
    "decoder": lambda m, b: _ce(m(b["ids"]), b["targets"]),
    "encoder-decoder": lambda m, b: _ce(m(b["src"], b["tgt_in"]), b["tgt_out"]),
}
SEQ2SEQ_ROWS = {"encoder": encoder_rows, "decoder": decoder_rows, "encoder-decoder": collate_pairs}


@torch.inference_mode()
def seq2seq_outputs(
    arch: str, model: nn.Module, pairs: list[tuple[list[int], list[int]]], batch_size: int = 100
) -> list[list[int]]:
    """Free-running outputs (ids, with the eos that ended them) for each source."""
    device = next(model.parameters()).device
    longest = max(len(t) for _, t in pairs) + 4
    params = SamplingParams(max_new_tokens=longest, temperature=0, eos_id=EOS)
    outputs: list[list[int]] = []
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start : start + batch_size]
        if arch == "encoder":
            rows = encoder_rows(chunk)
            ids = rows["ids"].to(device)
            predicted = model.head_logits(model(ids, ids != PAD)).argmax(-1).cpu()
            outputs += [predicted[i, : len(s)].tolist() + [EOS] for i, (s, _) in enumerate(chunk)]
        elif arch == "decoder":
            outputs += generate(model, [[*s, BOS] for s, _ in chunk], params).ids
        else:
            outputs += seq2seq_generate(model, [s for s, _ in chunk], params).ids
    return outputs


def compare_on_seq2seq(arch: str, config: ArchitecturesConfig, bar=None) -> dict[str, Any]:
    """Train ``arch`` on the config's task and score it on held-out pairs."""
    vocab = Seq2SeqVocab.for_task(config.task)
    row: dict[str, Any] = {"problem": config.task, "architecture": arch, "metric": "exact match"}
    probe = seq2seq_pairs(config.task, 200, seed=-7)
    if arch == "encoder" and any(len(s) != len(t) for s, t in probe):
        row["note"] = (
            "n/a: targets differ in length from their sources, and an encoder predicts one "
            "token per source position"
        )
        if bar is not None:
            bar.update(config.steps)
        return row
    device = resolve_device(config.device)
    head = {"head": "token", "n_labels": vocab.vocab_size} if arch == "encoder" else {}
    model = build(arch, vocab.vocab_size, config, **head).to(device)

    def encode(pairs):
        return [(vocab.encode(s), vocab.encode(t)) for s, t in pairs]

    def batch(step):
        seed = config.seed * 1_000_003 + step
        return SEQ2SEQ_ROWS[arch](encode(seq2seq_pairs(config.task, config.batch_size, seed)))

    t0 = time.perf_counter()
    losses = fit(model, batch, SEQ2SEQ_LOSS[arch], config.steps, config, bar)
    wall = time.perf_counter() - t0
    held_out = encode(seq2seq_pairs(config.task, config.eval_n, seed=-1_000_000 - config.seed))
    outputs = seq2seq_outputs(arch, model, held_out)
    exact = sum(o == [*t, EOS] for o, (_, t) in zip(outputs, held_out)) / len(held_out)
    row.update(
        params=n_params(model),
        steps=config.steps,
        train_s=round(wall, 1),
        score=exact,
        token_acc=position_accuracy(outputs, [t for _, t in held_out], EOS),
        losses=losses,
    )
    return row


# ----------------------------------------------------------------------------- classification

NEG, POS, UNK = 3, 4, 5
"""Label tokens (negative, positive) and the unknown word, after PAD, BOS (= [CLS]) and EOS
(= [SEP])."""


def read_sentiment(path: str | os.PathLike = SENTIMENT) -> list[tuple[list[str], int]]:
    """(words, label) rows of a ``sentence<TAB>label`` file with a header (labels 0/1)."""
    rows = []
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    for number, line in enumerate(lines[1:], 2):
        if not line.strip():
            continue
        sentence, _, label = line.rpartition("\t")
        if label not in ("0", "1") or not sentence.strip():
            raise DataError(f"{path}:{number}: want 'sentence<TAB>0 or 1', got {line!r}")
        rows.append((sentence.split(), int(label)))
    return rows


class WordVocab:
    """The words of the training sentences after the six specials; others are UNK."""

    def __init__(self, sentences: list[list[str]]):
        words = sorted({w for s in sentences for w in s})
        self.index = {w: i + 6 for i, w in enumerate(words)}
        self.vocab_size = len(words) + 6

    def encode(self, words: list[str]) -> list[int]:
        return [self.index.get(w, UNK) for w in words]


def classify_rows(arch: str, rows: list[tuple[list[int], int]]) -> dict[str, torch.Tensor]:
    """Model inputs for (word ids, label) rows; ``labels`` 0/1."""
    labels = torch.tensor([label for _, label in rows])
    if arch == "encoder":
        return {"ids": _pad([[BOS, *w] for w, _ in rows], PAD), "labels": labels}
    if arch == "decoder":
        ids = [[*w, EOS] for w, _ in rows]
        return {
            "ids": _pad(ids, PAD),
            "last": torch.tensor([len(r) - 1 for r in ids]),
            "labels": labels,
        }
    return {"src": _pad([w for w, _ in rows], PAD), "labels": labels}


def next_token_logits(arch: str, model: nn.Module, b: dict[str, torch.Tensor]) -> torch.Tensor:
    """[B, V]: the decoder's prediction after ``words [SEP]``, or the encoder-decoder's
    first target token."""
    if arch == "decoder":
        return model(b["ids"])[torch.arange(len(b["ids"])), b["last"]]  # (B, V) at [SEP]
    start = torch.full((len(b["src"]), 1), BOS, device=b["src"].device)
    return model(b["src"], start)[:, 0]


def label_logits(arch: str, model: nn.Module, b: dict[str, torch.Tensor]) -> torch.Tensor:
    """[B, 2] scores of (negative, positive) for each row."""
    if arch == "encoder":
        return model.head_logits(model(b["ids"], b["ids"] != PAD))
    return next_token_logits(arch, model, b)[:, [NEG, POS]]


def classify_loss(arch: str, model: nn.Module, b: dict[str, torch.Tensor]) -> torch.Tensor:
    """Cross-entropy of the label: over the two classes for the encoder's head, over the
    whole vocabulary (the label as a token, as a language model) for the other two."""
    if arch == "encoder":
        return F.cross_entropy(label_logits(arch, model, b).float(), b["labels"])
    label_ids = torch.tensor([NEG, POS], device=b["labels"].device)[b["labels"]]
    return F.cross_entropy(next_token_logits(arch, model, b).float(), label_ids)


def compare_on_sentiment(
    arch: str, config: ArchitecturesConfig, rows: list[tuple[list[str], int]], bar=None
) -> dict[str, Any]:
    """k-fold cross-validated accuracy of ``arch`` on (words, label) rows."""
    order = list(range(len(rows)))
    random.Random(config.seed).shuffle(order)
    folds = [order[k :: config.folds] for k in range(config.folds)]
    device = resolve_device(config.device)
    right, wall, params, losses = 0, 0.0, 0, []
    for k, held in enumerate(folds):
        train_rows = [rows[i] for i in order if i not in held]
        vocab = WordVocab([w for w, _ in train_rows])
        encoded = [(vocab.encode(w), y) for w, y in train_rows]
        head = {"head": "sequence", "pooler": True, "n_labels": 2} if arch == "encoder" else {}
        model = build(arch, vocab.vocab_size, config, **head).to(device)
        size = min(config.batch_size, len(encoded))

        def batch(step, encoded=encoded, size=size, k=k):
            rng = random.Random(f"{config.seed}:{k}:{step}")
            return classify_rows(arch, rng.sample(encoded, size))

        t0 = time.perf_counter()
        fold_losses = fit(
            model, batch, lambda m, b: classify_loss(arch, m, b), config.classify_steps, config, bar
        )
        wall += time.perf_counter() - t0
        losses.append(fold_losses)
        params = n_params(model)
        test = classify_rows(arch, [(vocab.encode(rows[i][0]), rows[i][1]) for i in held])
        with torch.inference_mode():
            test = {key: v.to(device) for key, v in test.items()}
            predicted = label_logits(arch, model, test).argmax(-1)
        right += int((predicted == test["labels"]).sum())
    mean_losses = [sum(fold[i] for fold in losses) / len(losses) for i in range(len(losses[0]))]
    return {
        "problem": "sentiment",
        "architecture": arch,
        "metric": f"{config.folds}-fold accuracy",
        "params": params,
        "steps": config.classify_steps * config.folds,
        "train_s": round(wall, 1),
        "score": right / len(rows),
        "losses": mean_losses,
    }


# ----------------------------------------------------------------------------- all of it


def compare_architectures(
    config: ArchitecturesConfig | None = None,
    out_dir: str | os.PathLike = "runs/architectures",
    data: str | os.PathLike = SENTIMENT,
) -> dict[str, Any]:
    """Train the three architectures on the seq2seq task and on sentiment classification
    (``data``: a ``sentence<TAB>label`` file); write ``architectures.json``,
    ``architectures.md`` and ``architectures.png`` to ``out_dir`` -> the results."""
    config = config or ArchitecturesConfig()
    rows_text = read_sentiment(data)
    if len(rows_text) < config.folds:
        raise DataError(f"{data}: {len(rows_text)} sentences for {config.folds} folds")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    total = len(ARCHITECTURES) * (config.steps + config.classify_steps * config.folds)
    results = []
    with tqdm(total=total, disable=not config.progress, desc="architectures") as bar:
        for arch in ARCHITECTURES:
            results.append(compare_on_seq2seq(arch, config, bar))
        for arch in ARCHITECTURES:
            results.append(compare_on_sentiment(arch, config, rows_text, bar))
    report = {"config": asdict(config), "results": results}
    atomic_write_json(out / "architectures.json", report)
    atomic_write_text(out / "architectures.md", markdown_table(results) + "\n")
    plot_architectures(report, out / "architectures.png")
    return report


def markdown_table(results: list[dict[str, Any]]) -> str:
    lines = [
        "| problem | architecture | parameters | steps | train s | score | metric |",
        "| --- | --- | --: | --: | --: | --: | --- |",
    ]
    for r in results:
        if "score" not in r:
            lines.append(f"| {r['problem']} | {r['architecture']} | | | | {r['note']} | |")
            continue
        metric = r["metric"] + (f" (per token {r['token_acc']:.3f})" if "token_acc" in r else "")
        lines.append(
            f"| {r['problem']} | {r['architecture']} | {r['params']:,} | {r['steps']} | "
            f"{r['train_s']:.1f} | {r['score']:.3f} | {metric} |"
        )
    return "\n".join(lines)


def plot_architectures(report: dict[str, Any], path: str | os.PathLike) -> Path:
    """Training loss of each architecture on each problem, and the scores as bars."""
    from matplotlib.figure import Figure  # deferred: slow to import, only for plots

    results = report["results"]
    problems = list(dict.fromkeys(r["problem"] for r in results))
    fig = Figure(figsize=(13, 4))
    axes = fig.subplots(1, len(problems) + 1)
    colours = dict(zip(ARCHITECTURES, ("C0", "C1", "C2")))
    for ax, problem in zip(axes, problems):
        for r in results:
            if r["problem"] == problem and "losses" in r:
                ax.plot(r["losses"], color=colours[r["architecture"]], label=r["architecture"])
        title = problem
        if problem == "sentiment":  # the head's loss is over 2 classes, the tokens' over V
            title += " (encoder: over 2 labels; others: the label token over the vocabulary)"
        ax.set(xlabel="step", ylabel="training loss (nats)", yscale="log")
        ax.set_title(title, fontsize=9 if problem == "sentiment" else 12)
        ax.legend(fontsize=8)
    bars = axes[-1]
    width = 0.8 / len(ARCHITECTURES)
    for i, arch in enumerate(ARCHITECTURES):
        scores = [
            next(
                (
                    r.get("score", 0.0)
                    for r in results
                    if r["problem"] == p and r["architecture"] == arch
                ),
                0.0,
            )
            for p in problems
        ]
        xs = [j + (i - 1) * width for j in range(len(problems))]
        bars.bar(xs, scores, width, color=colours[arch], label=arch)
        for x, s in zip(xs, scores):
            bars.text(x, s + 0.01, f"{s:.2f}", ha="center", fontsize=7)
    labels = [next(r["metric"] for r in results if r["problem"] == p) for p in problems]
    bars.set_xticks(
        range(len(problems)), [f"{p}\n{m}" for p, m in zip(problems, labels)], fontsize=8
    )
    bars.set(ylim=(0, 1.08), title="held-out score")
    bars.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=100)
    return path
