"""Decoding for every lmlab model: greedy, sampling, beam search and streaming.

A language model gives a distribution over the next token; decoding turns that into text
by choosing a token, appending it, and asking again:

- greedy: always the most likely token (``temperature=0`` or ``do_sample=False``);
- ancestral sampling: draw the token from the distribution ("pure" sampling at
  temperature 1 with no truncation), optionally reshaped by temperature, top-k and top-p
  (``processors.py``);
- beam search: keep the ``num_beams`` most probable partial sequences and return the best
  finished one, ranked by ``sum(log p) / n_new_tokens ** length_penalty``.

Prompts of different lengths are decoded together: they are left-padded and the model gets
a mask (False on padding) from which it works out positions, so a batch gives the same
tokens as its prompts run one at a time. A model with a cache (``new_cache``) reads the
prompt once and then one token per step; a model without one recomputes the whole prefix
each step.

Past the context: a model with a context window (``config.max_seq_len``: the transformers,
whose learned or rotary positions stop there) may still generate more than it holds
(nanoGPT's loop): once prompt + output outgrow ``max_seq_len`` tokens the window slides,
and each further token is predicted from the last ``max_seq_len`` tokens alone, the oldest
dropping out of view. The cache cannot follow: every cached key was computed with tokens
in view that the window has since dropped, so from then on each step reruns the model on
the window (as nanoGPT does: a forward over max_seq_len tokens per new token), and greedy
output equals the textbook reference "crop the ids to the last max_seq_len, run the model,
take the argmax". ``Generation.slid`` says how many tokens dropped out. A prompt longer
than the context is still an error, unless ``truncate_prompt`` cuts it
(``Generation.truncated``). Models without a window (``max_seq_len`` None: recurrent nets,
the MLPs, n-grams unless given one) read as far back as they always do.

Decoding never samples from a distribution that is not one: logits with NaN or inf (a
model whose weights or activations are not finite), or a row that processing left with no
finite logit, raise DecodingError naming the step, rather than failing inside
``torch.multinomial`` or letting argmax pick an arbitrary token.

``compile=True`` runs the one-token steps with a cache through ``torch.compile``
(``compiled.py``): the same tokens as the eager path, less time per token after a compile
of seconds (tens for SmolLM2) that a later process mostly finds in inductor's disk cache.
The prompt's pass, models without a cache and models with forward hooks stay eager.

Random draws come from a ``torch.Generator`` seeded with ``params.seed``, never the global
RNG: the same prompts and seed give the same output. The rows of a batch draw from that one
generator, so a sampled row depends on its batch (a greedy row never does).

Parity: ``tests/generate/test_search.py`` compares greedy and beam search token for token
with transformers' ``generate`` on tiny random GPT-2 and Llama models.
"""

from __future__ import annotations

import dataclasses
import inspect
import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Generic, TypeVar

import torch
from torch import nn

from lmlab.devices import cpu_plan, model_device
from lmlab.errors import DecodingError
from lmlab.generate.compiled import CompiledStep
from lmlab.generate.params import SamplingParams, check_ids
from lmlab.generate.processors import process_logits, seen_tokens
from lmlab.models.contract import require_causal_lm

Piece = TypeVar("Piece")

# A prompt is token ids, or a string when a tokenizer is given.
Prompt = Sequence[int] | str


@dataclass
class Generation:
    """What ``generate`` returns for a batch of prompts (one entry per prompt)."""

    ids: list[list[int]]
    """New tokens only; a stop token (eos_id or one of stop_ids) that ended a row is kept."""
    finish_reasons: list[str]
    """"stop" (a stop token or stop string ended it) or "length" (max_new_tokens reached)."""
    truncated: list[int]
    """Prompt tokens dropped from the left to fit the context (truncate_prompt); 0 = none."""
    prompt_lengths: list[int]
    """Prompt tokens the model actually saw (after truncation)."""
    slid: list[int] = dataclasses.field(default_factory=list)
    """Tokens (prompt first, then output) that dropped out of the model's context window as
    prompt + output outgrew max_seq_len; 0 = the whole sequence stayed in view."""
    texts: list[str] | None = None
    """Decoded new text, cut before the first stop string (only with a tokenizer)."""
    compile_seconds: float = 0.0
    """Wall seconds this call spent compiling the one-token step (``compile=True``); 0 when
    it was compiled before in this process, or compile is off."""


# ----------------------------------------------------------------------------- plumbing


