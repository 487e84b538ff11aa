"""The OpenAI request bodies (pydantic) and the error object every failure answers with.

Fields are checked strictly (a string is not a number, true is not 1) and unknown fields
are refused with their name, as OpenAI's API does; ranges and token ids are checked by
the library afterwards (``app.py``: ``SamplingParams`` and ``check_ids``), so a setting is
valid here exactly when ``lmlab generate`` takes it. Extensions beyond OpenAI's fields, as
vLLM names them: ``top_k``, ``repetition_penalty``, ``stop_token_ids``.

Every error is OpenAI's shape, with an HTTP status in the 4xx for the caller's mistakes::

    {"error": {"message": "top_p=1.5 is invalid: must be in (0, 1]",
               "type": "invalid_request_error", "param": "top_p", "code": null}}
"""

from __future__ import annotations

from typing import Any

from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError


class APIError(Exception):
    """An error answered with OpenAI's error object and ``status``."""

    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        code: str | None = None,
        kind: str = "invalid_request_error",
    ):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = (
            status,
            message,
            param,
            code,
            kind,
        )

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.kind,
                "param": self.param,
                "code": self.code,
            }
        }

    def response(self, headers: dict[str, str] | None = None) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=headers)


def validation_error(e: ValidationError | Any) -> APIError:
    """pydantic's (or FastAPI's) validation errors -> one 400 naming the first bad field."""
    errors = e.errors() if hasattr(e, "errors") else []
    if not errors:
        return APIError(400, "invalid request body")
    first = errors[0]
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    if first.get("type") == "json_invalid":
        return APIError(400, f"the body is not valid JSON: {first.get('msg')}", code="json_invalid")
    where = ".".join(loc) or "body"
    message = first.get("msg", "invalid value")
    if first.get("type") == "extra_forbidden":
        message = "unknown field (not an OpenAI request field this server supports)"
    elif first.get("type") == "missing":
        message = "this field is required"
    more = f" (and {len(errors) - 1} more problems)" if len(errors) > 1 else ""
    return APIError(400, f"{where}: {message}{more}", param=loc[0] if loc else None)


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    include_usage: bool = False


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    model: str | None = None
    """Must name the served model when given (``GET /v1/models``)."""
    temperature: float | None = None
    """0 = greedy; default 1."""
    top_p: float | None = None
    top_k: int | None = None
    """Extension: keep the k most likely tokens; 0 (default) = off."""
    n: int = 1
    """Choices per prompt."""
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    seed: int | None = None
    logit_bias: dict[str, float] | None = None
    """Token id (as a string, JSON keys are) -> bias added to its logit, in [-100, 100]."""
    repetition_penalty: float | None = None
    ignore_eos: bool = False
    """Extension (vLLM's): keep generating past the end-of-text token (benchmarks)."""
    presence_penalty: float | None = None
    """Accepted only as 0 (not implemented)."""
    frequency_penalty: float | None = None
    """Accepted only as 0 (not implemented)."""
    user: str | None = None


class CompletionRequest(_Request):
    prompt: str | list[str] | list[int] | list[list[int]]
    """A string, token ids, or a list of either (one choice set per prompt)."""
    max_tokens: int | None = 16
    """OpenAI's default is 16; 0 generates nothing (with echo and logprobs: the prompt's
    log-likelihood, as lm-evaluation-harness asks)."""
    echo: bool = False
    logprobs: int | None = None
    """Report log-probabilities, with this many alternatives per token (0..20)."""
    best_of: int | None = None
    """Accepted only as None or n."""
    suffix: str | None = None
    """Accepted only as None."""


class Message(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)

    role: str
    content: str | list[dict[str, Any]] | None = None


class ChatRequest(_Request):
    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = None
    """None: up to the context."""
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None


class TokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    model: str | None = None
    prompt: str | None = None
    messages: list[Message] | None = None
    add_special_tokens: bool = True
    add_generation_prompt: bool = True


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    model: str | None = None
    tokens: list[int]
