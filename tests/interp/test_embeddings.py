"""Nearest neighbours, analogies and the 2-D map of input embeddings, on planted tables."""

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from torch import nn

from lmlab.cli.embeddings import parse_analogies
from lmlab.data.tokenizers import CharTokenizer, HFTokenizer
from lmlab.errors import ConfigError
from lmlab.interp.embeddings import EmbeddingSpace, embedding_table, project_2d
from lmlab.models import build_model

WORDS = ["[UNK]", "king", "queen", "man", "woman", "apple", "pear", "walk", "walked", ",", "x"]


def word_tokenizer():
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return HFTokenizer(tok)


class Table(nn.Module):
    def __init__(self, weight):
        super().__init__()
        self.tok_emb = nn.Embedding.from_pretrained(weight)


def planted(seed=0, noise=0.01):
    """royal, male, female, fruit directions: king = royal + male, queen = royal + female."""
    g = torch.Generator().manual_seed(seed)
    d = 16
    basis = torch.linalg.qr(torch.randn(d, d, generator=g))[0][:6]
    royal, male, female, fruit, verb, past = basis
    rows = {
        "king": royal + male,
        "queen": royal + female,
        "man": male,
        "woman": female,
        "apple": fruit + 0.3 * male,
        "pear": fruit,
        "walk": verb,
        "walked": verb + past,
    }
    weight = noise * torch.randn(len(WORDS), d, generator=g)
    for w, v in rows.items():
        weight[WORDS.index(w)] += v
    return EmbeddingSpace.of(Table(weight), word_tokenizer())


@pytest.mark.parametrize("seed", range(5))
def test_the_planted_analogy_is_found(seed):
    space = planted(seed)
    assert space.analogy("man", "king", "woman", k=1)[0][0] == "queen"
    assert space.analogy("woman", "queen", "man", k=1)[0][0] == "king"


@pytest.mark.parametrize("seed", range(5))
def test_nearest_equals_brute_force_cosine(seed):
    space = planted(seed, noise=0.3)
    v = space.vectors.numpy().astype(np.float64)
    word_like = [i for i, w in enumerate(WORDS) if w.isalpha() and len(w) >= 2 and w != "king"]
    q = v[WORDS.index("king")]
    cos = {i: float(v[i] @ q / np.linalg.norm(v[i]) / np.linalg.norm(q)) for i in word_like}
    expected = sorted(cos, key=cos.get, reverse=True)[:4]
    got = space.nearest("king", k=4)
    assert [w for w, _ in got] == [WORDS[i] for i in expected]
    for (_, s), i in zip(got, expected):
        assert s == pytest.approx(cos[i], abs=1e-5)
    # punctuation, the unknown token and single letters are never neighbours
    assert not {w for w, _ in space.nearest("king", k=20)} & {",", "x", "[UNK]", "king"}


def test_project_2d_equals_the_top_principal_components():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(30, 8, generator=g) @ torch.diag(torch.tensor([5.0, 3, 1, 1, 1, 0.5, 0.5, 0.1]))
    got = project_2d(x).double().numpy()
    centred = x.double().numpy() - x.double().numpy().mean(0)
    values, vectors = np.linalg.eigh(np.cov(centred.T))  # another route: the covariance
    top = vectors[:, np.argsort(values)[::-1][:2]]
    expected = centred @ top
    for j in range(2):  # a component's sign is arbitrary
        sign = np.sign(got[:, j] @ expected[:, j])
        np.testing.assert_allclose(got[:, j], sign * expected[:, j], atol=1e-4)


def test_tables_of_lmlab_families_and_a_character_vocabulary():
    tok = CharTokenizer.train("abcde fghij ABCDE.")
    specs = [
        {"family": "transformer", "d_model": 16, "n_layers": 1, "n_heads": 2, "d_ff": 32},
        {"family": "recurrent", "cell": "lstm"},
    ]
    for spec in specs:
        model = build_model({**spec, "vocab_size": tok.vocab_size})
        assert embedding_table(model).shape[0] == tok.vocab_size
        space = EmbeddingSpace.of(model, tok)
        # a character vocabulary: every printable character may be a neighbour, not the space
        assert space.candidates.sum() == tok.vocab_size - 1
        assert len(space.nearest("a", k=3)) == 3


def test_a_model_without_an_embedding_table_is_a_one_line_error():
    with pytest.raises(ConfigError, match="no embedding layer"):
        embedding_table(nn.Linear(2, 2))


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda s: s.nearest("", 3), "non-empty"),
        (lambda s: s.nearest("king", 0), "k=0"),
        (lambda s: project_2d(torch.zeros(1, 4)), "at least two"),
    ],
)
def test_bad_input_is_a_one_line_error(call, message):
    with pytest.raises(ConfigError, match=message):
        call(planted())


def test_analogies_flag_parsing():
    assert parse_analogies("man:king:woman, a:b:c") == [("man", "king", "woman"), ("a", "b", "c")]
    with pytest.raises(ConfigError, match="a:b:c"):
        parse_analogies("man:king")