class _Runner:
    """Feeds a left-padded batch to a model, one new token per row at a time.

    ``ids`` [B, T + max_new] holds the prompts (left-padded to T) followed by the tokens
    appended so far; with a cache only the tokens it does not hold yet are fed, otherwise the
    whole prefix is recomputed. Once the slots outgrow the model's context (``max_seq_len``)
    only the last ``max_seq_len`` slots are fed, without the cache. Rows can be reordered
    (beam search).
    """

    @torch.inference_mode()
    def __init__(
        self,
        model: nn.Module,
        prompts: list[list[int]],
        max_new: int,
        seen: bool,
        compiled: CompiledStep | None = None,
    ):
        device = model_device(model)
        B, T = len(prompts), max(len(p) for p in prompts)
        self.model = model
        self.prompt_len = T
        self.context = _context(model)
        self.ids = torch.zeros(B, T + max_new, dtype=torch.long, device=device)
        self.ids[:, :T] = torch.tensor([[0] * (T - len(p)) + p for p in prompts], device=device)
        pad = torch.tensor([T - len(p) for p in prompts], device=device)
        # True from each row's first real token on, so slots appended later are already valid.
        self.mask = torch.arange(T + max_new, device=device) >= pad[:, None]  # (B, T + max_new)
        self.padded = any(len(p) < T for p in prompts)
        self.length = T  # slots filled per row, padding included
        self.fed = 0  # slots the cache holds
        # The cache holds at most the context: past it, the window slides without the cache.
        size = T + max_new if self.context is None else min(T + max_new, self.context)
        self.cache = model.new_cache(B, size) if hasattr(model, "new_cache") else None
        # compile=True: the one-token steps with the cache (the prompt's pass stays eager)
        use = compiled is not None and self.cache is not None and compiled.applies(model)
        self.compiled = compiled if use else None
        self.matvec = _native_matvec(model)
        # only the last position's logits are read: a model that can skip the others does
        # (the output layer's product for every prompt position but the last)
        if "logits_to_keep" in inspect.signature(model.forward).parameters:
            self.keep = {"logits_to_keep": 1}
        else:
            self.keep = {}
        self.vocab = model.config.vocab_size
        self.seen = seen_tokens(self.ids[:, :T], self.vocab, self.mask[:, :T]) if seen else None

    def next_logits(self) -> torch.Tensor:
        """Logits [B, V] for the token after everything appended so far."""
        if self.context is not None and self.length > self.context:
            # The window slides: the model reads the last max_seq_len slots (a row still
            # shorter than that keeps its padding masked). Keys cached so far were computed
            # with the dropped tokens in view, so the cache is of no more use.
            self.cache = None
            start = self.length - self.context
            mask = self.mask[:, start : self.length] if self.padded else None
            logits = self._call(self.ids[:, start : self.length], mask=mask)
        elif self.cache is None:
            mask = self.mask[:, : self.length] if self.padded else None
            logits = self._call(self.ids[:, : self.length], mask=mask)
        else:
            # The cache remembers the prompt's mask; the tokens appended after it are all real.
            mask = self.mask[:, : self.length] if self.padded and self.fed == 0 else None
            step = self.compiled if self.fed and self.length - self.fed == 1 else None
            logits = self._call(
                self.ids[:, self.fed : self.length], mask=mask, cache=self.cache, compiled=step
            )
            self.fed = self.length
        if logits.shape[-1] != self.vocab:
            raise DecodingError(
                f"the model returned outputs of width {logits.shape[-1]}, not next-token logits "
                f"over its vocabulary of {self.vocab}: it cannot generate (an encoder?)"
            )
        return logits[:, -1]  # (B, V)

    def append(self, tokens: torch.Tensor) -> None:
        """Append one token per row: tokens [B] int64."""
        self.ids[:, self.length] = tokens
        if self.seen is not None:
            self.seen.scatter_(1, tokens[:, None], True)
        self.length += 1

    def reorder(self, index: torch.Tensor) -> None:
        """Keep (or repeat) rows ``index`` [B'] int64."""
        self.ids = self.ids.index_select(0, index)
        self.mask = self.mask.index_select(0, index)
        if self.seen is not None:
            self.seen = self.seen.index_select(0, index)
        if self.cache is not None:
            self.cache.reorder(index)

    def new_tokens(self) -> torch.Tensor:
        """The tokens appended so far: [B, n] int64."""
        return self.ids[:, self.prompt_len : self.length]

    def _call(self, ids: torch.Tensor, compiled: CompiledStep | None = None, **kwargs):
        # Decoding always runs the model in eval mode (no dropout). A model left in training
        # mode is switched for the call and back, so the caller's mode survives.
        kwargs = {k: v for k, v in kwargs.items() if v is not None}

        def run() -> torch.Tensor:
            if compiled is not None:
                return compiled(self.model, ids, kwargs["cache"])
            return self.model(ids, **kwargs, **self.keep)

        with _onednn(enabled=not (self.matvec and ids.numel() == 1)):
            if not self.model.training:
                return run()
            self.model.eval()
            try:
                return run()
            finally:
                self.model.train()


