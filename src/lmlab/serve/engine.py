"""Continuous batching: concurrent requests share the model's forward passes.

One engine thread owns the model. Each request becomes one or more jobs (one per prompt
and choice); the thread loops:

    admit:   take waiting jobs (up to ``max_batch`` rows): read each prompt alone (its
             prefill, one forward over the prompt), choose its first token, and add its
             keys and values to the batch as a new row
    step:    one forward over every running row at once, one new token each; choose each
             row's next token with its own settings and random generator
    leave:   a row that finished (a stop token, a stop string, max_tokens) or whose client
             went away is dropped from the batch at once; its slot is free for the next job

so a request joins at the next step and leaves when done (continuous batching, as in Orca,
Yu et al. 2022, and vLLM), and a row's output never depends on its batch-mates.

The KV cache of a transformer (``models/transformer.py``'s ``KVCache``) holds every row,
right-aligned: all rows write their next key at the same column ``length``, and a row with
fewer tokens has padding on the left, marked invalid (so never attended to), with its own
positions (``next_pos``). A new row whose prompt is longer than ``length`` shifts the
others right; when the columns run out the rows move back left (the oldest column in use
becomes column 0) and the cache grows, up to the model's context. Models without a KV
cache (recurrent nets, MLPs, n-grams) rerun every row's whole sequence each step, left-
padded with a mask: slower, but batched and exact all the same.

Choosing a token is the library's: ``SamplingParams`` (already validated),
``process_logits`` (repetition penalty, temperature, top-k, top-p), greedy argmax or one
``torch.multinomial`` draw from a ``torch.Generator`` seeded per job, exactly as
``lmlab.generate`` does for one prompt, so a job's output is the library's output for its
prompt alone: token for token at temperature 0, and draw for draw with the same seed. In
float32 this holds exactly (``tests/serve/test_engine.py``; bench/serve.py on SmolLM2: 8/8
texts equal); in bfloat16 and 4-bit the matrix products of a batch of 8 round differently
from those of one row, so where two tokens nearly tie the choice can flip, and a text
differs from there on (bench/serve.py: 4/8 SmolLM2 texts of 64 forced tokens).

Log-probabilities reported to clients are the model's own distribution
(``log_softmax`` of its logits), before logit_bias, temperature, top-k or top-p, as
OpenAI's and vLLM's are.

Jobs report through ``emit`` (called on the engine thread; the server hands the events to
its event loop): ``PromptScores`` (echo), ``NewToken`` per token with the text it makes
final, then ``Finished`` or ``Failed``.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from lmlab.devices import model_device
from lmlab.errors import LMLabError
from lmlab.generate.params import SamplingParams
from lmlab.generate.processors import process_logits, seen_tokens
from lmlab.generate.search import _check_distribution, _final_text, _stable_prefix
from lmlab.models.transformer import KVCache

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- jobs and events


@dataclass(frozen=True)
class TokenScore:
    """A token with its log-probability under the model and the ``top`` alternatives
    [(id, logprob), ...], most likely first (empty when none were asked for)."""

    id: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)


@dataclass(frozen=True)
class PromptScores:
    """Scores of the prompt's tokens (for ``echo``): None for the first, which has no context."""

    tokens: list[TokenScore | None]


@dataclass(frozen=True)
class NewToken:
    """One generated token (``score.id``) and the text it made final (may be "": a
    character or a possible stop string still incomplete, or a stop token)."""

    score: TokenScore
    text: str


@dataclass(frozen=True)
class Finished:
    reason: str
    """"stop" (a stop token or stop string) or "length" (max_tokens, or the context)."""
    n_tokens: int
    """Generated tokens (a closing stop token included)."""


@dataclass(frozen=True)
class Failed:
    message: str
    user_error: bool
    """True when the message is about the request (an ``LMLabError``), False for a bug."""


Event = PromptScores | NewToken | Finished | Failed


@dataclass(eq=False)
class Job:
    """One sequence to generate: a prompt (token ids, checked by the caller against the
    vocabulary and the context) and how to continue it."""

    prompt: list[int]
    params: SamplingParams
    max_tokens: int
    """Tokens to generate, >= 0 (``params.max_new_tokens`` is ignored: it cannot be 0)."""
    emit: Callable[[Event], None]
    top_logprobs: int = 0
    """Alternatives reported per generated token."""
    prompt_logprobs: int | None = None
    """Score the prompt's tokens too (echo), with this many alternatives each; None = no."""
    logit_bias: dict[int, float] = field(default_factory=dict)
    """Added to the logits before choosing (OpenAI's logit_bias)."""
    stop_ids: tuple[int, ...] = ()
    """Token ids that end the sequence (eos and the params' stop_ids)."""
    cancelled: bool = False


# ----------------------------------------------------------------------------- rows


