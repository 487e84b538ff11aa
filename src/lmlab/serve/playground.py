"""The web playground's JSON API: what decoding does to a model's next-token distribution.

Every number comes from the library code that decodes text, so the page shows what
``lmlab generate`` does, not a re-implementation of it:

    POST next       the next-token distribution of a prompt: the top N tokens with their
                    raw probability softmax(logits), their processed probability after
                    temperature, top-k and top-p (``generate.processors.process_logits``)
                    and whether each is in the kept set (the tokens sampling may draw)
    POST step       append one token: sampled as ``generate`` samples it, or chosen
    POST tree       several samples of a few tokens from one prompt, merged into a tree
    POST beams      beam search's running beams and finished hypotheses after every step
                    (``generate.search.beam_search_steps``)
    POST chat       one turn of a conversation (``generate.chat.ChatSession``, as ``lmlab
                    chat``); ``chat/reset`` forgets one
    POST attention  one layer's attention pattern of a prompt (``interp.attention_maps``)
    GET  info       the model: vocabulary, context, layers and heads, chat and attention

all under ``/playground/api/``. Sampling settings go through ``SamplingParams``, the
validator the library and the OpenAI routes share: a bad value is an HTTP 400 with an
OpenAI-style error object naming it (a malformed body is FastAPI's 422), never a 500.

``playground_router(state)`` makes the routes; ``state`` is anything with an ``lm``
attribute (an ``lmlab.LM``, read at each request; ``model_name`` too if it has one, as
the server's ``app.state`` does) or an ``LM`` itself. The model serves one playground
request at a time. ``mount_playground(app, state)`` adds the routes and the page
(``static/``: plain HTML, JavaScript and CSS, no build step, nothing fetched from
elsewhere) at ``/playground/``; the page calls ``/playground/api/...`` wherever it is
served from. ``serve_in_thread(app)`` runs an app on 127.0.0.1 in a background thread
(notebooks, the browser tests, the lesson's screenshot script).

Tests: ``tests/serve/test_playground.py`` (each route against the library on a tiny
random model) and ``test_playground_browser.py`` (the page in headless chromium).
"""

from __future__ import annotations

import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import uvicorn
from fastapi import APIRouter, FastAPI
from fastapi.responses import JSONResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, ConfigDict, Field

from lmlab.devices import model_device
from lmlab.errors import ConfigError, DecodingError, LMLabError
from lmlab.generate import SamplingParams, beam_search_steps, check_ids, generate, process_logits
from lmlab.generate.chat import ChatSession
from lmlab.interp import attention_maps, hook_points
from lmlab.models.contract import abilities, require_causal_lm

STATIC = Path(__file__).resolve().parent / "static"
PREFIX = "/playground/api"
MAX_CHATS = 32
"""Conversations kept at once; the least recently used one is forgotten past this."""
MAX_ATTENTION_TOKENS = 128
"""Longest prompt whose attention is sent (a [T, T] matrix per request)."""


# ----------------------------------------------------------------------------- requests


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Decoding(_Request):
    """The sliders: SamplingParams' temperature, top_k and top_p (checked there)."""

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0

    def params(self, **more: Any) -> SamplingParams:
        return SamplingParams(
            temperature=self.temperature, top_k=self.top_k, top_p=self.top_p, **more
        )


class PromptRequest(Decoding):
    """A prompt as text, or as token ids (a path through the sampling tree)."""

    prompt: str | None = None
    ids: list[int] | None = None


class NextRequest(PromptRequest):
    top_n: int = Field(20, ge=1, le=200)


class StepRequest(PromptRequest):
    token: int | None = None
    """Append this token id; None samples one with the settings."""
    seed: int | None = None


class TreeRequest(PromptRequest):
    samples: int = Field(8, ge=1, le=32)
    depth: int = Field(4, ge=1, le=16)
    seed: int | None = 0


class BeamsRequest(PromptRequest):
    num_beams: int = Field(3, ge=2, le=16)
    steps: int = Field(6, ge=1, le=32)
    length_penalty: float = 1.0


class ChatRequest(Decoding):
    message: str
    session: str | None = None
    """The conversation to continue (from an earlier answer); None or unknown starts one."""
    system: str | None = None
    max_tokens: int = Field(64, ge=1, le=1024)
    seed: int | None = None


class ResetRequest(_Request):
    session: str


class AttentionRequest(PromptRequest):
    layer: int = 0
    head: int | None = None
    """None: the mean over the layer's heads."""


# ----------------------------------------------------------------------------- the maths


