"""Probing with control tasks: can a label be read off a layer, and is that the layer or the probe?

A probe is a small classifier trained on a model's frozen representations of words to
predict a label (part of speech, the subject's number). High accuracy says the label is
*decodable* from the layer; it does not say the model uses it, and a flexible probe can
learn the task itself. Hewitt and Liang (2019, "Designing and Interpreting Probes with
Control Tasks") make the second point measurable:

- a **control task** gives each word *type* one random label, drawn from the task's
  empirical label distribution and fixed for the type (``control_labels``). It has the
  task's output space and the same structure (a type's label is shared by its tokens), but
  no linguistic meaning: a probe can solve it only by memorising word identities;
- **selectivity** = task accuracy - control accuracy, on held-out sentences. A good probe
  is accurate *and* selective: it reflects the representation, not its own capacity.

Their finding, which ``tests/interp/test_probing.py`` shows on this module: linear probes
are more selective than MLP probes of about the same task accuracy.

The steps, each a function here::

    reps = collect(model, tokenizer, task, points)    # one vector per probed word and layer
    result = sweep(reps, probes=("linear", "mlp"))    # train probes, per layer, task and control
    plot_probes(result, "probe.png")                  # accuracy and selectivity per layer

``probe_model(model, task, out=DIR)`` loads a model and does all three (``lmlab probe``).

A word spanning several tokens is represented by its **last** token by default (the first
position where a causal model has read the whole word; ``pool="first"`` or ``"mean"``
choose otherwise). Texts are split into train, dev and test (70/10/20 by text, seeded);
probes stop early on dev accuracy and report test accuracy. There is no reference
implementation to compare with: the tests check the control task's definition, the
arithmetic of selectivity, and probes on synthetic features whose answer is known.
"""

from __future__ import annotations

import io
import os
from collections import Counter
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from lmlab.data.probing import LabelledText, ProbingTask, probing_task
from lmlab.devices import model_device
from lmlab.errors import ConfigError
from lmlab.fileio import atomic_write_bytes, atomic_write_json
from lmlab.interp.hooks import hook_points, layer_of, match_names, run_with_cache
from lmlab.lm import load
from lmlab.models.contract import abilities, base_model
from lmlab.seeds import seeded

Pool = Literal["last", "first", "mean"]
POOLS = ("last", "first", "mean")
PROBES = ("linear", "mlp")
SPLIT = (0.7, 0.1, 0.2)
"""Fractions of the texts for training, early stopping (dev) and the reported test accuracy."""


# ----------------------------------------------------------------------------- representations


def word_spans(
    tokenizer: Any, text: LabelledText, wrap: tuple[int | None, int | None] = (None, None)
) -> tuple[list[int], list[tuple[int, int]]]:
    """Token ids of ``text`` and each word's token span [start, end).

    Each word is encoded with what is written before it (``" dogs"``), and the pieces are
    concatenated: the ids decode to the text, and for tokenizers that split on spaces first
    (GPT-2 style BPE, WordPiece, characters) they equal encoding the whole text. ``wrap``:
    ids put before and after (BERT's [CLS] and [SEP]).

        words ("The", "dogs", "."), seps ("", " ", "") with a character tokenizer
        -> spans [(0, 3), (3, 8), (8, 9)]
    """
    ids = [] if wrap[0] is None else [wrap[0]]
    spans = []
    for sep, word in zip(text.seps, text.words, strict=True):
        piece = tokenizer.encode(sep + word)
        if not piece:
            raise ConfigError(f"the tokenizer gives no token for {sep + word!r} in {text.text!r}")
        spans.append((len(ids), len(ids) + len(piece)))
        ids += piece
    if wrap[1] is not None:
        ids.append(wrap[1])
    return ids, spans


def layer_points(model: nn.Module) -> list[str]:
    """The hook points a layer sweep reads, embeddings first: ``hook_embed``, then each
    block's ``hook_resid_post`` (transformers, encoders), each recurrent layer's
    ``hook_hidden``, or the MLP's ``hook_hidden``. Index k of this list is "layer k"."""
    names = list(hook_points(model))
    layered = [n for n in names if n.endswith(".hook_resid_post") and layer_of(n) is not None]
    layered = layered or [n for n in names if n.endswith("hook_hidden")]
    return [n for n in names if n == "hook_embed"] + layered