def _native_matvec(model: nn.Module) -> bool:
    """Whether one-token steps should bypass oneDNN: some bfloat16 linear weights on the
    CPU, and a CPU whose plan says so (``lmlab.devices.cpu_plan``: bf16 native, no AMX).

    A batch-1 decoding step multiplies every weight matrix by one vector. For bfloat16 on
    such a CPU, torch's own matrix-vector kernel reads the weights about twice as fast as
    oneDNN's (``bench/decode.py``); for two or more rows oneDNN's matrix product is faster,
    and float32 is the same either way. The 4- and 8-bit kernels (lmlab's or torch's) are
    not oneDNN's, nor is lmlab's Q8_0 output layer (a 4-bit GGUF load's); a bf16 output
    head of a 4-bit model runs without oneDNN.
    """
    if cpu_plan().onednn_matvec:
        return False
    return any(
        isinstance(m, nn.Linear)
        and m.weight.dtype == torch.bfloat16
        and m.weight.device.type == "cpu"
        for m in model.modules()
    )


@contextmanager
def _onednn(enabled: bool) -> Iterator[None]:
    """Turn torch's oneDNN (mkldnn) kernels on or off for a block, restoring the setting."""
    before = torch._C._get_mkldnn_enabled()
    if before == enabled:
        yield
        return
    torch._C._set_mkldnn_enabled(enabled)
    try:
        yield
    finally:
        torch._C._set_mkldnn_enabled(before)


def _context(model: nn.Module) -> int | None:
    """The model's context window in tokens (``config.max_seq_len``), or None: no limit."""
    return getattr(model.config, "max_seq_len", None)


def _slid(context: int | None, prompt_length: int, n_new: int) -> int:
    """Tokens out of view when the last of ``n_new`` new tokens was chosen: the model then
    read prompt + n_new - 1 tokens, of which it holds ``context``."""
    return 0 if context is None else max(0, prompt_length + n_new - 1 - context)


def _check_distribution(logits: torch.Tensor, processed: torch.Tensor, step: int, beams: int = 1):
    """Raise DecodingError unless every row of the model's ``logits`` [B, V] is free of NaN
    and +inf and keeps a finite value, and so does ``processed`` [B, V] (the logits a token
    is chosen from). ``step`` (from 1) and the row's prompt (row // beams) name the place.

    One reduction per tensor and one host sync: a row's max is NaN if the row holds a NaN,
    +inf if it holds +inf, and -inf if every token is ruled out.
    """
    raw, chosen = logits.amax(dim=-1), processed.amax(dim=-1)  # (B,) each
    bad = ~(torch.isfinite(raw) & torch.isfinite(chosen))
    if not bool(bad.any()):
        return
    row = int(bad.nonzero()[0, 0])
    prompt = row // beams
    if bool(logits[row].isnan().any() | logits[row].isposinf().any()):
        what = "NaN" if bool(logits[row].isnan().any()) else "inf"
        raise DecodingError(
            f"decoding step {step}: the model's next-token logits for prompt {prompt} contain "
            f"{what}, so there is no distribution to choose from; its weights or activations "
            "are not finite (a diverged run, or a corrupt checkpoint)"
        )
    if bool(logits[row].isneginf().all()):
        raise DecodingError(
            f"decoding step {step}: the model gives every next token of prompt {prompt} "
            "logit -inf (probability 0), so there is no distribution to choose from"
        )
    raise DecodingError(
        f"decoding step {step}: no token of prompt {prompt} is left with a finite logit after "
        "repetition_penalty, temperature, top_k and top_p (every token ruled out, or logits "
        "that overflow, e.g. at a tiny temperature)"
    )


