"""Hooks by name and an activation cache: the ground every interpretability method stands on.

Each model family places ``HookPoint`` modules (``lmlab.models.layers``) on the activations
a user may want: the embeddings, the residual stream before and after each block, q, k, v,
the attention pattern, attention and MLP outputs, a recurrent layer's hidden states. Their
names are the module paths, as TransformerLens names them::

    hook_embed  blocks.0.hook_resid_pre  blocks.0.attn.hook_q  blocks.0.attn.hook_pattern
    blocks.0.hook_attn_out  blocks.0.hook_mlp_out  blocks.0.hook_resid_post  hook_resid_final

A pattern names several at once: ``*`` stands for one dotted component
(``blocks.*.attn.hook_pattern``), ``**`` for any number of them (``**.hook_resid_post``).

Three things to do at a hook:

- **read** it: ``run_with_cache(model, ids, names=...)`` returns the logits and an
  ``ActivationCache``; ``hooks(model, read={...})`` calls your function with each value.
- **replace** it with a tensor or with what a function returns (activation patching).
- **add** a tensor to it (steering, noise for causal tracing).

Read-only hooks change nothing: the logits with them attached equal a plain forward to the
bit, because the attention keeps its fast path and the pattern is computed beside it.
Hooks that edit switch the attention to its explicit path (same numbers up to float
rounding). Every hook is removed on leaving the ``with`` block, also after an error.

    >>> logits, cache = run_with_cache(model, ids, names="blocks.*.hook_resid_post")
    >>> cache.stack("blocks.*.hook_resid_post").shape   # [L, B, T, D]
    >>> with hooks(model, replace={"blocks.1.hook_resid_post": clean_resid}):
    ...     patched = model(corrupt_ids)
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from lmlab.errors import ConfigError, closest
from lmlab.models.contract import abilities, base_model, family_name
from lmlab.models.layers import HookPoint

Names = str | list[str] | tuple[str, ...] | None
HookFn = Callable[[torch.Tensor, str], Any]


# ----------------------------------------------------------------------------- names


def hook_points(model: nn.Module) -> dict[str, HookPoint]:
    """Every hook point of ``model`` (inside any wrapper), by name, in module order."""
    inner = base_model(model)
    if not abilities(inner).hooks:
        raise ConfigError(
            f"{family_name(model)} has no hook points (it is a table, not a network); "
            "interpretability methods take the neural families: gpt, llama, rnn, gru, lstm, "
            "mlp, bag, bigram and the encoders"
        )
    return {name: m for name, m in inner.named_modules() if isinstance(m, HookPoint)}


def _regex(pattern: str) -> re.Pattern[str]:
    parts = []
    for piece in re.split(r"(\*\*|\*)", pattern):
        if piece == "**":
            parts.append(r".*")
        elif piece == "*":
            parts.append(r"[^.]+")
        else:
            parts.append(re.escape(piece))
    return re.compile("".join(parts))


def match_names(model: nn.Module, names: Names) -> list[str]:
    """The hook-point names that ``names`` (a name, a pattern or a list of them; None: all)
    picks, in module order. A pattern that matches nothing is an error naming valid ones."""
    points = list(hook_points(model))
    if names is None:
        return points
    wanted = [names] if isinstance(names, str) else list(names)
    picked: set[str] = set()
    known = set(points)
    for pattern in wanted:
        if pattern in known:
            picked.add(pattern)
            continue
        regex = _regex(pattern)
        found = [n for n in points if regex.fullmatch(n)]
        if not found:
            kinds = sorted({n.rsplit(".", 1)[-1] for n in points})
            raise ConfigError(
                f"no hook point matches {pattern!r}{closest(pattern, points)}; "
                f"{family_name(model)} has {len(points)} hook points, e.g. {points[0]!r}, "
                f"of these kinds: {', '.join(kinds)} (use '*' for one dotted part)"
            )
        picked.update(found)
    return [n for n in points if n in picked]


def layer_of(name: str) -> int | None:
    """The block or layer index in a hook name (``blocks.3.hook_resid_post`` -> 3), or None."""
    found = re.search(r"(?:^|\.)(?:blocks|layers)\.(\d+)\.", name)
    return int(found.group(1)) if found else None


# ----------------------------------------------------------------------------- hooks


def _value_at(value: Any, act: torch.Tensor, name: str) -> torch.Tensor:
    """A replacement or addend: a tensor, or a function of (activation, name)."""
    out = value(act, name) if callable(value) else value
    if not isinstance(out, torch.Tensor):
        raise ConfigError(
            f"the value for hook {name!r} must be a tensor (or a function returning one), "
            f"got {type(out).__name__}"
        )
    try:
        torch.broadcast_shapes(out.shape, act.shape)
    except RuntimeError:
        raise ConfigError(
            f"the value for hook {name!r} has shape {tuple(out.shape)}, which does not fit "
            f"the activation's {tuple(act.shape)}"
        ) from None
    return out.to(device=act.device, dtype=act.dtype)


def _reader(fn: HookFn, name: str):
    def hook(module, inputs, output):
        fn(output, name)

    return hook


def _replacer(value: Any, name: str):
    def hook(module, inputs, output):
        return _value_at(value, output, name).expand_as(output).clone()

    return hook


def _adder(value: Any, name: str):
    def hook(module, inputs, output):
        return output + _value_at(value, output, name)

    return hook


def _editor(fn: HookFn, name: str):
    def hook(module, inputs, output):
        out = fn(output, name)
        return None if out is None else _value_at(out, output, name).expand_as(output)

    return hook


@contextmanager
def hooks(
    model: nn.Module,
    read: Mapping[str, HookFn] | None = None,
    replace: Mapping[str, Any] | None = None,
    add: Mapping[str, Any] | None = None,
    edit: Mapping[str, HookFn] | None = None,
) -> Iterator[nn.Module]:
    """Attach hooks by name or pattern for the duration of a ``with`` block.

    - ``read``: ``{pattern: fn(activation, name)}``; the return value is ignored, and the
      forward's output is unchanged to the bit.
    - ``replace``: ``{pattern: tensor | fn(activation, name) -> tensor}``; the tensor must
      broadcast to the activation's shape.
    - ``add``: ``{pattern: tensor | fn(activation, name) -> tensor}``, added to it.
    - ``edit``: ``{pattern: fn(activation, name) -> tensor | None}`` (None keeps it).

    Several hooks on one point run in the order read, replace, add, edit.
    """
    points = hook_points(model)
    handles: list[tuple[HookPoint, Any, bool]] = []
    groups = (
        (read, _reader, True),
        (replace, _replacer, False),
        (add, _adder, False),
        (edit, _editor, False),
    )
    try:
        for table, make, reading in groups:
            for pattern, value in (table or {}).items():
                if reading and not callable(value):
                    raise ConfigError(
                        f"read hooks take a function (activation, name); got "
                        f"{type(value).__name__} for {pattern!r}"
                    )
                for name in match_names(model, pattern):
                    point = points[name]
                    handles.append((point, point.register_forward_hook(make(value, name)), reading))
                    point.readers += reading
        yield model
    finally:
        for point, handle, reading in handles:
            handle.remove()
            point.readers -= reading


# ----------------------------------------------------------------------------- cache


class ActivationCache(Mapping[str, torch.Tensor]):
    """Activations by hook name, in the order the forward reached them, with helpers to
    stack layers.

    ``cache["blocks.0.hook_resid_post"]`` is one tensor; ``cache.stack(pattern)`` stacks
    every match (layer order) into one tensor ``[L, ...]``; ``cache.layers(pattern)`` lists
    the layer index of each match.
    """

    def __init__(self, values: dict[str, torch.Tensor]):
        self._values = values

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self._values:
            raise KeyError(
                f"{name!r} is not in the cache{closest(name, list(self._values))}; it holds "
                f"{len(self._values)} activations (run_with_cache(names=...) picks them)"
            )
        return self._values[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)

    def names(self, pattern: str) -> list[str]:
        regex = _regex(pattern)
        found = [n for n in self._values if regex.fullmatch(n)]
        if not found:
            raise KeyError(f"no cached activation matches {pattern!r}")
        return found

    def stack(self, pattern: str) -> torch.Tensor:
        """The activations matching ``pattern`` stacked on a new first dimension."""
        return torch.stack([self._values[n] for n in self.names(pattern)])

    def layers(self, pattern: str) -> list[int | None]:
        return [layer_of(n) for n in self.names(pattern)]

    def to(self, device: torch.device | str) -> ActivationCache:
        return ActivationCache({n: v.to(device) for n, v in self._values.items()})

    def __repr__(self) -> str:
        return f"ActivationCache({len(self)} activations: {', '.join(list(self)[:4])}, ...)"


def run_with_cache(
    model: nn.Module,
    ids: torch.Tensor,
    names: Names = None,
    detach: bool = True,
    device: torch.device | str | None = None,
    **forward: Any,
) -> tuple[Any, ActivationCache]:
    """One forward of ``model(ids, **forward)`` recording the activations ``names`` picks
    (all hook points when None). Returns the model's output (logits, unchanged to the bit)
    and an ``ActivationCache`` (a hook point the forward does not reach, such as
    ``hook_pos_embed`` of a model with rotary positions, is absent from it).

    ``detach=False`` keeps the activations in the autograd graph (for gradients with respect
    to them); ``device`` moves each one there as it is recorded (e.g. "cpu" to keep GPU
    memory free).
    """
    values: dict[str, torch.Tensor] = {}

    def record(act: torch.Tensor, name: str) -> None:
        act = act.detach() if detach else act
        values[name] = act.to(device) if device is not None else act

    with hooks(model, read=dict.fromkeys(match_names(model, names), record)):
        out = model(ids, **forward)
    return out, ActivationCache(values)
