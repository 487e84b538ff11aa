"""Fine-tune an encoder's head on a bundled task and score it before and after.

    finetune_head("minilm", task="token", method="lora", config=TrainConfig(max_steps=100))

Three heads (``EncoderConfig.head``), each with its bundled task and metric on the task's
held-out test split:

- ``sequence``: sentiment of the 40 review sentences of ``lmlab.eval.tasks``'s
  ``sentiment`` TSV (classified from the pooled [CLS]; MiniLM's own pooler) -> accuracy;
- ``token``: the generated NER set (``lmlab.data.ner``; BIO tags, the first subword of
  each word labelled, word predictions by ``strategy``) -> seqeval's entity-level F1
  (``lmlab.eval.tagging``);
- ``span``: the generated extractive-QA set (``lmlab.data.qa``; ``doc_stride`` windows,
  best span over windows) -> SQuAD exact match and F1 (``lmlab.eval.squad``).

The model is MiniLM (``"minilm"``), any BERT folder, a ``lmlab pretrain`` checkpoint or a
fine-tuned head's ``model/``, or an encoder preset (``"bert-tiny"``) built from scratch with
a byte-level BPE tokenizer trained on the task's training text. The head starts from the
run's seed; ``method`` ``full`` trains every weight, ``lora`` wraps the attention's query
and value layers (``lmlab.finetune.lora``) and trains them with the head (and a pooler the
model did not have), as peft's ``modules_to_save`` does. Training is lmlab's trainer
(run folder, resume, guards, checkpoints); the run folder gets ``heads.json`` (the scores
before and after), ``heads.png`` and ``model/`` (the encoder with its head and label names,
``lmlab.load``-able).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from lmlab.checkpoint.bert import BERT_TYPES, load_hf_encoder
from lmlab.checkpoint.hf import hf_model_type
from lmlab.checkpoint.io import save_checkpoint
from lmlab.checkpoint.pretrained import is_pretrained_name, pretrained_path
from lmlab.data.ner import NER_LABELS, STRATEGIES, align_labels, ner_examples, word_scores
from lmlab.data.qa import qa_examples, qa_features, special_ids
from lmlab.data.tokenizers import BPETokenizer
from lmlab.errors import ConfigError, closest
from lmlab.eval.squad import best_answers, squad_scores
from lmlab.eval.tagging import entity_scores
from lmlab.eval.tasks import load_task
from lmlab.fileio import atomic_write_json
from lmlab.finetune.lora import LoRAConfig, apply_lora
from lmlab.finetune.selective import trainable_parameters
from lmlab.lm import load
from lmlab.models import PRESETS, base_model, build_model, model_spec
from lmlab.models.encoder import Encoder
from lmlab.seeds import seeded
from lmlab.train import TrainConfig, TrainResult, train
from lmlab.train.bert import PAD_ID, SPECIALS
from lmlab.train.heads import HeadBatches, HeadLoss, collate_rows
from lmlab.train.metrics import read_metrics
from lmlab.train.trainer import Supervised

HEADS = ("sequence", "token", "span")
HEAD_METHODS = ("full", "lora")
SENTIMENT_LABELS = ("negative", "positive")
METRICS = {
    "sequence": ("accuracy",),
    "token": ("f1", "word_accuracy"),
    "span": ("exact_match", "f1"),
}
"""The scores of each head, the first one the headline."""


@dataclass
class HeadData:
    """A head's task: label names, and the examples of each split."""

    head: str
    labels: tuple[str, ...]
    splits: dict[str, list[Any]]

    def texts(self) -> list[str]:
        """The training text (to train a tokenizer for a from-scratch encoder)."""
        rows = self.splits["train"]
        if self.head == "token":
            return [" ".join(r.words) for r in rows]
        if self.head == "span":
            return [r.question + "\n" + r.context for r in rows]
        return [text for text, _ in rows]