def _generator(seed: int | None, device: torch.device) -> torch.Generator:
    generator = torch.Generator(device=device)
    generator.manual_seed(seed if seed is not None else int.from_bytes(os.urandom(8)) >> 1)
    return generator


# ----------------------------------------------------------------------------- greedy and sampling


class _Sampler:
    """Greedy decoding or ancestral sampling for a batch, one step at a time.

    A row ends at a stop token (kept in its output) or when ``text_stop(new_ids)`` says a
    stop string has appeared; finished rows stay in the batch (their further tokens are
    ignored) until every row has finished or max_new_tokens steps have run.
    """

    @torch.inference_mode()
    def __init__(
        self,
        model: nn.Module,
        prompts: list[list[int]],
        params: SamplingParams,
        stop_ids: list[int],
        text_stop: Callable[[list[int]], bool] | None = None,
        compiled: CompiledStep | None = None,
    ):
        self.params = params
        penalise = params.repetition_penalty != 1.0
        self.runner = _Runner(model, prompts, params.max_new_tokens, penalise, compiled)
        B, device = len(prompts), self.runner.ids.device
        self.stop_ids = torch.tensor(stop_ids, device=device) if stop_ids else None
        self.text_stop = text_stop
        self.new_ids: list[list[int]] = [[] for _ in range(B)] if text_stop else []
        self.done = torch.zeros(B, dtype=torch.bool, device=device)
        self.kept = torch.full((B,), params.max_new_tokens, device=device)  # tokens kept per row
        self.steps = 0
        self.finished = False
        self.generator = _generator(params.seed, device) if params.sample else None

    @torch.inference_mode()
    def step(self) -> torch.Tensor:
        """Choose and append the next token of every row; returns them, [B] int64."""
        logits = self.runner.next_logits()  # (B, V)
        tokens = self._choose(logits)
        self.runner.append(tokens)
        self.steps += 1
        if self.stop_ids is not None:
            hit = torch.isin(tokens, self.stop_ids) & ~self.done
            self.kept = torch.where(hit, self.steps, self.kept)
            self.done |= hit
        if self.text_stop is not None:
            self._check_text(tokens)
        self.finished = self.steps == self.params.max_new_tokens
        if not self.finished and (self.stop_ids is not None or self.text_stop is not None):
            self.finished = bool(self.done.all())
        return tokens

    def _choose(self, logits: torch.Tensor) -> torch.Tensor:
        if self.generator is None:  # greedy: temperature, top-k and top-p keep the argmax
            processed = process_logits(logits, self.params, self.runner.seen)
            _check_distribution(logits, processed, self.steps + 1)
            return processed.argmax(dim=-1)
        processed = process_logits(logits.float(), self.params, self.runner.seen)
        _check_distribution(logits, processed, self.steps + 1)
        return torch.multinomial(processed.softmax(dim=-1), 1, generator=self.generator).view(-1)

    def _check_text(self, tokens: torch.Tensor) -> None:
        done = self.done.tolist()
        for row, (token, ended) in enumerate(zip(tokens.tolist(), done)):
            if ended:
                continue
            self.new_ids[row].append(token)
            if self.text_stop(self.new_ids[row]):
                self.done[row] = True
                self.kept[row] = self.steps

    def result(self) -> tuple[list[list[int]], list[str]]:
        """New ids per row (up to and including a stop token) and finish reasons."""
        rows = self.runner.new_tokens().tolist()
        ids = [row[:kept] for row, kept in zip(rows, self.kept.tolist())]
        return ids, ["stop" if d else "length" for d in self.done.tolist()]


# ----------------------------------------------------------------------------- beam search


class _Finished:
    """The best ``size`` finished hypotheses of one prompt, as (score, ids), best first."""

    def __init__(self, size: int):
        self.size = size
        self.hyps: list[tuple[float, list[int]]] = []
        self.closed = False  # no hypothesis will be added any more

    def add(self, score: float, ids: list[int]) -> None:
        self.hyps.append((score, ids))
        self.hyps.sort(key=lambda h: -h[0])  # stable: an earlier hypothesis wins a tie
        del self.hyps[self.size :]

    @property
    def full(self) -> bool:
        return len(self.hyps) == self.size


@dataclass
class BeamStep:
    """The state of one prompt's beam search after a step (``beam_search_steps``)."""

    step: int
    """New tokens in each running beam (1 after the first step)."""
    beams: list[tuple[list[int], float]]
    """The running beams, best first: (new ids, sum of log p); dead beams left out."""
    finished: list[tuple[list[int], float]]
    """Finished hypotheses so far, best first: (new ids, sum(log p) / n ** length_penalty)."""
    closed: bool
    """No hypothesis will be added any more: the search of this prompt is over."""


