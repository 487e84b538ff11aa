"""``lmlab.align.judge`` and ``lmlab judge``: the label-probability judge on a tiny random
model (antisymmetric under swapping, the label readout itself), agreement with the task
checker, the constitution, files and resuming."""

import json
import math
import re

import pytest
import torch

from lmlab.align import judge as judge_module
from lmlab.align.judge import (
    DEFAULT_CONSTITUTION,
    Agreement,
    agreement,
    debiased_preference,
    judge,
    judge_pair,
    judge_prompts,
    judge_question,
    label_logprobs,
    label_probability,
    read_constitution,
    task_judge,
)
from lmlab.align.rank import item_from_row, render_prompt
from lmlab.api import LM
from lmlab.checkpoint.io import save_checkpoint
from lmlab.cli.main import main
from lmlab.data import ByteTokenizer
from lmlab.data.preferences import PreferencePair, load_preferences
from lmlab.errors import ConfigError, DataError, DataNotFoundError
from lmlab.generate import SamplingParams
from lmlab.models import build_model

PARAMS = SamplingParams(max_new_tokens=4)
ROWS = [
    {"task": "arithmetic", "instruction": f"What is {a} + {b}?", "input": "", "output": str(a + b)}
    for a, b in [(2, 3), (4, 4), (10, 1)]
]


def tiny_model():
    torch.manual_seed(0)
    spec = {
        "family": "transformer",
        "vocab_size": 256,
        "d_model": 32,
        "n_layers": 1,
        "n_heads": 2,
        "d_ff": 64,
        "max_seq_len": 1024,
    }
    return build_model(spec).eval()


@pytest.fixture(scope="module")
def lm():
    return LM(tiny_model(), ByteTokenizer())


@pytest.fixture
def items():
    return [item_from_row(row) for row in ROWS]


def answers_right_and_wrong(lm, messages, n, params):
    """A policy whose first reply is right and second wrong (the row's sum, and sum + 1)."""
    a, b = map(int, re.findall(r"\d+", messages[-1]["content"]))
    return [str(a + b), str(a + b + 1)]


def shown_answers(question):
    """(question text, answer A, answer B) of a judge question."""
    m = re.search(r"Question:\n(.*)\n\nAnswer A:\n(.*)\n\nAnswer B:\n(.*?)\n", question, re.S)
    return m.groups()


def judge_preferring(right: bool):
    """A ``label_logprobs`` that puts its weight on the right (or the wrong) answer."""

    def logprobs(judge, question):
        prompt, a, b = shown_answers(question)
        x, y = map(int, re.findall(r"\d+", prompt))
        a_right = int(a) == x + y
        return (-0.1, -3.0) if a_right == right else (-3.0, -0.1)

    return logprobs


# ----------------------------------------------------------------------------- the maths


def test_label_probability_and_debiasing_by_hand():
    assert label_probability(-0.1, -2.4) == pytest.approx(1 / (1 + math.exp(-2.3)))
    assert label_probability(-1.0, -1.0) == 0.5
    # a judge that always says A with 0.9 has no preference once both orders are averaged
    assert debiased_preference(0.9, 0.9) == pytest.approx(0.5, abs=1e-12)
    # prefers a in both orders: 0.8 with a as A, 1 - 0.3 with a as B
    assert debiased_preference(0.8, 0.3) == pytest.approx(0.75)


def test_label_logprobs_match_a_direct_softmax(lm):
    """The readout is log softmax of the judge's logits at the label position; float32
    with the same ops in another order, so 1e-5."""
    question = judge_question("What is 2 + 3?", "5", "6", DEFAULT_CONSTITUTION)
    got = label_logprobs(lm, question)
    context = render_prompt(lm, [{"role": "user", "content": question}])
    # The harness moves the context's trailing newline to the continuation: "\nA", "\nB".
    assert context.endswith("### Response:\n")
    ids = torch.tensor([lm.tokenizer.encode(context)])
    with torch.no_grad():
        logp = lm.model(ids).float().log_softmax(-1)[0]  # (T, V)
    newline = logp[-2, ord("\n")]
    expected = [(newline + logp[-1, ord(label)]).item() for label in "AB"]
    torch.testing.assert_close(torch.tensor(got), torch.tensor(expected), atol=1e-5, rtol=0)


