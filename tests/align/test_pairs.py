"""Preference pairs from verifiable tasks: reference near misses and on-policy samples."""

import pytest
import torch

import lmlab
from lmlab.align.pairs import (
    near_misses,
    reference_pairs,
    row_prompt,
    sampled_pairs,
    sampled_reward,
)
from lmlab.checkpoint.io import save_checkpoint
from lmlab.data import BPETokenizer
from lmlab.data.instructions import PLAIN_TEMPLATE, example_from_row
from lmlab.data.preferences import load_preferences, write_preferences
from lmlab.data.tasks import TASKS, check, generate_tasks
from lmlab.errors import ConfigError, DataError
from lmlab.models import build_model, get_preset


def test_reference_pairs_chosen_is_right_and_rejected_is_a_near_miss(tmp_path):
    rows = generate_tasks(list(TASKS), 40, seed=3)
    pairs = reference_pairs(rows, seed=0)
    assert len(pairs) == len(rows)
    for row, pair in zip(rows, pairs):
        assert check(row["task"], pair.chosen, row["output"])
        assert not check(row["task"], pair.rejected, row["output"])
        assert pair.meta == {"task": row["task"], "source": "reference", "reference": row["output"]}
        if row["task"] == "arithmetic":  # a nearby number
            assert abs(int(pair.rejected) - int(row["output"])) <= 10
    assert reference_pairs(rows, seed=0) == pairs  # seeded
    write_preferences(pairs, tmp_path / "p.jsonl")
    assert load_preferences(tmp_path / "p.jsonl") == pairs


def test_near_misses_examples():
    row = {
        "instruction": "What is 4 * 5? Answer with the number only.",
        "input": "",
        "output": "20",
    }
    import random

    misses = near_misses("arithmetic", row, random.Random(0))
    assert set(misses) >= {"19", "21", "30", "10"} and "20" not in misses
    word = {
        "instruction": "Reverse the letters of the word.",
        "input": "planet",
        "output": "tenalp",
    }
    misses = near_misses("reverse", word, random.Random(0))
    assert misses[0] == "planet" and "tenalp" not in misses
    assert all(sorted(m) == sorted("tenalp") or len(m) != 6 for m in misses[1:3])


def test_prompt_is_the_user_message_as_sft_renders_it():
    row = {"instruction": "Reverse the letters of the word.", "input": "planet", "output": "tenalp"}
    assert row_prompt(row) == "Reverse the letters of the word.\n\nplanet"
    assert row_prompt(row) == example_from_row(row).messages[0]["content"]
    with_system = {**row, "system": "Be brief."}
    assert row_prompt(with_system) == (
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Reverse the letters of the word.\n\nplanet"},
    )
    with pytest.raises(DataError, match="'task'"):
        reference_pairs([row])


class ScriptedLM:
    """A stand-in model: the i-th prompt of a call gets ``answers[prompt][i % k]``."""

    def __init__(self, answers, k):
        self.tokenizer = type("Tok", (), {"eos_id": None})()
        self.chat_template = None
        self.answers, self.k, self.calls = answers, k, []

    def generate(self, prompts, **decoding):
        self.calls.append(decoding)
        return [f" {self.answers[p][i % self.k]}\n" for i, p in enumerate(prompts)]


THREE_SUMS = [
    {"task": "arithmetic", "instruction": "What is 1 + 1?", "input": "", "output": "2"},
    {"task": "arithmetic", "instruction": "What is 2 + 2?", "input": "", "output": "4"},
    {"task": "arithmetic", "instruction": "What is 3 + 3?", "input": "", "output": "6"},
]


