"""Atomic file writes: a crash mid-write leaves the previous file, never half of one.

Write to a temporary name in the same directory (so the rename stays on one filesystem),
then ``os.replace`` it over the target in one step. The file gets the permissions
``open()`` would give it (0666 less the umask, so 0644 under the usual umask 022), not
the 0600 of a ``tempfile.mkstemp`` file or of safetensors' ``save_file``.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any


def atomic_write_with(file: str | os.PathLike, write: Callable[[Path], object]) -> None:
    """Atomically create ``file`` with ``write(temporary_path)``, for libraries that write
    by path (``safetensors.torch.save_file``, ``gguf.GGUFWriter``); ordinary permissions."""
    file = Path(file)
    file.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=file.parent, prefix=f".{file.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(name)
    try:
        write(tmp)
        ordinary_permissions(tmp)  # after writing: a library may recreate the file 0600
        os.replace(tmp, file)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_text(file: str | os.PathLike, text: str) -> None:
    atomic_write_with(file, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def atomic_write_json(file: str | os.PathLike, obj: Any, indent: int = 2) -> None:
    atomic_write_text(file, json.dumps(obj, indent=indent) + "\n")


def atomic_write_bytes(file: str | os.PathLike, data: bytes) -> None:
    atomic_write_with(file, lambda tmp: tmp.write_bytes(data))


def ordinary_permissions(file: str | os.PathLike) -> None:
    """Give ``file`` the mode ``open()`` would have: 0666 less the umask (0644 usually)."""
    os.chmod(file, 0o666 & ~_umask())


def _umask() -> int:
    mask = os.umask(0)  # reading the umask means setting it: put it straight back
    os.umask(mask)
    return mask
