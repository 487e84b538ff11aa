"""The logit lens and the tuned lens: what each layer's residual stream would predict.

**Logit lens** (nostalgebraist 2020): read the residual stream after layer l as if it were
the last one, through the model's own final norm and unembedding::

    logits_l = lm_head(norm(h_l))        # lmlab's Transformer: model.norm, model.lm_head
    logits_l = lm_head(h_l)              # a recurrent LM: the layer's hidden state

Row 0 is the embedding (the input of block 0), row L the last block's output, whose lens
is the model's own prediction. Early rows are biased: the residual basis drifts from layer
to layer, so the unembedding reads early layers in the wrong coordinates and their KL to
the final distribution is large even when the information is there.

**Tuned lens** (Belrose et al. 2023, "Eliciting Latent Predictions from Transformers with
the Tuned Lens"): one affine translator per layer, ``h -> h + W_l h + b_l`` (W_l, b_l zero
at the start, so an untrained tuned lens *is* the logit lens), trained to minimise
``KL(final || lens_l)`` on a corpus with the model frozen (eq. 4 of the paper). The last
row needs no translator: it is the model's output. Translators are saved as a small
safetensors file with the model's shape in its metadata.

Both return a ``LensResult``: per row and position the top token, the KL divergence from
the final distribution (nats), and the rank and log-probability of a target token (by
default the next token of the prompt).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from torch import nn
from tqdm.auto import tqdm

from lmlab.errors import CheckpointError, ConfigError, DataNotFoundError
from lmlab.fileio import atomic_write_bytes
from lmlab.interp.hooks import run_with_cache
from lmlab.models.contract import base_model, family_name, require_causal_lm
from lmlab.models.recurrent import RecurrentLM
from lmlab.models.transformer import Transformer
from lmlab.seeds import seeded

# ----------------------------------------------------------------------------- the readout


def lens_points(model: nn.Module) -> tuple[list[str], Callable[[torch.Tensor], torch.Tensor]]:
    """The residual-stream hook names a lens reads, in order (embedding first, last block
    last), and the readout that turns one of them [..., D] into logits [..., V]."""
    require_causal_lm(model, "the logit lens")
    inner = base_model(model)
    if isinstance(inner, Transformer):
        L = inner.config.n_layers
        names = ["blocks.0.hook_resid_pre"] + [f"blocks.{i}.hook_resid_post" for i in range(L)]
        return names, lambda h: inner.lm_head(inner.norm(h))
    if isinstance(inner, RecurrentLM):
        names = ["hook_embed"] + [f"layers.{k}.hook_hidden" for k in range(len(inner.layers))]
        return names, inner.lm_head
    raise ConfigError(
        f"the logit lens reads a stream of layers; {family_name(model)} has none (it maps "
        "its input to logits in one step): use a transformer (gpt, llama) or a recurrent "
        "model (rnn, gru, lstm)"
    )


def row_labels(names: list[str]) -> list[str]:
    """Short labels for the lens rows: ``embed``, then ``0``, ``1``, ... (the block index)."""
    return ["embed"] + [str(i) for i in range(len(names) - 1)]


# ----------------------------------------------------------------------------- results


@dataclass
class LensResult:
    """What a lens sees at every row (embedding, block 0 .. block L-1) and position.

    All tensors are [R, T] with R = n_layers + 1 rows; KL and log-probabilities in nats.
    """

    labels: list[str]
    """Row labels: ``embed``, ``0``, ``1``, ..."""
    top_ids: torch.Tensor
    """int64: the most likely token under the lens."""
    top_probs: torch.Tensor
    """Its probability."""
    kl: torch.Tensor
    """KL(final || lens) per position; the last row is 0."""
    target_ids: torch.Tensor
    """int64 [T]: the token whose rank is tracked (the next prompt token; -1 where none)."""
    target_ranks: torch.Tensor
    """int64: rank of the target (0 = top); -1 where there is no target."""
    target_logprobs: torch.Tensor
    """Log-probability of the target (NaN where there is no target)."""

    @property
    def kl_per_layer(self) -> torch.Tensor:
        """[R] mean KL over positions."""
        return self.kl.mean(dim=1)

    def to_dict(self) -> dict:
        return {
            "rows": self.labels,
            "top_ids": self.top_ids.tolist(),
            "top_probs": self.top_probs.tolist(),
            "kl": self.kl.tolist(),
            "kl_per_layer": self.kl_per_layer.tolist(),
            "target_ids": self.target_ids.tolist(),
            "target_ranks": self.target_ranks.tolist(),
            "target_logprobs": [
                [None if v != v else v for v in r] for r in self.target_logprobs.tolist()
            ],
        }


def _summarise(log_probs: torch.Tensor, labels: list[str], targets: torch.Tensor) -> LensResult:
    """log_probs [R, T, V] (float32) and targets [T] (-1: none) -> LensResult."""
    final = log_probs[-1]  # (T, V)
    # KL(P_final || P_lens) = sum_v p_final (log p_final - log p_lens)
    kl = (final.exp() * (final - log_probs)).sum(-1).clamp_min(0.0)  # (R, T)
    top_lp, top_ids = log_probs.max(-1)
    has = targets >= 0
    safe = targets.clamp_min(0)
    target_lp = log_probs.gather(-1, safe.expand(log_probs.shape[0], -1)[..., None])[..., 0]
    ranks = (log_probs > target_lp[..., None]).sum(-1)
    return LensResult(
        labels=labels,
        top_ids=top_ids,
        top_probs=top_lp.exp(),
        kl=kl,
        target_ids=targets,
        target_ranks=torch.where(has, ranks, torch.full_like(ranks, -1)),
        target_logprobs=torch.where(has, target_lp, torch.full_like(target_lp, float("nan"))),
    )


def _targets(ids: torch.Tensor, target: int | None) -> torch.Tensor:
    """[T]: the next token of the prompt at each position (the last has none), or ``target``
    everywhere."""
    T = ids.shape[-1]
    if target is not None:
        return torch.full((T,), int(target), dtype=torch.long)
    nxt = torch.full((T,), -1, dtype=torch.long)
    nxt[:-1] = ids[0, 1:].cpu()
    return nxt


def _check_ids(model: nn.Module, ids: torch.Tensor, target: int | None) -> None:
    if ids.dim() != 2 or ids.shape[0] != 1:
        raise ConfigError(f"a lens reads one prompt: ids must be [1, T], got {tuple(ids.shape)}")
    V = base_model(model).config.vocab_size
    if target is not None and not 0 <= int(target) < V:
        raise ConfigError(f"target token id {target} is outside the vocabulary [0, {V})")


@torch.no_grad()
def logit_lens(model: nn.Module, ids: torch.Tensor, target: int | None = None) -> LensResult:
    """The logit lens on one prompt. ids: [1, T] int64; ``target``: a token id to track at
    every position (default: each position's next prompt token)."""
    return _lens(model, ids, target, translators=None)


@torch.no_grad()
def _lens(model, ids, target, translators: TunedLens | None) -> LensResult:
    _check_ids(model, ids, target)
    names, readout = lens_points(model)
    _, cache = run_with_cache(model, ids, names=names)
    rows = []
    for r, name in enumerate(names):
        h = cache[name][0]  # (T, D)
        if translators is not None:
            h = translators.translate(r, h)
        rows.append(F.log_softmax(readout(h).float(), dim=-1))
    return _summarise(torch.stack(rows).cpu(), row_labels(names), _targets(ids, target))


# ----------------------------------------------------------------------------- tuned lens


class TunedLens(nn.Module):
    """One affine translator per row but the last: ``h -> h + h W_r^T + b_r``, zero at the
    start (so it equals the logit lens until trained). Shapes: W [R-1, D, D], b [R-1, D]."""

    def __init__(self, n_rows: int, d_model: int):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(n_rows - 1, d_model, d_model))
        self.bias = nn.Parameter(torch.zeros(n_rows - 1, d_model))

    @property
    def n_rows(self) -> int:
        return self.weight.shape[0] + 1

    def translate(self, row: int, h: torch.Tensor) -> torch.Tensor:
        """h [..., D] of lens row ``row`` in the last layer's coordinates."""
        if row == self.n_rows - 1:
            return h
        w, b = self.weight[row].to(h.dtype), self.bias[row].to(h.dtype)
        return h + h @ w.T + b

    def check_fits(self, model: nn.Module) -> None:
        names, _ = lens_points(model)
        inner = base_model(model)
        D = self.weight.shape[-1]
        d_model = getattr(inner.config, "d_model", None)
        if len(names) != self.n_rows or d_model != D:
            raise ConfigError(
                f"this tuned lens was trained for {self.n_rows - 1} layers of width {D}; "
                f"{family_name(model)} has {len(names) - 1} layers of width {d_model}: train "
                "one for this model with lmlab lens-train"
            )

    def save(self, path: str | os.PathLike, meta: dict | None = None) -> None:
        """Write the translators as one safetensors file (atomic)."""
        tensors = {
            "weight": self.weight.detach().float().cpu(),
            "bias": self.bias.detach().float().cpu(),
        }
        atomic_write_bytes(
            path, save_safetensors(tensors, metadata={"lmlab": json.dumps(meta or {})})
        )

    @classmethod
    def load(cls, path: str | os.PathLike) -> TunedLens:
        file = Path(path)
        if not file.is_file():
            raise DataNotFoundError(
                f"no tuned lens at {str(path)!r}: make one with lmlab lens-train"
            )
        try:
            tensors = load_safetensors(file.read_bytes())
            w, b = tensors["weight"], tensors["bias"]
        except Exception as e:  # a truncated or foreign file
            raise CheckpointError(f"{file} is not a tuned lens file ({e})") from None
        if w.dim() != 3 or w.shape[1] != w.shape[2] or b.shape != w.shape[:2]:
            raise CheckpointError(
                f"{file}: tuned lens tensors have shapes {tuple(w.shape)} and {tuple(b.shape)}; "
                "expected weight [R-1, D, D] and bias [R-1, D]"
            )
        lens = cls(w.shape[0] + 1, w.shape[1])
        with torch.no_grad():
            lens.weight.copy_(w)
            lens.bias.copy_(b)
        return lens