def check_head(task: str, method: str = "full", strategy: str = "first") -> None:
    """ConfigError naming the valid choices for a wrong ``task``, ``method`` or ``strategy``."""
    for name, value, valid in (
        ("task", task, HEADS),
        ("method", method, HEAD_METHODS),
        ("strategy", strategy, STRATEGIES),
    ):
        if value not in valid:
            raise ConfigError(
                f"{name}={value!r} is not one of {', '.join(valid)}{closest(str(value), valid)}"
                + (" (the encoder heads fine-tune with these)" if name == "method" else "")
            )


def head_data(task: str, seed: int = 0) -> HeadData:
    """The bundled task of head ``task`` with train / validation / test splits."""
    check_head(task)
    if task == "token":
        splits = {s: ner_examples(s, seed=seed) for s in ("train", "validation", "test")}
        return HeadData(task, NER_LABELS, splits)
    if task == "span":
        splits = {s: qa_examples(s, seed=seed) for s in ("train", "validation", "test")}
        return HeadData(task, (), splits)
    items = load_task("sentiment").items
    rows = [(item.query, item.gold) for item in items]
    order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(seed)).tolist()
    # 40 sentences: a quarter held out for the test, 4 for validation, the rest to train
    test, val, train_ = order[:10], order[10:14], order[14:]
    splits = {"train": [rows[i] for i in train_], "validation": [rows[i] for i in val]}
    splits["test"] = [rows[i] for i in test]
    return HeadData(task, SENTIMENT_LABELS, splits)


# ----------------------------------------------------------------------------- the model


def encoder_with_head(model: str, data: HeadData, seed: int = 0) -> tuple[Encoder, Any, bool]:
    """An encoder carrying ``data.head``'s head -> (encoder, tokenizer, fresh pooler?).

    ``model``: an encoder preset (built from scratch, seeded; a BPE tokenizer with BERT's
    special tokens trained on the task's text), a BERT folder or ``"minilm"`` (with its
    pooler), or an lmlab encoder checkpoint. Its masked-LM and NSP heads are dropped; a
    head it already has is kept only if it is the same kind with the same labels.
    """
    head, labels = data.head, data.labels
    preset = PRESETS.get(model)
    if preset is not None and not Path(model).exists():
        if preset.get("family") != "encoder":
            raise ConfigError(
                f"the {head} head needs an encoder; preset {model!r} is a {preset.get('family')} "
                f"model: use an encoder preset ({', '.join(k for k, v in PRESETS.items() if v.get('family') == 'encoder')}), "
                "minilm or a `lmlab pretrain` checkpoint"
            )
        tokenizer = BPETokenizer.train(
            "\n".join(data.texts()), 2000, eos_token=None, special_tokens=SPECIALS
        )
        spec = {**preset, "vocab_size": tokenizer.vocab_size, "pad_id": PAD_ID}
        state, old_spec = None, {}
    else:
        source = pretrained_path(model) if is_pretrained_name(model) else Path(model)
        if source.is_dir() and hf_model_type(source) in BERT_TYPES:
            net, tokenizer, _ = load_hf_encoder(source, dtype=torch.float32, pooler=True)
            saved: dict[str, Any] = {}
        else:
            lm = load(model, dtype="float32", device="cpu")
            net, tokenizer, saved = lm.model, lm.tokenizer, lm.config
        if not isinstance(base_model(net), Encoder):
            raise ConfigError(
                f"the {head} head needs an encoder (minilm, bert-tiny, a `lmlab pretrain` "
                f"checkpoint); {model!r} is a {type(base_model(net)).__name__}"
            )
        if tokenizer is None:
            raise ConfigError(f"{model!r} has no tokenizer; the {head} head needs one for its text")
        old_spec = model_spec(base_model(net))
        _check_existing_head(model, old_spec, saved, head, labels)
        spec, state = dict(old_spec), net.state_dict()
    special_ids(tokenizer)  # [CLS], [SEP], [PAD] exist, or a ConfigError says so
    fresh_pooler = head == "sequence" and not old_spec.get("pooler", False)
    spec.update(
        family="encoder",
        head=head,
        n_labels=max(len(labels), 1) if head != "span" else 2,
        mlm_head=False,
        nsp_head=False,
        pooler=bool(spec.get("pooler", False) or head == "sequence"),
    )
    with seeded(seed):
        net = build_model(spec)
    if state is not None:
        kept = {k: v for k, v in state.items() if not k.startswith(("mlm.", "nsp."))}
        missing, unexpected = net.load_state_dict(kept, strict=False)
        allowed = ("head.", "pooler.") if fresh_pooler else ("head.",)
        if unexpected or any(not k.startswith(allowed) for k in missing):
            raise ConfigError(
                f"{model!r}: its weights do not fit the encoder with a {head} head "
                f"(missing {missing[:4]}, unexpected {unexpected[:4]})"
            )
    return net.train(), tokenizer, fresh_pooler


