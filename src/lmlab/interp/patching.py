"""Activation patching and causal tracing: which activations carry the answer?

**Activation patching** (Vig et al. 2020; Geiger et al. 2021; the IOI work of Wang et al.
2022). Two prompts of the same length differ where it matters: the *clean* one
("When Mary and John went to the store, John gave a drink to" -> " Mary") and a
*corrupted* one whose answer differs (the second "John" swapped for "Mary" -> " John").
The metric is the logit difference between the right and the wrong answer at the last
position, normalised to the clean/corrupt gap::

    effect = (LD_patched - LD_corrupt) / (LD_clean - LD_corrupt)    # 1 = clean, 0 = corrupt

*Denoising* (the default) runs the corrupted prompt with one clean activation copied in: a
large effect means that activation alone is enough to restore the answer. *Noising* runs
the clean prompt with one corrupted activation: a small effect means the answer needed it.
Sweeps:

- ``patch_residual``: every layer x position of a residual-stream point (``resid_pre``,
  the input of block l, by default; also ``resid_mid``, ``resid_post``, ``attn_out``,
  ``mlp_out``);
- ``patch_heads``: every layer x head of the attention heads' outputs (``hook_z``, before
  the output projection), each head patched at every position.

All variants of one layer run as one batch (one forward per layer, or per chunk of
``batch_size`` rows), so a full sweep costs n_layers forwards, not n_layers x T.

**Causal tracing** (Meng et al. 2022, "Locating and Editing Factual Associations in GPT",
section 2.1). Corrupt one prompt by adding Gaussian noise (std 3x that of the token
embeddings) to the subject tokens' embeddings, then restore the clean hidden state at one
layer x position and see how much of the answer's probability comes back; averaged over
several noise samples (seeded). ``kind="mlp"`` or ``"attn"`` restores the MLP or attention
output over a window of layers around each layer instead (the paper's Figure 1 e, f).

The functions use the hooks of ``lmlab.interp.hooks`` (``replace``/``add``/``edit``) and work
on lmlab's transformer decoders (GPT-2 and Llama styles, SmolLM2).
"""

from __future__ import annotations

import os
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from lmlab.errors import ConfigError
from lmlab.interp.hooks import hooks, run_with_cache
from lmlab.models.contract import base_model, family_name, require_causal_lm
from lmlab.models.transformer import Transformer

POINTS = ("resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_out")


# ----------------------------------------------------------------------------- prompt pairs


@dataclass
class PromptPairs:
    """N clean/corrupted prompt pairs of one length T, with the token each should answer."""

    clean: torch.Tensor
    """[N, T] int64."""
    corrupt: torch.Tensor
    """[N, T] int64."""
    answer: torch.Tensor
    """[N] int64: the clean prompt's answer (the corrupted prompt's wrong one)."""
    wrong: torch.Tensor
    """[N] int64: the other answer."""

    def __post_init__(self):
        if self.clean.dim() != 2 or self.clean.shape != self.corrupt.shape:
            raise ConfigError(
                f"clean and corrupted prompts must have the same number of tokens; got "
                f"{tuple(self.clean.shape)} and {tuple(self.corrupt.shape)} (ids [N, T])"
            )
        N = self.clean.shape[0]
        if self.answer.shape != (N,) or self.wrong.shape != (N,):
            raise ConfigError(f"give one answer and one wrong token per pair ({N} pairs)")

    def to(self, device) -> PromptPairs:
        return PromptPairs(
            *(t.to(device) for t in (self.clean, self.corrupt, self.answer, self.wrong))
        )


def _one_token(tokenizer, text: str, what: str) -> int:
    ids = tokenizer.encode(text)
    if len(ids) != 1:
        raise ConfigError(
            f"the {what} {text!r} is {len(ids)} tokens ({ids}); it must be exactly one "
            "(for most BPE tokenizers a word starts with its space: ' Mary')"
        )
    return ids[0]


