"""Tools for an agent: each has a name, a one-line description the model reads, and
``run(argument) -> observation``, a string capped in length. A tool never raises on what a
model wrote: a bad argument comes back as an observation saying what was wrong.

- ``calculator[3 * (4 + 5)]``: arithmetic only. The expression is parsed with ``ast`` and
  walked node by node; numbers, ``+ - * / // % **``, unary minus and parentheses are all
  it knows. A name, a call, an attribute, a string, a comparison: refused. Exponents and
  the size of results are bounded, so ``9**9**9`` is refused rather than computed.
- ``python[print(12 * 7)]``: the program runs in ``lmlab.prompting.sandbox`` (a separate,
  contained process); the observation is its printed output and answer, or its error.
- ``search[brass loom]``: ranks a document collection (BM25, or MiniLM embeddings; see
  ``retrieval.py``) and shows the top titles with their first sentences.
- ``lookup[born]``: the next sentence containing the keyword in the first result of the
  last search, as in ReAct's Wikipedia API (Yao et al. 2022).
- ``finish[answer]``: the final answer (the agent loop stops there).

``search`` and ``lookup`` share one ``Library`` (the page last searched and the lookup
position), so ``build_tools`` makes fresh tools for every episode.
"""

from __future__ import annotations

import ast
import math
import operator
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from lmlab.data.documents import Document
from lmlab.errors import ConfigError, closest
from lmlab.prompting.extract import extract_code
from lmlab.prompting.retrieval import Retriever, top
from lmlab.prompting.sandbox import Limits, run_python

MAX_OBSERVATION = 600
"""Characters of an observation the model sees; longer ones are cut (and say so)."""


@dataclass(frozen=True)
class Tool:
    name: str
    description: str
    """One line, shown to the model: how to call it and what it gives."""
    run: Callable[[str], str]


def cap(text: str, limit: int = MAX_OBSERVATION) -> str:
    """One line (an observation sits on one line of the prompt), at most ``limit`` long."""
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 14].rstrip() + " ... (cut)"


# ----------------------------------------------------------------------------- calculator

_BINARY = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
    ast.Pow: operator.pow,
}
_UNARY = {ast.USub: operator.neg, ast.UAdd: operator.pos}
MAX_BITS = 4096  # the largest integer result: about 1,233 decimal digits
MAX_EXPONENT = 1000
MAX_LENGTH = 300


class _Refused(Exception):
    pass


def _size(x: int | float) -> int:
    """Bits of magnitude (floats count by their exponent)."""
    if isinstance(x, float):
        return 0 if x == 0 or not math.isfinite(x) else max(0, math.frexp(x)[1])
    return abs(x).bit_length()


def _evaluate(node: ast.AST) -> int | float:
    if isinstance(node, ast.Expression):
        return _evaluate(node.body)
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        return node.value
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
        return _UNARY[type(node.op)](_evaluate(node.operand))
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        left, right = _evaluate(node.left), _evaluate(node.right)
        if isinstance(node.op, ast.Pow):
            if abs(right) > MAX_EXPONENT or _size(left) * abs(right) > MAX_BITS:
                raise _Refused(f"the power is too large (exponent at most {MAX_EXPONENT})")
        if isinstance(node.op, ast.Mult) and _size(left) + _size(right) > MAX_BITS:
            raise _Refused("the product is too large")
        result = _BINARY[type(node.op)](left, right)
        if isinstance(result, complex):
            raise _Refused("the result is not a real number")
        return result
    what = type(node).__name__
    if isinstance(node, ast.Constant):
        what = f"the constant {node.value!r}"
    elif isinstance(node, ast.Name):
        what = f"the name {node.id!r}"
    raise _Refused(f"{what} is not arithmetic")


def _format(x: int | float) -> str:
    if isinstance(x, float):
        if not math.isfinite(x):
            return str(x)
        if x.is_integer() and abs(x) < 1e15:
            return str(int(x))
        return f"{x:.12g}"
    return str(x)


def calculator(expression: str) -> str:
    """``"3 * (4 + 5)"`` -> ``"27"``; ``"7 / 2"`` -> ``"3.5"``; ``"__import__('os')"`` ->
    an error observation. Only numbers, + - * / // % **, unary minus and parentheses."""
    expression = expression.strip().strip("`").replace("^", "**").replace("×", "*")
    expression = re.sub(r"(?<=\d),(?=\d{3}\b)", "", expression)  # 1,200 -> 1200
    if len(expression) > MAX_LENGTH:
        return f"error: the expression is longer than {MAX_LENGTH} characters"
    if expression.endswith("="):
        expression = expression[:-1]
    usage = "the calculator takes arithmetic such as 3 * (4 + 5) - 2 ** 3"
    try:
        tree = ast.parse(expression, mode="eval")
        return _format(_evaluate(tree))
    except _Refused as e:
        return f"error: {e}; {usage}"
    except ZeroDivisionError:
        return "error: division by zero"
    except OverflowError:
        return "error: the result is too large"
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return f"error: not an arithmetic expression; {usage}"


# ----------------------------------------------------------------------------- python


TOOL_LIMITS = Limits(seconds=5.0)
"""What one run of the python tool may use (the sandbox's defaults)."""


