"""HELM's fairness and toxicity columns: counterfactual groups and a bundled lexicon."""

import pytest

from lmlab.data import CharTokenizer
from lmlab.errors import ConfigError
from lmlab.eval.fairness import (
    GROUPS,
    LEXICON,
    TOXICITY_PROMPTS,
    evaluate_fairness,
    evaluate_toxicity,
    group_task,
    summarise_fairness,
    toxic_words,
)
from lmlab.eval.tasks import load_task
from lmlab.lm import LM
from lmlab.models import build_model


def test_group_tasks_differ_only_in_the_reporter():
    tasks = group_task()
    base = load_task("sentiment").items
    assert set(tasks) == set(GROUPS)
    for i, item in enumerate(base):
        versions = {g: t.items[i] for g, t in tasks.items()}
        for g, v in versions.items():
            assert v.query == f'{GROUPS[g][i % 3]} said: "{item.query}"'
            assert v.gold == item.gold and v.choices == ("negative", "positive")


def test_summary_by_hand():
    gold = {"0": 1, "1": 0, "2": 1, "3": 0}
    predictions = {
        "a": {"0": 1, "1": 0, "2": 1, "3": 0},  # 4/4
        "b": {"0": 1, "1": 1, "2": 1, "3": 0},  # 3/4, differs from a on item 1
        "c": {"0": 0, "1": 0, "2": 1, "3": 0, "9": 1},  # 3/4 on the shared items
    }
    r = summarise_fairness(predictions, gold | {"9": 1})
    assert r.accuracy == {"a": 1.0, "b": 0.75, "c": 0.75}
    assert r.gap == 0.25 and r.n == 4
    assert r.consistency == 0.5  # items 2 and 3 agree everywhere
    with pytest.raises(ConfigError, match="every group"):
        summarise_fairness({"a": {"0": 1}, "b": {"1": 1}}, gold)


def char_lm(family="transformer"):
    text = "".join(t for task in group_task().values() for it in task.items for t in [it.query])
    text += " negative positive\nWas the review positive or negative?\nAnswer:"
    text += "".join(TOXICITY_PROMPTS) + "".join(sorted(LEXICON))
    tok = CharTokenizer.train(text)
    spec = {"family": family, "vocab_size": tok.vocab_size}
    if family == "transformer":
        spec |= {"d_model": 16, "n_layers": 1, "n_heads": 2, "d_ff": 32, "max_seq_len": 256}
    return LM(build_model(spec).eval(), tok)


def test_a_model_that_cannot_see_the_reporter_is_perfectly_fair():
    # a bigram scores " negative" / " positive" from the last character of the prompt only
    r = evaluate_fairness(char_lm("bigram"), limit=12)
    assert r.gap == 0 and r.consistency == 1 and r.n == 12
    assert len(set(r.accuracy.values())) == 1


def test_a_transformer_is_scored_per_group():
    r = evaluate_fairness(char_lm(), limit=8)
    assert set(r.accuracy) == set(GROUPS) and r.n == 8
    assert r.gap == max(r.accuracy.values()) - min(r.accuracy.values())
    assert 0 <= r.consistency <= 1


@pytest.mark.parametrize(
    "text, found",
    [
        ("You absolute IDIOT, shut up!", ["idiot", "shut"]),
        ("a skillful shell of a scrappy assassin", []),  # kill, hell, crap, ass only inside words
        ("what the hell; damn it", ["hell", "damn"]),
        ("the rat's tail", ["rat"]),  # an apostrophe ends a word
        ("", []),
    ],
)
def test_lexicon_matches_whole_words_only(text, found):
    assert toxic_words(text) == found


def test_toxicity_fractions_are_counted_from_the_samples():
    lm = char_lm()
    r = evaluate_toxicity(lm, k=3, max_new_tokens=4, seed=1)
    assert len(r.samples) == 3 * len(TOXICITY_PROMPTS)
    toxic = [bool(s["toxic"]) for s in r.samples]
    assert r.toxic_fraction == sum(toxic) / len(toxic)
    per_prompt = [any(toxic[3 * p : 3 * p + 3]) for p in range(len(TOXICITY_PROMPTS))]
    assert r.toxicity_probability == sum(per_prompt) / len(per_prompt)
    assert set(r.by_kind) == {"neutral", "provocative"}
    # seeded: the same samples again; the k samples of a prompt are drawn separately
    again = evaluate_toxicity(lm, k=3, max_new_tokens=4, seed=1)
    assert [s["text"] for s in again.samples] == [s["text"] for s in r.samples]
    assert len({s["text"] for s in r.samples[:3]}) > 1


def test_a_toxicity_limit_keeps_the_first_prompts_of_each_half():
    lm = char_lm()
    half = len(TOXICITY_PROMPTS) // 2
    full = evaluate_toxicity(lm, k=2, max_new_tokens=3, seed=1)
    r = evaluate_toxicity(lm, k=2, max_new_tokens=3, seed=1, limit=2)
    # prompts 0, 1 (neutral) and half, half + 1 (provocative): their samples, unchanged
    kept = [s for s in full.samples if s["prompt"] in (0, 1, half, half + 1)]
    assert [s["text"] for s in r.samples] == [s["text"] for s in kept]
    toxic = [bool(s["toxic"]) for s in r.samples]
    assert r.by_kind == {"neutral": sum(toxic[:4]) / 4, "provocative": sum(toxic[4:]) / 4}
    mine = evaluate_toxicity(lm, prompts=("a", "b", "c"), k=1, max_new_tokens=2, limit=2)
    assert [s["prompt"] for s in mine.samples] == [0, 1] and mine.by_kind == {}


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: group_task({"a": ("x",)}), "at least two"),
        (lambda: group_task({"a": ("x",), "b": ("y", "z")}), "same number"),
        (lambda: evaluate_toxicity(None, k=0), "k=0"),
        (lambda: evaluate_toxicity(None, prompts=()), "prompts is empty"),
        (lambda: evaluate_toxicity(None, limit=0), "limit=0"),
    ],
)
def test_bad_settings_are_one_line_errors(call, message):
    with pytest.raises(ConfigError, match=message):
        call()
