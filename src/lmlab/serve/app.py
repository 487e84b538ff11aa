"""The OpenAI-compatible HTTP API: ``create_app(lm)`` -> a FastAPI app.

Routes (``/health`` and the page stay public when an API key is set; everything else
needs ``Authorization: Bearer KEY``):

    GET  /health                 {"status": "ok", "active": jobs in the engine}
    GET  /v1/models              the one served model
    POST /v1/completions         OpenAI completions: prompt strings or token ids, n, echo,
                                 logprobs (tokens, token_logprobs, top_logprobs,
                                 text_offset), max_tokens 0, stop, seed, stream (SSE)
    POST /v1/chat/completions    the model's chat template, logprobs, stream (SSE)
    POST /tokenize, /detokenize  vLLM's shapes ({"prompt"} -> {"tokens", "count",
    GET  /tokenizer_info         "max_model_len"}, {"tokens"} -> {"prompt"}): what
                                 lm-evaluation-harness's ``tokenizer_backend=remote`` reads
    GET  /                       the playground page, when it is installed

A request is checked in full before any job starts: the body by pydantic
(``protocol.py``), the sampling settings by the library's own ``SamplingParams`` and token
ids by ``check_ids`` (so the server and ``lmlab generate`` accept exactly the same values),
and prompt + max_tokens against the context. Every failure answers OpenAI's error object
with a 4xx status; an internal error is the only 500.

Streams are Server-Sent Events (``data: {chunk}`` ... ``data: [DONE]``); an error after
the stream began is sent as ``data: {"error": ...}`` before ``[DONE]``. A client that goes
away (mid-stream, or while waiting for a whole reply) has its jobs cancelled, which frees
their rows at the engine's next step.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import math
import re
import secrets
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import RedirectResponse, StreamingResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException

from lmlab.data.chat import check_messages
from lmlab.errors import DecodingError, LMLabError
from lmlab.generate.chat import turn_end_id
from lmlab.generate.params import DEFAULT_MAX_NEW_TOKENS, SamplingParams, check_ids
from lmlab.serve.engine import (
    Engine,
    Failed,
    Finished,
    Job,
    NewToken,
    PromptScores,
    TokenScore,
)
from lmlab.serve.protocol import (
    APIError,
    ChatRequest,
    CompletionRequest,
    DetokenizeRequest,
    TokenizeRequest,
    validation_error,
)

STATIC = Path(__file__).parent / "static"
MAX_LOGPROBS = 20
MAX_CHOICES = 64
"""Most sequences (prompts x n) one request may ask for."""
# The library's field names, as the API names them.
API_NAMES = {"max_new_tokens": "max_tokens", "stop_ids": "stop_token_ids"}


def create_app(
    lm: Any,
    name: str | None = None,
    api_key: str | None = None,
    max_batch: int = 16,
    routers: Sequence[Any] = (),
) -> FastAPI:
    """The API over ``lm`` (an ``lmlab.LM`` with a tokenizer), answering as model ``name``.

    ``api_key``: when set, every route but ``/health`` and the page needs it (401 without).
    ``max_batch``: most sequences decoded together. ``routers``: more routes (FastAPI
    ``APIRouter``s, or callables ``f(app.state) -> APIRouter``, such as the playground's
    ``playground_router``), included behind the same API key.
    """
    if lm.tokenizer is None:
        raise LMLabError(
            f"model {lm.config.get('path', '')!r} has no tokenizer: the API sends and "
            "receives text, so serve a model that has one"
        )
    engine = Engine(lm.model.eval(), lm.tokenizer, max_batch=max_batch)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        engine.start()
        yield
        await asyncio.to_thread(engine.stop)

    app = FastAPI(title="lmlab", lifespan=lifespan, docs_url=None, redoc_url=None)
    state = app.state
    state.lm, state.tokenizer, state.engine = lm, lm.tokenizer, engine
    state.model_name = name or Path(str(lm.config.get("loaded_from") or "lmlab")).name
    state.context = getattr(lm.model.config, "max_seq_len", None)
    state.vocab_size = lm.model.config.vocab_size
    state.api_key = api_key
    state.created = int(time.time())
    _add_error_handlers(app)
    auth = [Depends(_require_key)]

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "active": engine.active}

    @app.get("/v1/models", dependencies=auth)
    async def models() -> dict[str, Any]:
        card = {
            "id": state.model_name,
            "object": "model",
            "created": state.created,
            "owned_by": "lmlab",
            "max_model_len": state.context,
        }
        return {"object": "list", "data": [card]}

    @app.post("/v1/completions", dependencies=auth)
    async def completions(body: CompletionRequest, request: Request):
        return await _completions(body, request)

    @app.post("/v1/chat/completions", dependencies=auth)
    async def chat_completions(body: ChatRequest, request: Request):
        return await _chat(body, request)

    @app.post("/tokenize", dependencies=auth)
    async def tokenize(body: TokenizeRequest) -> dict[str, Any]:
        _check_model(body.model, state)
        if (body.prompt is None) == (body.messages is None):
            raise APIError(400, "give exactly one of prompt (a string) or messages", "prompt")
        if body.messages is not None:
            text = _render_chat(state, body.messages, body.add_generation_prompt)
        else:
            text = body.prompt
        tokens = _encode(state, text, "prompt")
        return {"tokens": tokens, "count": len(tokens), "max_model_len": state.context}

    @app.post("/detokenize", dependencies=auth)
    async def detokenize(body: DetokenizeRequest) -> dict[str, Any]:
        _check_model(body.model, state)
        _check_ids(body.tokens, state, "tokens")
        return {"prompt": state.tokenizer.decode(body.tokens)}

    @app.get("/tokenizer_info", dependencies=auth)
    async def tokenizer_info() -> dict[str, Any]:
        tokenizer, template = state.tokenizer, lm.chat_template
        eos = tokenizer.eos_id
        return {
            "tokenizer_class": type(tokenizer).__name__,
            "eos_token": tokenizer.decode([eos]) if eos is not None else None,
            "bos_token": None,
            "pad_token": None,
            "chat_template": template.source if template is not None else None,
            "model_max_length": state.context,
        }

    for router in routers:
        app.include_router(
            router if hasattr(router, "routes") else router(state), dependencies=auth
        )
    if (STATIC / "index.html").is_file():
        app.mount("/static", StaticFiles(directory=STATIC), name="static")

        @app.get("/", include_in_schema=False)
        async def page():
            return RedirectResponse("/static/index.html")

    return app


# ----------------------------------------------------------------------------- checks


async def _require_key(request: Request) -> None:
    key = request.app.state.api_key
    if not key:
        return
    given = request.headers.get("authorization", "")
    scheme, _, token = given.partition(" ")
    if scheme.lower() != "bearer" or not secrets.compare_digest(token.strip(), key):
        raise APIError(
            401,
            "missing or wrong API key: send the header 'Authorization: Bearer <key>' with the "
            "key the server was started with (--api_key or LMLAB_API_KEY)",
            code="invalid_api_key",
        )


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def api_error(request: Request, e: APIError):
        headers = {"WWW-Authenticate": "Bearer"} if e.status == 401 else None
        return e.response(headers)

    @app.exception_handler(RequestValidationError)
    async def invalid_body(request: Request, e: RequestValidationError):
        return validation_error(e).response()

    @app.exception_handler(LMLabError)
    async def library_error(request: Request, e: LMLabError):
        return APIError(400, str(e), _param_of(e)).response()

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(e.status_code)
        message = f"{request.method} {request.url.path}: {e.detail}"
        return APIError(e.status_code, message, code=code).response(getattr(e, "headers", None))

    @app.exception_handler(Exception)
    async def internal_error(request: Request, e: Exception):
        message = f"internal error: {type(e).__name__}: {e}"
        return APIError(500, message, kind="server_error").response()


def _param_of(e: Exception) -> str | None:
    """The request field a library error is about ("top_p=1.5 is invalid" -> "top_p")."""
    match = re.match(r"(\w+)=", str(e))
    if match:
        return API_NAMES.get(match.group(1), match.group(1))
    return "prompt" if str(e).startswith("prompt") else None


def _check_model(model: str | None, state: Any) -> None:
    if model is not None and model != state.model_name:
        raise APIError(
            404,
            f"model {model!r} is not served here; this server serves {state.model_name!r}",
            "model",
            code="model_not_found",
        )


def _check_ids(ids: list[int], state: Any, what: str) -> None:
    try:
        check_ids(ids, state.vocab_size, what)
    except DecodingError as e:
        raise APIError(400, str(e), what.split()[0]) from e


def _encode(state: Any, text: str, what: str) -> list[int]:
    try:
        return state.tokenizer.encode(text)
    except LMLabError as e:
        raise APIError(400, f"{what}: {e}", what.split()[0]) from e


def _prompts(prompt: Any, state: Any) -> list[tuple[list[int], str | None]]:
    """(token ids, text or None) per prompt; OpenAI's four prompt forms."""
    if isinstance(prompt, str):
        prompts: list[Any] = [prompt]
    elif prompt and all(isinstance(x, int) for x in prompt):
        prompts = [prompt]
    else:
        prompts = list(prompt)
    if not prompts:
        raise APIError(400, "prompt is an empty list: give at least one prompt", "prompt")
    out = []
    for i, p in enumerate(prompts):
        what = "prompt" if len(prompts) == 1 else f"prompt {i}"
        ids = _encode(state, p, what) if isinstance(p, str) else list(p)
        if not ids:
            raise APIError(400, f"{what} is empty: the model needs at least one token", "prompt")
        _check_ids(ids, state, what)
        out.append((ids, p if isinstance(p, str) else None))
    return out


