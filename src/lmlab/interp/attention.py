"""Attention maps and attention rollout.

**Maps.** Every attention layer's pattern ``softmax(q k^T / sqrt(Dh) + mask)`` is read at
``blocks.{l}.attn.hook_pattern`` (``run_with_cache``), for each layer and head:
``attention_maps(model, ids) -> [L, H, T, T]``; row i is how query token i spreads its
attention over the keys. Decoders are causal (row i is zero right of the diagonal);
encoders (BERT, MiniLM) see both ways.

**Rollout** (Abnar and Zuidema 2020, "Quantifying Attention Flow in Transformers").
A token's representation after layer l mixes the previous layer's tokens through the
attention *and* through the residual connection, so each layer's head-mean map is mixed
with the identity, renormalised, and the layers are multiplied up::

    A_l = rownorm(0.5 * mean_h(attn_l) + 0.5 * I)          (residual=True; else mean_h)
    R_1 = A_1,   R_l = A_l @ R_{l-1}                         [T, T] each

``R_l[i, j]`` is how much of input token j reaches position i after layer l, if
information flowed only along attention weights. Products of lower-triangular matrices
are lower-triangular, so a decoder's rollout stays causal. Worked example, two layers,
two tokens, one head::

    attn_1 = [[1, 0], [0.5, 0.5]]  ->  A_1 = [[1, 0], [0.25, 0.75]]
    attn_2 = [[1, 0], [0.2, 0.8]]  ->  A_2 = [[1, 0], [0.1,  0.9 ]]
    R_2 = A_2 @ A_1 = [[1, 0], [0.1 + 0.9 * 0.25, 0.9 * 0.75]] = [[1, 0], [0.325, 0.675]]

Caveat (the paper's own): rollout ignores the values, the MLPs and the norms, so it is a
picture of where attention *could* carry information, not an attribution; it tends to
smear towards the first tokens as layers multiply: in SmolLM2, whose heads park most of
their weight on the first token (an "attention sink"), the rollout after 30 layers gives
nearly all of every row to that token. Lesson 11 compares it with gradients.

Parity: the maps are the cached patterns, which ``tests/interp/test_tl_parity.py`` checks
against TransformerLens; the rollout has no reference implementation, so
``tests/interp/test_attention.py`` checks it against the hand-computed example above and
the identity (a model whose patterns are replaced by I rolls out to I).
"""

from __future__ import annotations

import io
import os
from collections.abc import Sequence

import torch
from torch import nn

from lmlab.errors import ConfigError
from lmlab.fileio import atomic_write_bytes, atomic_write_json
from lmlab.interp.hooks import hook_points, run_with_cache
from lmlab.lm import load
from lmlab.models.contract import abilities, family_name

PATTERN = "blocks.*.attn.hook_pattern"


def attention_maps(model: nn.Module, ids: torch.Tensor, **forward) -> torch.Tensor:
    """Every layer's and head's attention pattern for one prompt: [L, H, T, T] float32.

    ``ids``: [T] or [1, T] int64. ``forward`` goes to the model (e.g. ``attention_mask`` for
    an encoder). Reading the patterns changes nothing in the forward (fast path kept).
    """
    if not any(name.endswith("attn.hook_pattern") for name in hook_points(model)):
        raise ConfigError(
            f"{family_name(model)} has no attention layers: attention maps take a transformer "
            "(gpt, llama, smollm2, or an encoder such as minilm)"
        )
    ids = ids[None] if ids.dim() == 1 else ids
    if ids.shape[0] != 1:
        raise ConfigError(f"attention_maps takes one prompt (ids [1, T]), got {tuple(ids.shape)}")
    with torch.no_grad():
        _, cache = run_with_cache(model, ids, names=PATTERN, **forward)
    return cache.stack(PATTERN)[:, 0].float()  # (L, H, T, T)


