import json
import math
from dataclasses import dataclass

import numpy as np
import pytest
import torch

from hf_models import tiny_llama
from lmlab.api import LM
from lmlab.checkpoint.hf import from_transformers
from lmlab.data.tokenizers import ByteTokenizer
from lmlab.errors import ConfigError
from lmlab.eval.behaviour import (
    DIR,
    INV,
    MFT,
    Generate,
    Labels,
    Prediction,
    Suite,
    add_prefix,
    add_typos,
    answer_matches,
    check_dir,
    check_inv,
    check_mft,
    default_suite,
    fill,
    pairs,
    replace_word,
    run_suite,
)
from lmlab.eval.scoring import score_continuations
from lmlab.models.ngram import NGramConfig, NGramLM


@dataclass(frozen=True)
class Table:
    """A stub predictor: the answer (and P(positive)) of each prompt from a table."""

    answers: tuple[tuple[str, str, float], ...]  # (prompt, label, P(positive))
    choices: tuple[str, ...] = (" positive", " negative")

    def predict(self, lm, prompts, batch_size=16):
        table = {p: (label, pos) for p, label, pos in self.answers}
        return [
            Prediction(table[p][0], {"positive": table[p][1], "negative": 1 - table[p][1]})
            for p in prompts
        ]


@pytest.fixture(scope="module")
def llama_lm():
    torch.manual_seed(0)
    hf = tiny_llama(vocab_size=256, max_position_embeddings=160)  # fits the default prompts
    return LM(from_transformers(hf), ByteTokenizer())


# ----------------------------------------------------------------------------- checks


def test_answer_matching_and_single_case_checks():
    assert answer_matches(" 5\nQ: next", "5")
    assert answer_matches("5 apples.", "5") and answer_matches("The Paris.", "paris")
    assert not answer_matches("50", "5") and not answer_matches("", "5")
    assert check_mft(Prediction("positive"), " Positive")
    assert not check_mft(Prediction("negative"), "positive")
    assert check_inv(Prediction("Five."), Prediction("five"))
    assert not check_inv(Prediction("5"), Prediction("6"))
    low, mid, high = (Prediction("x", {"positive": p}) for p in (0.4, 0.45, 0.6))
    assert check_dir(low, high, "positive", "up") and not check_dir(high, low, "positive", "up")
    assert check_dir(high, low, "positive", "down")
    assert not check_dir(low, low, "positive", "up")  # with no tolerance it must move
    assert check_dir(mid, low, "positive", "up", tolerance=0.1)  # fell by 0.05 < 0.1


def test_run_suite_counts_failures_per_test_with_examples():
    table = Table(
        (
            ("good film", "positive", 0.9),
            ("bad film", "positive", 0.6),  # MFT failure: expected negative
            ("Ann: good", "positive", 0.8),
            ("Bob: good", "negative", 0.4),  # INV failure
            ("Cy: good", "positive", 0.7),
            ("not good", "negative", 0.2),  # DIR pass: 0.9 -> 0.2 goes down
            ("very good", "positive", 0.95),  # DIR 'down' failure: 0.9 -> 0.95
        )
    )
    suite = Suite(
        "stub",
        (
            MFT("mft", ("good film", "bad film"), ("positive", "negative"), table),
            INV("inv", (("Ann: good", "Bob: good"), ("Ann: good", "Cy: good")), table),
            DIR(
                "dir",
                (("good film", "not good"), ("good film", "very good")),
                table,
                label="positive",
                direction="down",
            ),
        ),
    )
    result = run_suite(None, suite, max_examples=5)
    assert [(t.name, t.kind, t.n, t.failures) for t in result.tests] == [
        ("mft", "MFT", 2, 1),
        ("inv", "INV", 2, 1),
        ("dir", "DIR", 2, 1),
    ]
    mft, inv, dir_ = result.tests
    assert mft.examples == ({"input": "bad film", "expected": "negative", "got": "positive"},)
    assert inv.examples == (
        {"original": "Ann: good", "edited": "Bob: good", "got": ["positive", "negative"]},
    )
    assert dir_.examples[0]["p"] == [0.9, 0.95]
    assert result.failure_rate == 0.5 and mft.failure_rate == 0.5
    data = json.loads(json.dumps(result.to_dict()))
    assert data["tests"][2]["failures"] == 1
    table_md = result.to_markdown().splitlines()
    assert table_md[0].startswith("| test | kind |") and len(table_md) == 2 + 3
    assert "| inv | INV | 2 | 1 | 50.0% |" in table_md[3]
    assert "3 of 3 tests failed" in result.summary()
    assert len(run_suite(None, suite, max_examples=0).tests[0].examples) == 0