def pick_points(model: nn.Module, layers: Sequence[int] | None = None, names: str | None = None):
    """The hook points to probe: ``names`` (a name or pattern), else ``layers`` (indices
    into ``layer_points``; None: all of them)."""
    if names is not None:
        return match_names(model, names)
    points = layer_points(model)
    if layers is None:
        return points
    bad = [k for k in layers if not 0 <= k < len(points)]
    if bad:
        raise ConfigError(
            f"layers {bad} do not exist; this model has layers 0..{len(points) - 1} "
            f"(0 = the embeddings, k = after block k)"
        )
    return [points[k] for k in layers]


@dataclass
class Representations:
    """One vector per probed word at each hook point, with the word's label and type."""

    features: dict[str, torch.Tensor]
    """hook name -> [N, D] float32."""
    labels: torch.Tensor
    """[N] int64: index into ``classes``."""
    types: list[str]
    """The word type of each row (the word as written)."""
    groups: torch.Tensor
    """[N] int64: the text each row comes from (splits keep a text's words together)."""
    classes: tuple[str, ...]
    task: str = ""
    layers: dict[str, int] = field(default_factory=dict)
    """hook name -> its layer number (0 = embeddings, k = after block k) where it has one."""


def _pool(hidden: torch.Tensor, span: tuple[int, int], pool: str) -> torch.Tensor:
    """hidden [T, D] -> the word's vector [D]."""
    start, end = span
    if pool == "last":
        return hidden[end - 1]
    if pool == "first":
        return hidden[start]
    return hidden[start:end].mean(dim=0)


@torch.no_grad()
def collect(
    model: nn.Module,
    tokenizer: Any,
    task: ProbingTask,
    points: Sequence[str],
    pool: Pool = "last",
    batch_size: int = 32,
    progress: bool = False,
) -> Representations:
    """Run ``model`` over the task's texts (batched, no gradients) and keep, at each hook
    point in ``points``, the vector of every probed word (``pool`` over its tokens).

    Rows are right-padded: a causal model's earlier positions never see the padding, and an
    encoder gets an attention mask. A text longer than the model's context is an error.
    """
    if pool not in POOLS:
        raise ConfigError(f"pool {pool!r} is unknown; valid: {', '.join(POOLS)}")
    inner = base_model(model)
    encoder = abilities(inner).kind == "encoder"
    wrap = (getattr(tokenizer, "cls_id", None), getattr(tokenizer, "sep_id", None))
    encoded = [word_spans(tokenizer, t, wrap if encoder else (None, None)) for t in task.texts]
    context = getattr(getattr(inner, "config", None), "max_seq_len", None)
    longest = max(len(ids) for ids, _ in encoded)
    if context is not None and longest > context:
        raise ConfigError(
            f"task {task.name!r} has a text of {longest} tokens, longer than the model's "
            f"context of {context}; ask for shorter texts"
        )
    device = model_device(model)
    index = {c: i for i, c in enumerate(task.classes)}
    points = list(points)
    features: dict[str, list[torch.Tensor]] = {p: [] for p in points}
    labels, types, groups = [], [], []
    starts = range(0, len(encoded), batch_size)
    for start in tqdm(starts, disable=not progress, desc="representations", unit="batch"):
        batch = encoded[start : start + batch_size]
        T = max(len(ids) for ids, _ in batch)
        ids = torch.zeros(len(batch), T, dtype=torch.long)  # (B, T), right padding
        mask = torch.zeros(len(batch), T, dtype=torch.long)
        for row, (seq, _) in enumerate(batch):
            ids[row, : len(seq)] = torch.tensor(seq)
            mask[row, : len(seq)] = 1
        forward = {"attention_mask": mask.to(device)} if encoder else {}
        _, cache = run_with_cache(model, ids.to(device), names=points, **forward)
        for row, (_, spans) in enumerate(batch):
            text = task.texts[start + row]
            for (word, label), span in zip(zip(text.words, text.labels), spans, strict=True):
                if label is None:
                    continue
                for p in points:
                    features[p].append(_pool(cache[p][row], span, pool).float().cpu())
                labels.append(index[label])
                types.append(word)
                groups.append(start + row)
    if not labels:
        raise ConfigError(f"task {task.name!r} has no labelled word")
    numbered = layer_points(model)
    return Representations(
        {p: torch.stack(v) for p, v in features.items()},
        torch.tensor(labels),
        types,
        torch.tensor(groups),
        task.classes,
        task.name,
        {p: numbered.index(p) for p in points if p in numbered},
    )