def attention_rollout(maps: torch.Tensor, residual: bool = True) -> torch.Tensor:
    """Attention rollout (Abnar and Zuidema 2020) of ``maps`` [L, H, T, T] (or head-averaged
    [L, T, T]): [L, T, T], entry l the rollout through layers 0..l (see the module docstring).
    """
    if maps.dim() == 4:
        maps = maps.mean(dim=1)  # (L, T, T): heads averaged, as in the paper
    if maps.dim() != 3 or maps.shape[-1] != maps.shape[-2]:
        raise ConfigError(f"rollout takes maps [L, H, T, T] or [L, T, T], got {tuple(maps.shape)}")
    eye = torch.eye(maps.shape[-1], dtype=maps.dtype, device=maps.device)
    rolled, out = eye, []
    for attn in maps:
        mixed = 0.5 * attn + 0.5 * eye if residual else attn  # A = 0.5 W_att + 0.5 I
        mixed = mixed / mixed.sum(dim=-1, keepdim=True)
        rolled = mixed @ rolled  # (T, T)
        out.append(rolled)
    return torch.stack(out)


def token_labels(tokenizer, ids: Sequence[int]) -> list[str]:
    """One readable label per token id (its text, with spaces and newlines shown)."""
    if tokenizer is None:
        return [str(i) for i in ids]
    labels = []
    for i in ids:
        text = tokenizer.decode([int(i)])
        labels.append(text.replace(" ", "\u2423").replace("\n", "\\n") or f"<{int(i)}>")
    return labels


def _heatmap(ax, matrix: torch.Tensor, tokens: list[str], title: str, labels: bool) -> object:
    image = ax.imshow(matrix.cpu().numpy(), cmap="viridis", vmin=0.0, vmax=1.0)
    ax.set_title(title, fontsize=9)
    ticks = range(len(tokens))
    ax.set_xticks(ticks, tokens if labels else [""] * len(tokens), rotation=90, fontsize=7)
    ax.set_yticks(ticks, tokens if labels else [""] * len(tokens), fontsize=7)
    return image


def _save(fig, png: str | os.PathLike) -> None:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    atomic_write_bytes(png, buffer.getvalue())