def _choice_params(params, n: int):
    """The sampling settings of a request's ``n`` choices: choice k draws with seed + k (a
    request without a seed stays unseeded)."""
    for k in range(n):
        seed = None if params.seed is None else (params.seed + k) % 2**63
        yield dataclasses.replace(params, seed=seed)


def _check_fits(n_prompt: int, max_tokens: int, state: Any) -> None:
    context = state.context
    if context is not None and n_prompt + max_tokens > context:
        raise APIError(
            400,
            f"this model's context is {context} tokens, but the request needs "
            f"{n_prompt + max_tokens} ({n_prompt} in the prompt, max_tokens={max_tokens}); "
            "shorten the prompt or lower max_tokens",
            "max_tokens" if n_prompt < context else "prompt",
            code="context_length_exceeded",
        )


def _sampling(body: Any, max_tokens: int, state: Any) -> tuple[SamplingParams, dict[int, float]]:
    """The library's SamplingParams for a request (its validator decides), and logit_bias."""
    for field in ("presence_penalty", "frequency_penalty"):
        if getattr(body, field) not in (None, 0, 0.0):
            raise APIError(400, f"{field} is not supported; leave it out or 0", field)
    if not 1 <= body.n <= MAX_CHOICES:
        raise APIError(400, f"n={body.n} is invalid: must be in 1..{MAX_CHOICES}", "n")
    values = {
        "max_new_tokens": max(max_tokens, 1),  # 0 is allowed here: prompt scores only
        "temperature": 1.0 if body.temperature is None else body.temperature,
        "top_p": 1.0 if body.top_p is None else body.top_p,
        "top_k": 0 if body.top_k is None else body.top_k,
        "seed": body.seed,
        "stop": body.stop if body.stop is not None else (),
        "stop_ids": tuple(body.stop_token_ids or ()),
        "eos_id": state.tokenizer.eos_id,
        "repetition_penalty": 1.0 if body.repetition_penalty is None else body.repetition_penalty,
    }
    try:
        params = SamplingParams(**values)
    except DecodingError as e:
        raise APIError(400, str(e), _param_of(e)) from e
    _check_ids(list(params.stop_ids), state, "stop_token_ids")
    bias = {}
    for key, value in (body.logit_bias or {}).items():
        if not re.fullmatch(r"\d{1,12}", key):
            raise APIError(
                400, f'logit_bias has key {key!r}; keys are token ids ("42")', "logit_bias"
            )
        _check_ids([int(key)], state, "logit_bias")
        if not (math.isfinite(value) and -100 <= value <= 100):
            raise APIError(
                400, f"logit_bias[{key}]={value} is invalid: must be in [-100, 100]", "logit_bias"
            )
        bias[int(key)] = float(value)
    return params, bias


