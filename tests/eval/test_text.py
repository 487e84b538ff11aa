import json
import math

import pytest
import sacrebleu
from rouge_score import rouge_scorer

from lmlab.errors import ConfigError, DataError, DataNotFoundError
from lmlab.eval.text import (
    bleu,
    chrf,
    exact_match,
    load_scoring_examples,
    normalize_answer,
    rouge,
    score_breakdown,
    sentence_bleu,
    sentence_chrf,
    text_scores,
    token_f1,
)

HYPS = [
    "The cat sat on the mat.",
    "It is raining cats and dogs today",
    "A quick brown fox jumps over a lazy dog",
    "hello world",
]
REFS = [
    "The cat is sitting on the mat.",
    "Today it rains cats and dogs.",
    "The quick brown fox jumped over the lazy dog",
    "hello there world",
]
REFS_2 = [
    "A cat sat on the mat.",
    "It is pouring today.",
    "A fast brown fox leaps over a lazy dog",
    "hi world",
]


# Tolerance: none beyond float rounding. The wrapper passes the same strings to the same
# library calls, so the numbers must be identical; approx(abs=1e-9) only absorbs summation order.


def test_bleu_matches_sacrebleu():
    ours = bleu(HYPS, REFS)
    theirs = sacrebleu.corpus_bleu(HYPS, [REFS])
    assert ours.score == pytest.approx(theirs.score, abs=1e-9)
    assert ours.details["counts"] == theirs.counts and ours.details["bp"] == theirs.bp
    assert ours.signature.startswith("nrefs:1|case:mixed|eff:no|tok:13a")


def test_bleu_with_several_references_and_options_matches_sacrebleu():
    per_example = [[a, b] for a, b in zip(REFS, REFS_2)]
    ours = bleu(HYPS, per_example, lowercase=True, tokenize="intl")
    theirs = sacrebleu.corpus_bleu(HYPS, [REFS, REFS_2], lowercase=True, tokenize="intl")
    assert ours.score == pytest.approx(theirs.score, abs=1e-9)
    assert "nrefs:2|case:lc" in ours.signature


def test_bleu_with_a_variable_number_of_references_matches_sacrebleu():
    """sacrebleu takes None for a missing reference in a stream."""
    per_example = [[REFS[0], REFS_2[0]], [REFS[1]], [REFS[2], REFS_2[2]], [REFS[3]]]
    ours = bleu(HYPS, per_example)
    streams = [REFS, [REFS_2[0], None, REFS_2[2], None]]
    assert ours.score == pytest.approx(sacrebleu.corpus_bleu(HYPS, streams).score, abs=1e-9)
    assert "nrefs:var" in ours.signature


def test_sentence_scores_match_sacrebleu():
    for hyp, ref in zip(HYPS, REFS):
        assert sentence_bleu(hyp, ref).score == pytest.approx(
            sacrebleu.sentence_bleu(hyp, [ref]).score, abs=1e-9
        )
        assert sentence_chrf(hyp, [ref, "x"]).score == pytest.approx(
            sacrebleu.sentence_chrf(hyp, [ref, "x"]).score, abs=1e-9
        )


def test_chrf_matches_sacrebleu():
    assert chrf(HYPS, REFS).score == pytest.approx(
        sacrebleu.corpus_chrf(HYPS, [REFS]).score, abs=1e-9
    )
    plus = chrf(HYPS, REFS, word_order=2)  # chrF++
    assert plus.name == "chrF2++"
    assert plus.score == pytest.approx(
        sacrebleu.corpus_chrf(HYPS, [REFS], word_order=2).score, abs=1e-9
    )