def _check_existing_head(model, spec, saved, head, labels) -> None:
    """A model that already has a head continues training only on the same kind of head
    with the same labels."""
    had = spec.get("head", "none")
    if had == "none":
        return
    if had != head:
        raise ConfigError(
            f"{model!r} carries a {had} head, which does not fit task={head!r}; fine-tune "
            f"it with --task {had}, or start from the encoder without a head"
        )
    theirs = tuple(saved.get("labels") or ())
    n = spec.get("n_labels")
    if head != "span" and (theirs != tuple(labels) if theirs else n != len(labels)):
        raise ConfigError(
            f"{model!r}'s {head} head has labels {list(theirs) or n}, the task has "
            f"{list(labels)}: the label sets must match"
        )


# ----------------------------------------------------------------------------- features


def sequence_rows(rows, tokenizer, max_len: int) -> list[dict[str, Any]]:
    cls, sep, _ = special_ids(tokenizer)
    out = []
    for text, label in rows:
        ids = tokenizer.tokenizer.encode(text, add_special_tokens=False).ids[: max_len - 2]
        out.append(
            {"ids": [cls, *ids, sep], "token_type_ids": [0] * (len(ids) + 2), "label": label}
        )
    return out


def token_rows(sentences, tokenizer, labels, max_len: int) -> list[dict[str, Any]]:
    """Each sentence's subwords with their word ids (None on [CLS], [SEP]) and training
    labels on first subwords (``align_labels``); words past ``max_len`` are cut."""
    cls, sep, _ = special_ids(tokenizer)
    index = {tag: i for i, tag in enumerate(labels)}
    out = []
    for s in sentences:
        enc = tokenizer.tokenizer.encode(
            list(s.words), is_pretokenized=True, add_special_tokens=False
        )
        ids, words = enc.ids[: max_len - 2], enc.word_ids[: max_len - 2]
        word_ids = [None, *words, None]
        out.append(
            {
                "ids": [cls, *ids, sep],
                "token_type_ids": [0] * (len(ids) + 2),
                "label": align_labels(word_ids, [index[t] for t in s.tags]),
                "word_ids": word_ids,
            }
        )
    return out


def span_rows(examples, tokenizer, max_len: int, doc_stride: int) -> list[dict[str, Any]]:
    return [
        {
            "ids": f.ids,
            "token_type_ids": f.token_type_ids,
            "start": f.start,
            "end": f.end,
            "example": f.example,
            "offsets": f.offsets,
        }
        for f in qa_features(examples, tokenizer, max_len, doc_stride)
    ]


def task_rows(data: HeadData, split: str, tokenizer, max_len: int, doc_stride: int):
    rows = data.splits[split]
    if data.head == "token":
        return token_rows(rows, tokenizer, data.labels, max_len)
    if data.head == "span":
        return span_rows(rows, tokenizer, max_len, doc_stride)
    return sequence_rows(rows, tokenizer, max_len)


# ----------------------------------------------------------------------------- scoring