def make_pairs(
    tokenizer,
    clean: str | Sequence[str],
    corrupt: str | Sequence[str],
    answer: str | Sequence[str],
    wrong: str | Sequence[str],
) -> PromptPairs:
    """Tokenise prompt pairs; each answer must be one token and each pair one length."""

    def listed(x):
        return [x] if isinstance(x, str) else list(x)

    clean, corrupt, answer, wrong = map(listed, (clean, corrupt, answer, wrong))
    if not len(clean) == len(corrupt) == len(answer) == len(wrong) or not clean:
        raise ConfigError(
            f"give as many corrupted prompts, answers and wrong answers as clean prompts; got "
            f"{len(clean)}, {len(corrupt)}, {len(answer)}, {len(wrong)}"
        )
    rows_clean, rows_corrupt = [], []
    for a, b in zip(clean, corrupt, strict=True):
        ia, ib = tokenizer.encode(a), tokenizer.encode(b)
        if len(ia) != len(ib):
            raise ConfigError(
                f"a clean and a corrupted prompt must have the same number of tokens: {a!r} has "
                f"{len(ia)}, {b!r} has {len(ib)}; change words for words of the same length"
            )
        rows_clean.append(ia)
        rows_corrupt.append(ib)
    if len({len(r) for r in rows_clean}) > 1:
        raise ConfigError(
            "all the pairs of one sweep must have the same number of tokens; got "
            f"{sorted({len(r) for r in rows_clean})}"
        )
    return PromptPairs(
        torch.tensor(rows_clean),
        torch.tensor(rows_corrupt),
        torch.tensor([_one_token(tokenizer, t, "answer") for t in answer]),
        torch.tensor([_one_token(tokenizer, t, "wrong answer") for t in wrong]),
    )


NAMES = (
    "Mary John Tom James Anna Paul Mark Lisa Sarah David Emma Peter Kate Alex Laura Mike "
    "Jane Chris Dan Sam"
).split()
TEMPLATES = (
    "When {A} and {B} went to the store, {S} gave a drink to",
    "When {A} and {B} went to the park, {S} gave a ball to",
    "After {A} and {B} went to the office, {S} gave a letter to",
    "When {A} and {B} got a book at the library, {S} handed it to",
)


def ioi_pairs(tokenizer, n: int = 8, seed: int = 0) -> tuple[PromptPairs, list[tuple[str, str]]]:
    """``n`` indirect-object-identification pairs (Wang et al. 2022), seeded.

    Clean: "When {A} and {B} went to the store, {B} gave a drink to" -> " {A}" (the
    indirect object); corrupted: the second mention swapped to {A}, so the answer
    becomes " {B}" (same length). Names are ones the tokenizer keeps as one token with
    their leading space; all pairs share one template so they batch. Returns the pairs
    and the (clean, corrupted) texts.
    """
    names = [m for m in NAMES if len(tokenizer.encode(" " + m)) == 1]
    if len(names) < 2:
        raise ConfigError("this tokenizer splits the IOI names into several tokens")
    rng = random.Random(seed)
    template = TEMPLATES[0]
    texts, answers, wrongs = [], [], []
    for _ in range(n):
        a, b = rng.sample(names, 2)
        texts.append((template.format(A=a, B=b, S=b), template.format(A=a, B=b, S=a)))
        answers.append(" " + a)
        wrongs.append(" " + b)
    pairs = make_pairs(tokenizer, [c for c, _ in texts], [d for _, d in texts], answers, wrongs)
    return pairs, texts


# ----------------------------------------------------------------------------- metric


def logit_diff(logits: torch.Tensor, answer: torch.Tensor, wrong: torch.Tensor) -> torch.Tensor:
    """logits [B, T, V], answer/wrong [B] -> [B] float32: logit(answer) - logit(wrong) at
    the last position."""
    last = logits[:, -1].float()  # (B, V)
    rows = torch.arange(len(last), device=last.device)
    return last[rows, answer] - last[rows, wrong]


@dataclass
class PatchResult:
    """A patching sweep: ``effect`` [rows, cols], normalised (1 = clean, 0 = corrupt)."""

    effect: torch.Tensor
    """[L, T] (positions) or [L, H] (heads), float32, the mean over the pairs' logit
    differences, normalised."""
    rows: list[str]
    cols: list[str]
    point: str
    """The hook patched, e.g. ``blocks.*.hook_resid_pre`` or ``blocks.*.attn.hook_z``."""
    direction: str
    """``denoising`` (clean into corrupted) or ``noising`` (corrupted into clean)."""
    clean_diff: float
    """Mean logit difference (answer - wrong) on the clean prompts."""
    corrupt_diff: float
    pair_diffs: torch.Tensor = field(repr=False, default=None)
    """[L, cols, N] the raw logit difference of every patched run, per pair."""

    def to_dict(self) -> dict:
        return {
            "point": self.point,
            "direction": self.direction,
            "metric": "(LD_patched - LD_corrupt) / (LD_clean - LD_corrupt), LD = logit(answer) "
            "- logit(wrong) at the last position, mean over pairs",
            "clean_logit_diff": self.clean_diff,
            "corrupt_logit_diff": self.corrupt_diff,
            "rows": self.rows,
            "cols": self.cols,
            "effect": self.effect.tolist(),
        }