@torch.inference_mode()
def _beam_search(
    model: nn.Module,
    prompts: list[list[int]],
    params: SamplingParams,
    stop_ids: list[int],
    observe: Callable[[int, BeamStep], None] | None = None,
    compiled: CompiledStep | None = None,
) -> tuple[list[list[int]], list[str]]:
    """Beam search over a batch of prompts; the best finished sequence of each.

    Every step extends each of the N running beams of a prompt by every token and keeps
    the K = max(2, 1 + n_stop) * N best candidates by total log-probability, so that N
    remain even if some end. A candidate ending in a stop token (or reaching
    max_new_tokens) becomes a finished hypothesis, scored ``sum_logp / n ** length_penalty``
    with n its new tokens, if it ranks among the first N; the others continue as the next
    N beams. A prompt's search closes when N hypotheses have finished and either
    ``early_stopping`` is set or the best running beam, scored at its current length, cannot
    beat the worst finished one (Hugging Face's heuristic: exact for length_penalty <= 0,
    a guess for > 0, where longer beams are divided by more).

    ``observe(b, state)``, when given, sees prompt b's ``BeamStep`` after every step;
    ``compiled`` runs the one-token steps (``compile=True``).
    """
    N, B, max_new, lp = params.num_beams, len(prompts), params.max_new_tokens, params.length_penalty
    runner = _Runner(model, prompts, max_new, params.repetition_penalty != 1.0, compiled)
    device = runner.ids.device
    stop = set(stop_ids)
    logits = runner.next_logits()  # (B, V): the prompt is read once, then copied to N beams
    V = logits.shape[-1]
    runner.reorder(torch.arange(B, device=device).repeat_interleave(N))
    logits = logits.repeat_interleave(N, dim=0)  # (B*N, V)
    # The N copies of a prompt are identical: only beam 0 is live at the first step.
    scores = torch.full((B, N), float("-inf"), device=device)
    scores[:, 0] = 0.0
    K = min(max(2, 1 + len(stop)) * N, N * V)
    finished = [_Finished(N) for _ in range(B)]

    for step in range(max_new):
        if step:
            logits = runner.next_logits()
        processed = process_logits(logits.float(), params, runner.seen)
        _check_distribution(logits, processed, step + 1, beams=N)
        logp = processed.log_softmax(dim=-1)
        total = (scores.view(B * N, 1) + logp).view(B, N * V)  # sum of log p per candidate
        top_scores, top_index = (t.tolist() for t in total.topk(K, dim=-1))  # (B, K) each
        n = step + 1  # new tokens in each candidate
        last = n == max_new
        so_far = runner.new_tokens()  # (B*N, step)
        rows, tokens, beam_scores = [], [], []
        for b in range(B):
            kept = []
            for rank, (score, index) in enumerate(zip(top_scores[b], top_index[b])):
                if score == float("-inf"):
                    break  # sorted: only dead candidates follow
                beam, token = divmod(index, V)
                row = b * N + beam
                if (token in stop or last) and rank < N and not finished[b].closed:
                    finished[b].add(score / n**lp, so_far[row].tolist() + [token])
                if token not in stop and len(kept) < N:
                    kept.append((row, token, score))
            kept += [(b * N, 0, float("-inf"))] * (N - len(kept))  # dead beams if V is tiny
            best_running = kept[0][2]
            f = finished[b]
            if f.full and (params.early_stopping or best_running / n**lp <= f.hyps[-1][0]):
                f.closed = True
            if observe is not None:
                live = [(row, token, score) for row, token, score in kept if score > float("-inf")]
                beams = [(so_far[row].tolist() + [token], score) for row, token, score in live]
                finished_now = [(ids, score) for score, ids in f.hyps]
                observe(b, BeamStep(n, beams, finished_now, f.closed or last))
            for row, token, score in kept:
                rows.append(row)
                tokens.append(token)
                beam_scores.append(score)
        if last or all(f.closed for f in finished):
            break
        runner.reorder(torch.tensor(rows, device=device))
        runner.append(torch.tensor(tokens, device=device))
        scores = torch.tensor(beam_scores, device=device).view(B, N)

    ids = [f.hyps[0][1] for f in finished]
    return ids, ["stop" if seq and seq[-1] in stop else "length" for seq in ids]