def test_swapping_the_answers_gives_the_complement(lm):
    prompt = "What is 2 + 3?"
    forward = judge_pair(lm, prompt, "5", "six")
    backward = judge_pair(lm, prompt, "six", "5")
    assert forward.p_a + backward.p_a == pytest.approx(1.0, abs=1e-12)
    assert backward.p_orders == pytest.approx(tuple(1 - p for p in forward.p_orders[::-1]))
    # The random judge has a position bias (the two readings differ), which averaging cancels.
    assert abs(forward.p_orders[0] - forward.p_orders[1]) > 1e-4
    assert forward.p_a == pytest.approx(sum(forward.p_orders) / 2)


# ----------------------------------------------------------------------------- collecting


def test_a_judge_that_knows_the_answer_agrees_fully(lm, items, tmp_path, monkeypatch):
    monkeypatch.setattr(judge_module, "sample_replies", answers_right_and_wrong)
    monkeypatch.setattr(judge_module, "label_logprobs", judge_preferring(right=True))
    out = tmp_path / "prefs.jsonl"
    summary = judge_prompts(lm, lm, items, out, "oracle", params=PARAMS)
    assert (summary.prompts, summary.pairs, summary.ties) == (3, 3, 0)
    pairs = load_preferences(out)
    assert agreement(pairs) == Agreement(1.0, 3, 3)
    pair = pairs[0]
    assert pair.prompt == "What is 2 + 3?" and (pair.chosen, pair.rejected) == ("5", "6")
    assert pair.meta["judge"] == "oracle" and pair.meta["task"] == "arithmetic"
    assert pair.meta["reference"] == "5" and pair.meta["prompt_id"] == items[0].prompt_id
    p = label_probability(-0.1, -3.0)
    assert pair.meta["p_chosen"] == pytest.approx(p)
    assert pair.meta["p_orders"] == pytest.approx([p, p])

    wrong = tmp_path / "wrong.jsonl"
    monkeypatch.setattr(judge_module, "label_logprobs", judge_preferring(right=False))
    judge_prompts(lm, lm, items, wrong, params=PARAMS)
    assert agreement(load_preferences(wrong)) == Agreement(0.0, 3, 3)


def test_a_judge_with_only_a_position_bias_writes_no_pairs(lm, items, tmp_path, monkeypatch):
    monkeypatch.setattr(judge_module, "sample_replies", answers_right_and_wrong)
    monkeypatch.setattr(judge_module, "label_logprobs", lambda judge, question: (-0.2, -1.9))
    summary = judge_prompts(lm, lm, items, tmp_path / "p.jsonl", params=PARAMS)
    assert (summary.pairs, summary.ties) == (0, 3)


def test_real_tiny_judge_writes_loadable_pairs_and_resumes(lm, items, tmp_path):
    out = tmp_path / "prefs.jsonl"
    summary = judge_prompts(lm, lm, items, out, "tiny", samples=3, seed=1, params=PARAMS)
    pairs = load_preferences(out)
    assert summary.pairs == len(pairs) and summary.pairs + summary.ties == 3 * 3
    for pair in pairs:
        assert pair.meta["p_chosen"] > 0.5
        assert pair.meta["p_chosen"] == pytest.approx(sum(pair.meta["p_orders"]) / 2)
    again = judge_prompts(lm, lm, items, out, "tiny", samples=3, seed=1, params=PARAMS)
    assert (again.prompts, again.pairs) == (0, 0) and len(load_preferences(out)) == len(pairs)


def test_critiques_are_generated_and_recorded(lm, items, tmp_path, monkeypatch):
    monkeypatch.setattr(judge_module, "sample_replies", answers_right_and_wrong)
    out = tmp_path / "prefs.jsonl"
    judge_prompts(lm, lm, items[:1], out, params=PARAMS, critique=True)
    (pair,) = load_preferences(out)
    assert len(pair.meta["critiques"]) == 2 and all(
        isinstance(c, str) for c in pair.meta["critiques"]
    )


