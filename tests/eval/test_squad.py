"""SQuAD v1.1 exact match and F1, worked by hand from evaluate-v1.1.py's formulas, and the
post-processing of start/end logits over windows."""

import pytest
import torch

from lmlab.eval.squad import best_answers, exact_match, normalise_answer, squad_scores, token_f1


def test_normalise_answer_as_squad():
    # lower case, punctuation out, articles out, whitespace collapsed
    assert normalise_answer("The  Eiffel-Tower, in an  hour!") == "eiffeltower in hour"


def test_exact_match_and_f1_hand_worked():
    assert exact_match("the Globex.", "Globex") == 1.0
    assert exact_match("Globex Inc", "Globex") == 0.0
    # "in lyon" vs "lyon": precision 1/2, recall 1/1 -> F1 = 2 * 0.5 * 1 / 1.5 = 2/3
    assert token_f1("in Lyon", "Lyon") == pytest.approx(2 / 3)
    # "a b c" vs "b c d": 2 common -> precision 2/3, recall 2/3 -> F1 2/3
    assert token_f1("x y z", "y z w") == pytest.approx(2 / 3)
    # repeated words count with their multiplicity (Counter intersection)
    assert token_f1("lyon lyon", "lyon") == pytest.approx(2 * 0.5 * 1 / 1.5)
    assert token_f1("", "lyon") == 0.0


def test_squad_scores_take_the_best_gold_answer_in_percent():
    scores = squad_scores(["in Lyon", "Oslo"], [["Lyon", "in Lyon"], "Kyoto"])
    assert scores == {"exact_match": 50.0, "f1": 50.0}


def test_best_answers_pick_the_best_valid_span_over_windows():
    context = "Mira was born in Lyon ."
    # tokens: Mira(0,4) was(5,8) born(9,13) in(14,16) Lyon(17,21) .(22,23)
    spans = [(0, 4), (5, 8), (9, 13), (14, 16), (17, 21), (22, 23)]
    # window 0: [CLS] q [SEP] Mira was born [SEP]; window 1: [CLS] q [SEP] born in Lyon . [SEP]
    w0 = [None, None, None, *spans[:3], None]
    w1 = [None, None, None, *spans[2:], None]
    s0 = torch.tensor([9.0, 0, 0, 1, 0, 0, 0])  # the best start is [CLS]: not an answer
    e0 = torch.tensor([9.0, 0, 0, 0.5, 0, 1, 0])
    s1 = torch.tensor([0.0, 0, 0, 0, 0, 3, 0, 0])  # "Lyon" .. "Lyon" scores 3 + 2 = 5
    e1 = torch.tensor([0.0, 0, 0, 0, 5, 2, 1, 0])  # end before start (index 4) is invalid
    answers = best_answers([context], [(0, w0), (0, w1)], [s0, s1], [e0, e1], n_best=3)
    assert answers == ["Lyon"]
    # with at most 1 token per answer "Mira was born" (window 0) is too long as well
    assert best_answers([context], [(0, w0)], [s0], [e0], max_answer_len=1) == ["Mira"]