@torch.no_grad()
def tuned_lens(
    model: nn.Module, ids: torch.Tensor, lens: TunedLens, target: int | None = None
) -> LensResult:
    """The tuned lens on one prompt (as ``logit_lens``, each row translated first)."""
    lens.check_fits(model)
    return _lens(model, ids, target, translators=lens)


def corpus_windows(ids: torch.Tensor, seq_len: int, n_windows: int, seed: int) -> torch.Tensor:
    """``n_windows`` random windows [n, seq_len] of a token stream ``ids`` [N] (seeded)."""
    if len(ids) <= seq_len:
        raise ConfigError(f"the corpus has {len(ids)} tokens; a window needs more than {seq_len}")
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(ids) - seq_len, (n_windows,), generator=g)
    return torch.stack([ids[s : s + seq_len] for s in starts.tolist()])


def train_tuned_lens(
    model: nn.Module,
    windows: torch.Tensor,
    steps: int = 100,
    batch_size: int = 8,
    lr: float = 1e-3,
    seed: int = 0,
    progress: bool = True,
) -> tuple[TunedLens, list[float]]:
    """Train a tuned lens for ``model`` (frozen) on token windows [N, T] int64.

    Each step draws ``batch_size`` windows (seeded), runs the model once, and minimises the
    sum over rows of the mean KL(final || lens_r) over positions with Adam. Returns the lens
    (float32, on the CPU) and the loss per step (nats, summed over rows).
    """
    names, readout = lens_points(model)
    inner = base_model(model)
    device = next(inner.parameters()).device
    with seeded(seed):
        lens = TunedLens(len(names), inner.config.d_model).to(device)
    g = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(lens.parameters(), lr=lr)
    losses = []
    frozen = [p.requires_grad for p in inner.parameters()]
    for p in inner.parameters():
        p.requires_grad_(False)
    try:
        for _ in tqdm(range(steps), desc="tuned lens", disable=not progress):
            pick = torch.randint(0, len(windows), (batch_size,), generator=g)
            batch = windows[pick].to(device)
            with torch.no_grad():
                logits, cache = run_with_cache(model, batch, names=names)
                final = F.log_softmax(logits.float(), dim=-1)  # (B, T, V)
            loss = 0.0
            for r, name in enumerate(names[:-1]):
                h = lens.translate(r, cache[name].float())
                lp = F.log_softmax(readout(h.to(logits.dtype)).float(), dim=-1)
                loss = loss + F.kl_div(lp, final, log_target=True, reduction="none").sum(-1).mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(float(loss.detach()))
    finally:
        for p, req in zip(inner.parameters(), frozen, strict=True):
            p.requires_grad_(req)
    return lens.cpu(), losses