# ----------------------------------------------------------------------------- control task


def control_labels(
    types: Sequence[str], labels: Sequence[int] | torch.Tensor, seed: int = 0
) -> tuple[torch.Tensor, dict[str, int]]:
    """Hewitt and Liang's control task: each word type gets one label drawn from the
    empirical distribution of ``labels``, the same for every occurrence of the type.

    Returns the control label of each word [N] int64 and the type -> label map. Types are
    drawn in sorted order, so the map depends only on the set of types, their labels'
    distribution and the seed.

        types ["a", "b", "a"], labels [0, 1, 1] -> [x, y, x], x and y drawn from {0: 1/3, 1: 2/3}
    """
    labels = torch.as_tensor(labels)
    counts = Counter(labels.tolist())
    classes = sorted(counts)
    probs = np.array([counts[c] for c in classes], dtype=np.float64) / len(labels)
    rng = np.random.default_rng(seed)
    vocab = sorted(set(types))
    drawn = rng.choice(len(classes), size=len(vocab), p=probs)
    by_type = {t: classes[int(k)] for t, k in zip(vocab, drawn, strict=True)}
    return torch.tensor([by_type[t] for t in types]), by_type


def split_groups(groups: torch.Tensor, seed: int = 0, fractions=SPLIT):
    """Boolean masks (train, dev, test) over rows, cutting by group (text) so that the words
    of one text stay together; seeded."""
    ids = torch.unique(groups)
    order = ids[torch.randperm(len(ids), generator=torch.Generator().manual_seed(seed))]
    n_train = max(1, round(fractions[0] * len(ids)))
    n_dev = max(1, round(fractions[1] * len(ids)))
    parts = order[:n_train], order[n_train : n_train + n_dev], order[n_train + n_dev :]
    if len(parts[2]) == 0:
        raise ConfigError(f"{len(ids)} texts are too few to split into train, dev and test")
    return tuple(torch.isin(groups, p) for p in parts)


# ----------------------------------------------------------------------------- probes


@dataclass(frozen=True)
class ProbeConfig:
    kind: Literal["linear", "mlp"] = "linear"
    """linear: softmax regression; mlp: one hidden ReLU layer (Hewitt and Liang's MLP-1)."""
    hidden: int = 256
    """Width of the MLP's hidden layer."""
    weight_decay: float = 0.0
    """AdamW weight decay (a simple way to make a probe less able to memorise)."""
    lr: float = 1e-2
    batch_size: int = 256
    max_epochs: int = 40
    patience: int = 5
    """Stop after this many epochs without a better dev accuracy; keep the best epoch."""
    seed: int = 0

    def __post_init__(self):
        if self.kind not in PROBES:
            raise ConfigError(f"ProbeConfig.kind={self.kind!r} is invalid: one of {PROBES}")
        for name in ("hidden", "batch_size", "max_epochs", "patience"):
            if getattr(self, name) < 1:
                raise ConfigError(f"ProbeConfig.{name}={getattr(self, name)!r}: must be >= 1")
        if self.lr <= 0 or self.weight_decay < 0:
            raise ConfigError("ProbeConfig: lr must be > 0 and weight_decay >= 0")