# ----------------------------------------------------------------------------- checks


def _compiled_step(model: nn.Module, params: SamplingParams) -> CompiledStep | None:
    """The compiled one-token step when ``params.compile`` asks for one (a clear error when
    no C++ compiler can build it)."""
    return CompiledStep(model_device(model)) if params.compile else None


def _check_params(params: SamplingParams | None) -> SamplingParams:
    if params is None:
        return SamplingParams()
    if not isinstance(params, SamplingParams):
        raise DecodingError(f"params must be a SamplingParams, got {type(params).__name__}")
    return params


def _stop_ids(model: nn.Module, params: SamplingParams, tokenizer) -> list[int]:
    """eos_id (the tokenizer's when params has none) and stop_ids, checked against the vocab."""
    vocab = model.config.vocab_size
    check_ids(params.stop_ids, vocab, "stop_ids")
    eos = params.eos_id
    if eos is None and tokenizer is not None:
        eos = getattr(tokenizer, "eos_id", None)
    if eos is not None:
        check_ids([eos], vocab, "eos_id")
    ids = list(params.stop_ids) + ([eos] if eos is not None else [])
    return list(dict.fromkeys(ids))  # unique, in order


def _encode(prompts, tokenizer) -> list[list[int]]:
    if isinstance(prompts, str | bytes) or not isinstance(prompts, Sequence) or not prompts:
        raise DecodingError(
            "prompts must be a non-empty list of prompts (each a list of token ids, or a string "
            "when a tokenizer is given)"
        )
    out = []
    for i, prompt in enumerate(prompts):
        if isinstance(prompt, str):
            if tokenizer is None:
                raise DecodingError(f"prompt {i} is a string: pass a tokenizer to encode it")
            prompt = tokenizer.encode(prompt)
        elif not isinstance(prompt, Sequence):
            raise DecodingError(
                f"prompt {i} is a {type(prompt).__name__}, not a list of token ids; "
                "a single prompt must still be wrapped in a list: [[1, 2, 3]]"
            )
        out.append(list(prompt))
    return out


def _fit_prompts(
    model: nn.Module, prompts: list[list[int]], params: SamplingParams
) -> tuple[list[list[int]], list[int]]:
    """Check every prompt; left-truncate one longer than the context when asked.
    -> (prompts, dropped). Prompt + output may outgrow the context: the window slides."""
    vocab = model.config.vocab_size
    context = _context(model)
    fitted, dropped = [], []
    for i, prompt in enumerate(prompts):
        name = f"prompt {i}" if len(prompts) > 1 else "prompt"
        if not prompt:
            raise DecodingError(
                f"{name} is empty: the model needs at least one token to condition on "
                "(e.g. a beginning-of-sequence token)"
            )
        check_ids(prompt, vocab, name)
        cut = 0
        if context is not None and len(prompt) > context:
            if not params.truncate_prompt:
                raise DecodingError(
                    f"{name} has {len(prompt)} tokens, more than the model's context of "
                    f"{context} tokens (max_seq_len); shorten it, or set truncate_prompt=True "
                    f"to keep only its last {context} tokens"
                )
            cut = len(prompt) - context
        fitted.append(prompt[cut:])
        dropped.append(cut)
    return fitted, dropped


# ----------------------------------------------------------------------------- text


def _final_text(tokenizer, ids: list[int], stop_ids: Sequence[int], stop: Sequence[str]):
    """-> (text, cut): the decoded new tokens without a closing stop token, cut before the
    first stop string (cut is True when one was found)."""
    if ids and ids[-1] in stop_ids:
        ids = ids[:-1]
    text = tokenizer.decode(ids)
    at = min((i for i in (text.find(s) for s in stop) if i >= 0), default=-1)
    return (text[:at], True) if at >= 0 else (text, False)


def _text_stop(tokenizer, stop: Sequence[str]) -> Callable[[list[int]], bool] | None:
    if not stop:
        return None

    def seen_stop(ids: list[int]) -> bool:
        text = tokenizer.decode(ids)
        return any(s in text for s in stop)

    return seen_stop


def _stable_prefix(text: str, stop: Sequence[str]) -> str:
    """The part of a growing text that later tokens cannot change: without a trailing
    U+FFFD (an incomplete multi-byte character) or the start of a possible stop string.

    "ab\\n" with stop "\\n\\n" -> "ab"; "ab\\ufffd" -> "ab".
    """
    text = text.rstrip("\ufffd")
    hold = 0
    for s in stop:
        for k in range(min(len(s) - 1, len(text)), hold, -1):
            if text.endswith(s[:k]):
                hold = k
                break
    return text[: len(text) - hold]