def plot_attention(
    maps: torch.Tensor,
    tokens: list[str],
    png: str | os.PathLike,
    layer: int | None = None,
    head: int | None = None,
    title: str = "",
) -> None:
    """Heatmaps of ``maps`` [L, H, T, T] with ``tokens`` on both axes (keys across,
    queries down): the heads of ``layer``, one ``head`` of it, or (layer None) every
    layer's head-mean."""
    from matplotlib.figure import Figure  # deferred: slow to import, only for plots

    L, H = maps.shape[:2]
    if layer is not None and not -L <= layer < L:
        raise ConfigError(f"layer {layer} is out of range: the model has layers 0..{L - 1}")
    if head is not None and not -H <= head < H:
        raise ConfigError(f"head {head} is out of range: each layer has heads 0..{H - 1}")
    if head is not None and layer is None:
        raise ConfigError("--head needs --layer: a head is one of a layer's heads")
    if layer is None:
        panels = [(maps[i].mean(0), f"layer {i} (mean of {H} heads)") for i in range(L)]
    elif head is None:
        panels = [(maps[layer, h], f"layer {layer % L} head {h}") for h in range(H)]
    else:
        panels = [(maps[layer, head], f"layer {layer % L} head {head % H}")]
    cols = min(len(panels), 4 if len(tokens) > 12 else 6)
    rows = -(-len(panels) // cols)
    side = max(2.6, 0.22 * len(tokens) + 1.2)
    fig = Figure(figsize=(side * cols, side * rows + 0.6))
    axes = fig.subplots(rows, cols, squeeze=False)
    for k, ax in enumerate(axes.flat):
        if k >= len(panels):
            ax.axis("off")
            continue
        matrix, name = panels[k]
        image = _heatmap(ax, matrix, tokens, name, labels=k % cols == 0 or len(panels) == 1)
        if k % cols:
            ax.set_yticks([])
    fig.colorbar(image, ax=axes.ravel().tolist(), shrink=0.6, label="attention weight")
    fig.suptitle(title or "attention (rows: queries, columns: keys)")
    _save(fig, png)


def plot_rollout(
    rollout: torch.Tensor, tokens: list[str], png: str | os.PathLike, title: str = ""
) -> None:
    """The rollout after the last layer [T, T] beside how much each input token reaches
    the last position, through the layers (from ``rollout`` [L, T, T])."""
    from matplotlib.figure import Figure  # deferred: slow to import, only for plots

    side = max(3.5, 0.25 * len(tokens) + 1.5)
    fig = Figure(figsize=(2 * side + 1, side + 0.6))
    left, right = fig.subplots(1, 2)
    image = _heatmap(left, rollout[-1], tokens, f"rollout through {len(rollout)} layers", True)
    fig.colorbar(image, ax=left, shrink=0.7)
    last = rollout[:, -1].cpu().numpy()  # (L, T): what reaches the last token, per layer
    shown = right.imshow(last, cmap="viridis", aspect="auto", vmin=0.0)
    right.set_title(f"into the last token ({tokens[-1]!r}) after each layer", fontsize=9)
    right.set_xticks(range(len(tokens)), tokens, rotation=90, fontsize=7)
    right.set_ylabel("layer")
    fig.colorbar(shown, ax=right, shrink=0.7)
    fig.suptitle(title or "attention rollout (Abnar and Zuidema 2020)")
    _save(fig, png)


def prompt_ids(lm, prompt: str) -> torch.Tensor:
    """``prompt`` as the model reads it, [1, T]: an encoder's with its [CLS] ... [SEP]."""
    if not prompt:
        raise ConfigError("the prompt is empty: give the text whose attention to show")
    if lm.tokenizer is None:
        raise ConfigError(f"{lm.config.get('path')} has no tokenizer: attention maps need text")
    if abilities(lm.model).kind == "encoder":
        ids = lm.tokenizer.encode(prompt, add_special_tokens=True)
    else:
        ids = lm.tokenizer.encode(prompt)
    device = next(lm.model.parameters()).device
    return torch.tensor([ids], dtype=torch.long, device=device)


def attention_report(
    model: str,
    prompt: str,
    out: str | os.PathLike,
    layer: int | None = None,
    head: int | None = None,
    dtype: str | None = "float32",
    device: str = "auto",
) -> dict:
    """Load ``model``, read its attention on ``prompt`` and write ``out/attention.png``
    (the heads of ``layer``, one ``head``, or every layer's head-mean), ``out/rollout.png``
    and ``out/attention.json`` (tokens, maps [L][H][T][T], rollout [L][T][T]).
    Returns the JSON's content with the paths written."""
    lm = load(model, dtype=dtype, device=device)
    ids = prompt_ids(lm, prompt)
    maps = attention_maps(lm.model, ids)  # (L, H, T, T)
    rollout = attention_rollout(maps)
    tokens = token_labels(lm.tokenizer, ids[0].tolist())
    out = os.fspath(out)
    os.makedirs(out, exist_ok=True)
    name = os.path.basename(os.path.normpath(str(model)))
    what = "all layers" if layer is None else f"layer {layer}"
    what += "" if head is None else f" head {head}"
    paths = {
        "attention": os.path.join(out, "attention.png"),
        "rollout": os.path.join(out, "rollout.png"),
        "json": os.path.join(out, "attention.json"),
    }
    plot_attention(maps, tokens, paths["attention"], layer, head, f"{name}: attention, {what}")
    plot_rollout(rollout, tokens, paths["rollout"], f"{name}: attention rollout")
    result = {
        "model": str(model),
        "prompt": prompt,
        "tokens": tokens,
        "ids": ids[0].tolist(),
        "layer": layer,
        "head": head,
        "causal": abilities(lm.model).kind != "encoder",
        "maps": maps.round(decimals=5).tolist(),
        "rollout": rollout.round(decimals=5).tolist(),
    }
    atomic_write_json(paths["json"], result)
    return {**result, "paths": paths}
