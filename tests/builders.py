"""Small lmlab models shared by several test files (import: ``from builders import ...``)."""

import torch

from lmlab.models import build_model, get_preset


def tiny_llama(seed=0):
    """A 2-layer llama-small over 64 tokens, randomly initialised from ``seed``, eval mode."""
    torch.manual_seed(seed)
    spec = {**get_preset("llama-small"), "vocab_size": 64, "n_layers": 2}
    return build_model(spec).eval()


def logits(model, seed=1):
    """The float32 logits [2, 16, 64] of ``model`` on random ids drawn from ``seed``."""
    ids = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model(ids).float()