class Probe(nn.Module):
    """Standardise the features (with the training set's mean and std), then classify."""

    def __init__(self, mean: torch.Tensor, std: torch.Tensor, n_classes: int, config: ProbeConfig):
        super().__init__()
        self.register_buffer("mean", mean)
        self.register_buffer("std", std)
        D = mean.shape[0]
        if config.kind == "linear":
            self.net = nn.Linear(D, n_classes)
        else:
            self.net = nn.Sequential(
                nn.Linear(D, config.hidden), nn.ReLU(), nn.Linear(config.hidden, n_classes)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [N, D] -> logits [N, C]."""
        return self.net((x - self.mean) / self.std)

    @torch.no_grad()
    def accuracy(self, x: torch.Tensor, y: torch.Tensor) -> float:
        return (self(x).argmax(-1) == y).float().mean().item() if len(y) else float("nan")


def train_probe(
    x: torch.Tensor,
    y: torch.Tensor,
    x_dev: torch.Tensor,
    y_dev: torch.Tensor,
    n_classes: int,
    config: ProbeConfig = ProbeConfig(),
) -> Probe:
    """Fit a probe on (x [N, D] float, y [N] int64) with AdamW and minibatches, keeping the
    epoch with the best dev accuracy and stopping after ``config.patience`` epochs without
    one (or at a perfect dev accuracy). Seeded by ``config.seed`` (initialisation and batch
    order)."""
    with one_thread():
        return _fit(x, y, x_dev, y_dev, n_classes, config)


@contextmanager
def one_thread():
    """Run the block on one CPU thread: a probe's matrix products are so small that
    synchronising threads costs more than it saves (several times over on a busy machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _fit(x, y, x_dev, y_dev, n_classes: int, config: ProbeConfig) -> Probe:
    mean, std = x.mean(0), x.std(0).clamp_min(1e-6)
    with seeded(config.seed):
        probe = Probe(mean, std, n_classes, config)
    opt = torch.optim.AdamW(probe.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    order = torch.Generator().manual_seed(config.seed)
    best, best_state, waited = -1.0, _snapshot(probe), 0
    for _ in range(config.max_epochs):
        probe.train()
        for rows in torch.randperm(len(y), generator=order).split(config.batch_size):
            loss = F.cross_entropy(probe(x[rows]), y[rows])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        probe.eval()
        score = probe.accuracy(x_dev, y_dev)
        if score > best:
            best, best_state, waited = score, _snapshot(probe), 0
            if best == 1.0:  # nothing left to gain on dev
                break
        else:
            waited += 1
            if waited >= config.patience:
                break
    probe.load_state_dict(best_state)
    return probe.eval()


def _snapshot(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def selectivity(accuracy: float, control_accuracy: float) -> float:
    """Hewitt and Liang's selectivity: task accuracy minus control accuracy."""
    return accuracy - control_accuracy


# ----------------------------------------------------------------------------- the sweep


@dataclass
class ProbeRow:
    point: str
    layer: int
    """The layer number (0 = embeddings, k = after block k), or, for a hook point that is
    not a layer's output (``blocks.2.hook_attn_out``), its position in the sweep."""
    probe: str
    accuracy: float
    """Test accuracy on the task."""
    control_accuracy: float
    """Test accuracy on the control task (the same words, the control labels)."""
    selectivity: float
    train_accuracy: float
    control_train_accuracy: float


@dataclass
class ProbeResult:
    task: str
    classes: tuple[str, ...]
    rows: list[ProbeRow]
    majority: float
    """Test accuracy of always answering the most frequent training label."""
    n_words: int
    n_types: int
    settings: dict[str, Any] = field(default_factory=dict)

    def table(self) -> list[dict[str, Any]]:
        return [asdict(r) for r in self.rows]

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["classes"] = list(self.classes)
        return out


def sweep(
    reps: Representations,
    probes: Sequence[str] = PROBES,
    config: ProbeConfig = ProbeConfig(),
    seed: int = 0,
    progress: bool = False,
) -> ProbeResult:
    """Train each kind of probe in ``probes`` at every hook point of ``reps``, on the task
    and on its control task, and report test accuracy, control accuracy and selectivity.

    The split (by text) and the control labels are drawn once from ``seed``, so every point
    and probe sees the same words and the same control task."""
    for kind in probes:
        if kind not in PROBES:
            raise ConfigError(f"probe {kind!r} is unknown; valid: {', '.join(PROBES)}")
    train, dev, test = split_groups(reps.groups, seed)
    y = reps.labels
    control, _ = control_labels(reps.types, y, seed)
    C = len(reps.classes)
    majority_label = torch.bincount(y[train], minlength=C).argmax()
    numbered = all(p in reps.layers for p in reps.features)
    rows = []
    total = len(reps.features) * len(probes)
    bar = tqdm(total=total, disable=not progress, desc="probes", unit="probe")
    for k, point in enumerate(reps.features):
        x = reps.features[point]
        for kind in probes:
            cfg = replace(config, kind=kind)
            task_probe = train_probe(x[train], y[train], x[dev], y[dev], C, cfg)
            ctrl_probe = train_probe(x[train], control[train], x[dev], control[dev], C, cfg)
            acc = task_probe.accuracy(x[test], y[test])
            ctrl = ctrl_probe.accuracy(x[test], control[test])
            rows.append(
                ProbeRow(
                    point,
                    reps.layers[point] if numbered else k,
                    kind,
                    acc,
                    ctrl,
                    selectivity(acc, ctrl),
                    task_probe.accuracy(x[train], y[train]),
                    ctrl_probe.accuracy(x[train], control[train]),
                )
            )
            bar.update()
    bar.close()
    return ProbeResult(
        reps.task,
        reps.classes,
        rows,
        (y[test] == majority_label).float().mean().item(),
        len(y),
        len(set(reps.types)),
        {"probe": asdict(config), "seed": seed, "split": list(SPLIT), "layers": numbered},
    )


# ----------------------------------------------------------------------------- figure


def plot_probes(result: ProbeResult, png: str | os.PathLike, title: str = "") -> None:
    """Two panels over the swept points: task (solid) and control (dashed) accuracy of each
    probe with the majority baseline, and each probe's selectivity."""
    from matplotlib.figure import Figure  # deferred: slow to import, only for plots

    fig = Figure(figsize=(11, 4.2))
    left, right = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    colours = {"linear": "tab:blue", "mlp": "tab:orange"}
    points = list(dict.fromkeys(r.point for r in result.rows))
    for kind in dict.fromkeys(r.probe for r in result.rows):
        rows = [r for r in result.rows if r.probe == kind]
        xs = [r.layer for r in rows]
        c = colours.get(kind)
        left.plot(xs, [r.accuracy for r in rows], "o-", color=c, label=f"{kind}: task")
        left.plot(xs, [r.control_accuracy for r in rows], "s--", color=c, label=f"{kind}: control")
        right.plot(xs, [r.selectivity for r in rows], "o-", color=c, label=kind)
    left.axhline(result.majority, color="grey", lw=1, ls=":", label="majority label")
    left.set_ylabel("test accuracy")
    left.set_ylim(0, 1.02)
    right.set_ylabel("selectivity (task - control accuracy)")
    right.axhline(0, color="grey", lw=1)
    numbered = result.settings.get("layers", True)
    xs = sorted({r.layer for r in result.rows})
    ticks = [str(x) for x in xs] if numbered else points
    for ax in (left, right):
        ax.set_xticks(xs, ticks, rotation=0 if numbered else 30, fontsize=8)
        ax.set_xlabel("layer (0 = embeddings, k = after block k)" if numbered else "hook point")
        ax.grid(True, alpha=0.3)
    left.legend(fontsize=8, loc="lower left")
    right.legend(fontsize=8)
    left.set_title(f"{result.task}: accuracy, task and control")
    right.set_title("selectivity")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    atomic_write_bytes(png, buffer.getvalue())


# ----------------------------------------------------------------------------- the command


def probe_model(
    model: str,
    task: str = "pos",
    layers: Sequence[int] | None = None,
    points: str | None = None,
    probes: Sequence[str] = PROBES,
    n: int | None = None,
    pool: Pool = "last",
    config: ProbeConfig = ProbeConfig(),
    seed: int = 0,
    out: str | os.PathLike | None = None,
    dtype: str | None = "auto",
    device: str = "auto",
    batch_size: int = 32,
    progress: bool = True,
) -> ProbeResult:
    """Load ``model`` (anything ``lmlab.load`` takes), build the bundled ``task`` with ``n``
    texts, collect the representations at ``layers`` (or the hook ``points`` pattern),
    sweep the probes, and with ``out`` write ``out/probe.json`` and ``out/probe.png``."""
    # a misspelt task, pool or probe fails before the model loads
    built = probing_task(task, n, seed)
    if pool not in POOLS:
        raise ConfigError(f"pool {pool!r} is unknown; valid: {', '.join(POOLS)}")
    for kind in probes:
        if kind not in PROBES:
            raise ConfigError(f"probe {kind!r} is unknown; valid: {', '.join(PROBES)}")
    lm = load(model, dtype=dtype, device=device)
    if lm.tokenizer is None:
        raise ConfigError(f"model {model!r} has no tokenizer; probing reads text")
    chosen = pick_points(lm.model, layers, points)
    reps = collect(lm.model, lm.tokenizer, built, chosen, pool, batch_size, progress)
    result = sweep(reps, probes, config, seed, progress)
    result.settings.update({"model": str(model), "pool": pool, "texts": len(built.texts)})
    if out is not None:
        out = Path(out)
        atomic_write_json(out / "probe.json", result.to_dict())
        title = f"probing {Path(str(model)).name}: {result.n_words} words of {result.n_types} types"
        plot_probes(result, out / "probe.png", title)
    return result
