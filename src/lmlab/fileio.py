"""Atomic file writes: a crash mid-write leaves the previous file, never half of one.

Write to a temporary name in the same directory (so the rename stays on one filesystem),
then ``os.replace`` it over the target in one step.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any


def atomic_write_text(file: str | os.PathLike, text: str) -> None:
    file = Path(file)
    file.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=file.parent, prefix=f".{file.name}.", suffix=".tmp")
    try:
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give what open() would
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, file)
    except BaseException:
        os.unlink(tmp)
        raise


def atomic_write_json(file: str | os.PathLike, obj: Any, indent: int = 2) -> None:
    atomic_write_text(file, json.dumps(obj, indent=indent) + "\n")


def atomic_write_bytes(file: str | os.PathLike, data: bytes) -> None:
    file = Path(file)
    file.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=file.parent, prefix=f".{file.name}.", suffix=".tmp")
    try:
        os.chmod(tmp, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, file)
    except BaseException:
        os.unlink(tmp)
        raise


def _umask() -> int:
    mask = os.umask(0)  # reading the umask means setting it: put it straight back
    os.umask(mask)
    return mask
