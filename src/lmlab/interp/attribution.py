"""Attribution: how much each input token contributes to one number the model computes.

The number is a **score**: for a decoder, the log-probability (default) or the logit of a
chosen next token at the last position; for a reward model, its scalar value at the last
token; for an encoder with a head, a class score. Every method here takes it as a
``score_fn(model, ids) -> [N]`` that runs the model and reduces its output to one number per
row, so a new head plugs in as one function::

    score_fn = next_token_score(target_id)                        # decoders (log-prob)
    score_fn = value_score()                                      # a reward model
    score_fn = lambda model, ids: head(model(ids))[:, cls]        # an encoder's head

The methods differentiate the score with respect to the **token embeddings** e_t (the
``hook_embed`` hook point; ``[T, D]`` for one prompt). Position embeddings, learned or
rotary, and the encoder's token-type embeddings stay as they are: they get no attribution.
The interpolated or occluded embeddings are put in with ``hooks(model, replace=...)``, so
the rest of the model runs exactly as usual.

- **Saliency** (Simonyan et al. 2014): ``g_t = d score / d e_t``; per token ``||g_t||_2``
  (no sign: it says how sensitive, not in which direction).
- **Gradient x input** (Shrikumar et al. 2016): per token ``sum_d g_td * e_td``, the first
  order Taylor estimate of the change from a zero embedding.
- **Integrated gradients** (Sundararajan et al. 2017): with a baseline b (zeros, or a
  token's embedding such as eos/pad at every position)::

      IG_td = (e_td - b_td) * integral_0^1 d score(b + a (e - b)) / d e_td  da
            ~ (e_td - b_td) * sum_k w_k * g_td(b + a_k (e - b))

  with the nodes a_k and weights w_k of Gauss-Legendre quadrature (the default) or one of
  Captum's Riemann rules, exactly as Captum builds them. The steps run in batches of
  ``internal_batch_size`` rows, so memory stays bounded whatever ``steps`` is. IG is
  *complete*: ``sum IG = score(e) - score(b)``; the rest, ``delta``, measures the
  quadrature error and is reported. Captum's ``riemann_trapezoid`` uses weights 1/n with
  halved ends (they sum to 1 - 1/n, not 1): kept for parity, its delta shows it.
- **Occlusion** (Zeiler & Fergus 2014): replace a window of ``window`` tokens (every
  ``stride`` tokens) by the baseline and record the drop ``score(e) - score(occluded)``;
  a token gets the mean drop of the windows that cover it (Captum's ``Occlusion``).

One prompt at a time (``ids`` [1, T] or [T]). The model runs in eval mode with its
parameters' gradients off during attribution (both restored after). The parity tests
(tests/interp/test_attribution.py) compare with Captum 0.9's ``IntegratedGradients``,
``LayerIntegratedGradients``, ``Saliency``, ``InputXGradient`` and ``Occlusion``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from lmlab.data.tokenizers import require_tokenizer
from lmlab.errors import ConfigError
from lmlab.interp.hooks import hook_points, hooks
from lmlab.lm import LM
from lmlab.models.contract import base_model, family_name, require_causal_lm
from lmlab.models.mlp import MLP

ScoreFn = Callable[[nn.Module, torch.Tensor], torch.Tensor]
Method = Literal["ig", "saliency", "gxi", "occlusion"]
METHODS: tuple[str, ...] = ("ig", "saliency", "gxi", "occlusion")
QUADRATURES = (
    "gausslegendre",
    "riemann_trapezoid",
    "riemann_left",
    "riemann_middle",
    "riemann_right",
)
Baseline = Literal["zeros"] | int


@dataclass
class Attribution:
    """One method's attribution of a score to the tokens of one prompt."""

    method: str
    values: torch.Tensor
    """[T] float32: one number per token (saliency: a norm, >= 0; the others signed)."""
    elements: torch.Tensor | None
    """[T, D] float32: per embedding element (None for occlusion, which has none)."""
    score: float
    """score(e): the score of the prompt as it is."""
    baseline_score: float | None = None
    """score(b) (integrated gradients)."""
    delta: float | None = None
    """Completeness gap sum(values) - (score - baseline_score) (integrated gradients)."""
    settings: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "values": [round(float(v), 7) for v in self.values],
            "score": self.score,
            "baseline_score": self.baseline_score,
            "delta": self.delta,
            "settings": self.settings,
        }


