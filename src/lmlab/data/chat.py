"""Chat templates: turn a conversation into the one string an instruction-tuned model reads.

An instruction-tuned model was trained on conversations written in one exact format, and
it only behaves as a chat assistant when prompted in that format. The format ships with
the model as a Jinja template (``chat_template`` in a Hugging Face ``tokenizer_config.json``,
``tokenizer.chat_template`` in GGUF metadata) that receives ``messages`` (a list of
``{"role", "content"}`` dicts), ``add_generation_prompt`` and the special tokens
(``bos_token``, ``eos_token``), e.g. SmolLM2's ChatML:

    [{"role": "user", "content": "Hi"}]  ->
        <|im_start|>system
        You are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>
        <|im_start|>user
        Hi<|im_end|>
        <|im_start|>assistant         <- the generation prompt: the model writes from here

A template is code that came with a downloaded model, so it runs in Jinja's
``ImmutableSandboxedEnvironment`` (RELIABILITY.md item 17): it can read the data it is
given, but not private attributes (``''.__class__.__mro__`` and the usual escapes through
``__subclasses__`` or ``__globals__``), not mutate its inputs, and it gets no function that
touches files, the network or the process. An attempt is a ``DataError`` saying so. Like
transformers, the environment uses ``trim_blocks`` and ``lstrip_blocks``, and offers
``raise_exception(msg)`` (a template's way to reject a conversation, e.g. roles that do not
alternate), ``strftime_now(fmt)``, a ``tojson`` filter that does not escape HTML, ``{% break
%}``/``{% continue %}`` and a ``{% generation %}`` block (rendered as its body).

Parity: ``tests/data/test_chat.py`` renders SmolLM2's ChatML template, a Llama-2 template
and a whitespace-heavy one with transformers' ``apply_chat_template(..., tokenize=False)``
and asserts the same strings.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
from jinja2.exceptions import SecurityError, TemplateError, TemplateSyntaxError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from lmlab.errors import DataError, DataNotFoundError

ROLES: tuple[str, ...] = ("system", "user", "assistant", "tool")
"""The roles a message may have."""

TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
CHAT_TEMPLATE_FILE = "chat_template.jinja"  # newer Hugging Face folders keep it apart

# The special tokens transformers passes to every template (its ``special_tokens_map``).
_SPECIAL_TOKENS = (
    "bos_token",
    "eos_token",
    "unk_token",
    "sep_token",
    "pad_token",
    "cls_token",
    "mask_token",
)


class UnsafeTemplateError(DataError):
    """A chat template tried an operation the sandbox forbids (RELIABILITY.md item 17)."""


class ChatTemplate:
    """A model's chat template, compiled once in a sandbox; ``render`` makes prompts.

        >>> t = ChatTemplate("{% for m in messages %}<{{ m.role }}>{{ m.content }}"
        ...                  "{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}")
        >>> t.render([{"role": "user", "content": "Hi"}])
        '<user>Hi<assistant>'

    ``bos_token``, ``eos_token`` and any other ``special`` strings (``pad_token`` ...) are
    visible to the template under their names (None: the model has no such token).
    Raises ``DataError`` for a template with a syntax error.
    """

    def __init__(
        self,
        template: str,
        bos_token: str | None = "",
        eos_token: str | None = "",
        **special: str | None,
    ):
        if not isinstance(template, str):
            raise DataError(f"a chat template must be a string, got {type(template).__name__}")
        self.source = template
        # A token the model does not have (None) is left undefined, which renders as "".
        special = {name: value for name, value in special.items() if value is not None}
        self.special = {"bos_token": bos_token or "", "eos_token": eos_token or "", **special}
        for name, value in self.special.items():
            if not isinstance(value, str):
                raise DataError(f"{name} must be a string, got {type(value).__name__}")
        try:
            self._template = _environment().from_string(template)
        except TemplateSyntaxError as e:
            raise DataError(
                f"chat template has a syntax error at line {e.lineno}: {e.message}"
            ) from e

    @property
    def bos_token(self) -> str:
        return self.special["bos_token"]

    @property
    def eos_token(self) -> str:
        return self.special["eos_token"]

    def render(
        self, messages: list[dict[str, Any]], add_generation_prompt: bool = True, **kwargs: Any
    ) -> str:
        """The prompt text for ``messages``, ending with the assistant's turn opener when
        ``add_generation_prompt`` (what a model continues to answer).

        ``kwargs`` are more variables for the template (``tools``, ``documents``, or a
        template's own switches); they override the special tokens and must be JSON data.
        Raises ``DataError`` for a malformed message (naming its index), when the template
        rejects the conversation (``raise_exception``) or fails, and ``UnsafeTemplateError``
        when it tries something the sandbox forbids.
        """
        context = {
            "tools": None,
            "documents": None,
            **self.special,
            **{name: _plain(value, name) for name, value in kwargs.items()},
            "messages": check_messages(messages),
            "add_generation_prompt": bool(add_generation_prompt),
        }
        try:
            return self._template.render(**context)
        except _Raised as e:
            raise DataError(f"the chat template rejected the conversation: {e.message}") from e
        except SecurityError as e:
            raise UnsafeTemplateError(
                f"the chat template tried an unsafe operation and was stopped: {e}"
            ) from e
        except Exception as e:  # the template is foreign code: any failure is its own
            raise DataError(f"the chat template failed: {type(e).__name__}: {e}") from e

    def __repr__(self) -> str:
        head = self.source if len(self.source) <= 40 else self.source[:37] + "..."
        return f"ChatTemplate({head!r}, eos_token={self.eos_token!r})"

    @classmethod
    def from_tokenizer_config(
        cls, config: str | os.PathLike | Mapping[str, Any]
    ) -> ChatTemplate | None:
        """The template of a Hugging Face tokenizer config, or None when it has none.

        ``config`` is a ``tokenizer_config.json`` file, a folder holding one (or a
        ``chat_template.jinja``, which takes precedence, as in transformers), or the parsed
        dict. ``chat_template`` is a string, or a list of ``{"name", "template"}`` of which
        the one named "default" is used. Special tokens are read as strings or as
        ``{"content": ...}`` dicts.
        """
        template = None
        if isinstance(config, Mapping):
            where = "tokenizer config"
        else:
            path = Path(config)
            folder = path if path.is_dir() else path.parent
            if path.is_dir():
                path = path / TOKENIZER_CONFIG_FILE
            where = str(path)
            if (folder / CHAT_TEMPLATE_FILE).is_file():
                template = (folder / CHAT_TEMPLATE_FILE).read_text(encoding="utf-8")
            if not path.is_file():
                if template is None:
                    raise DataNotFoundError(f"tokenizer config {where!r} does not exist")
                config = {}
            else:
                try:
                    config = json.loads(path.read_text(encoding="utf-8"))
                except (json.JSONDecodeError, UnicodeDecodeError) as e:
                    raise DataError(f"{where!r} is not valid JSON: {e}") from e
                if not isinstance(config, dict):
                    raise DataError(f"{where!r} must hold a JSON object")
        if template is None:
            template = _pick_template(config.get("chat_template"), where)
        if template is None:
            return None
        special = {}
        for name in _SPECIAL_TOKENS:
            value = config.get(name)
            if isinstance(value, Mapping):  # a serialised AddedToken
                value = value.get("content")
            if isinstance(value, str):
                special[name] = value
        return cls(template, **special)

    @classmethod
    def from_gguf(cls, gguf_file: str | os.PathLike | Any) -> ChatTemplate | None:
        """The template in a GGUF file's metadata (``tokenizer.chat_template``), with its
        special tokens looked up by id in ``tokenizer.ggml.tokens``; None if it has none.

        ``gguf_file`` is a path or an open ``gguf.GGUFReader`` (opening SmolLM2's file
        takes seconds: a loader that has one should pass it).
        """
        import gguf  # deferred: only GGUF files need the reader

        if isinstance(gguf_file, gguf.GGUFReader):
            reader = gguf_file
        else:
            if not Path(gguf_file).is_file():
                raise DataNotFoundError(f"GGUF file {str(gguf_file)!r} does not exist")
            reader = gguf.GGUFReader(str(gguf_file))
        field = reader.fields.get("tokenizer.chat_template")
        if field is None:
            return None
        special = {}
        tokens = reader.fields.get("tokenizer.ggml.tokens")
        for name in ("bos", "eos", "unk", "pad"):
            id_field = reader.fields.get(f"tokenizer.ggml.{name}_token_id")
            if tokens is not None and id_field is not None:
                i = int(id_field.contents())
                if 0 <= i < len(tokens.data):
                    special[f"{name}_token"] = tokens.contents(i)
        return cls(field.contents(), **special)


def check_messages(messages: Any) -> list[dict[str, Any]]:
    """A plain copy of a conversation, or ``DataError`` naming the first bad message.

    A conversation is a list of dicts, each with a ``role`` in ``ROLES`` and a string
    ``content``; other keys (``name``, ``tool_calls``) pass through if they are JSON data.
    """
    if not isinstance(messages, list | tuple):
        raise DataError(
            f"messages must be a list of {{'role', 'content'}} dicts, got {type(messages).__name__}"
        )
    out = []
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise DataError(
                f"message {i} is a {type(message).__name__}, not a {{'role', 'content'}} dict"
            )
        role, content = message.get("role"), message.get("content")
        if role not in ROLES:
            raise DataError(f"message {i} has role {role!r}; valid roles: {', '.join(ROLES)}")
        if not isinstance(content, str):
            got = "no content" if "content" not in message else f"a {type(content).__name__}"
            raise DataError(f"message {i} ({role}) has {got}; its content must be a string")
        out.append(_plain(dict(message), f"message {i}"))
    return out


def _pick_template(value: Any, where: str) -> str | None:
    """``chat_template`` as Hugging Face stores it -> the template string (or None)."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, list):
        named = {
            t.get("name"): t.get("template")
            for t in value
            if isinstance(t, Mapping) and isinstance(t.get("template"), str)
        }
        if "default" in named:
            return named["default"]
        if len(named) == 1:
            return next(iter(named.values()))
        raise DataError(
            f"{where!r} has chat templates {sorted(map(str, named))} but none named 'default'"
        )
    raise DataError(f"{where!r}: chat_template must be a string or a list of named templates")


def _plain(value: Any, what: str) -> Any:
    """A copy of ``value`` built only from JSON types (exact str, int, float, bool, None,
    list, dict), so the template sees no object with methods the sandbox does not know."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, str):  # a subclass (an enum) may carry methods: keep the base value
        return str.__str__(value)
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, Mapping):
        return {_plain(k, what): _plain(v, what) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v, what) for v in value]
    raise DataError(
        f"{what} holds a {type(value).__name__}; chat templates take only JSON data "
        "(strings, numbers, booleans, None, lists, dicts)"
    )


# ----------------------------------------------------------------------------- environment


class _Raised(TemplateError):
    """What a template's ``raise_exception(message)`` raises."""


class _Undefined(jinja2.Undefined):
    """Jinja's lenient Undefined (a missing key renders as ""), except for the placeholder
    the sandbox returns for a forbidden attribute: printing, testing or iterating it is a
    SecurityError too, so ``{{ x.__class__ }}`` is reported, not silently blank."""

    __slots__ = ()

    def _unsafe(self) -> bool:
        return self._undefined_exception is SecurityError

    def __str__(self) -> str:
        if self._unsafe():
            self._fail_with_undefined_error()
        return super().__str__()

    def __bool__(self) -> bool:
        if self._unsafe():
            self._fail_with_undefined_error()
        return super().__bool__()

    def __iter__(self):
        if self._unsafe():
            self._fail_with_undefined_error()
        return super().__iter__()

    def __len__(self) -> int:
        if self._unsafe():
            self._fail_with_undefined_error()
        return super().__len__()

    __hash__ = jinja2.Undefined.__hash__


class _Generation(jinja2.ext.Extension):
    """``{% generation %}...{% endgeneration %}`` (transformers marks assistant tokens with
    it): rendered as its body."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.Scope(body).set_lineno(lineno)


class _Namespace(jinja2.utils.Namespace):
    """``namespace()`` that refuses underscore names (as transformers' does)."""

    def __init__(*args, **kwargs):
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _Namespace._check(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name, value):
        _Namespace._check(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check(name):
        if isinstance(name, str) and name.startswith("_"):
            raise SecurityError(f"namespace attribute {name!r} starts with an underscore")


class _Dict:
    """``dict(...)`` and ``dict.fromkeys(...)`` without handing the template the dict type."""

    def __call__(self, *args, **kwargs):
        return dict(*args, **kwargs)

    def fromkeys(self, *args, **kwargs):
        return dict.fromkeys(*args, **kwargs)


def _raise_exception(message: str):
    raise _Raised(str(message))


def _strftime_now(format: str) -> str:
    return datetime.now().strftime(format)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False) -> str:
    # transformers' filter: unlike Jinja's, it does not escape <, >, & and ' for HTML.
    return json.dumps(
        x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _environment() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True,
        lstrip_blocks=True,
        undefined=_Undefined,
        extensions=[_Generation, jinja2.ext.loopcontrols],
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["namespace"] = _Namespace
    env.globals["dict"] = _Dict()
    return env