@torch.no_grad()
def mean_kl_per_layer(
    model: nn.Module, windows: torch.Tensor, lens: TunedLens | None = None, batch_size: int = 8
) -> torch.Tensor:
    """[R] mean KL(final || lens) per row over every position of ``windows`` [N, T]: the
    logit lens when ``lens`` is None."""
    names, readout = lens_points(model)
    device = next(base_model(model).parameters()).device
    total = torch.zeros(len(names), dtype=torch.float64)
    count = 0
    for start in range(0, len(windows), batch_size):
        batch = windows[start : start + batch_size].to(device)
        logits, cache = run_with_cache(model, batch, names=names)
        final = F.log_softmax(logits.float(), dim=-1)
        for r, name in enumerate(names):
            h = cache[name]
            if lens is not None:
                h = lens.to(device).translate(r, h)
            lp = F.log_softmax(readout(h).float(), dim=-1)
            total[r] += (final.exp() * (final - lp)).sum(-1).sum().double().cpu()
        count += batch.numel()
    return (total / count).float()


# ----------------------------------------------------------------------------- figures


def plot_lens(
    result: LensResult,
    tokens: list[str],
    decode: Callable[[int], str],
    png: str | os.PathLike,
    title: str = "logit lens",
) -> None:
    """Rows x positions heatmap of the KL to the final distribution, with each cell's top
    token written in it (the cells' colour: KL in nats, darker = closer to the output)."""
    from matplotlib.colors import LogNorm  # deferred: slow to import, only for plots
    from matplotlib.figure import Figure  # deferred, as above

    R, T = result.kl.shape
    fig = Figure(figsize=(max(6.0, 0.9 * T + 2), max(4.0, 0.28 * R + 1.5)))
    ax = fig.add_subplot()
    # log colours: the embedding row's KL is often 10x the others'; 0.01 nats is "equal"
    kl = result.kl.clamp_min(1e-2)
    norm = LogNorm(vmin=1e-2, vmax=max(1.0, float(kl.max())))
    image = ax.imshow(kl.numpy(), aspect="auto", cmap="viridis", origin="lower", norm=norm)
    fig.colorbar(image, ax=ax, label="KL(final || lens), nats (log scale)")
    size = 7 if T <= 16 else 5
    for r in range(R):
        for t in range(T):
            text = decode(int(result.top_ids[r, t])).replace("\n", "\\n")[:8]
            colour = "black" if norm(float(kl[r, t])) > 0.6 else "white"
            ax.text(t, r, text, ha="center", va="center", fontsize=size, color=colour)
    ax.set_xticks(
        range(T), [tok.replace("\n", "\\n")[:10] for tok in tokens], rotation=60, fontsize=8
    )
    step = max(1, R // 16)
    ax.set_yticks(range(0, R, step), result.labels[::step])
    ax.set_xlabel("input token (the prediction is for the next one)")
    ax.set_ylabel("layer (residual stream after it)")
    ax.set_title(f"{title}: top next token at each layer and position")
    fig.tight_layout()
    fig.savefig(png, dpi=100)


def plot_kl_per_layer(
    curves: dict[str, torch.Tensor], labels: list[str], png: str | os.PathLike
) -> None:
    """Mean KL to the final distribution per layer, one line per lens (log scale)."""
    from matplotlib.figure import Figure  # deferred: slow to import, only for plots

    fig = Figure(figsize=(6.4, 4))
    ax = fig.add_subplot()
    for name, kl in curves.items():
        ax.plot(range(len(kl)), kl.clamp_min(1e-4).numpy(), marker="o", markersize=3, label=name)
    ax.set_yscale("log")
    step = max(1, len(labels) // 16)
    ax.set_xticks(range(0, len(labels), step), labels[::step])
    ax.set_xlabel("layer (residual stream after it)")
    ax.set_ylabel("mean KL(final || lens), nats")
    ax.set_title("how far each layer's prediction is from the output")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(png, dpi=100)
