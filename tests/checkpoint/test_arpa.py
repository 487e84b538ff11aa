"""ARPA export and import: KenLM scores lmlab's files as lmlab does; files read back."""

import math
import random

import pytest
import torch

from lmlab import native
from lmlab.checkpoint.arpa import read_arpa, write_arpa
from lmlab.data import WordTokenizer
from lmlab.errors import CheckpointError, ConfigError
from lmlab.models.ngram import NGramConfig, NGramLM

# KenLM stores log10 probabilities and backoffs as float32 (about 7 digits) and sums them
# in float32: 1e-4 in log10 over a sentence of a few tokens is far above that rounding
# (about 1e-6 seen) and far below any wrong backoff or missing n-gram (0.01 and more).
KENLM_ATOL = 1e-4
# write_arpa prints 10 significant digits: a round trip moves a log-probability by ~1e-9.
ROUND_TRIP_ATOL = 1e-7
LN10 = math.log(10)


@pytest.fixture(scope="module")
def kenlm():
    # kenlm is in the dev extra (it compiles from its sdist); a missing reference fails the
    # test rather than skipping it (STYLE.md)
    import kenlm

    return kenlm


def random_text(rng: random.Random, lines: int, words: str = "abcdefgh") -> str:
    return "".join(
        " ".join(rng.choice(words) for _ in range(rng.randint(1, 9))) + "\n" for _ in range(lines)
    )


def fitted(text: str, tok: WordTokenizer, **kw) -> NGramLM:
    config = NGramConfig(vocab_size=tok.vocab_size, sentence_end_id=tok.eos_id, **kw)
    return NGramLM(config).fit(tok.encode(text))


def sentence_log10(model: NGramLM, ids: list[int]) -> torch.Tensor:
    """log10 p of each id of one sentence (ending in </s>) from BOS, as KenLM scores it."""
    ids = torch.tensor(ids)
    row = torch.cat([ids.new_zeros(1), ids])[None]  # a dummy first token, masked to BOS
    mask = torch.ones_like(row, dtype=torch.bool)
    mask[0, 0] = False
    return model.log_prob(row[:, :-1], ids[None], mask[:, :-1])[0] / LN10


@pytest.mark.parametrize(
    ("smoothing", "order", "seed"),
    [
        ("kneser_ney", 2, 0),
        ("kneser_ney", 3, 1),
        ("modified_kneser_ney", 3, 2),
        ("modified_kneser_ney", 5, 3),
        ("backoff", 3, 4),
        ("backoff", 4, 5),
        ("witten_bell", 3, 6),
        ("linear_interpolation", 3, 8),
    ],
)
def test_arpa_file_matches_kenlm(kenlm, tmp_path, smoothing, order, seed):
    rng = random.Random(seed)
    train = random_text(rng, 300)
    tok = WordTokenizer.train(train, min_count=40)  # a few letters become <unk>
    model = fitted(train, tok, order=order, smoothing=smoothing, discount=rng.uniform(0.3, 0.9))
    path = write_arpa(model, tmp_path / "lm.arpa", tok.words)
    reference = kenlm.Model(str(path))
    assert reference.order == order
    # held-out sentences, with words unseen in training ("z") that both map to <unk>
    for sentence in random_text(rng, 40, words="abcdefghz").splitlines():
        ours = sentence_log10(model, tok.encode(sentence + "\n"))
        theirs = torch.tensor([score for score, _, _ in reference.full_scores(sentence)])
        torch.testing.assert_close(ours, theirs.double(), atol=KENLM_ATOL, rtol=0)
        assert float(ours.sum()) == pytest.approx(reference.score(sentence), abs=KENLM_ATOL)


@pytest.mark.parametrize(
    "smoothing", ["kneser_ney", "modified_kneser_ney", "backoff", "witten_bell"]
)
def test_arpa_round_trip_scores_the_same(tmp_path, smoothing):
    rng = random.Random(7)
    train = random_text(rng, 200)
    tok = WordTokenizer.train(train)
    model = fitted(train, tok, order=4, smoothing=smoothing)
    loaded, words = read_arpa(write_arpa(model, tmp_path / "lm.arpa", tok.words))
    assert words == tok.words and loaded.config.sentence_end_id == tok.eos_id
    ids = torch.tensor(tok.encode(random_text(rng, 30)))[None]
    torch.testing.assert_close(
        loaded.log_prob(ids[:, :-1], ids[:, 1:]),
        model.log_prob(ids[:, :-1], ids[:, 1:]),
        atol=ROUND_TRIP_ATOL,
        rtol=0,
    )
    # the ARPA model's full rows are distributions too, and gathering matches them exactly
    full = loaded.log_probs(ids)
    torch.testing.assert_close(full.exp().sum(-1), torch.ones(ids.shape, dtype=torch.float64))
    gathered = loaded.log_prob(ids[:, :-1], ids[:, 1:])
    assert torch.equal(full[:, :-1].gather(-1, ids[:, 1:, None])[..., 0], gathered)


