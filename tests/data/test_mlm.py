"""BERT's masking (80/10/10, whole words, specials never chosen), next-sentence pairs, and a
pretraining loss over exactly the chosen positions."""

import random

import pytest
import torch
import torch.nn.functional as F

from lmlab.data.mlm import (
    IGNORE,
    IS_NEXT,
    IS_RANDOM,
    mask_tokens,
    pack_pairs,
    segment_pairs,
    sentence_pairs,
)
from lmlab.errors import ConfigError
from lmlab.models import build_model
from lmlab.train.bert import pretraining_loss

CLS, SEP, PAD, MASK = 1, 2, 0, 3
V = 50


def test_masking_follows_the_80_10_10_rule_and_never_chooses_specials():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, V, (64, 256), generator=g)
    special = torch.zeros_like(ids, dtype=torch.bool)
    special[:, 0] = special[:, -1] = True
    inputs, labels = mask_tokens(ids, MASK, V, special, generator=g, random_low=5)
    chosen = labels != IGNORE
    assert not chosen[special].any()
    assert torch.equal(labels[chosen], ids[chosen])  # labels: the original ids
    assert torch.equal(inputs[~chosen], ids[~chosen])  # nothing else changes
    n = chosen.sum().item()
    rate = n / (~special).sum().item()
    masked = (inputs[chosen] == MASK).float().mean().item()
    kept = (inputs[chosen] == ids[chosen]).float().mean().item()
    # 16,256 maskable positions: 3-sigma bounds of the binomial proportions
    assert abs(rate - 0.15) < 0.01
    assert abs(masked - 0.8) < 0.03
    assert abs(kept - 0.1) < 0.025  # includes random draws equal to the original (~0.2%)
    assert (inputs >= 5).logical_or(inputs == MASK).all()  # random ids avoid the specials


