import math

import pytest
import torch

from lmlab.generate import (
    SamplingParams,
    apply_temperature,
    process_logits,
    repetition_penalty,
    seen_tokens,
    top_k_filter,
    top_p_filter,
)


def logits_of(*probs: float) -> torch.Tensor:
    """Logits [1, V] whose softmax is ``probs``."""
    return torch.tensor([probs]).log()


def kept(logits: torch.Tensor) -> set[int]:
    """Token ids still possible in a one-row result."""
    return {i for i, x in enumerate(logits[0].tolist()) if x != -math.inf}


# ----------------------------------------------------------------------------- top-k


@pytest.mark.parametrize(
    "k,expected", [(1, {1}), (2, {1, 3}), (3, {1, 2, 3}), (4, {0, 1, 2, 3}), (0, {0, 1, 2, 3})]
)
def test_top_k_keeps_the_k_most_likely(k, expected):
    assert kept(top_k_filter(logits_of(0.1, 0.4, 0.2, 0.3), k)) == expected


def test_top_k_renormalises_over_the_kept_tokens():
    probs = top_k_filter(logits_of(0.1, 0.4, 0.2, 0.3), 2).softmax(-1)
    torch.testing.assert_close(probs, torch.tensor([[0.0, 4 / 7, 0.0, 3 / 7]]))


def test_top_k_breaks_ties_by_lower_id_and_keeps_exactly_k():
    logits = torch.tensor([[1.0, 3.0, 3.0, 3.0, 0.0]])
    assert kept(top_k_filter(logits, 2)) == {1, 2}
    assert kept(top_k_filter(logits, 1)) == {1}
    assert kept(top_k_filter(logits, 4)) == {0, 1, 2, 3}
    # All tied: the k lowest ids.
    assert kept(top_k_filter(torch.zeros(1, 6), 3)) == {0, 1, 2}


def test_top_k_works_row_by_row():
    logits = torch.tensor([[0.0, 1.0, 2.0], [2.0, 1.0, 0.0]])
    out = top_k_filter(logits, 1)
    assert torch.isfinite(out).tolist() == [[False, False, True], [True, False, False]]


# ----------------------------------------------------------------------------- top-p


@pytest.mark.parametrize(
    "p,expected",
    [
        (1e-6, {1}),  # tiny p: only the most likely token
        (0.45, {1}),
        (0.55, {1, 2}),  # 0.5 < p: the second token is needed
        (0.7, {1, 2}),
        (0.85, {0, 1, 2}),  # tokens 0 and 3 tie at 0.1: the lower id is taken first
        (0.95, {0, 1, 2, 3}),
        (1.0, {0, 1, 2, 3}),  # p = 1 keeps everything
    ],
)
def test_top_p_keeps_the_smallest_set_reaching_p(p, expected):
    assert kept(top_p_filter(logits_of(0.1, 0.5, 0.3, 0.1), p)) == expected


def test_top_p_at_one_keeps_even_negligible_tokens():
    logits = torch.tensor([[30.0, 0.0, -30.0]])  # tail probabilities below float32 epsilon
    assert kept(top_p_filter(logits, 1.0)) == {0, 1, 2}


def test_top_p_with_ties_is_deterministic():
    logits = logits_of(0.4, 0.2, 0.2, 0.2)
    assert kept(top_p_filter(logits, 0.5)) == {0, 1}
    assert kept(top_p_filter(logits, 0.7)) == {0, 1, 2}
    assert kept(top_p_filter(torch.zeros(1, 4), 0.3)) == {0, 1}


def test_top_p_respects_tokens_already_removed():
    # After top-k removed token 1, the nucleus is computed on what is left.
    logits = top_k_filter(logits_of(0.45, 0.05, 0.5), 2)
    assert kept(top_p_filter(logits, 0.5)) == {2}
    assert kept(top_p_filter(logits, 0.6)) == {0, 2}


def test_top_p_works_row_by_row():
    logits = torch.cat([logits_of(0.6, 0.3, 0.1), logits_of(0.1, 0.2, 0.7)])
    out = top_p_filter(logits, 0.8)
    assert torch.isfinite(out).tolist() == [[True, True, False], [False, True, True]]


# ----------------------------------------------------------------------------- temperature and penalty


def test_temperature_scales_log_probabilities():
    # At t = 0.5 each probability is squared then renormalised: [0.5, 0.25, 0.25] -> [4, 1, 1]/6.
    probs = apply_temperature(logits_of(0.5, 0.25, 0.25), 0.5).softmax(-1)
    torch.testing.assert_close(probs, torch.tensor([[4 / 6, 1 / 6, 1 / 6]]))
    flat = apply_temperature(logits_of(0.5, 0.25, 0.25), 1e6).softmax(-1)
    torch.testing.assert_close(flat, torch.full((1, 3), 1 / 3))


def test_repetition_penalty_worked_example():
    logits = torch.tensor([[2.0, -1.0, 0.5]])
    seen = torch.tensor([[True, True, False]])
    out = repetition_penalty(logits, seen, 2.0)
    torch.testing.assert_close(out, torch.tensor([[1.0, -2.0, 0.5]]))
    assert repetition_penalty(logits, seen, 1.0) is logits


def test_seen_tokens_ignores_padding():
    ids = torch.tensor([[0, 0, 3, 1], [2, 2, 2, 2]])
    mask = torch.tensor([[False, False, True, True], [True, True, True, True]])
    seen = seen_tokens(ids, 5, mask)
    assert seen.tolist() == [
        [False, True, False, True, False],
        [False, False, True, False, False],
    ]
    assert seen_tokens(ids, 5)[0].tolist() == [True, True, False, True, False]


# ----------------------------------------------------------------------------- composition


def test_process_logits_order_penalty_temperature_top_k_top_p():
    logits = logits_of(0.1, 0.4, 0.2, 0.3)
    seen = torch.tensor([[False, True, False, False]])
    params = SamplingParams(temperature=0.5, top_k=3, top_p=0.6, repetition_penalty=1.5)
    expected = repetition_penalty(logits, seen, 1.5)
    expected = top_p_filter(top_k_filter(expected / 0.5, 3), 0.6)
    torch.testing.assert_close(process_logits(logits, params, seen), expected)


def test_process_logits_greedy_only_applies_the_penalty():
    logits = logits_of(0.1, 0.4, 0.2, 0.3)
    greedy = SamplingParams(temperature=0, top_k=1, top_p=0.1)
    assert process_logits(logits, greedy) is logits
    seen = torch.tensor([[False, True, False, False]])
    out = process_logits(logits, SamplingParams(temperature=0, repetition_penalty=2.0), seen)
    torch.testing.assert_close(out, repetition_penalty(logits, seen, 2.0))


def test_process_logits_pure_sampling_is_identity():
    logits = torch.randn(3, 11)
    assert process_logits(logits, SamplingParams()) is logits