# ----------------------------------------------------------------------------- public API


def generate(
    model: nn.Module,
    prompts: Sequence[Prompt],
    params: SamplingParams | None = None,
    tokenizer=None,
) -> Generation:
    """Decode a batch of prompts: token-id lists, or strings when a ``tokenizer`` is given.

    Greedy, sampling or beam search as ``params`` says (see SamplingParams). With a
    tokenizer (duck-typed: ``encode(str) -> list[int]``, ``decode(list[int]) -> str``,
    optional ``eos_id``) the result also carries ``texts`` and stop strings apply.
    Raises DecodingError, before any tensor is built, for out-of-range ids, an empty
    prompt, or a prompt longer than the context (unless ``truncate_prompt``); and, at the
    step it happens, for logits that are not finite. Prompt + output may outgrow the
    context: the window slides (``slid`` in the result says by how many tokens).
    """
    require_causal_lm(model, "generating text")
    params = _check_params(params)
    if params.stop and tokenizer is None:
        raise DecodingError(
            f"stop={list(params.stop)!r} needs a tokenizer to find stop strings; "
            "use generate_text or pass tokenizer="
        )
    stop_ids = _stop_ids(model, params, tokenizer)
    prompts, dropped = _fit_prompts(model, _encode(prompts, tokenizer), params)
    compiled = _compiled_step(model, params)
    if params.num_beams > 1:
        ids, reasons = _beam_search(model, prompts, params, stop_ids, compiled=compiled)
    else:
        text_stop = _text_stop(tokenizer, params.stop)
        sampler = _Sampler(model, prompts, params, stop_ids, text_stop, compiled)
        while not sampler.finished:
            sampler.step()
        ids, reasons = sampler.result()
    context = _context(model)
    slid = [_slid(context, len(p), len(row)) for p, row in zip(prompts, ids)]
    out = Generation(ids, reasons, dropped, [len(p) for p in prompts], slid)
    out.compile_seconds = compiled.seconds if compiled is not None else 0.0
    if tokenizer is not None:
        out.texts = []
        for i, row in enumerate(ids):
            text, cut = _final_text(tokenizer, row, stop_ids, params.stop)
            out.texts.append(text)
            if cut:  # beam search finds stop strings only here, after the search
                out.finish_reasons[i] = "stop"
    return out


def beam_search_steps(
    model: nn.Module, prompt: Prompt, params: SamplingParams, tokenizer=None
) -> tuple[list[BeamStep], list[int]]:
    """Beam search on one prompt, step by step: (the state after every step, the best
    finished sequence's new ids). The ids are those ``generate`` returns for the same
    prompt and params (``params.num_beams`` > 1), so a picture of the steps shows the
    search that ``generate`` runs."""
    require_causal_lm(model, "beam search")
    params = _check_params(params)
    if params.num_beams < 2:
        raise DecodingError(f"num_beams={params.num_beams}: beam search needs num_beams >= 2")
    stop_ids = _stop_ids(model, params, tokenizer)
    (prompt,), _ = _fit_prompts(model, _encode([prompt], tokenizer), params)
    steps: list[BeamStep] = []
    observe = lambda _, s: steps.append(s)  # noqa: E731
    compiled = _compiled_step(model, params)
    (ids,), _ = _beam_search(model, [prompt], params, stop_ids, observe, compiled)
    return steps, ids


def generate_ids(
    model: nn.Module, prompts: Sequence[Sequence[int]], params: SamplingParams | None = None
) -> list[list[int]]:
    """New token ids for each prompt (a closing stop token included); see ``generate``."""
    return generate(model, prompts, params).ids


def generate_text(
    model: nn.Module, tokenizer, prompt: str | Sequence[str], params: SamplingParams | None = None
) -> str | list[str]:
    """Generated text for a prompt string (-> str) or a list of them (-> list[str]).

    The text excludes a closing stop token and is cut before the first stop string in
    ``params.stop``; generation of a prompt ends as soon as one appears.
    """
    single = isinstance(prompt, str)
    texts = generate(model, [prompt] if single else prompt, params, tokenizer).texts
    return texts[0] if single else texts


