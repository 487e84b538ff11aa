"""Small transformers trained in a second or two to carry a known mechanism, for the
interpretability tests (import: ``from planted import ...``).

The copy task: a row of random tokens; the label at the last position is the token at a
fixed position ``P``. A model that solves it must move the token from position P to the
last position through attention, so patching must find it at P in the early layers and at
the last position after the move.

Left alone, every head of a 1-layer model learns to copy (each attends from the last
position to P, and the copy is shared among them). ``blind`` plants a single copying head:
the other heads' attention to position P is cut (an edit hook on ``hook_pattern``, kept on
while training and afterwards, part of the model like a mask), so only head ``COPY_HEAD``
can read the token there and the head sweep must find it.
"""

from contextlib import contextmanager, nullcontext

import torch
import torch.nn.functional as F

from lmlab.interp.hooks import hooks
from lmlab.models import build_model, get_preset

V, T, P = 12, 8, 2  # vocabulary, prompt length, the copied position


def copy_batch(n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(0, V, (n, T), generator=generator)
    return ids, ids[:, P]


COPY_HEAD = 2


@contextmanager
def blind(model, n_heads: int):
    """Heads other than COPY_HEAD of layer 0 cannot attend to position P."""
    others = [h for h in range(n_heads) if h != COPY_HEAD]

    def cut(pattern, name):  # (B, H, T, S)
        pattern = pattern.clone()
        pattern[:, others, :, P] = 0.0
        return pattern

    with hooks(model, edit={"blocks.0.attn.hook_pattern": cut}):
        yield model


def copy_model(
    n_layers: int = 1, n_heads: int = 4, steps: int = 200, seed: int = 0, blinded: bool = False
):
    """A GPT-style model (learned positions) trained with Adam on the copy task's last
    position (with ``blinded``: under ``blind``); eval mode, with its accuracy on fresh
    rows (seeded, deterministic)."""
    torch.manual_seed(seed)
    spec = {
        **get_preset("gpt-char-tiny"),
        "vocab_size": V,
        "n_layers": n_layers,
        "n_heads": n_heads,
        "d_model": 32,
        "d_ff": 64,
        "max_seq_len": T,
    }
    model = build_model(spec)
    g = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    with blind(model, n_heads) if blinded else nullcontext():
        for _ in range(steps):
            ids, label = copy_batch(64, g)
            loss = F.cross_entropy(model(ids)[:, -1], label)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        model.eval()
        ids, label = copy_batch(256, g)
        with torch.no_grad():
            accuracy = (model(ids)[:, -1].argmax(-1) == label).float().mean().item()
    return model, accuracy


def copy_pairs(n: int, seed: int = 1):
    """n clean/corrupted pairs that differ only at position P (and the answers they copy)."""
    from lmlab.interp.patching import PromptPairs

    g = torch.Generator().manual_seed(seed)
    clean, answer = copy_batch(n, g)
    corrupt = clean.clone()
    wrong = (answer + 1 + torch.randint(0, V - 1, (n,), generator=g)) % V  # != answer
    corrupt[:, P] = wrong
    return PromptPairs(clean, corrupt, answer, wrong)
