"""Ranking documents for a query: BM25 (Robertson et al., Okapi at TREC-3, 1994) and dense
retrieval with sentence embeddings (MiniLM). The agent's ``search`` tool uses either.

BM25 scores a document D for a query Q (its terms q, repeats counted) as

    score(D, Q) = sum over q in Q of  idf(q) * f(q, D) * (k1 + 1) / (f(q, D) + k1 * (1 - b + b * |D| / avgdl))
    idf(q)      = ln((N - n(q) + 0.5) / (n(q) + 0.5)),  floored at 0

with f(q, D) the count of q in D, |D| the length of D in terms, avgdl the mean length, N the
number of documents and n(q) how many contain q; k1 = 1.5 and b = 0.75 by default. The term
frequency saturates (k1) and long documents are discounted (b). The Robertson-Sparck Jones
idf is negative for a term in more than half the documents; floored at 0, such a term
neither helps nor hurts (Lucene instead adds 1 inside the logarithm).

Worked example (``tests/prompting/test_retrieval.py`` checks it): documents "a b b", "a c"
and "c d e f", query "b". N = 3, n(b) = 1, idf = ln(2.5 / 1.5) = 0.5108; avgdl = 3. For
"a b b": f = 2, |D| = 3, score = 0.5108 * 2 * 2.5 / (2 + 1.5 * 1) = 0.7297; the others 0.

Terms are lower-cased runs of letters and digits. Dense retrieval embeds every document
and the query with a sentence encoder (``lmlab.load("minilm")``, ``lm.embed``, normalised)
and ranks by cosine similarity.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Sequence
from typing import Protocol

import torch

from lmlab.data.documents import Document
from lmlab.errors import ConfigError
from lmlab.lm import LM, load

_TERM = re.compile(r"[a-z0-9]+")


def terms(text: str) -> list[str]:
    """``"The Brass Loom, 1843"`` -> ``["the", "brass", "loom", "1843"]``."""
    return _TERM.findall(text.lower())


class Retriever(Protocol):
    def scores(self, query: str) -> list[float]:
        """One score per document, higher is better."""
        ...


class BM25:
    """BM25 over ``texts`` (see the module docstring for the formula)."""

    def __init__(self, texts: Sequence[str], k1: float = 1.5, b: float = 0.75):
        if not texts:
            raise ConfigError("BM25 needs at least one document")
        if k1 < 0 or not 0 <= b <= 1:
            raise ConfigError(f"BM25 needs k1 >= 0 and 0 <= b <= 1; got k1={k1}, b={b}")
        self.k1, self.b = k1, b
        self.counts = [Counter(terms(t)) for t in texts]
        self.lengths = [sum(c.values()) for c in self.counts]
        self.avgdl = sum(self.lengths) / len(texts) or 1.0
        containing = Counter(term for c in self.counts for term in c)
        n_docs = len(texts)
        self.idf = {
            term: max(0.0, math.log((n_docs - n + 0.5) / (n + 0.5)))
            for term, n in containing.items()
        }

    def scores(self, query: str) -> list[float]:
        query_terms = [t for t in terms(query) if t in self.idf]
        out = []
        for counts, length in zip(self.counts, self.lengths):
            norm = self.k1 * (1 - self.b + self.b * length / self.avgdl)
            score = 0.0
            for term in query_terms:
                f = counts.get(term, 0)
                score += self.idf[term] * f * (self.k1 + 1) / (f + norm)
            out.append(score)
        return out


class Embeddings:
    """Dense retrieval: cosine similarity of sentence embeddings from an encoder ``lm``."""

    def __init__(self, texts: Sequence[str], lm: LM, batch_size: int = 32):
        if not texts:
            raise ConfigError("embedding search needs at least one document")
        self.lm = lm
        with torch.no_grad():
            # [N, D], unit length
            self.vectors = torch.cat(
                [
                    lm.embed(list(texts[i : i + batch_size]))
                    for i in range(0, len(texts), batch_size)
                ]
            ).float()

    def scores(self, query: str) -> list[float]:
        with torch.no_grad():
            q = self.lm.embed([query]).float()  # [1, D]
        return (self.vectors @ q[0]).tolist()


def top(retriever: Retriever, query: str, k: int) -> list[tuple[int, float]]:
    """The ``k`` best (document index, score), best first; ties go to the lower index, and
    documents that score 0 or less under BM25 (no query term) are left out."""
    scores = retriever.scores(query)
    order = sorted(range(len(scores)), key=lambda i: (-scores[i], i))
    keep = [(i, scores[i]) for i in order[:k]]
    if isinstance(retriever, BM25):
        keep = [(i, s) for i, s in keep if s > 0]
    return keep


METHODS = ("bm25", "embedding")


def make_retriever(docs: Sequence[Document], method: str = "bm25") -> Retriever:
    """A retriever over ``docs`` (title and text of each): ``bm25``, or ``embedding`` with
    MiniLM (``lmlab.load("minilm")``; its package must be installed)."""
    texts = [f"{d.title}. {d.text}" for d in docs]
    if method == "bm25":
        return BM25(texts)
    if method == "embedding":
        return Embeddings(texts, load("minilm", device="cpu"))
    raise ConfigError(f"unknown search method {method!r}; valid: {', '.join(METHODS)}")