class Stream(Generic[Piece]):
    """An iterator over one prompt's output as it is produced.

    ``truncated`` and ``prompt_length`` are known at once; ``ids`` grows as tokens come, and
    ``slid`` with them (tokens dropped out of the context window, as ``Generation.slid``);
    ``finish_reason`` ("stop" or "length") is set once the iterator is exhausted.
    """

    def __init__(self, truncated: int, prompt_length: int, context: int | None = None):
        self.compiled: CompiledStep | None = None
        self.truncated = truncated
        self.prompt_length = prompt_length
        self.context = context
        self.ids: list[int] = []
        self.finish_reason: str | None = None
        self._pieces: Iterator[Piece] = iter(())

    def __iter__(self) -> Stream[Piece]:
        return self

    def __next__(self) -> Piece:
        return next(self._pieces)

    @property
    def compile_seconds(self) -> float:
        """Wall seconds spent so far compiling the one-token step (as
        ``Generation.compile_seconds``)."""
        return self.compiled.seconds if self.compiled is not None else 0.0

    @property
    def slid(self) -> int:
        """Tokens that dropped out of the context window so far (0: none)."""
        return _slid(self.context, self.prompt_length, len(self.ids))


def _start_stream(model, prompt, params, tokenizer):
    """Validate eagerly (errors surface at the call, not at the first next()) and build the
    sampler of a one-prompt stream."""
    require_causal_lm(model, "streaming text")
    params = _check_params(params)
    if params.num_beams > 1:
        raise DecodingError(
            f"num_beams={params.num_beams}: beam search cannot stream (the best beam is known "
            "only at the end); use num_beams=1"
        )
    if params.stop and tokenizer is None:
        raise DecodingError(f"stop={list(params.stop)!r} needs a tokenizer: use stream_text")
    if isinstance(prompt, str) and tokenizer is None:
        raise DecodingError("prompt is a string: use stream_text with a tokenizer")
    stop_ids = _stop_ids(model, params, tokenizer)
    if isinstance(prompt, str):
        prompt = tokenizer.encode(prompt)
    elif not isinstance(prompt, Sequence) or any(isinstance(x, Sequence) for x in prompt[:1]):
        raise DecodingError("stream_ids takes one prompt: a list of token ids")
    (prompt,), (dropped,) = _fit_prompts(model, [list(prompt)], params)
    compiled = _compiled_step(model, params)
    text_stop = _text_stop(tokenizer, params.stop)
    sampler = _Sampler(model, [prompt], params, stop_ids, text_stop, compiled)
    stream = Stream(dropped, len(prompt), _context(model))
    stream.compiled = compiled
    return sampler, stream, stop_ids, params


def stream_ids(
    model: nn.Module, prompt: Sequence[int], params: SamplingParams | None = None
) -> Stream[int]:
    """Yield the new token ids of one prompt as they are produced (a closing stop token
    included); the same ids as ``generate_ids`` with the same params and seed."""
    sampler, stream, _, _ = _start_stream(model, prompt, params, None)

    def pieces() -> Iterator[int]:
        while not sampler.finished:
            token = int(sampler.step()[0])
            stream.ids.append(token)
            yield token
        (_,), (stream.finish_reason,) = sampler.result()

    stream._pieces = pieces()
    return stream


def stream_text(
    model: nn.Module, tokenizer, prompt: str, params: SamplingParams | None = None
) -> Stream[str]:
    """Yield text pieces of one prompt's output as they become final.

    ``"".join(stream_text(...)) == generate_text(...)`` for the same params and seed. Each
    step decodes all new ids and emits what extends the text already sent, holding back a
    trailing U+FFFD (a multi-byte character still incomplete) and any tail that could be
    the start of a stop string.
    """
    sampler, stream, stop_ids, params = _start_stream(model, prompt, params, tokenizer)

    def pieces() -> Iterator[str]:
        sent = ""
        while not sampler.finished:
            stream.ids.append(int(sampler.step()[0]))
            if sampler.finished:
                break
            stable = _stable_prefix(tokenizer.decode(stream.ids), params.stop)
            if len(stable) > len(sent) and stable.startswith(sent):
                yield stable[len(sent) :]
                sent = stable
        (ids,), (stream.finish_reason,) = sampler.result()
        stream.ids = ids
        text, _ = _final_text(tokenizer, stream.ids, stop_ids, params.stop)
        if len(text) > len(sent) and text.startswith(sent):
            yield text[len(sent) :]

    stream._pieces = pieces()
    return stream
