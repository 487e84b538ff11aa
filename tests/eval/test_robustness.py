import json
import random

import pytest
import torch

import lmlab.eval.choice as choice
from hf_models import tiny_llama
from lmlab.api import LM
from lmlab.checkpoint.hf import from_transformers
from lmlab.data.tokenizers import ByteTokenizer
from lmlab.errors import ConfigError
from lmlab.eval.robustness import (
    PROMPT_VARIANTS,
    add_typos,
    evaluate_robustness,
    perturb,
    shuffle_item,
)
from lmlab.eval.scoring import Continuation
from lmlab.eval.tasks import LETTER_CHOICES, ChoiceItem, ChoiceTask, load_task


def test_shuffle_choices_keeps_gold_on_the_same_text():
    task = load_task("world-facts")
    shuffled = perturb(task, "shuffle_choices", seed=3)
    moved = 0
    for a, b in zip(task.items, shuffled.items):
        assert sorted(a.choices) == sorted(b.choices)
        assert b.choices[b.gold] == a.choices[a.gold]
        moved += a.gold != b.gold
    assert moved > 10  # the order really changes
    assert perturb(task, "shuffle_choices", seed=3) == shuffled  # seeded
    moved = shuffle_item(ChoiceItem("q", ("a", "b", "c"), 2), random.Random(0))
    assert moved.choices[moved.gold] == "c"


def test_case_and_typos_touch_only_the_query():
    task = load_task("world-facts")
    for name in ("lowercase", "uppercase", "typos"):
        p = perturb(task, name, seed=1, typo_rate=0.2)
        assert [(it.choices, it.gold) for it in p.items] == [
            (it.choices, it.gold) for it in task.items
        ]
        assert p.items != task.items
    assert perturb(task, "uppercase").items[0].query == "WHAT IS THE CAPITAL OF FRANCE?"
    rng = random.Random(0)
    noisy = add_typos("the capital of france", 0.3, rng)
    assert noisy != "the capital of france"
    assert noisy == add_typos("the capital of france", 0.3, random.Random(0))  # seeded
    assert len(noisy) < len("the capital of france")  # at this seed some letters drop
    assert add_typos("abc 123", 0.0, rng) == "abc 123" and add_typos("123 !", 1.0, rng) == "123 !"


def test_prompt_format_variants():
    task = load_task("world-facts")
    p = perturb(task, "prompt_format:qa_short")
    assert p.prompt.render(p.items[0]) == "Q: What is the capital of France?\nA:"
    lettered = ChoiceTask("m", task.items, prompt=LETTER_CHOICES)
    assert "\nA. Lyon\nB. Paris" in perturb(lettered, "prompt_format:plain").prompt.render(
        task.items[0]
    )
    with pytest.raises(ConfigError, match="did you mean 'qa_short'"):
        perturb(task, "prompt_format:qa_shor")
    with pytest.raises(ConfigError, match="perturbation 'lower' is unknown"):
        perturb(task, "lower")


def test_robustness_scores_deltas_and_spread(monkeypatch):
    """A stub that always prefers the choice "a": accuracy is the share of items whose
    gold is "a" (3 of 4), which neither case nor shuffling changes; then a stub that prefers
    whichever choice comes first, whose accuracy shuffling does change."""
    monkeypatch.setattr(
        choice,
        "score_continuations",
        lambda lm, reqs, batch_size, progress: [
            Continuation(-1.0 if cont == " a" else -5.0, 1, False) for _, cont in reqs
        ],
    )
    items = tuple(ChoiceItem(f"q{i}", ("a", "b"), 0 if i < 3 else 1) for i in range(4))
    task = ChoiceTask("t", items)
    result = evaluate_robustness(
        None, task, ["lowercase", "shuffle_choices"], seed=0, progress=False
    )
    assert result.scores == {"none": 0.75, "lowercase": 0.75, "shuffle_choices": 0.75}
    assert result.deltas == {"lowercase": 0.0, "shuffle_choices": 0.0} and result.spread == 0

    def first(lm, reqs, batch_size, progress):  # the first choice of each item wins
        firsts = {ctx: cont for ctx, cont in reversed(reqs)}
        return [Continuation(-1.0 if firsts[c] == x else -5.0, 1, False) for c, x in reqs]

    monkeypatch.setattr(choice, "score_continuations", first)
    result = evaluate_robustness(None, task, ["shuffle_choices"], seed=0, progress=False)
    shuffled = perturb(task, "shuffle_choices", seed=0)
    expected = sum(it.gold == 0 for it in shuffled.items) / 4
    assert expected != 0.75  # this seed moves some answers
    assert result.scores == {"none": 0.75, "shuffle_choices": expected}
    assert result.deltas["shuffle_choices"] == pytest.approx(expected - 0.75)
    assert result.spread == pytest.approx(abs(expected - 0.75))
    json.dumps(result.to_dict())
    assert result.rows()[0]["perturbation"] == "none"


@pytest.mark.slow
def test_robustness_end_to_end_on_a_tiny_model():
    torch.manual_seed(0)
    lm = LM(from_transformers(tiny_llama(vocab_size=256)), ByteTokenizer())
    result = evaluate_robustness(
        lm, load_task("sentiment"), seed=0, limit=3, batch_size=64, progress=False
    )
    assert list(result.scores) == ["none", "lowercase", "uppercase", "typos", "shuffle_choices"] + [
        f"prompt_format:{v}" for v in PROMPT_VARIANTS
    ]
    assert all(r.n == 3 for r in result.results.values())
    assert result.std <= result.spread
    assert "unperturbed" in result.summary()


def test_conditions_the_tokenizer_cannot_encode_are_left_out_of_the_spread():
    from lmlab.api import LM
    from lmlab.data.tokenizers import CharTokenizer
    from lmlab.eval.robustness import evaluate_robustness
    from lmlab.eval.tasks import ChoiceItem, ChoiceTask
    from lmlab.models import build_model, get_preset

    chars = "".join(sorted(set("Question: Answer\nabcdxyzQA")))  # no capitals beyond Q, A
    torch.manual_seed(0)
    spec = {**get_preset("gpt-char-tiny"), "vocab_size": len(chars), "n_layers": 1}
    lm = LM(build_model(spec), CharTokenizer(chars))
    task = ChoiceTask("tiny", (ChoiceItem("abc", ["x", "y"], 0), ChoiceItem("cab", ["y", "z"], 1)))
    result = evaluate_robustness(lm, task, ["lowercase", "uppercase"], progress=False)
    assert list(result.scores) == ["none", "lowercase"]  # "ABC" is not encodable
    assert "uppercase" in result.unscored and "not encodable" in result.summary()
    assert result.to_dict()["unscored"] == result.unscored