HAND_WORKED = """\\data\\
ngram 1=4
ngram 2=2

\\1-grams:
-1.0\t<unk>
-99\t<s>\t-0.30103
-0.5\ta\t-0.2
-0.39794\t</s>

\\2-grams:
-0.2\t<s> a
-0.1\ta </s>

\\end\\
"""


def test_hand_worked_arpa_file_loads_and_scores(tmp_path):
    """Worked by hand, log10 p with the backoff rule (module docstring of checkpoint.arpa):

    "a a":  p(a | <s>) = -0.2 (listed);  p(a | a) = B(a) + p(a) = -0.2 + -0.5 = -0.7;
            p(</s> | a) = -0.1 (listed)                               sum -1.0
    "b":    b is <unk>: p(<unk> | <s>) = B(<s>) + p(<unk>) = -0.30103 + -1.0;
            p(</s> | <unk>) = B(<unk>) (none: 0) + p(</s>) = -0.39794   sum -1.69897
    """
    path = tmp_path / "hand.arpa"
    path.write_text(HAND_WORKED)
    model, words = read_arpa(path)
    assert words == ["<unk>", "a", "</s>"] and model.config.order == 2
    unk, a, end = 0, 1, 2
    torch.testing.assert_close(
        sentence_log10(model, [a, a, end]), torch.tensor([-0.2, -0.7, -0.1], dtype=torch.float64)
    )
    torch.testing.assert_close(
        sentence_log10(model, [unk, end]),
        torch.tensor([-1.30103, -0.39794], dtype=torch.float64),
    )


def test_hand_worked_arpa_file_matches_kenlm(kenlm, tmp_path):
    path = tmp_path / "hand.arpa"
    path.write_text(HAND_WORKED)
    reference = kenlm.Model(str(path))
    assert reference.score("a a") == pytest.approx(-1.0, abs=KENLM_ATOL)
    assert reference.score("b") == pytest.approx(-1.69897, abs=KENLM_ATOL)


@pytest.mark.parametrize(
    ("edit", "line", "problem"),
    [
        (lambda t: t.replace("\\data\\", "data"), None, "no \\data\\ line"),
        (lambda t: t.replace("ngram 2=2", "ngram 2=3"), 11, "announces 3 2-grams"),
        (lambda t: t.replace("ngram 2=2", "ngram 3=2"), 3, "expected 'ngram 2=<count>'"),
        (lambda t: t.replace("-0.5\ta", "oops\ta"), 8, "expected numbers"),
        (lambda t: t.replace("-0.5\ta", "0.5\ta"), 8, "<= 0"),
        (lambda t: t.replace("-0.2\t<s> a", "-0.2\t<s> b"), 12, "'b', which is not a 1-gram"),
        (lambda t: t.replace("-0.2\t<s> a", "-0.2\ta <s>"), 12, "<s> can only open"),
        (lambda t: t.replace("-0.1\ta </s>", "-0.1\ta </s>\t-0.5"), 13, "no backoff"),
        (lambda t: t.replace("-0.1\ta </s>", "-0.1\t<s> a"), 13, "listed twice"),
        (lambda t: t.replace("-0.1\ta </s>", "-0.1\ta"), 13, "2 word(s)"),
        (lambda t: t.replace("\\end\\", ""), 16, "expected \\end\\"),
        (lambda t: t.replace("\\2-grams:", "\\3-grams:"), 11, "'\\2-grams:' section"),
    ],
)
def test_bad_arpa_files_are_one_line_errors_naming_the_line(tmp_path, edit, line, problem):
    path = tmp_path / "bad.arpa"
    path.write_text(edit(HAND_WORKED))
    with pytest.raises(CheckpointError) as info:
        read_arpa(path)
    message = str(info.value)
    assert "\n" not in message and problem in message and str(path) in message
    if line is not None:
        assert f"{path}:{line}:" in message


def test_smoothings_without_a_backoff_form_and_bad_words_are_refused(tmp_path):
    tok = WordTokenizer.train("a b\nb a\n")
    for smoothing in ("mle", "add_k", "stupid_backoff"):
        with pytest.raises(ConfigError, match="no ARPA"):
            write_arpa(fitted("a b\n", tok, order=2, smoothing=smoothing), tmp_path / "x.arpa")
    model = fitted("a b\n", tok, order=2)
    with pytest.raises(ConfigError, match="vocab_size 4"):
        write_arpa(model, tmp_path / "x.arpa", ["a", "b"])
    with pytest.raises(ConfigError, match="'a b'"):
        write_arpa(model, tmp_path / "x.arpa", ["<unk>", "</s>", "a b", "c"])
    with pytest.raises(ConfigError, match="<s>"):
        write_arpa(model, tmp_path / "x.arpa", ["<unk>", "</s>", "<s>", "c"])
    assert not (tmp_path / "x.arpa").exists()