def _stop_ids(params: SamplingParams, body: Any, extra: int | None = None) -> tuple[int, ...]:
    """The ids that end a sequence: stop_token_ids, eos (unless ignore_eos) and ``extra``
    (chat: the template's turn-closing token)."""
    ids = [*params.stop_ids] + ([] if body.ignore_eos else [params.eos_id, extra])
    return tuple(dict.fromkeys(i for i in ids if i is not None))


# ----------------------------------------------------------------------------- running jobs


@dataclasses.dataclass
class _Choice:
    """What one job produced, gathered from its events."""

    prompt: list[int]
    prompt_text: str | None
    text: str = ""
    tokens: list[TokenScore] = dataclasses.field(default_factory=list)
    prompt_scores: list[TokenScore | None] | None = None
    reason: str | None = None
    failed: Failed | None = None


class _Run:
    """A request's jobs in the engine, with their events handed to this event loop."""

    def __init__(self, engine: Engine, jobs: list[Job]):
        self.engine, self.jobs = engine, jobs
        loop, self.queue = asyncio.get_running_loop(), asyncio.Queue()
        for i, job in enumerate(jobs):
            job.emit = self._sink(loop, i)
        self.open = set(range(len(jobs)))

    def _sink(self, loop: asyncio.AbstractEventLoop, i: int) -> Callable:
        def emit(event) -> None:
            try:
                loop.call_soon_threadsafe(self.queue.put_nowait, (i, event))
            except RuntimeError:  # the loop is closed: nobody is listening any more
                pass

        return emit

    def start(self) -> None:
        try:
            for job in self.jobs:
                self.engine.submit(job)
        except RuntimeError as e:  # the engine is stopping (shutdown)
            self.cancel()
            raise APIError(503, f"the server is shutting down: {e}", kind="server_error") from e

    def cancel(self) -> None:
        for job in self.jobs:
            self.engine.cancel(job)

    async def events(self, request: Request | None = None) -> AsyncIterator[tuple[int, Any]]:
        """(job index, event) until every job has finished or failed. With ``request``,
        check every second whether its client has gone, and if so cancel and stop (a
        stream's client is watched by Starlette, which cancels the stream)."""
        checked = time.monotonic()
        while self.open:
            try:
                i, event = await asyncio.wait_for(self.queue.get(), 1.0)
            except asyncio.TimeoutError:
                i = None
            if request is not None and time.monotonic() - checked >= 1.0:
                checked = time.monotonic()
                if await request.is_disconnected():
                    self.cancel()
                    return
            if i is None or i not in self.open:
                continue
            if isinstance(event, Finished | Failed):
                self.open.discard(i)
            yield i, event