def test_whole_word_masking_takes_every_piece_of_a_chosen_word():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(5, V, (8, 60), generator=g)
    word_ids = (torch.arange(60) // 3).expand(8, 60).clone()  # 3 pieces per word
    word_ids[:, 0] = -1
    special = word_ids < 0
    _, labels = mask_tokens(ids, MASK, V, special, rate=0.3, generator=g, word_ids=word_ids)
    chosen = (labels != IGNORE).view(8, 20, 3)[:, 1:]  # words 1..19 are whole
    assert chosen.any()
    assert torch.equal(chosen.all(-1), chosen.any(-1))  # all pieces or none


def test_pairs_are_next_or_random_and_packed_with_segments():
    rng = random.Random(0)
    docs = [[[10 + d, 20 + i] for i in range(4)] for d in range(5)]
    pairs = sentence_pairs(docs, 400, rng)
    labels = [label for _, _, label in pairs]
    assert 150 < labels.count(IS_NEXT) < 250
    for a, b, label in pairs:
        same_doc = a[0] == b[0]
        assert (label == IS_NEXT) == (same_doc and b[1] == a[1] + 1)
        assert label == IS_NEXT or not same_doc
    batch = pack_pairs(
        [([5, 6, 7], [8, 9], IS_NEXT), ([5] * 20, [6] * 20, IS_RANDOM)], CLS, SEP, PAD, 12
    )
    assert batch.ids[0].tolist() == [CLS, 5, 6, 7, SEP, 8, 9, SEP, PAD, PAD, PAD, PAD]
    assert batch.token_type_ids[0].tolist() == [0, 0, 0, 0, 0, 1, 1, 1, 0, 0, 0, 0]
    assert batch.ids[1].tolist() == [CLS, *[5] * 5, SEP, *[6] * 4, SEP]  # the longer gave way
    assert batch.special[0].tolist() == [
        True,
        False,
        False,
        False,
        True,
        False,
        False,
        True,
        True,
        True,
        True,
        True,
    ]
    assert batch.nsp_labels.tolist() == [IS_NEXT, IS_RANDOM]
    with pytest.raises(ConfigError, match="at least two documents"):
        sentence_pairs(docs[:1], 3, rng)


def test_segment_pairs_keep_the_junction_and_fit_the_budget():
    doc = [[1, 2], [3], [4, 5, 6], [7]]
    # the docstring's example: every IS_NEXT pair at junction 2 of doc is ([1, 2, 3], [4, 5, 6])
    pairs = segment_pairs([doc, [[9, 9], [8]]], 200, random.Random(0), 6)
    at_two = [(a, b) for a, b, label in pairs if label == IS_NEXT and a[-1] == 3]
    assert at_two and all(pair == ([1, 2, 3], [4, 5, 6]) for pair in at_two)
    # many documents whose tokens say where they come from: (document, position)
    rng = random.Random(1)
    docs = []
    for d in range(6):
        sentences, at = [], 0
        for _ in range(rng.randint(2, 8)):
            n = rng.randint(1, 7)
            sentences.append([100 * d + at + k for k in range(n)])
            at += n
        docs.append(sentences)
    pairs = segment_pairs(docs, 500, random.Random(2), 12)
    assert 200 < sum(label == IS_NEXT for _, _, label in pairs) < 300
    for a, b, label in pairs:
        assert a and b and len(a) + len(b) <= 12 and len(a) <= 6
        assert all(y == x + 1 for x, y in zip(a, a[1:]))  # A is one contiguous run
        assert all(y == x + 1 for x, y in zip(b, b[1:]))
        if label == IS_NEXT:
            assert b[0] == a[-1] + 1  # B starts right where A ends
        else:
            assert b[0] // 100 != a[0] // 100  # another document
    with pytest.raises(ConfigError, match="at least two documents"):
        segment_pairs(docs[:1], 3, rng, 12)


def test_the_loss_counts_exactly_the_chosen_positions_and_every_nsp_label():
    torch.manual_seed(0)
    spec = {
        "family": "encoder",
        "vocab_size": V,
        "d_model": 16,
        "n_heads": 2,
        "n_layers": 1,
        "d_ff": 32,
        "max_seq_len": 32,
        "mlm_head": True,
        "pooler": True,
        "nsp_head": True,
    }
    model = build_model(spec).eval()
    rng = random.Random(0)
    docs = [[[rng.randrange(5, V) for _ in range(5)] for _ in range(4)] for _ in range(6)]
    batch = pack_pairs(sentence_pairs(docs, 8, rng), CLS, SEP, PAD, 16)
    inputs, labels = mask_tokens(
        batch.ids, MASK, V, batch.special, generator=torch.Generator().manual_seed(2)
    )
    out = pretraining_loss(model, batch, inputs, labels)
    hidden = model(inputs, batch.attention_mask, batch.token_type_ids)
    logp = model.mlm_logits(hidden).log_softmax(-1)
    chosen = labels != IGNORE
    by_hand = -logp[chosen].gather(1, labels[chosen][:, None]).mean()
    torch.testing.assert_close(out["mlm_loss"], by_hand)
    nsp = F.cross_entropy(model.nsp_logits(hidden), batch.nsp_labels)
    torch.testing.assert_close(out["nsp_loss"], nsp)
    torch.testing.assert_close(out["loss"], by_hand + nsp)
    # labels outside the chosen positions do not matter: change them all, same loss
    scrambled = torch.where(chosen, labels, torch.full_like(labels, IGNORE))
    assert torch.equal(
        pretraining_loss(model, batch, inputs, scrambled)["mlm_loss"], out["mlm_loss"]
    )
    # ... and an unmasked position's logits get no gradient from the MLM loss
    model.zero_grad()
    hidden = model(inputs, batch.attention_mask, batch.token_type_ids).detach().requires_grad_()
    F.cross_entropy(
        model.mlm_logits(hidden).flatten(0, 1), labels.flatten(), ignore_index=IGNORE
    ).backward()
    assert hidden.grad[~chosen].abs().max() == 0 and hidden.grad[chosen].abs().max() > 0