@pytest.mark.parametrize("use_stemmer", [False, True])
def test_rouge_matches_rouge_score(use_stemmer):
    types = ["rouge1", "rouge2", "rougeL"]
    ours = rouge(HYPS, REFS, types, use_stemmer=use_stemmer)
    scorer = rouge_scorer.RougeScorer(types, use_stemmer=use_stemmer)
    rows = [scorer.score(ref, hyp) for hyp, ref in zip(HYPS, REFS)]  # (target, prediction)
    for t in types:
        for ours_key, field in (
            ("precision", "precision"),
            ("recall", "recall"),
            ("f1", "fmeasure"),
        ):
            expected = sum(getattr(r[t], field) for r in rows) / len(rows)
            assert ours[t][ours_key] == pytest.approx(expected, abs=1e-12)


def test_rouge_with_several_references_keeps_the_best_by_f1():
    ours = rouge(["the cat sat"], [["dogs bark", "the cat sat down"]], types=["rouge1"])
    # best reference "the cat sat down": 3 shared unigrams, P = 3/3, R = 3/4
    assert ours["rouge1"] == pytest.approx({"precision": 1.0, "recall": 0.75, "f1": 6 / 7})


def test_identical_text_scores_perfectly():
    assert bleu(REFS, REFS).score == pytest.approx(100.0)
    assert chrf(REFS, REFS).score == pytest.approx(100.0)
    for scores in rouge(REFS, REFS).values():
        assert scores == pytest.approx({"precision": 1.0, "recall": 1.0, "f1": 1.0})


def test_normalize_answer_hand_worked():
    assert normalize_answer("The  Cat's hat!") == "cats hat"
    assert normalize_answer("An apple, a day.") == "apple day"
    assert normalize_answer("Theatre") == "theatre"  # articles only as whole words
    assert normalize_answer("  ") == ""


def test_exact_match_hand_worked():
    assert exact_match("The cat.", "cat") == 1.0
    assert exact_match("The cat.", "cat", normalize=False) == 0.0
    assert exact_match("cat", "cat", normalize=False) == 1.0
    assert exact_match("cats", ["cat", "dog"]) == 0.0
    assert exact_match("A dog!", ["cat", "the dog"]) == 1.0  # any reference
    assert exact_match("", "") == 1.0
    assert exact_match("", "cat") == 0.0


def test_token_f1_hand_worked():
    # ["cat", "sat"] vs ["cat", "sat", "down"]: 2 shared; P = 1, R = 2/3, F1 = 2PR/(P+R) = 0.8
    assert token_f1("the cat sat", "a cat sat down") == pytest.approx(0.8)
    # multiset overlap: ["cat", "cat"] vs ["cat"] share 1; P = 1/2, R = 1, F1 = 2/3
    assert token_f1("cat cat", "cat") == pytest.approx(2 / 3)
    assert token_f1("Dog.", "cat") == 0.0
    assert token_f1("the dog", ["cat", "a dog"]) == 1.0  # best reference
    assert token_f1("", "") == 1.0  # SQuAD 2.0: two empty answers agree
    assert token_f1("", "cat") == 0.0 and token_f1("the", "cat") == 0.0  # "the" normalises to ""


def test_text_scores_collects_every_metric_as_json():
    scores, details = text_scores(HYPS, REFS)
    assert set(scores) == {"exact_match", "token_f1", "bleu", "chrf", "rouge1", "rouge2", "rougeL"}
    assert scores["bleu"] == pytest.approx(bleu(HYPS, REFS).score)
    assert scores["rougeL"] == pytest.approx(rouge(HYPS, REFS)["rougeL"]["f1"])
    assert scores["token_f1"] == pytest.approx(sum(map(token_f1, HYPS, REFS)) / 4)
    json.dumps({"scores": scores, "details": details})  # serialisable
    only, _ = text_scores(HYPS, REFS, ["exact_match"])
    assert only == {"exact_match": 0.0}