@torch.no_grad()
def head_outputs(model: nn.Module, rows, pad_id: int, batch_size: int = 32) -> list[Any]:
    """The head's logits for each row, unpadded: [n_labels] (sequence), [T, n_labels]
    (token) or ([T], [T]) (span)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    kind = base_model(model).config.head
    out: list[Any] = []
    for i in range(0, len(rows), batch_size):
        chunk = rows[i : i + batch_size]
        batch = {k: v.to(device) for k, v in collate_rows(chunk, pad_id).items()}
        logits = model.head_logits(
            model(batch["ids"], batch["attention_mask"], batch["token_type_ids"])
        )
        for j, r in enumerate(chunk):
            T = len(r["ids"])
            if kind == "sequence":
                out.append(logits[j].float().cpu())
            elif kind == "token":
                out.append(logits[j, :T].float().cpu())
            else:
                out.append((logits[0][j, :T].float().cpu(), logits[1][j, :T].float().cpu()))
    model.train(was_training)
    return out


def score_head(
    model: nn.Module,
    data: HeadData,
    rows,
    split: str,
    pad_id: int,
    strategy: str = "first",
    n_best: int = 20,
    max_answer_len: int = 30,
) -> dict[str, float]:
    """The head's metrics (``METRICS``) on ``rows``, the features of ``data``'s ``split``."""
    outputs = head_outputs(model, rows, pad_id)
    examples = data.splits[split]
    if data.head == "sequence":
        right = sum(int(o.argmax()) == label for o, (_, label) in zip(outputs, examples))
        return {"accuracy": right / len(examples)}
    if data.head == "token":
        true, predicted, right, words = [], [], 0, 0
        for o, r, s in zip(outputs, rows, examples):
            labels = word_scores(o, r["word_ids"], strategy).argmax(-1).tolist()
            tags = [data.labels[i] for i in labels] + ["O"] * (len(s.tags) - len(labels))
            true.append(list(s.tags))
            predicted.append(tags)
            right += sum(a == b for a, b in zip(s.tags, tags))
            words += len(s.tags)
        return {**entity_scores(true, predicted), "word_accuracy": right / words}
    windows = [(r["example"], r["offsets"]) for r in rows]
    answers = best_answers(
        [e.context for e in examples],
        windows,
        [o[0] for o in outputs],
        [o[1] for o in outputs],
        n_best,
        max_answer_len,
    )
    return squad_scores(answers, [e.answer for e in examples])


# ----------------------------------------------------------------------------- the run


@dataclass
class HeadResult:
    task: str
    method: str
    model: str
    before: dict[str, float]
    after: dict[str, float]
    train: TrainResult
    trainable: int
    total: int
    out_dir: Path
    model_dir: Path
    labels: tuple[str, ...]
    counts: dict[str, int] = field(default_factory=dict)
    wall_s: float = 0.0


def finetune_head(
    model: str = "minilm",
    task: Literal["sequence", "token", "span"] = "token",
    method: Literal["full", "lora"] = "full",
    strategy: Literal["first", "average", "max"] = "first",
    max_len: int = 128,
    doc_stride: int = 32,
    lora: LoRAConfig = LoRAConfig(),
    n_best: int = 20,
    max_answer_len: int = 30,
    config: TrainConfig | None = None,
) -> HeadResult:
    """Fine-tune ``model`` with a ``task`` head (see the module docstring) and score the
    held-out test split before and after -> ``HeadResult``; writes ``heads.json``,
    ``heads.png`` and ``model/`` in ``config.out_dir``. ``max_len`` is cut to the model's
    ``max_seq_len``."""
    started = time.perf_counter()
    check_head(task, method, strategy)
    config = config or TrainConfig(out_dir="runs/heads", max_steps=100, lr=1e-4, min_lr=1e-5)
    data = head_data(task, seed=0)
    net, tokenizer, fresh_pooler = encoder_with_head(model, data, seed=config.seed)
    max_len = min(max_len, net.config.max_seq_len)
    _, _, pad_id = special_ids(tokenizer)
    rows = {s: task_rows(data, s, tokenizer, max_len, doc_stride) for s in data.splits}

    def score() -> dict[str, float]:
        return score_head(net, data, rows["test"], "test", pad_id, strategy, n_best, max_answer_len)

    before = score()
    if method == "lora":
        with seeded(config.seed):
            apply_lora(net, lora)
        net.head.requires_grad_(True)  # peft's modules_to_save: the new head trains whole
        if fresh_pooler:
            net.pooler.requires_grad_(True)
    trainable, total, _ = trainable_parameters(net)
    batches = HeadBatches(rows["train"], config.batch_size, config.seed, pad_id)
    val = [
        collate_rows(rows["validation"][i : i + config.batch_size], pad_id)
        for i in range(0, len(rows["validation"]), config.batch_size)
    ][: config.eval_batches]
    result = train(
        net,
        None,
        None,
        config,
        tokenizer=tokenizer,
        supervised=Supervised(batches, HeadLoss(), val),
    )
    after = score()

    out = Path(config.out_dir)
    model_dir = save_checkpoint(
        out / "model",
        net,
        tokenizer=tokenizer,
        extra_config={"task": task, "labels": list(data.labels)},
    )
    counts = {s: len(v) for s, v in data.splits.items()}
    counts["train_features"] = len(rows["train"])
    done = HeadResult(
        task,
        method,
        model,
        before,
        after,
        result,
        trainable,
        total,
        out,
        model_dir,
        data.labels,
        counts,
    )
    done.wall_s = time.perf_counter() - started
    atomic_write_json(out / "heads.json", head_summary(done, strategy, max_len, doc_stride))
    plot_heads(done)
    return done


def head_summary(
    result: HeadResult, strategy: str, max_len: int, doc_stride: int
) -> dict[str, Any]:
    """What ``heads.json`` holds."""
    return {
        "task": result.task,
        "model": result.model,
        "method": result.method,
        "metric": METRICS[result.task][0],
        "before": result.before,
        "after": result.after,
        "steps": result.train.step,
        "train_wall_s": result.train.wall_time_s,
        "wall_s": result.wall_s,
        "trainable": result.trainable,
        "total": result.total,
        "labels": list(result.labels),
        "examples": result.counts,
        "strategy": strategy if result.task == "token" else None,
        "max_len": max_len,
        "doc_stride": doc_stride if result.task == "span" else None,
    }


def plot_heads(result: HeadResult) -> Path:
    """``heads.png``: the test scores before and after fine-tuning, and the training loss."""
    from matplotlib.figure import Figure  # deferred: slow to import, only for plots

    names = METRICS[result.task]
    scale = 1.0 if result.task == "span" else 100.0  # SQuAD's scores are percentages already
    fig = Figure(figsize=(10, 4))
    left, right = fig.subplots(1, 2)
    x = torch.arange(len(names)).tolist()
    for shift, (label, scores) in zip(
        (-0.2, 0.2), (("before", result.before), ("after", result.after))
    ):
        values = [scores[n] * scale for n in names]
        bars = left.bar([i + shift for i in x], values, width=0.4, label=label)
        left.bar_label(bars, fmt="%.1f", fontsize=8)
    left.set_xticks(x, [n.replace("_", " ") for n in names])
    left.set(ylim=(0, 105), ylabel="% on the held-out test split")
    left.set_title(f"{result.model}, {result.task} head, {result.method}")
    left.legend(fontsize=8)
    events = read_metrics(result.out_dir / "metrics.jsonl")
    for kind, style in (("train", "-"), ("eval", "o-")):
        key = "loss" if kind == "train" else "val_loss"
        points = [(e["step"], e[key]) for e in events if e["event"] == kind and key in e]
        if points:
            right.plot(
                *zip(*points),
                style,
                label=f"{'training' if kind == 'train' else 'validation'} loss",
            )
    right.set(xlabel="step", ylabel="cross-entropy (nats)", title="fine-tuning loss")
    right.legend(fontsize=8)
    fig.tight_layout()
    path = result.out_dir / "heads.png"
    fig.savefig(path, dpi=100)
    return path