class _Rows:
    """Rows of a model without a KV cache: each step reruns every whole sequence."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.device = model_device(model)
        self.seqs: list[list[int]] = []

    def prefill(self, prompt: list[int]) -> tuple[torch.Tensor, list[int]]:
        """logits [P, V] of the prompt alone, and the row's state."""
        ids = torch.tensor([prompt], device=self.device)
        return self.model(ids)[0], list(prompt)

    def add(self, state: list[int]) -> None:
        self.seqs.append(state)

    def step(self, tokens: list[int]) -> torch.Tensor:
        """Append one token per row; next-token logits [B, V]."""
        for seq, token in zip(self.seqs, tokens):
            seq.append(token)
        T = max(len(s) for s in self.seqs)
        ids = torch.tensor([[0] * (T - len(s)) + s for s in self.seqs], device=self.device)
        if all(len(s) == T for s in self.seqs):
            return self.model(ids)[:, -1]
        mask = torch.tensor([[False] * (T - len(s)) + [True] * len(s) for s in self.seqs])
        return self.model(ids, mask=mask.to(self.device))[:, -1]  # (B, V)

    def keep(self, index: list[int]) -> None:
        self.seqs = [self.seqs[i] for i in index]


class _CachedRows:
    """Rows sharing one ``KVCache``, right-aligned at its column ``length`` (module doc).

    ``n[r]`` is how many real tokens row r holds: columns ``length - n[r] .. length - 1``.
    """

    def __init__(self, model: nn.Module):
        self.model = model
        self.device = model_device(model)
        self.context = model.config.max_seq_len
        self.cache: KVCache | None = None
        self.n: list[int] = []

    def prefill(self, prompt: list[int]) -> tuple[torch.Tensor, KVCache]:
        cache = self.model.new_cache(1, len(prompt))
        ids = torch.tensor([prompt], device=self.device)
        return self.model(ids, cache=cache)[0], cache  # (P, V)

    def add(self, row: KVCache) -> None:
        """Add a prefilled one-row cache as the last row."""
        P = row.length
        if not self.n:
            self.cache, self.n = row, [P]
            return
        c = self.cache
        if P > c.length:  # the others move right so that the new row fits on their left
            self._move(max(c.max_len, P), P)
        L, S = c.length, c.max_len
        for layer in range(len(c.k)):
            for kv, new in ((c.k, row.k[layer]), (c.v, row.v[layer])):
                slot = new.new_zeros(1, new.shape[1], S, new.shape[3])  # (1, Hkv, S, Dh)
                slot[:, :, L - P : L] = new[:, :, :P]
                kv[layer] = torch.cat([kv[layer], slot])
        valid = c.valid.new_zeros(1, S)
        valid[:, L - P : L] = True
        c.valid = torch.cat([c.valid, valid])
        c.next_pos = torch.cat([c.next_pos, c.next_pos.new_tensor([P])])
        self.n.append(P)

    def step(self, tokens: list[int]) -> torch.Tensor:
        c = self.cache
        if c.length + 1 > c.max_len:
            # Out of columns: move the rows left (the longest row then starts at column 0)
            # and grow, by as many columns as the longest row holds, up to the context.
            longest = max(self.n)
            self._move(max(longest + 1, min(2 * longest, self.context)), longest)
        # Padding anywhere needs the masked path; rows all full-length take the fast one.
        c.padded = any(n < c.length for n in self.n)
        ids = torch.tensor(tokens, device=self.device)[:, None]  # (B, 1)
        logits = self.model(ids, cache=c)[:, -1]  # (B, V)
        self.n = [n + 1 for n in self.n]
        return logits

    def keep(self, index: list[int]) -> None:
        if not index:
            self.cache, self.n = None, []
            return
        self.cache.reorder(torch.tensor(index, device=self.device))
        self.n = [self.n[i] for i in index]

    def _move(self, size: int, length: int) -> None:
        """Reallocate the cache to ``size`` columns, the rows' tokens ending at ``length``."""
        c, m = self.cache, max(self.n)
        old = c.length

        def moved(t: torch.Tensor, dim: int) -> torch.Tensor:
            shape = list(t.shape)
            shape[dim] = size
            new = t.new_zeros(shape)
            new.narrow(dim, length - m, m).copy_(t.narrow(dim, old - m, m))
            return new

        c.k = [moved(k, 2) for k in c.k]  # (B, Hkv, S, Dh)
        c.v = [moved(v, 2) for v in c.v]
        c.valid = moved(c.valid, 1)  # (B, S)
        c.length, c.max_len = length, size


# ----------------------------------------------------------------------------- engine