def _transformer(model: nn.Module, what: str) -> Transformer:
    require_causal_lm(model, what)
    inner = base_model(model)
    if not isinstance(inner, Transformer):
        raise ConfigError(
            f"{what} works on transformer decoders (gpt, llama, smollm2); {family_name(model)} "
            "is not one"
        )
    return inner


def _gap(model, pairs: PromptPairs) -> tuple[float, float]:
    with torch.no_grad():
        clean = logit_diff(model(pairs.clean), pairs.answer, pairs.wrong).mean().item()
        corrupt = logit_diff(model(pairs.corrupt), pairs.answer, pairs.wrong).mean().item()
    if abs(clean - corrupt) < 1e-6:
        raise ConfigError(
            f"the clean and corrupted prompts give the same logit difference ({clean:.4g}): "
            "there is nothing to patch; corrupt a token that changes the answer"
        )
    return clean, corrupt


@torch.no_grad()
def _sweep(
    model: nn.Module,
    pairs: PromptPairs,
    names: list[str],
    n_variants: int,
    patch: Callable[[torch.Tensor, torch.Tensor, int], None],
    noising: bool,
    batch_size: int,
    progress: bool,
) -> torch.Tensor:
    """For each hook name, run ``n_variants`` copies of the base prompts (corrupted when
    denoising), variant k with ``patch(act_k, source, k)`` applied in place to its
    activation from the other run's ``source``. -> raw logit differences [L, K, N]."""
    base, other = (pairs.clean, pairs.corrupt) if noising else (pairs.corrupt, pairs.clean)
    _, cache = run_with_cache(model, other, names=names)
    N = base.shape[0]
    per_chunk = max(1, batch_size // N)  # variants per forward
    out = torch.zeros(len(names), n_variants, N)
    for layer, name in enumerate(tqdm(names, desc="patching", disable=not progress)):
        source = cache[name]
        for k0 in range(0, n_variants, per_chunk):
            k1 = min(n_variants, k0 + per_chunk)

            def edit(act: torch.Tensor, _name: str, k0=k0, k1=k1, source=source) -> torch.Tensor:
                act = act.clone().view(k1 - k0, N, *act.shape[1:])  # (K, N, ...)
                for j in range(k1 - k0):
                    patch(act[j], source, k0 + j)
                return act.flatten(0, 1)

            with hooks(model, edit={name: edit}):
                logits = model(base.repeat(k1 - k0, 1))  # variant-major rows
            diffs = logit_diff(logits, pairs.answer.repeat(k1 - k0), pairs.wrong.repeat(k1 - k0))
            out[layer, k0:k1] = diffs.view(k1 - k0, N).cpu()
    return out


def _result(raw, clean, corrupt, rows, cols, point, noising) -> PatchResult:
    effect = (raw.mean(-1) - corrupt) / (clean - corrupt)
    return PatchResult(
        effect, rows, cols, point, "noising" if noising else "denoising", clean, corrupt, raw
    )


def patch_residual(
    model: nn.Module,
    pairs: PromptPairs,
    point: str = "resid_pre",
    noising: bool = False,
    batch_size: int = 64,
    progress: bool = False,
) -> PatchResult:
    """Layer x position sweep of ``blocks.{l}.hook_<point>``: each cell patches one layer's
    activation at one position (in every pair). -> effect [n_layers, T]."""
    inner = _transformer(model, "activation patching")
    if point not in POINTS:
        raise ConfigError(
            f"point {point!r} is not a residual point; choose one of {', '.join(POINTS)}"
        )
    pairs = pairs.to(next(inner.parameters()).device)
    clean, corrupt = _gap(model, pairs)
    L, T = inner.config.n_layers, pairs.clean.shape[1]
    names = [f"blocks.{i}.hook_{point}" for i in range(L)]

    def patch(act, source, p):  # act, source: (N, T, D)
        act[:, p] = source[:, p]

    raw = _sweep(model, pairs, names, T, patch, noising, batch_size, progress)
    rows, cols = [str(i) for i in range(L)], [str(t) for t in range(T)]
    return _result(raw, clean, corrupt, rows, cols, f"blocks.*.hook_{point}", noising)


def patch_heads(
    model: nn.Module,
    pairs: PromptPairs,
    noising: bool = False,
    batch_size: int = 64,
    progress: bool = False,
) -> PatchResult:
    """Layer x head sweep of the heads' outputs (``blocks.{l}.attn.hook_z``, before the
    output projection): each cell patches one head at every position. -> [n_layers, H]."""
    inner = _transformer(model, "activation patching")
    pairs = pairs.to(next(inner.parameters()).device)
    clean, corrupt = _gap(model, pairs)
    L, H = inner.config.n_layers, inner.config.n_heads
    names = [f"blocks.{i}.attn.hook_z" for i in range(L)]

    def patch(act, source, h):  # act, source: (N, T, H, Dh)
        act[:, :, h] = source[:, :, h]

    raw = _sweep(model, pairs, names, H, patch, noising, batch_size, progress)
    rows, cols = [str(i) for i in range(L)], [str(h) for h in range(H)]
    return _result(raw, clean, corrupt, rows, cols, "blocks.*.attn.hook_z", noising)


# ----------------------------------------------------------------------------- causal tracing


@dataclass
class TraceResult:
    """Causal tracing of one prompt: probability of the answer with one state restored."""

    probs: torch.Tensor
    """[L, T] float32: p(answer) with the clean state at (layer, position) restored into
    the noised run, mean over the noise samples."""
    p_clean: float
    p_corrupt: float
    """p(answer) with the subject noised and nothing restored (mean over samples)."""
    subject: list[int]
    """The positions noised."""
    noise_std: float
    kind: str
    """``resid`` (the block's output), ``mlp`` or ``attn`` (a window of layers)."""
    samples: int

    @property
    def indirect_effect(self) -> torch.Tensor:
        """[L, T]: p_restored - p_corrupt (the paper's indirect effect)."""
        return self.probs - self.p_corrupt

    def to_dict(self) -> dict:
        return {
            "kind": self.kind,
            "p_clean": self.p_clean,
            "p_corrupt": self.p_corrupt,
            "subject_positions": self.subject,
            "noise_std": self.noise_std,
            "samples": self.samples,
            "probs": self.probs.tolist(),
            "indirect_effect": self.indirect_effect.tolist(),
        }


def subject_positions(tokenizer, prompt: str, subject: str) -> list[int]:
    """The token positions of ``subject`` (its first occurrence) in ``prompt``."""
    start = prompt.find(subject)
    if start < 0 or not subject:
        raise ConfigError(f"the subject {subject!r} is not in the prompt {prompt!r}")
    end = start + len(subject)
    while start > 0 and prompt[start - 1] == " ":  # BPE: a word's token carries its space
        start -= 1
    ids = tokenizer.encode(prompt)
    before = tokenizer.encode(prompt[:start]) if start else []
    first, last = len(before), len(tokenizer.encode(prompt[:end]))
    if ids[:last] != tokenizer.encode(prompt[:end]) or ids[:first] != before or last <= first:
        raise ConfigError(
            f"the subject {subject!r} does not end on a token boundary of the prompt; give "
            "whole words"
        )
    return list(range(first, last))


@torch.no_grad()
def causal_trace(
    model: nn.Module,
    ids: torch.Tensor,
    answer: int,
    subject: Sequence[int],
    kind: str = "resid",
    samples: int = 10,
    noise: float = 3.0,
    window: int = 10,
    seed: int = 0,
    batch_size: int = 64,
    progress: bool = False,
) -> TraceResult:
    """Causal tracing of ``ids`` [1, T] for the token ``answer`` with the embeddings at the
    ``subject`` positions noised (std ``noise`` x the token embeddings' std, ``samples``
    seeded draws). ``kind``: restore each layer's residual output (``resid``), or the MLP
    (``mlp``) or attention (``attn``) outputs of the ``window`` layers centred on it."""
    inner = _transformer(model, "causal tracing")
    if kind not in ("resid", "mlp", "attn"):
        raise ConfigError(f"kind {kind!r} is not one of resid, mlp, attn")
    if ids.dim() != 2 or ids.shape[0] != 1:
        raise ConfigError(f"causal tracing reads one prompt: ids [1, T], got {tuple(ids.shape)}")
    T = ids.shape[1]
    subject = sorted(set(int(p) for p in subject))
    if not subject or subject[0] < 0 or subject[-1] >= T:
        raise ConfigError(f"subject positions {subject} must be within the prompt's {T} tokens")
    device = next(inner.parameters()).device
    ids = ids.to(device)
    L, D = inner.config.n_layers, inner.config.d_model
    std = noise * inner.tok_emb.weight.float().std().item()
    g = torch.Generator().manual_seed(seed)
    eps = torch.zeros(samples, T, D)
    eps[:, subject] = torch.randn(samples, len(subject), D, generator=g) * std
    eps = eps.to(device)

    point = {"resid": "hook_resid_post", "mlp": "hook_mlp_out", "attn": "hook_attn_out"}[kind]
    names = [f"blocks.{i}.{point}" for i in range(L)]
    logits, cache = run_with_cache(model, ids, names=names)
    p_clean = logits[0, -1].float().softmax(-1)[answer].item()
    with hooks(model, add={"hook_embed": eps}):
        noised = model(ids.expand(samples, T))
    p_corrupt = noised[:, -1].float().softmax(-1)[:, answer].mean().item()

    per_chunk = max(1, batch_size // samples)  # positions per forward
    probs = torch.zeros(L, T)
    for layer in tqdm(range(L), desc="causal tracing", disable=not progress):
        if kind == "resid":
            restored = [layer]
        else:
            restored = list(
                range(max(0, layer - window // 2), min(L, layer - window // 2 + window))
            )
        for p0 in range(0, T, per_chunk):
            p1 = min(T, p0 + per_chunk)
            k = p1 - p0

            def restore(act, name, p0=p0, k=k):  # act: (k * samples, T, D), position-major
                act = act.clone().view(k, samples, T, -1)
                clean = cache[name][0]  # (T, D)
                for j in range(k):
                    act[j, :, p0 + j] = clean[p0 + j]
                return act.flatten(0, 1)

            edit = {names[i]: restore for i in restored}
            with hooks(model, add={"hook_embed": eps.repeat(k, 1, 1)}, edit=edit):
                out = model(ids.expand(k * samples, T))
            p = out[:, -1].float().softmax(-1)[:, answer].view(k, samples).mean(1)
            probs[layer, p0:p1] = p.cpu()
    return TraceResult(probs, p_clean, p_corrupt, subject, std, kind, samples)


# ----------------------------------------------------------------------------- figures


def plot_effect(
    effect: torch.Tensor,
    rows: list[str],
    cols: list[str],
    png: str | os.PathLike,
    title: str,
    xlabel: str,
    colorbar: str = "normalised logit difference (1 = clean, 0 = corrupt)",
    highlight: Sequence[int] = (),
    centre: bool = True,
) -> None:
    """A rows (layers) x cols heatmap, layer 0 at the bottom. ``centre``: a diverging map
    centred on 0; else a sequential one. Columns in ``highlight`` get a starred label."""
    from matplotlib.figure import Figure  # deferred: slow to import, only for plots

    R, C = effect.shape
    fig = Figure(figsize=(max(5.0, 0.55 * C + 2.5), max(4.0, 0.2 * R + 1.8)))
    ax = fig.add_subplot()
    values = effect.float().numpy()
    if centre:
        bound = max(1.0, float(abs(effect).max()))
        image = ax.imshow(
            values, aspect="auto", origin="lower", cmap="RdBu_r", vmin=-bound, vmax=bound
        )
    else:
        image = ax.imshow(values, aspect="auto", origin="lower", cmap="Purples")
    fig.colorbar(image, ax=ax, label=colorbar)
    labels = [("*" if c in highlight else "") + cols[c].replace("\n", "\\n")[:12] for c in range(C)]
    ax.set_xticks(range(C), labels, rotation=60 if max(map(len, labels)) > 2 else 0, fontsize=8)
    step = max(1, R // 16)
    ax.set_yticks(range(0, R, step), rows[::step])
    ax.set_xlabel(xlabel)
    ax.set_ylabel("layer")
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(png, dpi=100)