# HAND_WORKED with its 2-gram "a </s>" turned into a 3-gram "a a </s>": the context "a a"
# is then no listed 2-gram
SKIPS_A_PREFIX = HAND_WORKED.replace("ngram 2=2\n", "ngram 2=1\nngram 3=1\n").replace(
    "-0.1\ta </s>\n", "\n\\3-grams:\n-0.1\ta a </s>\n"
)


@pytest.mark.parametrize(
    "use_c",
    [
        pytest.param(
            True,
            id="c",
            marks=pytest.mark.skipif(native.compiler() is None, reason="no C compiler here"),
        ),
        pytest.param(False, id="torch"),
    ],
)
def test_arpa_models_score_streams_through_the_index_exactly(tmp_path, use_c):
    # lmlab's export read back: the hash-index path (``NGramLM.build_index``, in C or in
    # PyTorch) gives the same numbers as the full rows, bit for bit; a file whose 3-gram
    # context "a a" is no listed 2-gram cannot be indexed and is scored by binary search,
    # as exactly
    rng = random.Random(11)
    train = random_text(rng, 200)
    tok = WordTokenizer.train(train)
    model = fitted(train, tok, order=4, smoothing="modified_kneser_ney")
    loaded, _ = read_arpa(write_arpa(model, tmp_path / "lm.arpa", tok.words))
    (tmp_path / "skips.arpa").write_text(SKIPS_A_PREFIX)
    skips, _ = read_arpa(tmp_path / "skips.arpa")
    for lm, indexed in [(loaded, True), (skips, False)]:
        ids = torch.tensor(tok.encode(random_text(rng, 30)))[None] % lm.config.vocab_size
        lm.build_index(native=use_c)
        assert lm._streamed(ids[:, :-1], ids[:, 1:], None) == indexed
        assert (lm._levels()[0].native is not None) == (use_c and indexed)
        full = lm.log_probs(ids[:, :-1]).gather(-1, ids[:, 1:, None])[..., 0]
        assert torch.equal(lm.log_prob(ids[:, :-1], ids[:, 1:]), full)


def random_arpa(rng: random.Random) -> tuple[str, list[str]]:
    """An ARPA file as another tool could write it, with random numbers: the n-grams (up
    to order 2-5) of a few random sentences, so that every listed n-gram's context and
    shorter suffix are listed too (KenLM refuses most files that skip one); every word a
    1-gram (``<s>`` at -99), positive and negative backoffs, some left out (0)."""
    words = [f"w{i}" for i in range(rng.randint(2, 12))]
    order = rng.randint(2, 5)
    grams: list[dict[tuple[str, ...], None]] = [{} for _ in range(order + 1)]
    grams[1] = dict.fromkeys([("<unk>",), ("<s>",), ("</s>",), *((w,) for w in words)])
    for _ in range(rng.randint(1, 12)):
        sentence = ["<s>", *(rng.choice(words) for _ in range(rng.randint(1, 8))), "</s>"]
        for m in range(2, order + 1):
            for i in range(len(sentence) - m + 1):
                grams[m][tuple(sentence[i : i + m])] = None
    order = max(m for m in range(1, order + 1) if grams[m])
    lines = ["\\data\\", *(f"ngram {m}={len(grams[m])}" for m in range(1, order + 1)), ""]
    for m in range(1, order + 1):
        lines.append(f"\\{m}-grams:")
        for gram in grams[m]:
            p = -99.0 if gram == ("<s>",) else -rng.uniform(0.05, 3.0)
            b = None if m == order or rng.random() < 0.1 else rng.uniform(-1.5, 0.5)
            lines.append(f"{p:.6f}\t{' '.join(gram)}" + ("" if b is None else f"\t{b:.6f}"))
        lines.append("")
    return "\n".join([*lines, "\\end\\", ""]), words


@pytest.mark.parametrize("seed", range(16))
def test_random_arpa_files_of_other_tools_score_as_kenlm_scores_them(kenlm, tmp_path, seed):
    """read_arpa's backoff rule on files lmlab did not write: KenLM's per-word scores of
    random sentences, with words the file does not know (<unk>), within KENLM_ATOL."""
    rng = random.Random(seed)
    text, words = random_arpa(rng)
    path = tmp_path / "other.arpa"
    path.write_text(text)
    reference = kenlm.Model(str(path))
    model, names = read_arpa(path)
    assert model.config.order == reference.order
    index = {w: i for i, w in enumerate(names)}
    for _ in range(20):
        sentence = [rng.choice([*words, "zz"]) for _ in range(rng.randint(1, 10))]
        ids = [index.get(w, index["<unk>"]) for w in sentence] + [index["</s>"]]
        theirs = torch.tensor([s for s, _, _ in reference.full_scores(" ".join(sentence))])
        torch.testing.assert_close(
            sentence_log10(model, ids), theirs.double(), atol=KENLM_ATOL, rtol=0
        )
