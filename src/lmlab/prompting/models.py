"""One small interface for the model behind a prompt or an agent: an lmlab model, or any
OpenAI-compatible endpoint (the lmlab server, vLLM, llama.cpp's server, ...).

    model = LMCompleter(lmlab.load("smollm2"))             # or
    model = OpenAICompleter("http://127.0.0.1:8000/v1", "smollm2")
    model.complete(["Q: 2+3?\\nA:"], max_tokens=8, stop=["\\n"])      # -> ["5"]
    model.chat([{"role": "user", "content": "2+3?"}], max_tokens=8)  # -> "5"

Prompting and agent code call only ``complete`` and ``chat``, so every method runs the
same against a local model and a served one, and a ``ReplayCompleter`` can stand in with
recorded replies so that a saved run replays exactly.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Sequence
from typing import Any, Protocol

from lmlab.errors import ConfigError, DataError
from lmlab.generate.params import SamplingParams
from lmlab.generate.search import generate_text
from lmlab.lm import LM
from lmlab.models.contract import require_causal_lm

Message = dict[str, str]


class Completer(Protocol):
    """What prompting and agents need of a model."""

    name: str

    def complete(
        self,
        prompts: Sequence[str],
        max_tokens: int = 256,
        temperature: float = 0.0,
        stop: Sequence[str] = (),
        seed: int | None = None,
    ) -> list[str]:
        """One continuation per prompt (prompt excluded, cut before the first stop string)."""
        ...

    def chat(
        self,
        messages: Sequence[Message],
        max_tokens: int = 256,
        temperature: float = 0.0,
        stop: Sequence[str] = (),
        seed: int | None = None,
    ) -> str:
        """The assistant's reply to a conversation, in the model's chat format."""
        ...


class LMCompleter:
    """An lmlab model (``lmlab.load(...)``) behind the Completer interface. Prompts are
    decoded together in one batch; ``temperature`` 0 is greedy."""

    def __init__(self, lm: LM, name: str | None = None):
        require_causal_lm(lm.model, "prompting")
        self.lm = lm
        self.name = name or str(lm.config.get("path", "lmlab-model"))

    def _params(self, max_tokens, temperature, stop, seed) -> SamplingParams:
        return SamplingParams(
            max_new_tokens=max_tokens,
            temperature=temperature,
            do_sample=temperature > 0,
            stop=tuple(stop),
            seed=seed,
            eos_id=getattr(self.lm.tokenizer, "eos_id", None),
        )

    def complete(self, prompts, max_tokens=256, temperature=0.0, stop=(), seed=None):
        params = self._params(max_tokens, temperature, stop, seed)
        return list(generate_text(self.lm.model, self.lm.tokenizer, list(prompts), params))

    def render(self, messages: Sequence[Message]) -> str:
        """The conversation as the model's prompt (its chat template, or a plain layout)."""
        if self.lm.chat_template is not None:
            return self.lm.chat_template.render(
                [dict(m) for m in messages], add_generation_prompt=True
            )
        lines = [f"{m['role'].capitalize()}: {m['content']}" for m in messages]
        return "\n".join(lines) + "\nAssistant:"

    def chat(self, messages, max_tokens=256, temperature=0.0, stop=(), seed=None):
        return self.complete([self.render(messages)], max_tokens, temperature, stop, seed)[0]


class OpenAICompleter:
    """An OpenAI-compatible HTTP endpoint (``base_url`` ends in ``/v1``), standard library
    only. Errors (unreachable server, an HTTP error, a malformed reply) are one line."""

    def __init__(self, base_url: str, model: str, api_key: str = "none", timeout: float = 120.0):
        if not base_url.startswith(("http://", "https://")):
            raise ConfigError(f"base_url must start with http:// or https://, got {base_url!r}")
        self.base_url, self.name, self.api_key, self.timeout = (
            base_url.rstrip("/"),
            model,
            api_key,
            timeout,
        )

    def _post(self, route: str, body: dict[str, Any]) -> dict[str, Any]:
        request = urllib.request.Request(
            f"{self.base_url}/{route}",
            data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json", "Authorization": f"Bearer {self.api_key}"},
        )
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                return json.loads(response.read())
        except urllib.error.HTTPError as e:
            detail = e.read()[:300].decode("utf-8", "replace")
            raise DataError(f"{self.base_url}/{route} answered HTTP {e.code}: {detail}") from None
        except (urllib.error.URLError, TimeoutError, OSError) as e:
            raise DataError(f"cannot reach {self.base_url}/{route}: {e}") from None
        except ValueError:
            raise DataError(f"{self.base_url}/{route} did not answer JSON") from None

    def _options(self, max_tokens, temperature, stop, seed) -> dict[str, Any]:
        options = {"model": self.name, "max_tokens": max_tokens, "temperature": temperature}
        if stop:
            options["stop"] = list(stop)
        if seed is not None:
            options["seed"] = seed
        return options

    def complete(self, prompts, max_tokens=256, temperature=0.0, stop=(), seed=None):
        prompts = list(prompts)
        body = {"prompt": prompts, **self._options(max_tokens, temperature, stop, seed)}
        choices = self._post("completions", body).get("choices")
        try:
            ordered = sorted(choices, key=lambda c: c.get("index", 0))
            texts = [c["text"] for c in ordered]
        except (TypeError, KeyError, AttributeError):
            raise DataError(
                f"{self.base_url}/completions: no choices[].text in the reply"
            ) from None
        if len(texts) != len(prompts):
            raise DataError(
                f"{self.base_url}/completions: {len(texts)} choices for {len(prompts)} prompts"
            )
        return texts

    def chat(self, messages, max_tokens=256, temperature=0.0, stop=(), seed=None):
        body = {"messages": list(messages), **self._options(max_tokens, temperature, stop, seed)}
        reply = self._post("chat/completions", body)
        try:
            return reply["choices"][0]["message"]["content"]
        except (TypeError, KeyError, IndexError):
            raise DataError(
                f"{self.base_url}/chat/completions: no choices[0].message.content"
            ) from None


class ReplayCompleter:
    """Answers with recorded replies, in order: a saved run replays exactly, offline."""

    def __init__(self, replies: Sequence[str], name: str = "replay"):
        self.replies, self.name, self.calls = list(replies), name, 0

    def _next(self) -> str:
        if self.calls >= len(self.replies):
            raise DataError(
                f"the recording holds {len(self.replies)} replies and the run asked for more: "
                "it no longer matches the program that made it"
            )
        self.calls += 1
        return self.replies[self.calls - 1]

    def complete(self, prompts, max_tokens=256, temperature=0.0, stop=(), seed=None):
        return [self._next() for _ in prompts]

    def chat(self, messages, max_tokens=256, temperature=0.0, stop=(), seed=None):
        return self._next()