def test_the_constitution_file_replaces_the_default(lm, items, tmp_path, monkeypatch):
    file = tmp_path / "principles.txt"
    file.write_text("1. Prefer the shorter answer.\n")
    assert read_constitution(None) == DEFAULT_CONSTITUTION
    assert read_constitution(file) == "1. Prefer the shorter answer."
    seen = []
    monkeypatch.setattr(judge_module, "sample_replies", answers_right_and_wrong)
    monkeypatch.setattr(
        judge_module, "label_logprobs", lambda judge, q: seen.append(q) or (-1.0, -2.0)
    )
    judge_prompts(lm, lm, items[:1], tmp_path / "p.jsonl", constitution=read_constitution(file))
    assert len(seen) == 2 and all("1. Prefer the shorter answer." in q for q in seen)
    assert all("The answer is correct" not in q for q in seen)
    assert [shown_answers(q)[1:] for q in seen] == [("5", "6"), ("6", "5")]


def test_missing_files_and_bad_settings_are_clear_errors(lm, items, tmp_path):
    with pytest.raises(DataNotFoundError, match="constitution file"):
        read_constitution(tmp_path / "none.txt")
    (tmp_path / "empty.txt").write_text("  \n")
    with pytest.raises(DataError, match="empty"):
        read_constitution(tmp_path / "empty.txt")
    with pytest.raises(DataNotFoundError, match="prompts"):
        judge("m", str(tmp_path / "none.jsonl"), "m")
    prompts = tmp_path / "p.txt"
    prompts.write_text("hi\n")
    with pytest.raises(DataNotFoundError, match="no model"):
        judge(str(tmp_path / "no-model"), str(prompts), "m")
    with pytest.raises(ConfigError, match="samples=1"):
        judge_prompts(lm, lm, items, tmp_path / "p.jsonl", samples=1)
    with pytest.raises(ConfigError, match="limit=0"):
        judge("m", str(prompts), "m", limit=0)


def test_task_judge_compares_only_when_exactly_one_is_right():
    meta = {"task": "arithmetic", "reference": "5"}
    assert task_judge(PreferencePair("q", "5", "6", meta)) is True
    assert task_judge(PreferencePair("q", "6", "5", meta)) is False
    assert task_judge(PreferencePair("q", "7", "6", meta)) is None
    assert task_judge(PreferencePair("q", " 5", "5.", meta)) is None
    assert task_judge(PreferencePair("q", "5", "6", {})) is None
    pairs = [
        PreferencePair("q", "5", "6", meta),
        PreferencePair("q", "6", "5", meta),
        PreferencePair("q", "7", "6", meta),
    ]
    assert agreement(pairs) == Agreement(0.5, 2, 3)
    assert agreement([]) == Agreement(None, 0, 0)


# ----------------------------------------------------------------------------- CLI


def test_cli_judge_writes_pairs_and_reports_agreement(tmp_path, capsys, monkeypatch):
    save_checkpoint(tmp_path / "model", tiny_model(), tokenizer=ByteTokenizer())
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    out = tmp_path / "prefs.jsonl"
    monkeypatch.setattr(judge_module, "sample_replies", answers_right_and_wrong)
    model = str(tmp_path / "model")
    argv = ["judge", "--model", model, "--prompts", str(prompts), "--policy", model]
    argv += ["--out", str(out), "--max-new-tokens", "4", "--progress", "false", "--limit", "2"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "judged 2 prompts" in printed
    assert len(load_preferences(out)) == 2  # one right and one wrong reply per prompt
    assert "agreement with the task checker" in printed and "on 2 of 2 pairs" in printed
    argv[argv.index("--out") + 1] = str(tmp_path / "other.jsonl")
    assert main([*argv, "--constitution", str(tmp_path / "none.txt")]) == 2
    assert "constitution file" in capsys.readouterr().err
