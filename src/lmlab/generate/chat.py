"""A multi-turn chat with an instruction-tuned model: history in, streamed reply out.

Each turn renders the whole conversation (system prompt, every earlier turn, the new user
message) with the model's own chat template and ``add_generation_prompt=True``, encodes it
(special-token text such as ``<|im_start|>`` maps to its id) and decodes until the model
closes its turn: the tokenizer's ``eos_id``, or the template's ``eos_token`` when that is a
single token of the vocabulary. The reply, without the closing token, joins the history.
Nothing is cached between turns: the model rereads the conversation each time, which is
simple and exact, and cheap at the lengths a small model's context allows.

    >>> chat = ChatSession(lm, system="Answer in one sentence.", params={"seed": 0})
    >>> for piece in chat.send("What is a language model?"):
    ...     print(piece, end="", flush=True)
    >>> chat.history      # system, user, assistant
    >>> chat.reset()      # back to the system prompt alone

Tests (``tests/generate/test_chat.py``): a tiny random model with a BPE tokenizer whose
specials are ChatML's; the streamed pieces join to the stored reply, reset, seeding.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from typing import Any

from lmlab.data.chat import check_messages
from lmlab.errors import ConfigError, DecodingError
from lmlab.generate.params import SamplingParams


class ChatSession:
    """A conversation with ``lm`` (an ``lmlab.api.LM`` whose ``chat_template`` is set).

    ``system`` is the system prompt, kept by ``reset``; ``params`` the decoding settings of
    every turn (a SamplingParams, a dict of its fields, or None for the defaults). With a
    ``seed``, every turn draws from a generator seeded alike, so a conversation replays
    exactly.
    """

    def __init__(
        self, lm: Any, system: str | None = None, params: SamplingParams | dict | None = None
    ):
        if getattr(lm, "chat_template", None) is None:
            raise ConfigError(
                "this model has no chat template, so it cannot chat: use an instruction-tuned "
                "model that ships one (e.g. smollm2), or generate to continue plain text"
            )
        if system is not None and not isinstance(system, str):
            raise ConfigError(f"system must be a string or None, got {type(system).__name__}")
        if params is None:
            params = SamplingParams()
        elif isinstance(params, dict):
            params = SamplingParams.from_dict(params)
        elif not isinstance(params, SamplingParams):
            raise DecodingError(
                f"params must be a SamplingParams, a dict or None, got {type(params).__name__}"
            )
        self.lm = lm
        self.template = lm.chat_template
        self.system = system
        self.params = params
        self.finish_reason: str | None = None
        """How the last complete reply ended: "stop" (the model closed its turn) or "length"."""
        self.compile_seconds = 0.0
        """Seconds the last complete reply spent compiling the decoding step (compile=True)."""
        self._messages: list[dict[str, str]] = []
        self.reset()

    @property
    def history(self) -> list[dict[str, str]]:
        """A copy of the conversation: the system message (if any), then user and assistant
        turns in order; a reply joins only once it is complete."""
        return [dict(m) for m in self._messages]

    def reset(self) -> None:
        """Forget every turn; the system prompt stays."""
        self._messages = [{"role": "system", "content": self.system}] if self.system else []
        self.finish_reason = None

    def prompt(self, text: str) -> str:
        """The text the model reads when ``text`` is the next user message."""
        messages = self._messages + [{"role": "user", "content": text}]
        return self.template.render(check_messages(messages), add_generation_prompt=True)

    def send(self, text: str) -> Iterator[str]:
        """Stream the assistant's reply to ``text``: text pieces that join to the reply.

        Checks happen at the call, before any token is generated: a non-string message, a
        conversation that does not fit the model's context with ``max_new_tokens``
        (``DecodingError``; ``reset()`` starts over). The exchange joins the history when
        the iterator is exhausted; one abandoned early (Ctrl-C) leaves the history as it was.
        """
        if not isinstance(text, str):
            raise DecodingError(f"a message must be a string, got {type(text).__name__}")
        prompt = self.prompt(text)
        decoding = self._decoding()
        self._check_fits(prompt)
        if self.params.num_beams > 1:  # beam search knows its best beam only at the end
            stream = None
            pieces: Iterator[str] = iter([self.lm.generate(prompt, **decoding)])
        else:
            stream = self.lm.stream(prompt, **decoding)
            pieces = stream
        return self._reply(text, pieces, stream)

    def ask(self, text: str) -> str:
        """The whole reply to ``text`` at once (``"".join(send(text))``)."""
        return "".join(self.send(text))

    def _reply(self, text: str, pieces: Iterator[str], stream) -> Iterator[str]:
        reply = []
        for piece in pieces:
            reply.append(piece)
            yield piece
        self._messages += [
            {"role": "user", "content": text},
            {"role": "assistant", "content": "".join(reply)},
        ]
        self.finish_reason = stream.finish_reason if stream is not None else None
        self.compile_seconds = stream.compile_seconds if stream is not None else 0.0

    def _decoding(self) -> dict[str, Any]:
        """The SamplingParams fields for ``lm.stream``: eos_id from the tokenizer when unset,
        plus the template's eos_token as a stop id when it is one token of the vocabulary."""
        decoding = {f.name: getattr(self.params, f.name) for f in dataclasses.fields(self.params)}
        if decoding["eos_id"] is None:
            decoding["eos_id"] = getattr(self.lm.tokenizer, "eos_id", None)
        end = turn_end_id(self.lm.tokenizer, self.template)
        if end is not None and end != decoding["eos_id"]:
            decoding["stop_ids"] = tuple(dict.fromkeys((*decoding["stop_ids"], end)))
        return decoding

    def _check_fits(self, prompt: str) -> None:
        context = getattr(getattr(self.lm.model, "config", None), "max_seq_len", None)
        if context is None:
            return
        n, max_new = len(self.lm.tokenizer.encode(prompt)), self.params.max_new_tokens
        if n + max_new > context:
            # Cutting the prompt's oldest tokens (truncate_prompt) would cut the template's
            # opening and the system prompt, so a chat never does it.
            raise DecodingError(
                f"the conversation is {n} tokens with the chat template, and with "
                f"max_new_tokens={max_new} that is {n + max_new} > the model's context of "
                f"{context} tokens (max_seq_len); reset the chat, send a shorter message, "
                f"or lower max_new_tokens (truncate_prompt does not apply to a chat)"
            )


def turn_end_id(tokenizer: Any, template: Any) -> int | None:
    """The id of the chat template's ``eos_token`` (``<|im_end|>`` in ChatML), which closes
    the assistant's turn, when that text is one token of the vocabulary; else None. Used by
    ``ChatSession`` and the HTTP server (``lmlab.serve``) alike."""
    end = template.eos_token
    if not end:
        return None
    ids = tokenizer.encode(end)
    return ids[0] if len(ids) == 1 else None