def next_token_table(logits: torch.Tensor, params: SamplingParams, top_n: int) -> dict[str, Any]:
    """The next-token distribution before and after processing: ``logits`` [V] float.

    -> ``ids``, ``raw`` (softmax of the logits) and ``processed`` (softmax of
    ``process_logits``: what sampling draws from) for the ``top_n`` most likely tokens,
    most likely first (ties: lower id); ``kept`` (processed probability > 0) for each;
    ``kept_count`` and ``kept_mass`` (raw probability of the kept set) over the whole
    vocabulary. Greedy decoding (temperature 0) keeps the argmax alone, as ``generate``.
    """
    logits = logits.float()[None]  # (1, V)
    raw = logits.softmax(dim=-1)[0]  # (V,)
    if params.sample:
        processed = process_logits(logits, params).softmax(dim=-1)[0]  # (V,)
    else:
        processed = torch.zeros_like(raw)
        processed[int(process_logits(logits, params).argmax(dim=-1))] = 1.0
    kept = processed > 0
    # A stable sort on -raw ranks equal probabilities by lower id, as the filters do.
    order = torch.sort(-raw, stable=True).indices[:top_n]
    return {
        "ids": order.tolist(),
        "raw": raw[order].tolist(),
        "processed": processed[order].tolist(),
        "kept": kept[order].tolist(),
        "kept_count": int(kept.sum()),
        "kept_mass": float(raw[kept].sum()),
    }


def token_tree(samples: list[list[int]], raw: list[list[float]], processed: list[list[float]]):
    """Merge sampled continuations into a prefix tree of dicts.

    ``samples[s][i]`` is sample s's i-th new token, ``raw`` and ``processed`` its
    probabilities. Each node: ``id``, ``count`` (samples through it), ``raw``,
    ``processed``, ``children`` (most visited first). [[5, 7], [5, 9]] -> root -> 5 (count
    2) -> {7, 9} (count 1 each).
    """
    root: dict[str, Any] = {"id": None, "count": len(samples), "children": []}
    for tokens, raws, procs in zip(samples, raw, processed):
        node = root
        for token, p, q in zip(tokens, raws, procs):
            child = next((c for c in node["children"] if c["id"] == token), None)
            if child is None:
                child = {"id": token, "count": 0, "raw": p, "processed": q, "children": []}
                node["children"].append(child)
            child["count"] += 1
            node = child
    stack = [root]
    while stack:
        node = stack.pop()
        node["children"].sort(key=lambda c: (-c["count"], -c["raw"]))
        stack += node["children"]
    return root


# ----------------------------------------------------------------------------- the routes


