"""Preference data: (prompt, chosen, rejected) triples for reward models, DPO and PPO.

One JSON object a line, the shape TRL and most public preference sets use::

    {"prompt": "What is 2 + 2?", "chosen": "4", "rejected": "5"}

The conversational form is accepted too: ``prompt`` a list of messages (optionally a
system message, then user and assistant turns, ending with the user's), ``chosen`` and
``rejected`` a string or a one-message list ``[{"role": "assistant", "content": ...}]``.
Any other key (``source``, ``judge``, ``prompt_id``, ...) is kept in ``meta``.

Files are written two ways, both crash-safe (RELIABILITY item 26):
- ``write_preferences``: a whole file at once, atomically;
- ``PreferenceLog``: one pair at a time (a ranking session), each line flushed and fsynced
  as it is recorded; reopening a log whose last line a crash cut short drops that line with
  a warning and keeps every complete one.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lmlab.data.chat import check_messages
from lmlab.data.instructions import read_rows
from lmlab.errors import DataError
from lmlab.fileio import atomic_write_text

log = logging.getLogger(__name__)

FIELDS = ("prompt", "chosen", "rejected")
EXPECTED = "expected 'prompt', 'chosen' and 'rejected' (strings, or chat messages)"

Prompt = str | tuple[dict[str, str], ...]


@dataclass(frozen=True)
class PreferencePair:
    """One judgement: ``chosen`` is preferred to ``rejected`` as the reply to ``prompt``."""

    prompt: Prompt
    """The prompt text, or the conversation so far (messages ending with the user's)."""
    chosen: str
    rejected: str
    meta: Mapping[str, Any] = field(default_factory=dict)
    """Every other key of the line (where it came from, who judged, ...)."""

    def to_row(self) -> dict[str, Any]:
        prompt = self.prompt if isinstance(self.prompt, str) else list(self.prompt)
        return {"prompt": prompt, "chosen": self.chosen, "rejected": self.rejected, **self.meta}


def pair_from_row(row: Mapping[str, Any], where: str = "row") -> PreferencePair:
    """A ``PreferencePair`` from one JSON object; ``where`` (``file:line``) names it in errors."""
    missing = [k for k in FIELDS if k not in row]
    if missing:
        raise DataError(
            f"{where}: missing {', '.join(map(repr, missing))}; {EXPECTED}; "
            f"the line has keys {sorted(row)}"
        )
    prompt = row["prompt"]
    if isinstance(prompt, list):
        messages = _messages(prompt, where, "prompt")
        if not messages or messages[-1]["role"] != "user":
            raise DataError(
                f"{where}: a conversational prompt must end with a user message, got roles "
                f"{[m['role'] for m in messages]}"
            )
        prompt = tuple(messages)
    elif not isinstance(prompt, str):
        raise DataError(
            f"{where}: 'prompt' must be a string or a list of messages, got {type(prompt).__name__}"
        )
    replies = [_reply(row[key], where, key) for key in ("chosen", "rejected")]
    meta = {k: v for k, v in row.items() if k not in FIELDS}
    return PreferencePair(prompt, *replies, meta=meta)


def _messages(value: list, where: str, key: str) -> list[dict[str, str]]:
    try:
        return check_messages(value)
    except DataError as e:
        raise DataError(f"{where}: {key!r}: {e}") from e


def _reply(value: Any, where: str, key: str) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        messages = _messages(value, where, key)
        if len(messages) == 1 and messages[0]["role"] == "assistant":
            return messages[0]["content"]
        raise DataError(
            f"{where}: {key!r} as messages must be one assistant message, got roles "
            f"{[m['role'] for m in messages]}"
        )
    raise DataError(
        f"{where}: {key!r} must be a string or one assistant message, got {type(value).__name__}"
    )


def load_preferences(path: str | os.PathLike) -> list[PreferencePair]:
    """The pairs of a JSONL file (or a folder of them); errors name ``file:line``.

    A pair whose two replies are identical carries no preference: it is kept (its loss
    gradient is zero) with a warning naming the line.
    """
    pairs = []
    for where, row in read_rows(path, "preference data", EXPECTED):
        pair = pair_from_row(row, where)
        if pair.chosen == pair.rejected:
            log.warning(
                "%s: 'chosen' and 'rejected' are identical; the pair teaches nothing", where
            )
        pairs.append(pair)
    return pairs


def write_preferences(pairs: Iterable[PreferencePair], path: str | os.PathLike) -> None:
    """Write ``pairs`` as JSONL, atomically (a crash leaves the previous file)."""
    lines = [json.dumps(p.to_row(), ensure_ascii=False) + "\n" for p in pairs]
    atomic_write_text(path, "".join(lines))


class PreferenceLog:
    """An append-only preference file that survives crashes, for sessions that record one
    judgement at a time (``lmlab rank``, an AI judge).

        >>> log = PreferenceLog("prefs.jsonl")     # reads what an earlier session saved
        >>> len(log.pairs)
        12
        >>> log.append(PreferencePair("2 + 2 =", "4", "5", {"prompt_id": 7}))

    Each ``append`` writes one line, flushes and fsyncs it before returning, so a recorded
    judgement is on disk. A last line without its newline (the session died mid-write) is
    cut off when the log is reopened, with a warning; a malformed complete line is an error
    naming ``file:line``, never silently dropped.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.pairs: list[PreferencePair] = []
        if self.path.exists():
            self._recover()
            if self.path.stat().st_size:
                self.pairs = load_preferences(self.path)
        else:
            self.path.parent.mkdir(parents=True, exist_ok=True)

    def _recover(self) -> None:
        data = self.path.read_bytes()
        if data and not data.endswith(b"\n"):
            keep = data.rfind(b"\n") + 1
            log.warning(
                "%s: the last line is incomplete (an interrupted write); dropping its %d bytes",
                self.path,
                len(data) - keep,
            )
            with open(self.path, "r+b") as f:
                f.truncate(keep)
                f.flush()
                os.fsync(f.fileno())

    def append(self, pair: PreferencePair) -> None:
        line = json.dumps(pair.to_row(), ensure_ascii=False) + "\n"
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(line)
            f.flush()
            os.fsync(f.fileno())
        self.pairs.append(pair)

    def extend(self, pairs: Sequence[PreferencePair]) -> None:
        for pair in pairs:
            self.append(pair)