def test_each_prompt_is_predicted_once_per_predictor():
    calls = []

    @dataclass(frozen=True)
    class Counting:
        def predict(self, lm, prompts, batch_size=16):
            calls.append(list(prompts))
            return [Prediction("a") for _ in prompts]

    p = Counting()
    run_suite(None, [MFT("a", ("x", "y"), "a", p), INV("b", (("x", "z"),), p)])
    assert calls == [["x", "y", "z"]]


def test_bad_tests_are_errors():
    labels = Labels((" yes", " no"))
    with pytest.raises(ConfigError, match="2 inputs but 3 expected"):
        MFT("m", ("a", "b"), ("x", "y", "z"), labels)
    with pytest.raises(ConfigError, match="label='maybe' is not one of"):
        DIR("d", (("a", "b"),), labels, label="maybe", direction="up")
    with pytest.raises(ConfigError, match="direction='left' is invalid; valid: up, down"):
        DIR("d", (("a", "b"),), labels, label="yes", direction="left")
    with pytest.raises(ConfigError, match="has no cases"):
        INV("i", (), labels)
    with pytest.raises(ConfigError, match="predictor='x' is invalid"):
        INV("i", (("a", "b"),), "x")
    with pytest.raises(ConfigError, match="need at least two"):
        Labels((" yes",))
    with pytest.raises(ConfigError, match="repeats test names"):
        Suite("s", (INV("i", (("a", "b"),), labels), INV("i", (("a", "c"),), labels)))
    gen = DIR("d", (("a", "b"),), Generate(), label="yes", direction="up")
    with pytest.raises(ConfigError, match="needs label probabilities"):
        gen.check({"a": Prediction("x"), "b": Prediction("y")})


# ----------------------------------------------------------------------------- helpers


def test_templates_and_perturbations():
    assert fill("{name} is {age}.", name=["Ann", "Bo"], age=["9", "10"]) == [
        "Ann is 9.",
        "Ann is 10.",
        "Bo is 9.",
        "Bo is 10.",
    ]
    assert replace_word("was", "was not")("It was good, wasn't it") == "It was not good, wasn't it"
    assert add_prefix("Note: x\n")("Q") == "Note: x\nQ"
    text = "The food was great."
    typo = add_typos(text, seed=3)
    assert typo == add_typos(text, seed=3) and typo != text
    assert sorted(typo) == sorted(text) and len(typo) == len(text)
    assert sum(a != b for a, b in zip(typo, text)) == 2  # one swap of adjacent letters
    assert add_typos("a b c") == "a b c"  # no word long enough
    assert pairs(["It was good.", "Nice."], replace_word("was", "was not"), "R: {text}") == [
        ("R: It was good.", "R: It was not good.")
    ]


# ----------------------------------------------------------------------------- predictors


def test_labels_probabilities_are_the_softmax_of_continuation_scores(llama_lm):
    labels = Labels((" positive", " negative"))
    prompts = ["Review: great.\nSentiment:", "Review: awful.\nSentiment:"]
    got = labels.predict(llama_lm, prompts)
    for prompt, prediction in zip(prompts, got):
        pos, neg = (
            s.logprob
            for s in score_continuations(llama_lm, [(prompt, " positive"), (prompt, " negative")])
        )
        expected = math.exp(pos) / (math.exp(pos) + math.exp(neg))
        assert prediction.probs["positive"] == pytest.approx(expected, abs=1e-6)
        assert prediction.text == ("positive" if pos >= neg else "negative")


def test_generate_is_greedy_and_keeps_the_first_line(llama_lm):
    gen = Generate(max_new_tokens=5, stop=())
    got = gen.predict(llama_lm, ["Q: 1 + 1?\nA:", "Hi"], batch_size=1)
    for prompt, prediction in zip(["Q: 1 + 1?\nA:", "Hi"], got):
        text = llama_lm.generate(prompt, max_new_tokens=5, temperature=0.0)
        lines = [line.strip() for line in text.splitlines() if line.strip()]
        assert prediction.text == (lines[0] if lines else "") and prediction.probs is None


# ----------------------------------------------------------------------------- end to end


def test_default_suite_runs_on_a_tiny_model_and_an_ngram(llama_lm):
    suite = default_suite()
    assert {t.kind for t in suite.tests} == {"MFT", "INV", "DIR"}
    text = b"Q: What is 2 + 3?\nA: 5\nReview: I loved it.\nSentiment: positive\n" * 3
    ngram = NGramLM(NGramConfig(vocab_size=256, order=3)).fit(np.frombuffer(text, np.uint8))
    for lm in (llama_lm, LM(ngram, ByteTokenizer())):
        result = run_suite(lm, suite)
        assert [t.name for t in result.tests] == [t.name for t in suite.tests]
        assert all(0 <= t.failures <= t.n for t in result.tests)
        json.dumps(result.to_dict())
        assert result.to_markdown().count("\n") == 1 + len(suite.tests)