def playground_router(state: Any) -> APIRouter:
    """The playground's JSON routes, under ``/playground/api/``; ``state.lm`` (or ``state``
    itself) is the loaded ``LM`` they use."""
    router = APIRouter(prefix=PREFIX)
    lock = threading.Lock()  # one playground computation on the model at a time
    chats: OrderedDict[str, ChatSession] = OrderedDict()

    def current():
        return getattr(state, "lm", state)

    def answer(work: Callable[[Any], dict[str, Any]]) -> Any:
        """Run ``work(lm)`` under the lock; an lmlab error becomes a 400 error object."""
        try:
            with lock:
                return work(current())
        except LMLabError as e:
            kind = "invalid_request_error"
            body = {"error": {"message": str(e), "type": kind, "param": None, "code": None}}
            return JSONResponse(status_code=400, content=body)

    @router.get("/info")
    def info() -> Any:
        def work(lm):
            model = lm.model
            config = model.config
            found = abilities(model)
            attention = found.hooks and any(
                n.endswith("attn.hook_pattern") for n in hook_points(model)
            )
            return {
                "model": getattr(state, "model_name", None)
                or str(lm.config.get("loaded_from") or lm.config.get("path", "model")),
                "kind": found.kind,
                "vocab_size": config.vocab_size,
                "context": getattr(config, "max_seq_len", None),
                "n_layers": getattr(config, "n_layers", None) if attention else None,
                "n_heads": getattr(config, "n_heads", None) if attention else None,
                "chat": lm.chat_template is not None and lm.tokenizer is not None,
                "attention": attention,
            }

        return answer(work)

    @router.post("/next")
    def next_token(request: NextRequest) -> Any:
        def work(lm):
            params = request.params()
            ids = prompt_ids(lm, request)
            table = next_token_table(last_logits(lm.model, ids), params, request.top_n)
            return {
                "prompt_ids": ids,
                "prompt_tokens": labels(lm, ids),
                "tokens": labels(lm, table["ids"]),
                **table,
            }

        return answer(work)

    @router.post("/step")
    def step(request: StepRequest) -> Any:
        def work(lm):
            params = request.params(max_new_tokens=1, seed=request.seed)
            ids = prompt_ids(lm, request, extra=1)
            if request.token is None:
                token = generate(lm.model, [ids], params).ids[0][0]
            else:
                check_ids([request.token], lm.model.config.vocab_size, "token")
                token = request.token
            logits = last_logits(lm.model, ids)[None]  # (1, V)
            (raw,), (processed,) = token_probabilities(logits, torch.tensor([token]), params)
            return {
                "token": token,
                "text": labels(lm, [token])[0],
                "raw": raw,
                "processed": processed,
                "ids": ids + [token],
                "prompt_tokens": labels(lm, ids + [token]),
            }

        return answer(work)

    @router.post("/tree")
    def tree(request: TreeRequest) -> Any:
        def work(lm):
            params = request.params(max_new_tokens=request.depth, seed=request.seed)
            ids = prompt_ids(lm, request, extra=request.depth)
            samples = generate(lm.model, [ids] * request.samples, params).ids
            raw, processed = path_probabilities(lm.model, ids, samples, params)
            root = token_tree(samples, raw, processed)
            stack = [root]
            while stack:
                node = stack.pop()
                if node["id"] is not None:
                    node["text"] = labels(lm, [node["id"]])[0]
                stack += node["children"]
            return {"prompt_tokens": labels(lm, ids), "samples": samples, "root": root}

        return answer(work)

    @router.post("/beams")
    def beams(request: BeamsRequest) -> Any:
        def work(lm):
            params = request.params(
                max_new_tokens=request.steps,
                num_beams=request.num_beams,
                length_penalty=request.length_penalty,
            )
            ids = prompt_ids(lm, request, extra=request.steps)
            steps, best = beam_search_steps(lm.model, ids, params)

            def entry(tokens: list[int], score: float) -> dict[str, Any]:
                return {"ids": tokens, "tokens": labels(lm, tokens), "score": score}

            return {
                "prompt_tokens": labels(lm, ids),
                "steps": [
                    {
                        "step": s.step,
                        "beams": [entry(*b) for b in s.beams],
                        "finished": [entry(*f) for f in s.finished],
                        "closed": s.closed,
                    }
                    for s in steps
                ],
                "best": entry(best, steps[-1].finished[0][1]),
            }

        return answer(work)

    @router.post("/chat")
    def chat(request: ChatRequest) -> Any:
        def work(lm):
            params = request.params(max_new_tokens=request.max_tokens, seed=request.seed)
            session = chats.get(request.session or "")
            if session is None or session.system != request.system:
                session = ChatSession(lm, system=request.system, params=params)
                key = secrets.token_hex(8)
            else:
                key = request.session
            session.params = params
            reply = session.ask(request.message)
            chats[key] = session
            chats.move_to_end(key)
            while len(chats) > MAX_CHATS:
                chats.popitem(last=False)
            return {
                "session": key,
                "reply": reply,
                "finish_reason": session.finish_reason,
                "history": session.history,
            }

        return answer(work)

    @router.post("/chat/reset")
    def chat_reset(request: ResetRequest) -> Any:
        return {"forgotten": chats.pop(request.session, None) is not None}

    @router.post("/attention")
    def attention(request: AttentionRequest) -> Any:
        def work(lm):
            ids = prompt_ids(lm, request)
            if len(ids) > MAX_ATTENTION_TOKENS:
                raise ConfigError(
                    f"the prompt has {len(ids)} tokens; the playground shows attention for "
                    f"at most {MAX_ATTENTION_TOKENS}"
                )
            device = model_device(lm.model)
            maps = attention_maps(lm.model, torch.tensor(ids, device=device))  # (L, H, T, T)
            L, H = maps.shape[:2]
            if not 0 <= request.layer < L:
                raise ConfigError(f"layer={request.layer} is out of range: layers are 0..{L - 1}")
            if request.head is not None and not 0 <= request.head < H:
                raise ConfigError(f"head={request.head} is out of range: heads are 0..{H - 1}")
            layer = maps[request.layer]  # (H, T, T)
            matrix = layer.mean(dim=0) if request.head is None else layer[request.head]
            return {
                "prompt_ids": ids,
                "prompt_tokens": labels(lm, ids),
                "layer": request.layer,
                "head": request.head,
                "n_layers": L,
                "n_heads": H,
                "matrix": matrix.tolist(),
            }

        return answer(work)

    return router


