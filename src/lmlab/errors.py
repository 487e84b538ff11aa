"""Errors that mean "the user asked for something invalid".

The CLI prints these as one line and exits with status 2 (``--debug`` shows the
traceback); any other exception is a bug in lmlab and propagates unchanged. Each
subclass also derives from the builtin a Python user would catch (``ValueError``,
``FileNotFoundError``), so library callers can keep writing ordinary ``except`` clauses.
"""

from __future__ import annotations

import difflib


class LMLabError(Exception):
    """Base class: a message meant for the user, naming what is wrong and what is valid."""


class ConfigError(LMLabError, ValueError):
    """An invalid configuration field, preset name or command-line value."""


class DataError(LMLabError, ValueError):
    """Unreadable or malformed data: a corpus, a token file, a JSONL line."""


class DataNotFoundError(LMLabError, FileNotFoundError):
    """A path the user named does not exist (or an empty folder)."""


class CheckpointError(LMLabError, ValueError):
    """A checkpoint that is missing, incomplete, corrupt or incompatible."""


class DecodingError(LMLabError, ValueError):
    """Invalid decoding settings or a prompt the model cannot take."""


def closest(name: str, valid: list[str] | tuple[str, ...]) -> str:
    """A hint like ``" (did you mean 'top_p'?)"`` for an unknown name, or ``""``."""
    match = difflib.get_close_matches(name, list(valid), n=1)
    return f" (did you mean {match[0]!r}?)" if match else ""


def pick_names(value, valid: list[str] | tuple[str, ...], what: str) -> list[str]:
    """Names given as a list or one comma-separated string -> the list, each one of
    ``valid`` and none twice; otherwise a ``ConfigError`` naming ``what`` and the choices.

    >>> pick_names(" linear, free_running", ("linear", "free_running"), "objectives")
    ['linear', 'free_running']
    """
    names = [n.strip() for n in value.split(",")] if isinstance(value, str) else list(value)
    names = [n for n in names if n]
    choices = ", ".join(valid)
    if not names:
        raise ConfigError(f"{what} is empty; valid: {choices}")
    for name in names:
        if name not in valid:
            raise ConfigError(f"{what}: unknown {name!r}{closest(name, valid)}; valid: {choices}")
    if len(set(names)) != len(names):
        raise ConfigError(f"{what}={names} names one twice")
    return names