def _record(choice: _Choice, event: Any) -> None:
    if isinstance(event, PromptScores):
        choice.prompt_scores = event.tokens
    elif isinstance(event, NewToken):
        choice.tokens.append(event.score)
        choice.text += event.text
    elif isinstance(event, Finished):
        choice.reason = event.reason
    elif isinstance(event, Failed):
        choice.failed = event


def _raise_failed(choices: list[_Choice]) -> None:
    for choice in choices:
        if choice.failed is not None:
            status = 400 if choice.failed.user_error else 500
            kind = "invalid_request_error" if choice.failed.user_error else "server_error"
            raise APIError(status, choice.failed.message, kind=kind)


def _sse(data: Any) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


def _error_chunk(message: str, user_error: bool) -> str:
    kind = "invalid_request_error" if user_error else "server_error"
    return _sse(APIError(400 if user_error else 500, message, kind=kind).body())


def _usage(choices: list[_Choice], n: int) -> dict[str, int]:
    prompt = sum(len(c.prompt) for c in choices[::n])
    completion = sum(len(c.tokens) for c in choices)
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }


def _streaming(run: _Run, chunks: AsyncIterator[str]) -> StreamingResponse:
    """An SSE response of ``chunks``; the run is cancelled however the stream ends."""

    async def body() -> AsyncIterator[str]:
        try:
            async for chunk in chunks:
                yield chunk
        finally:
            run.cancel()

    return StreamingResponse(
        body(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"}
    )


# ----------------------------------------------------------------------------- completions


async def _completions(body: CompletionRequest, request: Request):
    state = request.app.state
    _check_model(body.model, state)
    for field, allowed in (("suffix", None), ("best_of", (None, body.n))):
        value = getattr(body, field)
        if value is not None and (allowed is None or value not in allowed):
            raise APIError(400, f"{field} is not supported (got {value!r})", field)
    max_tokens = 16 if body.max_tokens is None else body.max_tokens
    if max_tokens < 0:
        raise APIError(400, f"max_tokens={max_tokens} is invalid: must be >= 0", "max_tokens")
    if body.logprobs is not None and not 0 <= body.logprobs <= MAX_LOGPROBS:
        raise APIError(
            400, f"logprobs={body.logprobs} is invalid: must be in 0..{MAX_LOGPROBS}", "logprobs"
        )
    params, bias = _sampling(body, max_tokens, state)
    prompts = _prompts(body.prompt, state)
    if len(prompts) * body.n > MAX_CHOICES:
        raise APIError(400, f"{len(prompts)} prompts x n={body.n} is more than {MAX_CHOICES}", "n")
    for ids, _ in prompts:
        _check_fits(len(ids), max_tokens, state)
    want = body.logprobs is not None
    jobs, choices = [], []
    for ids, text in prompts:
        for job_params in _choice_params(params, body.n):
            jobs.append(
                Job(
                    ids,
                    job_params,
                    max_tokens,
                    emit=None,
                    top_logprobs=body.logprobs or 0,
                    prompt_logprobs=(body.logprobs or 0) if want and body.echo else None,
                    logit_bias=bias,
                    stop_ids=_stop_ids(job_params, body),
                )
            )
            choices.append(_Choice(ids, text))
    run = _Run(state.engine, jobs)
    run.start()
    meta = {
        "id": f"cmpl-{uuid.uuid4().hex}",
        "object": "text_completion",
        "created": int(time.time()),
        "model": state.model_name,
    }
    if body.stream:
        include_usage = body.stream_options is not None and body.stream_options.include_usage
        chunks = _completion_chunks(run, choices, body, meta, include_usage, state)
        return _streaming(run, chunks)
    try:
        async for i, event in run.events(request):
            _record(choices[i], event)
    finally:
        run.cancel()
    _raise_failed(choices)
    out = []
    for index, choice in enumerate(choices):
        text = choice.text
        if body.echo:
            text = _prompt_text(choice, state) + text
        logprobs = _completion_logprobs(choice, body.echo, state) if want else None
        out.append(
            {"index": index, "text": text, "logprobs": logprobs, "finish_reason": choice.reason}
        )
    return {**meta, "choices": out, "usage": _usage(choices, body.n)}


async def _completion_chunks(run, choices, body, meta, include_usage, state):
    want = body.logprobs is not None
    for index, choice in enumerate(choices):
        if body.echo and not want:
            yield _sse(_completion_chunk(meta, index, _prompt_text(choice, state), None, None))
    async for i, event in run.events():
        choice = choices[i]
        _record(choice, event)
        if isinstance(event, PromptScores):
            logprobs = _lp_completion(choice.prompt, event.tokens, 0, state)
            yield _sse(_completion_chunk(meta, i, _prompt_text(choice, state), logprobs, None))
        elif isinstance(event, NewToken) and (event.text or want):
            logprobs = _lp_completion([event.score.id], [event.score], 0, state) if want else None
            yield _sse(_completion_chunk(meta, i, event.text, logprobs, None))
        elif isinstance(event, Finished):
            yield _sse(_completion_chunk(meta, i, "", None, event.reason))
        elif isinstance(event, Failed):
            yield _error_chunk(event.message, event.user_error)
    if include_usage:
        yield _sse({**meta, "choices": [], "usage": _usage(choices, body.n)})
    yield "data: [DONE]\n\n"


def _completion_chunk(meta, index, text, logprobs, reason) -> dict[str, Any]:
    choice = {"index": index, "text": text, "logprobs": logprobs, "finish_reason": reason}
    return {**meta, "choices": [choice]}


def _prompt_text(choice: _Choice, state: Any) -> str:
    if choice.prompt_text is not None:
        return choice.prompt_text
    return state.tokenizer.decode(choice.prompt)


def _completion_logprobs(choice: _Choice, echo: bool, state: Any) -> dict[str, Any]:
    ids = [t.id for t in choice.tokens]
    scores: list[TokenScore | None] = list(choice.tokens)
    start = 0
    if echo:
        ids = choice.prompt + ids
        scores = list(choice.prompt_scores or [None] * len(choice.prompt)) + scores
    else:
        start = len(_prompt_text(choice, state))
    return _lp_completion(ids, scores, start, state)


def _lp_completion(ids, scores, start: int, state: Any) -> dict[str, Any]:
    """The completions ``logprobs`` object: each token's text, log-probability, top
    alternatives ({text: logprob}, the token itself included) and character offset (the
    sum of the texts before it, from ``start``)."""
    decode = state.tokenizer.decode
    tokens = [decode([i]) for i in ids]
    offsets, at = [], start
    for text in tokens:
        offsets.append(at)
        at += len(text)
    tops = []
    for score in scores:
        if score is None:
            tops.append(None)
            continue
        top = {decode([i]): lp for i, lp in score.top}
        top.setdefault(decode([score.id]), score.logprob)
        tops.append(top)
    return {
        "tokens": tokens,
        "token_logprobs": [None if s is None else s.logprob for s in scores],
        "top_logprobs": tops,
        "text_offset": offsets,
    }


# ----------------------------------------------------------------------------- chat


def _render_chat(state: Any, messages: list[Any], add_generation_prompt: bool = True) -> str:
    template = state.lm.chat_template
    if template is None:
        raise APIError(
            400,
            f"model {state.model_name!r} has no chat template, so it cannot chat: use "
            "/v1/completions, or serve an instruction-tuned model (e.g. smollm2)",
            "messages",
        )
    plain = []
    for i, m in enumerate(messages):
        message = m.model_dump(exclude_none=True)
        content = message.get("content", "")
        if isinstance(content, list):  # OpenAI's content parts: text only
            texts = []
            for part in content:
                if part.get("type") != "text" or not isinstance(part.get("text"), str):
                    raise APIError(
                        400,
                        f"messages.{i}.content: only text parts ({{'type': 'text', 'text': "
                        f"...}}) are supported, got {str(part)[:80]}",
                        "messages",
                    )
                texts.append(part["text"])
            content = "".join(texts)
        message["content"] = content
        plain.append(message)
    try:
        return template.render(check_messages(plain), add_generation_prompt=add_generation_prompt)
    except LMLabError as e:
        raise APIError(400, str(e), "messages") from e


async def _chat(body: ChatRequest, request: Request):
    state = request.app.state
    _check_model(body.model, state)
    ids = _encode(state, _render_chat(state, body.messages), "messages")
    _check_ids(ids, state, "messages")
    max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else None
    max_tokens = body.max_tokens if max_tokens is None else max_tokens
    if max_tokens is None:  # OpenAI: up to the context
        context = state.context
        max_tokens = context - len(ids) if context is not None else DEFAULT_MAX_NEW_TOKENS
        max_tokens = max(max_tokens, 1)
    if max_tokens < 1:
        raise APIError(400, f"max_tokens={max_tokens} is invalid: must be >= 1", "max_tokens")
    top = body.top_logprobs
    if top is not None and not (body.logprobs and 0 <= top <= MAX_LOGPROBS):
        raise APIError(
            400,
            f"top_logprobs={top} is invalid: must be in 0..{MAX_LOGPROBS}, with logprobs true",
            "top_logprobs",
        )
    params, bias = _sampling(body, max_tokens, state)
    _check_fits(len(ids), max_tokens, state)
    end = turn_end_id(state.tokenizer, state.lm.chat_template)
    jobs, choices = [], []
    for job_params in _choice_params(params, body.n):
        jobs.append(
            Job(
                ids,
                job_params,
                max_tokens,
                emit=None,
                top_logprobs=top or 0,
                logit_bias=bias,
                stop_ids=_stop_ids(job_params, body, end),
            )
        )
        choices.append(_Choice(ids, None))
    run = _Run(state.engine, jobs)
    run.start()
    meta = {
        "id": f"chatcmpl-{uuid.uuid4().hex}",
        "created": int(time.time()),
        "model": state.model_name,
    }
    if body.stream:
        include_usage = body.stream_options is not None and body.stream_options.include_usage
        return _streaming(run, _chat_chunks(run, choices, body, meta, include_usage, state))
    try:
        async for i, event in run.events(request):
            _record(choices[i], event)
    finally:
        run.cancel()
    _raise_failed(choices)
    out = []
    for index, choice in enumerate(choices):
        logprobs = {"content": _lp_chat(choice.tokens, state)} if body.logprobs else None
        message = {"role": "assistant", "content": choice.text}
        out.append(
            {
                "index": index,
                "message": message,
                "logprobs": logprobs,
                "finish_reason": choice.reason,
            }
        )
    meta["object"] = "chat.completion"
    return {**meta, "choices": out, "usage": _usage(choices, body.n)}


async def _chat_chunks(run, choices, body, meta, include_usage, state):
    meta = {**meta, "object": "chat.completion.chunk"}

    def chunk(index, delta, logprobs=None, reason=None):
        choice = {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": reason}
        return _sse({**meta, "choices": [choice]})

    for index in range(len(choices)):
        yield chunk(index, {"role": "assistant", "content": ""})
    async for i, event in run.events():
        _record(choices[i], event)
        if isinstance(event, NewToken) and (event.text or body.logprobs):
            logprobs = {"content": _lp_chat([event.score], state)} if body.logprobs else None
            yield chunk(i, {"content": event.text}, logprobs)
        elif isinstance(event, Finished):
            yield chunk(i, {}, reason=event.reason)
        elif isinstance(event, Failed):
            yield _error_chunk(event.message, event.user_error)
    if include_usage:
        yield _sse({**meta, "choices": [], "usage": _usage(choices, body.n)})
    yield "data: [DONE]\n\n"


def _lp_chat(scores: list[TokenScore], state: Any) -> list[dict[str, Any]]:
    """The chat ``logprobs.content`` list: token, logprob, UTF-8 bytes, top alternatives."""
    decode = state.tokenizer.decode

    def entry(token: int, logprob: float) -> dict[str, Any]:
        text = decode([token])
        return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}

    return [
        {**entry(s.id, s.logprob), "top_logprobs": [entry(i, lp) for i, lp in s.top]}
        for s in scores
    ]