def mount_playground(app: FastAPI, state: Any) -> None:
    """Add the playground to ``app``: its JSON routes, then the page at ``/playground/``."""
    app.include_router(playground_router(state))
    app.mount("/playground", StaticFiles(directory=STATIC, html=True), name="playground")


@contextmanager
def serve_in_thread(app: FastAPI, host: str = "127.0.0.1", port: int = 0, timeout: float = 30.0):
    """Serve ``app`` with uvicorn in a background thread (a notebook, a test, a screenshot
    script); yields its base URL. ``port`` 0 takes a free one. Stops on leaving the block."""
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            server.should_exit = True
            raise ConfigError(f"the server did not start on {host}:{port} within {timeout} s")
        time.sleep(0.02)
    bound = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://{host}:{bound}"
    finally:
        server.should_exit = True
        thread.join(timeout)


# ----------------------------------------------------------------------------- helpers


def prompt_ids(lm, request: PromptRequest, extra: int = 0) -> list[int]:
    """The request's prompt as token ids, checked: exactly one of text and ids, not empty,
    every id in the vocabulary, and ``extra`` more tokens fit the model's context."""
    require_causal_lm(lm.model, "the playground")
    if (request.prompt is None) == (request.ids is None):
        raise DecodingError("give the prompt as text (prompt) or as token ids (ids), not both")
    if request.ids is not None:
        ids = list(request.ids)
    elif lm.tokenizer is None:
        raise ConfigError("this model has no tokenizer: give the prompt as token ids (ids)")
    else:
        ids = lm.tokenizer.encode(request.prompt)
    if not ids:
        raise DecodingError("the prompt is empty: the model needs at least one token")
    check_ids(ids, lm.model.config.vocab_size, "prompt")
    context = getattr(lm.model.config, "max_seq_len", None)
    if context is not None and len(ids) + extra > context:
        raise DecodingError(
            f"the prompt has {len(ids)} tokens and {extra} more would make "
            f"{len(ids) + extra} > the model's context of {context} tokens; shorten it"
        )
    return ids


@torch.inference_mode()
def last_logits(model: torch.nn.Module, ids: list[int]) -> torch.Tensor:
    """The model's next-token logits after ``ids``: [V]."""
    x = torch.tensor([ids], device=model_device(model))  # (1, T)
    return model(x)[0, -1]


def token_probabilities(logits: torch.Tensor, tokens: torch.Tensor, params: SamplingParams):
    """Raw and processed probability of ``tokens`` [N] int64 under ``logits`` [N, V]:
    -> (raw, processed), lists of N floats. Greedy's processed distribution is all on the
    argmax."""
    logits, tokens = logits.float(), tokens.to(logits.device)[:, None]  # (N, V), (N, 1)
    raw = logits.softmax(-1).gather(1, tokens)
    if params.sample:
        processed = process_logits(logits, params).softmax(-1).gather(1, tokens)
    else:
        processed = (process_logits(logits, params).argmax(-1, keepdim=True) == tokens).float()
    return raw[:, 0].tolist(), processed[:, 0].tolist()


@torch.inference_mode()
def path_probabilities(model, prompt: list[int], samples: list[list[int]], params: SamplingParams):
    """Raw and processed probability of every token of every sample, read off one forward
    pass over prompt + samples: -> (raw, processed), each [S][n] floats."""
    x = torch.tensor([prompt + s for s in samples], device=model_device(model))  # (S, T + n)
    S, n, T = len(samples), len(samples[0]), len(prompt)
    logits = model(x)[:, T - 1 : T - 1 + n]  # (S, n, V): the logits that predicted each token
    raw, processed = token_probabilities(logits.reshape(S * n, -1), x[:, T:].reshape(-1), params)
    return [raw[i * n : (i + 1) * n] for i in range(S)], [
        processed[i * n : (i + 1) * n] for i in range(S)
    ]


def labels(lm, ids: list[int]) -> list[str]:
    """A readable label per id: its text with spaces and newlines shown, ``<id>`` for an id
    the tokenizer cannot show (or every id, without a tokenizer)."""
    tokenizer = lm.tokenizer
    out = []
    for i in ids:
        text = ""
        if tokenizer is not None and i < getattr(tokenizer, "vocab_size", i + 1):
            text = tokenizer.decode([i])
        text = text.replace(" ", "\u2423").replace("\n", "\\n")
        text = "".join(c if c.isprintable() else f"\\x{ord(c):02x}" for c in text)
        out.append(text or f"<{i}>")
    return out