def python_tool(limits: Limits = TOOL_LIMITS) -> Callable[[str], str]:
    def run(code: str) -> str:
        program = extract_code(code) if "```" in code else code
        result = run_python(program or code, limits)
        if not result.ok:
            return f"{result.status}: {result.error or 'no output'}"
        printed = result.stdout.strip()
        answer = None if result.answer is None else str(result.answer)
        if answer is not None and printed and answer != printed:
            return f"{printed}\nanswer: {answer}"
        if answer is not None and not printed:
            return answer
        return printed or "(the program printed nothing; print the result)"

    return run


# ----------------------------------------------------------------------------- search and lookup

_SENTENCE = re.compile(r"(?<=[.!?])\s+(?=[A-Z\"'(])")


def sentences(text: str) -> list[str]:
    return [s for s in _SENTENCE.split(text.strip()) if s]


def _key(title: str) -> str:
    words = re.findall(r"\w+", title.lower())
    return " ".join(words[1:] if words[:1] == ["the"] else words)


class Library:
    """Search over ``documents`` and lookup in the page last searched (one episode)."""

    def __init__(self, documents: Sequence[Document], retriever: Retriever, k: int = 3):
        self.documents, self.retriever, self.k = list(documents), retriever, k
        self.page: Document | None = None
        self.keyword: str | None = None
        self.found: list[str] = []
        self.shown = 0

    def search(self, query: str) -> str:
        query = query.strip()
        if not query:
            return "error: search needs a query, e.g. search[brass loom]"
        hits = top(self.retriever, query, self.k)
        # As in ReAct's Wikipedia API, a query that names a page exactly opens that page.
        exact = [i for i, d in enumerate(self.documents) if _key(d.title) == _key(query)]
        if exact:
            hits = [(exact[0], math.inf)] + [h for h in hits if h[0] != exact[0]][: self.k - 1]
        if not hits:
            self.page = None
            return f"No document matches {query!r}. Try other words."
        self.page, self.keyword = self.documents[hits[0][0]], None
        lines = []
        for rank, (i, _) in enumerate(hits, 1):
            doc = self.documents[i]
            first = sentences(doc.text)[0] if doc.text else ""
            lines.append(f"[{rank}] {doc.title}: {first}")
        return " ".join(lines)

    def lookup(self, keyword: str) -> str:
        keyword = keyword.strip().strip("'\"")
        if self.page is None:
            return "error: nothing to look in; search for a page first"
        if not keyword:
            return "error: lookup needs a keyword, e.g. lookup[born]"
        if keyword.lower() != self.keyword:
            self.keyword, self.shown = keyword.lower(), 0
            self.found = [s for s in sentences(self.page.text) if keyword.lower() in s.lower()]
        if not self.found:
            return f"No sentence of {self.page.title} contains {keyword!r}."
        if self.shown >= len(self.found):
            return f"No more results for {keyword!r} in {self.page.title}."
        self.shown += 1
        return f"(Result {self.shown} / {len(self.found)}) {self.found[self.shown - 1]}"


# ----------------------------------------------------------------------------- the toolbox

TOOL_NAMES = ("calculator", "python", "search", "lookup", "finish")
DESCRIPTIONS = {
    "calculator": "calculator[expression]: computes arithmetic such as 12 * (3 + 4) / 2.",
    "python": "python[code]: runs a short Python program and shows what it prints.",
    "search": "search[words]: searches the encyclopedia and shows the best pages' first sentences.",
    "lookup": "lookup[keyword]: the next sentence containing the keyword in the first page of "
    "the last search.",
    "finish": "finish[answer]: gives the final answer and ends.",
}


def parse_tool_names(names: str | Sequence[str]) -> list[str]:
    """``"calculator,search"`` -> ``["calculator", "search", "finish"]`` (finish is always
    there); an unknown name is a ConfigError naming the valid ones."""
    if isinstance(names, str):
        names = [n.strip() for n in names.split(",") if n.strip()]
    out = []
    for name in names:
        if name not in TOOL_NAMES:
            raise ConfigError(
                f"unknown tool {name!r}{closest(name, TOOL_NAMES)}; valid: {', '.join(TOOL_NAMES)}"
            )
        if name not in out:
            out.append(name)
    if "lookup" in out and "search" not in out:
        raise ConfigError("the lookup tool reads the page of the last search: add search too")
    return [n for n in TOOL_NAMES if n in out or n == "finish"]


def build_tools(
    names: str | Sequence[str],
    documents: Sequence[Document] = (),
    retriever: Retriever | None = None,
    limits: Limits = TOOL_LIMITS,
    k: int = 3,
) -> dict[str, Tool]:
    """Fresh tools for one episode, by name (in ``TOOL_NAMES`` order, finish included).
    ``search`` needs ``documents`` and a ``retriever`` built over them (``retrieval.py``)."""
    names = parse_tool_names(names)
    runs: dict[str, Callable[[str], str]] = {
        "calculator": calculator,
        "python": python_tool(limits),
        "finish": str.strip,
    }
    if "search" in names:
        if retriever is None or not documents:
            raise ConfigError("the search tool needs documents and a retriever over them")
        library = Library(documents, retriever, k)
        runs["search"], runs["lookup"] = library.search, library.lookup
    return {n: Tool(n, DESCRIPTIONS[n], _capped(runs[n])) for n in names}


def _capped(run: Callable[[str], str]) -> Callable[[str], str]:
    return lambda argument: cap(run(argument))
