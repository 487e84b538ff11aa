"""The package's layers point one way (README, "Layout"): read every import with ast.

A unit is a subpackage of lmlab (``lmlab.train``) or a top-level module (``lmlab.api``).
A unit may import its own modules and units in lower rows of ``LAYERS``; never one in its
own row or above. So there is no cycle between units, and library code never reaches up
into the facade or the CLI. Imports written inside functions are only for heavy optional
dependencies, each with a comment saying so.
"""

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "lmlab"

# Lowest first. The README's layout section states the same order.
LAYERS = [
    {"errors", "fileio", "version"},
    {"devices", "seeds", "native"},
    {"models"},
    {"data", "quant"},
    {"checkpoint"},
    {"generate", "train"},
    {"lm"},
    {"finetune"},
    {"eval", "interp"},
    {"prompting", "scaling"},
    {"align"},
    {"api"},
    {"compare", "demo", "sweep"},
    {"serve"},
    {"cli"},
    {"__main__", "__init__"},
]
RANK = {unit: row for row, units in enumerate(LAYERS) for unit in units}
# Third-party modules (and the packages inside them) that may be imported inside a
# function, and why.
DEFERRED = {
    "matplotlib": "plots",
    "sacrebleu": "BLEU",
    "rouge_score": "ROUGE",
    "gguf": "GGUF",
    "sentencepiece": "tokenizer.model files",
    "ctypes": "the sandbox's child loads it to isolate itself, then forgets it",
    "torch.utils.tensorboard": "TensorBoard logging (needs the optional tensorboard package)",
    "wandb": "Weights & Biases logging (optional)",
    "lmlab.serve": "the HTTP server: needs the optional serve extra (FastAPI, uvicorn)",
    "fastapi": "the HTTP server (the optional serve extra)",
    "uvicorn": "the HTTP server (the optional serve extra)",
    # about 1.4 s and 60 MB of imports, needed only when decoding with compile=True
    "torch._dynamo": "torch.compile of the decoding step (lmlab.generate.compiled)",
    "torch._inductor": "torch.compile's compiler settings and cache (lmlab.generate.compiled)",
    # about 1.6 s of imports, needed only by runs on several processes (torchrun)
    "torch.distributed.fsdp": "FSDP2 sharding (lmlab.train.distributed)",
    "torch.distributed.tensor": "FSDP2's sharded parameters (lmlab.train.distributed)",
    "torch.distributed.checkpoint": "distributed checkpoints (lmlab.train.distributed)",
}


def unit_of(path: Path) -> str:
    rel = path.relative_to(SRC)
    return rel.parts[0] if len(rel.parts) > 1 else rel.stem


def lmlab_targets(node: ast.AST, path: Path) -> list[str]:
    """The lmlab units an import statement reaches (``from lmlab import api`` -> api)."""
    if isinstance(node, ast.Import):
        names = [a.name for a in node.names]
    elif node.level:  # relative import: resolve against the importing module's package
        package = list(path.relative_to(SRC.parent).with_suffix("").parts)[:-1]
        base = package[: len(package) - node.level + 1]
        names = [".".join(base + ([node.module] if node.module else []))]
        if not node.module:
            names = [f"{names[0]}.{a.name}" for a in node.names]
    else:
        names = [node.module or ""]
        if node.module == "lmlab":
            names = [f"lmlab.{a.name}" for a in node.names]
    return [n.split(".")[1] for n in names if n.startswith("lmlab.")]


def imports(path: Path):
    """(node, inside a function?) for every import statement of ``path``."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    inner = set()
    for fn in ast.walk(tree):
        if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            inner.update(id(n) for n in ast.walk(fn) if isinstance(n, (ast.Import, ast.ImportFrom)))
    for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node, id(node) in inner


FILES = sorted(SRC.rglob("*.py"))


def test_every_unit_has_a_layer():
    units = {unit_of(f) for f in FILES}
    assert units <= set(RANK), f"units missing from LAYERS: {sorted(units - set(RANK))}"


@pytest.mark.parametrize("path", FILES, ids=lambda p: str(p.relative_to(SRC)))
def test_imports_point_down(path):
    unit = unit_of(path)
    wrong = []
    for node, _ in imports(path):
        for target in lmlab_targets(node, path):
            if target != unit and RANK.get(target, -1) >= RANK[unit]:
                wrong.append(f"line {node.lineno}: {unit} (row {RANK[unit]}) imports {target}")
    assert not wrong, "\n".join(wrong)


@pytest.mark.parametrize("path", FILES, ids=lambda p: str(p.relative_to(SRC)))
def test_imports_inside_functions_only_defer_heavy_dependencies(path):
    lines = path.read_text(encoding="utf-8").splitlines()
    wrong = []
    for node, inside in imports(path):
        if not inside:
            continue
        names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module]
        name = names[0] or ""
        # a deferred module, or one inside a deferred package ("gguf.quants" under "gguf")
        deferred = any(name == d or name.startswith(d + ".") for d in DEFERRED)
        commented = "#" in lines[node.lineno - 1] or lines[node.lineno - 2].strip().startswith("#")
        if not deferred or not commented:
            wrong.append(f"line {node.lineno}: import of {names[0]} inside a function")
    assert not wrong, "\n".join(wrong)


def test_no_cycle_between_units():
    """Implied by the rows, checked directly so that a wrong row table cannot hide one."""
    edges: dict[str, set[str]] = {}
    for path in FILES:
        unit = unit_of(path)
        for node, _ in imports(path):
            edges.setdefault(unit, set()).update(t for t in lmlab_targets(node, path) if t != unit)
    state: dict[str, int] = {}

    def visit(unit: str, trail: list[str]) -> None:
        state[unit] = 1
        for nxt in sorted(edges.get(unit, ())):
            if state.get(nxt) == 1:
                raise AssertionError("import cycle: " + " -> ".join([*trail, unit, nxt]))
            if nxt not in state:
                visit(nxt, [*trail, unit])
        state[unit] = 2

    for unit in sorted(edges):
        if unit not in state:
            visit(unit, [])


def test_the_checker_sees_a_wrong_import(tmp_path):
    """An upward import (train -> finetune) and a relative one are both caught."""
    fake = SRC / "train" / "trainer.py"
    tree = ast.parse("from lmlab.finetune.peft import x\nfrom ..api import load\n")
    found = [t for node in tree.body for t in lmlab_targets(node, fake)]
    assert found == ["finetune", "api"]
    assert all(RANK[t] >= RANK["train"] for t in found)