def test_sampled_pairs_pairs_a_right_with_a_wrong_reply():
    rows = THREE_SUMS
    rendered = [PLAIN_TEMPLATE_RENDER(r["instruction"]) for r in rows]
    answers = {
        rendered[0]: ["3", "2", "2"],  # mixed: a pair ("2" over "3")
        rendered[1]: ["4", "4", "4"],  # all right: no pair
        rendered[2]: ["5", "7", "x"],  # all wrong: no pair
    }
    lm = ScriptedLM(answers, k=3)
    result = sampled_pairs(lm, rows, k=3, seed=5, temperature=0.9, batch_size=2)
    assert (result.prompts, result.with_pair, result.all_right, result.all_wrong) == (3, 1, 1, 1)
    assert len(result.pairs) == 1
    pair = result.pairs[0]
    assert (pair.prompt, pair.chosen, pair.rejected) == ("What is 1 + 1?", "2", "3")
    assert pair.meta["source"] == "sampled"
    assert result.accuracy == pytest.approx(5 / 9)
    assert [c["seed"] for c in lm.calls] == [5 * 1_000_003, 5 * 1_000_003 + 1]  # per batch
    assert all(c["temperature"] == 0.9 for c in lm.calls)


def PLAIN_TEMPLATE_RENDER(user):
    from lmlab.data.instructions import template_for

    tok = type("Tok", (), {"eos_id": None})()
    return template_for(tok, None).render([{"role": "user", "content": user}], True)


def test_sampled_pairs_settings_are_checked():
    with pytest.raises(ConfigError, match="k=1"):
        sampled_pairs(ScriptedLM({}, 1), [], k=1)
    with pytest.raises(ConfigError, match="temperature=0"):
        sampled_pairs(ScriptedLM({}, 2), [], k=2, temperature=0)


def test_sampled_pairs_with_a_real_tiny_model_is_seeded(tmp_path):
    rows = generate_tasks(["arithmetic"], 6, seed=0)
    text = " ".join(r["instruction"] + " " + r["output"] for r in rows) + "0123456789"
    tok = BPETokenizer.train(text + " ### Instruction: Response:", 280)
    torch.manual_seed(0)
    model = build_model(
        {**get_preset("gpt-char-tiny"), "vocab_size": tok.vocab_size, "n_layers": 1}
    )
    save_checkpoint(tmp_path / "m", model.eval(), tokenizer=tok)
    lm = lmlab.load(str(tmp_path / "m"))
    a = sampled_pairs(lm, rows, k=2, seed=1, max_new_tokens=3)
    b = sampled_pairs(lm, rows, k=2, seed=1, max_new_tokens=3)
    assert a.replies == b.replies and len(a.replies) == 6 and all(len(r) == 2 for r in a.replies)
    assert a.with_pair + a.all_right + a.all_wrong == 6
    assert a.replies != sampled_pairs(lm, rows, k=2, seed=2, max_new_tokens=3).replies
    assert PLAIN_TEMPLATE is not None


def test_sampled_pairs_can_pair_the_reference_with_a_mistake_when_all_replies_are_wrong():
    rows = THREE_SUMS
    rendered = [PLAIN_TEMPLATE_RENDER(r["instruction"]) for r in rows]
    answers = {
        rendered[0]: ["3", "2"],  # mixed: the sampled right reply is chosen
        rendered[1]: ["4", "4"],  # all right: still no pair
        rendered[2]: ["5", "7"],  # all wrong: the reference over the first mistake
    }
    result = sampled_pairs(ScriptedLM(answers, k=2), rows, k=2, reference_if_all_wrong=True)
    assert (result.with_pair, result.all_right, result.all_wrong) == (2, 1, 1)
    got = [(p.chosen, p.rejected, p.meta["source"]) for p in result.pairs]
    assert got == [("2", "3", "sampled"), ("6", "5", "reference")]


def test_sampled_reward_is_the_share_of_right_replies_with_the_given_draws():
    rendered = [PLAIN_TEMPLATE_RENDER(r["instruction"]) for r in THREE_SUMS]
    answers = {rendered[0]: ["3", "2"], rendered[1]: ["4", "4"], rendered[2]: ["5", "7"]}
    lm = ScriptedLM(answers, k=2)
    assert sampled_reward(lm, THREE_SUMS, k=2, seed=3, temperature=0.5) == pytest.approx(3 / 6)
    assert [(c["seed"], c["temperature"]) for c in lm.calls] == [(3 * 1_000_003, 0.5)]
