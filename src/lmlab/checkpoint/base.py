"""Base references: a PEFT checkpoint names the model it adapts instead of copying it.

A LoRA run on SmolLM2 trains 1.8 MB of tensors over a 540 MB frozen base. Its checkpoints
store only the trained tensors (``checkpoint.io`` saves the parameters that require
gradients) and, in config.json, where the base comes from::

    "base": {"source": "smollm2",                      the name or path the user gave
             "path": "/.../SmolLM2-135M-Instruct.Q4_1.gguf",   where it resolved to
             "sha256": "9f3c...",                      of the base's weight files
             "hashed": ["SmolLM2-135M-Instruct.Q4_1.gguf"]}

The hash is sha256 over the bytes of the base's weight files, read in the order listed
in ``hashed``: the ``.gguf`` file; an HF folder's ``*.safetensors`` files sorted by name;
an lmlab checkpoint's ``model.safetensors`` (a run directory: its newest complete
checkpoint's). Bytes, not tensors: it does not depend on the dtype the base is loaded in,
and it costs one read of the files (about 0.2 s for SmolLM2's 98 MB GGUF).

At load, ``find_base`` resolves the source (as given, then the recorded absolute path),
hashes it again and refuses a missing or changed base with one ``CheckpointError`` naming
the path and both hashes. Loading the base itself happens above this layer (``lmlab.load``
reads every format), which then applies the PEFT structure and the trained tensors.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

from lmlab.checkpoint.io import (
    BASE_KEY,
    CHECKPOINTS_DIR,
    COMPLETE_FILE,
    WEIGHTS_FILE,
    attach_base,
    attached_base,
    resolve_checkpoint,
)
from lmlab.checkpoint.pretrained import is_pretrained_name, pretrained_path
from lmlab.errors import CheckpointError, DataNotFoundError

__all__ = ["BASE_KEY", "attach_base", "attached_base", "base_entry", "find_base"]
_CHUNK = 1 << 24  # bytes read at a time while hashing


def weight_files(path: str | os.PathLike) -> list[Path]:
    """The files whose bytes identify the model at ``path`` ([] when there are none).

    A ``.gguf`` file is itself; an HF folder gives its ``*.safetensors`` sorted by name; an
    lmlab checkpoint (or run directory: its newest complete checkpoint) its
    ``model.safetensors``.
    """
    path = Path(path)
    if path.is_file():
        return [path]
    if not path.is_dir():
        return []
    if (path / CHECKPOINTS_DIR).is_dir() or (path / COMPLETE_FILE).is_file():
        return [resolve_checkpoint(path) / WEIGHTS_FILE]
    return sorted(path.glob("*.safetensors"))


def weights_sha256(files: list[Path]) -> str:
    """sha256 (hex) over the bytes of ``files``, one after another."""
    digest = hashlib.sha256()
    for file in files:
        with open(file, "rb") as f:
            while chunk := f.read(_CHUNK):
                digest.update(chunk)
    return digest.hexdigest()


def _resolve(source: str) -> Path:
    path = Path(source)
    if not path.exists() and is_pretrained_name(source):
        return pretrained_path(source)
    return path


def base_entry(source: str | os.PathLike) -> dict[str, Any] | None:
    """The ``"base"`` entry for the model at ``source`` (a pretrained name or a path, kept
    as given), or None when it has no weight files to hash (then checkpoints hold every
    weight, as before base references existed)."""
    try:
        path = _resolve(str(source))
        files = weight_files(path)
    except (DataNotFoundError, CheckpointError):
        return None
    if not files:
        return None
    return {
        "source": str(source),
        "path": str(path.resolve()),
        "sha256": weights_sha256(files),
        "hashed": [f.name for f in files],
    }


def find_base(entry: Any, where: str) -> Path:
    """The path of a checkpoint's base, after checking its hash -> the path to load.

    Tries ``entry["source"]`` (a pretrained name or a path, relative to the working
    directory), then ``entry["path"]``. A missing base or a hash that differs is a
    ``CheckpointError`` naming ``where``, the path and both hashes.
    """
    if not isinstance(entry, dict) or not all(
        isinstance(entry.get(k), str) for k in ("source", "path", "sha256")
    ):
        raise CheckpointError(
            f"{where}: the 'base' entry {entry!r} is invalid; it needs source, path and sha256"
        )
    candidates = [entry["source"], entry["path"]]
    for candidate in candidates:
        try:
            path = _resolve(candidate)
            files = weight_files(path)
        except (DataNotFoundError, CheckpointError):
            continue
        if files:
            found = weights_sha256(files)
            if found != entry["sha256"]:
                raise CheckpointError(
                    f"{where}: its base {str(path)!r} has changed: weights sha256 {found}, the "
                    f"checkpoint was trained on sha256 {entry['sha256']}; restore that base"
                )
            return path
    raise CheckpointError(
        f"{where}: its base is missing: no model at {entry['source']!r} or {entry['path']!r} "
        f"(weights sha256 {entry['sha256']}); put the base back there"
    )
