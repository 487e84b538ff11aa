"""Saving and loading lmlab checkpoints (``io``) and converting other formats (``hf``)."""

from lmlab.checkpoint.io import (
    checkpoint_dir,
    latest_checkpoint,
    list_checkpoints,
    load_model,
    load_train_state,
    load_weights,
    resolve_checkpoint,
    rotate_checkpoints,
    save_checkpoint,
)

__all__ = [
    "checkpoint_dir",
    "latest_checkpoint",
    "list_checkpoints",
    "load_model",
    "load_train_state",
    "load_weights",
    "resolve_checkpoint",
    "rotate_checkpoints",
    "save_checkpoint",
]