# ----------------------------------------------------------------------------- scores


def next_token_score(
    target: int, kind: Literal["logprob", "logit"] = "logprob", position: int = -1
) -> ScoreFn:
    """The score of token ``target`` as the next token after ``position``: its
    log-probability (``logprob``, default: it counts the competition from every other token)
    or its raw logit (``logit``: moves with anything that shifts all logits alike)."""
    if kind not in ("logprob", "logit"):
        raise ConfigError(f"score kind {kind!r} is not known; use 'logprob' or 'logit'")

    def score(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
        logits = model(ids)[:, position].float()  # (N, V)
        if kind == "logprob":
            logits = logits.log_softmax(-1)
        return logits[:, target]

    return score


def value_score(position: int = -1) -> ScoreFn:
    """A scalar-headed model's value at ``position`` (a reward model: output [N, T, 1])."""

    def score(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
        return model(ids)[:, position, 0].float()

    return score


# ----------------------------------------------------------------------------- embeddings


def token_embeddings(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """The token embeddings [B, T, D] of ``ids`` [B, T] (the model's ``tok_emb`` table)."""
    inner = base_model(model)
    table = getattr(inner, "tok_emb", None)
    if not isinstance(table, nn.Embedding) or "hook_embed" not in hook_points(model):
        raise ConfigError(
            f"attribution needs a token embedding table (tok_emb) and a hook_embed point; "
            f"{family_name(model)} has none (use gpt, llama, rnn, gru, lstm, mlp, bag or an "
            "encoder)"
        )
    return table(ids)


def _hook_layout(model: nn.Module, emb: torch.Tensor) -> torch.Tensor:
    """Token embeddings [N, T, D] as ``hook_embed`` holds them: the same for every family
    but the fixed-window MLP, whose hook holds each position's window [N, T, K*D]."""
    inner = base_model(model)
    if not isinstance(inner, MLP):
        return emb
    N, T, D = emb.shape
    K = inner.config.context
    # the slots before the start read the pad row, as in MLP.forward: not attributed
    pad = inner.tok_emb.weight[inner.pad_id].expand(N, K - 1, D)
    padded = torch.cat([pad, emb], dim=1)  # (N, K-1+T, D)
    # window t = padded[t : t+K], current token last
    windows = padded.unfold(1, K, 1).transpose(-1, -2)  # (N, T, K, D)
    return windows.reshape(N, T, K * D)


def embedding_forward(
    model: nn.Module, ids: torch.Tensor, score_fn: ScoreFn
) -> Callable[[torch.Tensor], torch.Tensor]:
    """``f(emb [N, T, D]) -> scores [N]``: the score with the token embeddings of ``ids``
    [1, T] replaced by ``emb`` (a forward function over embeddings, as Captum takes)."""

    def forward(emb: torch.Tensor) -> torch.Tensor:
        rows = ids.expand(emb.shape[0], -1)
        with hooks(model, replace={"hook_embed": _hook_layout(model, emb)}):
            return score_fn(model, rows)

    return forward


@contextmanager
def _attributing(model: nn.Module) -> Iterator[None]:
    """Eval mode and no parameter gradients (only the embeddings' are needed: less memory),
    both restored afterwards."""
    training = model.training
    flags = [(p, p.requires_grad) for p in model.parameters()]
    model.eval()
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
        model.train(training)


def _one_prompt(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    ids = torch.as_tensor(ids)
    if ids.dim() == 1:
        ids = ids[None]
    if ids.dim() != 2 or ids.shape[0] != 1 or ids.shape[1] == 0:
        raise ConfigError(
            f"attribution takes one prompt: ids [T] or [1, T] with T >= 1, got shape "
            f"{tuple(ids.shape)}"
        )
    device = next(model.parameters()).device
    return ids.to(device)


def baseline_embeddings(model: nn.Module, ids: torch.Tensor, baseline: Baseline) -> torch.Tensor:
    """The baseline [1, T, D]: zeros, or token ``baseline``'s embedding at every position."""
    emb = token_embeddings(model, ids)
    if baseline == "zeros":
        return torch.zeros_like(emb)
    vocab = base_model(model).tok_emb.num_embeddings
    if isinstance(baseline, bool) or not isinstance(baseline, int) or not 0 <= baseline < vocab:
        raise ConfigError(
            f"baseline {baseline!r} is not valid; use 'zeros' or a token id in [0, {vocab})"
        )
    return token_embeddings(model, torch.full_like(ids, baseline))


def _gradients(forward: Callable, emb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(scores [N], d score_n / d emb_n [N, T, D]) of a batch of embeddings."""
    emb = emb.detach().requires_grad_(True)
    with torch.enable_grad():
        scores = forward(emb)
        (grad,) = torch.autograd.grad(scores.sum(), emb)
    return scores.detach(), grad


# ----------------------------------------------------------------------------- methods


def saliency(model: nn.Module, ids: torch.Tensor, score_fn: ScoreFn) -> Attribution:
    """Per token ``||d score / d e_t||_2``; ``elements`` is the signed gradient [T, D]."""
    ids = _one_prompt(model, ids)
    with _attributing(model):
        emb = token_embeddings(model, ids).detach()
        score, grad = _gradients(embedding_forward(model, ids, score_fn), emb)
    grad = grad[0].float()
    return Attribution("saliency", grad.norm(dim=-1).cpu(), grad.cpu(), float(score[0]))


def gradient_x_input(model: nn.Module, ids: torch.Tensor, score_fn: ScoreFn) -> Attribution:
    """Per token ``sum_d (d score / d e_td) * e_td``; ``elements`` is the product [T, D]."""
    ids = _one_prompt(model, ids)
    with _attributing(model):
        emb = token_embeddings(model, ids).detach()
        score, grad = _gradients(embedding_forward(model, ids, score_fn), emb)
    elements = (grad * emb)[0].float()
    return Attribution("gxi", elements.sum(-1).cpu(), elements.cpu(), float(score[0]))


def quadrature_rule(
    steps: int, quadrature: str = "gausslegendre"
) -> tuple[torch.Tensor, torch.Tensor]:
    """(alphas [steps], weights [steps]) float64 for integrating over [0, 1], as Captum's
    ``approximation_methods`` builds them: Gauss-Legendre nodes and weights, or the Riemann
    rules on ``steps`` points with weights 1/steps (the trapezoid halves the two ends).

    >>> quadrature_rule(2, "riemann_trapezoid")   # alphas (0, 1), weights (0.25, 0.25)
    """
    if quadrature not in QUADRATURES:
        raise ConfigError(
            f"quadrature {quadrature!r} is not known; use one of {', '.join(QUADRATURES)}"
        )
    if steps < (1 if quadrature == "gausslegendre" else 2):
        raise ConfigError(f"steps must be at least 2 (1 for gausslegendre), got {steps}")
    if quadrature == "gausslegendre":
        nodes, weights = np.polynomial.legendre.leggauss(steps)
        # from [-1, 1] to [0, 1]
        return torch.from_numpy(0.5 * (1 + nodes)), torch.from_numpy(0.5 * weights)
    n = steps
    # linspace in float32, then widened: Captum takes torch.linspace(...).tolist()
    alphas = {
        "riemann_trapezoid": torch.linspace(0, 1, n),
        "riemann_left": torch.linspace(0, 1 - 1 / n, n),
        "riemann_middle": torch.linspace(1 / (2 * n), 1 - 1 / (2 * n), n),
        "riemann_right": torch.linspace(1 / n, 1, n),
    }[quadrature].double()
    weights = torch.full((n,), 1 / n, dtype=torch.float64)
    if quadrature == "riemann_trapezoid":
        weights[0] /= 2
        weights[-1] /= 2
    return alphas, weights


def integrated_gradients(
    model: nn.Module,
    ids: torch.Tensor,
    score_fn: ScoreFn,
    baseline: Baseline = "zeros",
    steps: int = 50,
    quadrature: str = "gausslegendre",
    internal_batch_size: int | None = 16,
    progress: bool = False,
) -> Attribution:
    """Integrated gradients on the token embeddings, ``steps`` quadrature points run in
    batches of ``internal_batch_size`` rows (None: all at once). ``values`` [T] sums each
    token's [D] attributions; ``delta`` is the completeness gap."""
    ids = _one_prompt(model, ids)
    alphas, weights = quadrature_rule(steps, quadrature)
    batch = internal_batch_size or steps
    if batch < 1:
        raise ConfigError(f"internal_batch_size must be at least 1, got {internal_batch_size}")
    with _attributing(model):
        forward = embedding_forward(model, ids, score_fn)
        emb = token_embeddings(model, ids).detach()  # (1, T, D)
        base = baseline_embeddings(model, ids, baseline).detach()
        diff = emb - base
        total = torch.zeros_like(emb[0])  # (T, D): sum_k w_k g(b + a_k (e - b))
        chunks = range(0, steps, batch)
        for start in tqdm(chunks, desc="integrated gradients", disable=not progress):
            a = alphas[start : start + batch].to(emb)  # (n,)
            w = weights[start : start + batch].to(emb)
            path = base + a[:, None, None] * diff  # (n, T, D)
            _, grad = _gradients(forward, path)
            total += (w[:, None, None] * grad).sum(0)
        with torch.no_grad():
            ends = forward(torch.cat([emb, base]))  # (2,): score(e), score(b)
    elements = (diff[0] * total).float()
    values = elements.sum(-1)
    score, base_score = float(ends[0]), float(ends[1])
    delta = float(values.sum()) - (score - base_score)
    settings = {"baseline": baseline, "steps": steps, "quadrature": quadrature}
    return Attribution("ig", values.cpu(), elements.cpu(), score, base_score, delta, settings)


def occlusion(
    model: nn.Module,
    ids: torch.Tensor,
    score_fn: ScoreFn,
    baseline: Baseline = "zeros",
    window: int = 1,
    stride: int = 1,
    internal_batch_size: int | None = 16,
) -> Attribution:
    """Occlude windows of ``window`` tokens (starting every ``stride``) with the baseline
    embedding; a token's value is the mean drop ``score - score(occluded)`` over the
    windows covering it (0 for a token no window covers)."""
    ids = _one_prompt(model, ids)
    T = ids.shape[1]
    if not 1 <= window <= T or stride < 1:
        raise ConfigError(
            f"occlusion window {window} and stride {stride} must satisfy 1 <= window <= "
            f"{T} (the prompt's tokens) and stride >= 1"
        )
    starts = list(range(0, T - window + 1, stride))
    batch = internal_batch_size or len(starts)
    with torch.no_grad(), _attributing(model):
        forward = embedding_forward(model, ids, score_fn)
        emb = token_embeddings(model, ids)  # (1, T, D)
        base = baseline_embeddings(model, ids, baseline)
        score = float(forward(emb)[0])
        drops = []
        for first in range(0, len(starts), batch):
            rows = emb.repeat(len(starts[first : first + batch]), 1, 1)  # (n, T, D)
            for row, s in enumerate(starts[first : first + batch]):
                rows[row, s : s + window] = base[0, s : s + window]
            drops.append(score - forward(rows).float())
        drops = torch.cat(drops).cpu()  # (W,)
    total, count = torch.zeros(T), torch.zeros(T)
    for drop, s in zip(drops, starts, strict=True):
        total[s : s + window] += drop
        count[s : s + window] += 1
    values = total / count.clamp(min=1)
    settings = {"baseline": baseline, "window": window, "stride": stride}
    return Attribution("occlusion", values, None, score, settings=settings)


def attribute(
    model: nn.Module, ids: torch.Tensor, score_fn: ScoreFn, method: Method = "ig", **options
) -> Attribution:
    """One method by name (``ig``, ``saliency``, ``gxi``, ``occlusion``) with its options."""
    functions = {
        "ig": integrated_gradients,
        "saliency": saliency,
        "gxi": gradient_x_input,
        "occlusion": occlusion,
    }
    if method not in functions:
        raise ConfigError(
            f"attribution method {method!r} is not known; use one of {', '.join(METHODS)}"
        )
    return functions[method](model, ids, score_fn, **options)


# ----------------------------------------------------------------------------- prompts


@dataclass
class PromptAttribution:
    """Every requested method's attribution of one next-token score to a prompt's tokens."""

    prompt: str
    tokens: list[str]
    """Each token's text (decoded alone)."""
    ids: list[int]
    target: str
    target_id: int
    score: str
    """What is attributed: ``logprob`` or ``logit`` of the target as the next token."""
    results: dict[str, Attribution]

    def to_dict(self) -> dict[str, Any]:
        return {
            "prompt": self.prompt,
            "tokens": self.tokens,
            "ids": self.ids,
            "target": self.target,
            "target_id": self.target_id,
            "score": self.score,
            "attributed_to": "token embeddings (position embeddings held fixed)",
            "methods": {name: r.to_dict() for name, r in self.results.items()},
        }


def _methods(methods: str | list[str]) -> list[str]:
    names = (
        list(METHODS)
        if methods == "all"
        else (methods.split(",") if isinstance(methods, str) else list(methods))
    )
    for name in names:
        if name not in METHODS:
            raise ConfigError(
                f"attribution method {name!r} is not known; use one of {', '.join(METHODS)} or all"
            )
    return names


def _baseline_id(baseline: str | int, tokenizer: Any) -> Baseline:
    """'zeros', 'eos' (the tokenizer's end token) or a token id."""
    if baseline == "zeros":
        return "zeros"
    if baseline == "eos":
        eos = getattr(tokenizer, "eos_id", None)
        if eos is None:
            raise ConfigError("baseline 'eos': this tokenizer has no end token; use zeros or an id")
        return int(eos)
    try:
        return int(baseline)
    except (TypeError, ValueError):
        raise ConfigError(
            f"baseline {baseline!r} is not valid; use zeros, eos or a token id"
        ) from None


def attribute_prompt(
    lm: LM,
    prompt: str,
    target: str | None = None,
    methods: str | list[str] = "all",
    score: Literal["logprob", "logit"] = "logprob",
    steps: int = 50,
    baseline: str | int = "zeros",
    quadrature: str = "gausslegendre",
    window: int = 1,
    internal_batch_size: int = 16,
    progress: bool = False,
) -> PromptAttribution:
    """Attribute the score of ``target`` (text of one token; None: the model's most likely
    next token) as the token after ``prompt``, with each of ``methods`` (``all`` or a list
    of ig, saliency, gxi, occlusion). ``lm`` is an ``lmlab.load``-ed decoder."""
    require_causal_lm(lm.model, "attributing a next token")
    tokenizer = require_tokenizer(lm.tokenizer, lm.config.get("path", "(in memory)"), "attribution")
    ids = list(tokenizer.encode(prompt))
    if not ids:
        raise ConfigError("the prompt is empty: attribution needs at least one token")
    tensor = _one_prompt(lm.model, torch.tensor(ids))
    if target is None:
        with torch.no_grad():
            target_id = int(lm.model(tensor)[0, -1].argmax())
    else:
        pieces = list(tokenizer.encode(target))
        if len(pieces) != 1:
            shown = [tokenizer.decode([i]) for i in pieces]
            raise ConfigError(
                f"target {target!r} is {len(pieces)} tokens {shown}, not one; give a single "
                "token (mind the leading space, e.g. ' Paris')"
            )
        target_id = pieces[0]
    score_fn = next_token_score(target_id, score)
    base = _baseline_id(baseline, tokenizer)
    options: dict[str, dict[str, Any]] = {
        "ig": dict(
            baseline=base,
            steps=steps,
            quadrature=quadrature,
            internal_batch_size=internal_batch_size,
            progress=progress,
        ),
        "saliency": {},
        "gxi": {},
        "occlusion": dict(baseline=base, window=window, internal_batch_size=internal_batch_size),
    }
    results = {
        name: attribute(lm.model, tensor, score_fn, name, **options[name])
        for name in _methods(methods)
    }
    tokens = [tokenizer.decode([i]) for i in ids]
    return PromptAttribution(
        prompt, tokens, ids, tokenizer.decode([target_id]), target_id, score, results
    )