def test_bad_inputs_are_clear_errors():
    with pytest.raises(DataError, match="2 predictions but 1 references"):
        bleu(["a", "b"], ["a"])
    with pytest.raises(DataError, match="at least one"):
        chrf([], [])
    with pytest.raises(DataError, match="references of example 0"):
        bleu(["a"], [[]])
    with pytest.raises(ConfigError, match="unknown BLEU option 'lowercased'.*'lowercase'"):
        bleu(["a"], ["a"], lowercased=True)
    with pytest.raises(ConfigError, match="ROUGE type 'rouge0'"):
        rouge(["a"], ["a"], types=["rouge0"])
    with pytest.raises(ConfigError, match="unknown metric 'blue'.*'bleu'"):
        text_scores(["a"], ["a"], ["blue"])


# ----------------------------------------------------------------------------- score_breakdown


def test_score_breakdown_matches_sacrebleu_and_rouge_score():
    # random sentences over a small vocabulary (so n-grams match now and then), several seeds
    import random

    from sacrebleu.metrics import BLEU, CHRF

    words = "the a cat dog sat ran on under mat rug door near".split()
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"])
    for seed in range(6):
        rng = random.Random(seed)
        ref = " ".join(rng.choice(words) for _ in range(rng.randint(4, 14)))
        hyp = " ".join(rng.choice(words) for _ in range(rng.randint(2, 14)))
        ours = score_breakdown(hyp, ref)
        theirs = BLEU(effective_order=True).sentence_score(hyp, [ref])
        assert ours["bleu"]["score"] == pytest.approx(theirs.score, abs=1e-9)
        assert ours["bleu"]["bp"] == theirs.bp and ours["bleu"]["counts"] == theirs.counts
        orders = sum(1 for t in theirs.totals if t)
        assert ours["bleu"]["precisions"] == pytest.approx(
            [100 * c / t for c, t in zip(theirs.counts[:orders], theirs.totals[:orders])]
        )
        if theirs.score > 0:  # BLEU = BP * geometric mean of the smoothed precisions
            logs = [math.log(p / 100) for p in ours["bleu"]["smoothed_precisions"]]
            expected = 100 * theirs.bp * math.exp(sum(logs) / len(logs))
            assert ours["bleu"]["score"] == pytest.approx(expected, rel=1e-9)
        assert ours["chrf"] == pytest.approx(CHRF().sentence_score(hyp, [ref]).score, abs=1e-9)
        for t, s in scorer.score(ref, hyp).items():
            assert ours[t]["precision"] == pytest.approx(s.precision, abs=1e-12)
            assert ours[t]["recall"] == pytest.approx(s.recall, abs=1e-12)
            assert ours[t]["f1"] == pytest.approx(s.fmeasure, abs=1e-12)


def test_score_breakdown_brevity_penalty_by_hand():
    # "the cat sat" against "the cat sat on the mat": every n-gram of the candidate is in
    # the reference (3 orders), so BLEU is the brevity penalty alone: exp(1 - 6/3) = 0.368
    pieces = score_breakdown("the cat sat", "the cat sat on the mat")
    assert pieces["bleu"]["precisions"] == [100.0, 100.0, 100.0]
    assert pieces["bleu"]["score"] == pytest.approx(100 * math.exp(-1), abs=1e-9)
    assert pieces["rouge1"] == pytest.approx({"precision": 1.0, "recall": 0.5, "f1": 2 / 3})
    # word salad: every word, no bigram
    salad = score_breakdown("mat the on sat cat the", "the cat sat on the mat")
    assert salad["rouge1"]["f1"] == 1.0 and salad["rouge2"]["f1"] == 0.0
    assert salad["bleu"]["precisions"][0] == 100.0 and salad["bleu"]["counts"][1] == 0


def test_scoring_examples_load_and_errors_name_the_line(tmp_path):
    rows = load_scoring_examples()
    assert len(rows) == 14 and {r["kind"] for r in rows} >= {"paraphrase", "word salad"}
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"candidate": "a", "reference": "b"}\n{"candidate": "a"}\n')
    with pytest.raises(DataError, match=r"bad.jsonl:2: needs 'reference'"):
        load_scoring_examples(bad)
    with pytest.raises(DataNotFoundError, match="missing.jsonl' does not exist"):
        load_scoring_examples(tmp_path / "missing.jsonl")