class _Seq:
    """A running job: its generated ids, text sent so far, generator and seen tokens."""

    def __init__(self, job: Job, vocab: int, device: torch.device):
        self.job = job
        self.ids: list[int] = []
        self.sent = ""
        self.pending = -1  # the last chosen token, not yet fed to the model
        self.generator = None
        if job.params.sample:
            seed = job.params.seed
            self.generator = torch.Generator(device=device)
            if seed is None:
                self.generator.seed()
            else:
                self.generator.manual_seed(seed)
        self.seen = None
        if job.params.repetition_penalty != 1.0:
            self.seen = seen_tokens(torch.tensor([job.prompt], device=device), vocab)
        self.bias = None
        if job.logit_bias:
            self.bias = torch.zeros(1, vocab, device=device)
            for token, value in job.logit_bias.items():
                self.bias[0, token] = value


class Engine:
    """Continuous batching over one model (see the module doc).

    ``submit(job)`` queues a job; ``cancel(job)`` drops it at the next step; ``active`` is
    the number of jobs waiting or running. The thread starts at the first ``submit`` (or
    ``start()``) and ends with ``stop()``. ``stats`` counts batched steps and the most rows
    one step held.
    """

    def __init__(
        self, model: nn.Module, tokenizer, max_batch: int = 16, prefill_budget: int = 2048
    ):
        if max_batch < 1:
            raise ValueError(f"max_batch={max_batch} is invalid: must be >= 1")
        self.model = model
        self.tokenizer = tokenizer
        self.max_batch = max_batch
        self.prefill_budget = prefill_budget
        """Prompt tokens read per loop before the running rows take their next step."""
        self.vocab = model.config.vocab_size
        self.device = model_device(model)
        self.cached = isinstance(getattr(model, "new_cache", None) and _probe(model), KVCache)
        self.stats = {"steps": 0, "max_rows": 0, "prefills": 0}
        self._rows = _CachedRows(model) if self.cached else _Rows(model)
        self._running: list[_Seq] = []
        self._waiting: deque[Job] = deque()
        self._cond = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------------ public

    def start(self) -> None:
        with self._cond:
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="lmlab-engine")
                self._thread.daemon = True
                self._thread.start()

    def submit(self, job: Job) -> None:
        self.start()
        with self._cond:
            if self._stopping:
                raise RuntimeError("the engine is stopping")
            self._waiting.append(job)
            self._cond.notify()

    def cancel(self, job: Job) -> None:
        with self._cond:
            job.cancelled = True
            self._cond.notify()

    @property
    def active(self) -> int:
        with self._cond:
            return len(self._waiting) + len(self._running)

    def stop(self, timeout: float = 10.0) -> None:
        """Cancel what is left and end the thread."""
        with self._cond:
            self._stopping = True
            for job in self._waiting:
                job.cancelled = True
            for seq in self._running:
                seq.job.cancelled = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join(timeout)

    # ------------------------------------------------------------------------ the loop

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not (self._waiting or self._running or self._stopping):
                    self._cond.wait()
                if self._stopping and not self._running and not self._waiting:
                    return
                admitted = self._take()
            try:
                with torch.inference_mode():
                    self._drop_cancelled()
                    for job in admitted:
                        self._admit(job)
                    if self._running:
                        self._step()
            except Exception as e:  # a bug or a device error: fail every job, keep serving
                log.exception("engine step failed")
                with self._cond:
                    jobs = [s.job for s in self._running]
                    self._running = []
                self._rows.keep([])
                for job in jobs + admitted:
                    job.emit(Failed(f"{type(e).__name__}: {e}", user_error=False))

    def _take(self) -> list[Job]:
        """Waiting jobs to admit now: free rows, within the prefill budget (at least one)."""
        out, tokens = [], 0
        while self._waiting and len(self._running) + len(out) < self.max_batch:
            job = self._waiting[0]
            if out and tokens + len(job.prompt) > self.prefill_budget:
                break
            out.append(self._waiting.popleft())
            tokens += len(job.prompt)
        return out

    def _drop_cancelled(self) -> None:
        keep = [i for i, s in enumerate(self._running) if not s.job.cancelled]
        if len(keep) < len(self._running):
            self._rows.keep(keep)
            with self._cond:
                self._running = [self._running[i] for i in keep]

    def _admit(self, job: Job) -> None:
        if job.cancelled:
            return
        if job.max_tokens == 0 and job.prompt_logprobs is None:
            job.emit(Finished("length", 0))
            return
        seq = _Seq(job, self.vocab, self.device)
        self.stats["prefills"] += 1
        try:
            logits, state = self._rows.prefill(job.prompt)  # (P, V)
            if job.prompt_logprobs is not None:
                job.emit(PromptScores(self._prompt_scores(job, logits)))
            if job.max_tokens == 0:
                job.emit(Finished("length", 0))
                return
            done = self._advance(seq, self._choose(seq, logits[-1:], step=1))
        except LMLabError as e:
            job.emit(Failed(str(e), user_error=True))
            return
        if not done:
            self._rows.add(state)
            with self._cond:
                self._running.append(seq)

    def _step(self) -> None:
        logits = self._rows.step([s.pending for s in self._running])  # (B, V)
        self.stats["steps"] += 1
        self.stats["max_rows"] = max(self.stats["max_rows"], len(self._running))
        keep = []
        for i, seq in enumerate(self._running):
            try:
                token = self._choose(seq, logits[i : i + 1], step=len(seq.ids) + 1)
                done = self._advance(seq, token)
            except LMLabError as e:
                seq.job.emit(Failed(str(e), user_error=True))
                done = True
            if not done:
                keep.append(i)
        if len(keep) < len(self._running):
            self._rows.keep(keep)
            with self._cond:
                self._running = [self._running[i] for i in keep]

    # ------------------------------------------------------------------------ one token

    def _choose(self, seq: _Seq, logits: torch.Tensor, step: int) -> TokenScore:
        """The next token of ``seq`` from its logits [1, V], as lmlab.generate chooses it."""
        params = seq.job.params
        raw = logits
        if seq.bias is not None:
            logits = logits.float() + seq.bias
        if seq.generator is None:
            processed = process_logits(logits, params, seq.seen)
            _check_distribution(raw, processed, step)
            token = int(processed.argmax(dim=-1))
        else:
            processed = process_logits(logits.float(), params, seq.seen)
            _check_distribution(raw, processed, step)
            probs = processed.softmax(dim=-1)
            token = int(torch.multinomial(probs, 1, generator=seq.generator))
        if seq.seen is not None:
            seq.seen[0, token] = True
        logp = raw[0].float().log_softmax(dim=-1)  # (V,)
        return TokenScore(token, float(logp[token]), _top(logp, seq.job.top_logprobs))

    def _advance(self, seq: _Seq, score: TokenScore) -> bool:
        """Record the chosen token and emit it with the text it makes final; True when the
        sequence has finished."""
        job, tokenizer, stop = seq.job, self.tokenizer, seq.job.params.stop
        seq.ids.append(score.id)
        seq.pending = score.id
        reason = None
        if score.id in job.stop_ids:
            reason = "stop"
        elif len(seq.ids) >= job.max_tokens:
            reason = "length"
        elif self._rows_full(seq):
            reason = "length"
        if tokenizer is None:
            text = ""
        elif reason is None:
            decoded = tokenizer.decode(seq.ids)
            if stop and any(s in decoded for s in stop):
                reason = "stop"
                text = _final_text(tokenizer, seq.ids, job.stop_ids, stop)[0]
            else:
                text = _stable_prefix(decoded, stop)
        else:
            text, cut = _final_text(tokenizer, seq.ids, job.stop_ids, stop)
            reason = "stop" if cut else reason
        delta = ""
        if len(text) > len(seq.sent) and text.startswith(seq.sent):
            delta, seq.sent = text[len(seq.sent) :], text
        job.emit(NewToken(score, delta))
        if reason is not None:
            job.emit(Finished(reason, len(seq.ids)))
        return reason is not None

    def _rows_full(self, seq: _Seq) -> bool:
        """The sequence fills the context (callers keep prompt + max_tokens within it)."""
        context = getattr(self.model.config, "max_seq_len", None)
        return context is not None and len(seq.job.prompt) + len(seq.ids) >= context

    def _prompt_scores(self, job: Job, logits: torch.Tensor) -> list[TokenScore | None]:
        """Each prompt token's log-probability given the tokens before it: logits [P, V]."""
        logp = logits[:-1].float().log_softmax(dim=-1)  # (P - 1, V)
        targets = torch.tensor(job.prompt[1:], device=logp.device)
        chosen = logp.gather(-1, targets[:, None])[:, 0].tolist()
        k = job.prompt_logprobs
        tops: list[list[tuple[int, float]]] = [[] for _ in chosen]
        if k:
            values, index = logp.topk(min(k, logp.shape[-1]), dim=-1)  # (P - 1, k)
            tops = [list(zip(i, v)) for i, v in zip(index.tolist(), values.tolist())]
        scores = [TokenScore(t, lp, top) for t, lp, top in zip(job.prompt[1:], chosen, tops)]
        return [None, *scores]


def _top(logp: torch.Tensor, k: int) -> list[tuple[int, float]]:
    if k <= 0:
        return []
    values, index = logp.topk(min(k, logp.shape[-1]))
    return list(zip(index.tolist(), values.tolist()))


def _probe(model: nn.Module):
    """A one-row, one-token cache of ``model``: tells which kind of cache it keeps."""
    try:
        return model.new_cache(1, 1)
    except Exception:  # a cache that needs more (an encoder's memory): treat as none
        return None
