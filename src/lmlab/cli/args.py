"""Parsed flags as keyword arguments for the API functions."""

from __future__ import annotations

from collections.abc import Collection
from typing import Any


def options(namespace: Any, skip: Collection[str] = ()) -> dict[str, Any]:
    """The values of a parsed command or group (``args``, ``args.lora``) as keyword
    arguments, without ``skip``, ``config`` (the ``--config`` file) and the ``__path__``
    that ``--group file.yaml`` records."""
    dropped = {"config", "__path__", *skip}
    return {k: v for k, v in vars(namespace).items() if k not in dropped}
