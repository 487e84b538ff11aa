"""BM25 against a hand-computed example and its defining properties; dense retrieval with
MiniLM (slow)."""

import math
import random

import pytest

from lmlab.data.documents import documents
from lmlab.errors import ConfigError
from lmlab.prompting.retrieval import BM25, Embeddings, make_retriever, terms, top


def test_bm25_matches_the_hand_computed_example():
    """Documents "a b b", "a c", "c d e f"; query "b" (module docstring): N = 3, n(b) = 1,
    idf = ln(2.5 / 1.5) = 0.51083, avgdl = 3; doc 0: f = 2, |D| = 3,
    0.51083 * 2 * 2.5 / (2 + 1.5 * (1 - 0.75 + 0.75 * 3 / 3)) = 0.72975; docs 1, 2: 0.
    Query "c a": idf(c) = idf(a) = ln(1.5 / 2.5) < 0, floored at 0: every score 0."""
    bm25 = BM25(["a b b", "a c", "c d e f"])
    idf = math.log(2.5 / 1.5)
    want = idf * 2 * 2.5 / (2 + 1.5 * 1.0)
    assert want == pytest.approx(0.72975, abs=1e-5)
    assert bm25.scores("b") == pytest.approx([want, 0.0, 0.0], abs=1e-12)
    assert bm25.scores("c a") == [0.0, 0.0, 0.0]
    # "d": n = 1 as well, doc 2 has |D| = 4: 0.51083 * 2.5 / (1 + 1.5 * (0.25 + 0.75 * 4 / 3))
    assert bm25.scores("D!")[2] == pytest.approx(idf * 2.5 / (1 + 1.5 * 1.25), abs=1e-12)
    assert top(bm25, "b", 3) == [(0, pytest.approx(want))]  # zero scores are left out


def _random_corpus(rng, n_docs=12):
    words = [f"w{i}" for i in range(30)]
    return [" ".join(rng.choices(words, k=rng.randint(3, 20))) for _ in range(n_docs)]


def test_bm25_properties_on_random_corpora():
    """On seeded random corpora: a document holding a rare query term outranks one without
    it; one more occurrence never lowers a score (saturating); padding a document with
    other words never raises it (length normalisation); a query term is order-free."""
    rng = random.Random(0)
    for _ in range(30):
        texts = _random_corpus(rng) + ["zz " + "w1 " * rng.randint(0, 5)]
        bm25 = BM25(texts)
        ranked = top(bm25, "zz", 3)
        assert ranked[0][0] == len(texts) - 1 and len(ranked) == 1
        term = rng.choice(terms(texts[0]))
        more = BM25([texts[0] + " " + term, *texts[1:]]).scores(term)[0]
        assert more >= bm25.scores(term)[0]
        longer = BM25([texts[0] + " filler" * 5, *texts[1:]])
        assert longer.scores(term)[0] <= BM25([texts[0], *texts[1:]]).scores(term)[0] + 1e-12
        query = " ".join(rng.sample(terms(" ".join(texts)), 3))
        assert bm25.scores(query) == pytest.approx(bm25.scores(" ".join(query.split()[::-1])))
        assert all(s >= 0 for s in bm25.scores(query))


def test_bm25_finds_the_bundled_page_named_by_a_query():
    docs = documents()
    bm25 = make_retriever(docs, "bm25")
    person = next(d for d in docs if d.kind == "person")
    work = person.text.split(" who ")[1].split(" ", 1)[1].rstrip(".")  # "the brass loom"
    assert docs[top(bm25, work, 1)[0][0]] == person


def test_bad_settings_are_config_errors():
    with pytest.raises(ConfigError, match="at least one document"):
        BM25([])
    with pytest.raises(ConfigError, match="0 <= b <= 1"):
        BM25(["a"], b=2)
    with pytest.raises(ConfigError, match="unknown search method 'tfidf'; valid: bm25"):
        make_retriever(documents()[:3], "tfidf")


@pytest.mark.slow
def test_embedding_search_with_minilm_ranks_a_paraphrase_first():
    docs = documents()
    dense = make_retriever(docs, "embedding")
    assert isinstance(dense, Embeddings) and dense.vectors.shape[0] == len(docs)
    city = next(d for d in docs if d.kind == "city")
    hits = top(dense, f"the town called {city.title}", 3)
    assert city in [docs[i] for i, _ in hits]
    scores = dense.scores("a river")
    assert all(-1.0001 <= s <= 1.0001 for s in scores)
