"""``lmlab.align.rank`` and ``lmlab rank``: prompts files, rankings -> pairs, a scripted
session on a tiny random model with ChatML, and resuming after a quit or a crash."""

import io
import json

import pytest
import torch

from lmlab.align import rank as rank_module
from lmlab.align.rank import (
    PromptItem,
    RankingSession,
    pairs_from_ranking,
    parse_ranking,
    read_prompts,
    render_prompt,
    sample_replies,
)
from lmlab.api import LM
from lmlab.checkpoint.io import save_checkpoint
from lmlab.cli.main import main
from lmlab.data import BPETokenizer, ByteTokenizer
from lmlab.data.chat import ChatTemplate
from lmlab.data.preferences import load_preferences
from lmlab.errors import ConfigError, DataError, DataNotFoundError
from lmlab.generate import SamplingParams
from lmlab.models import build_model

CHATML = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + "
    "message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
TEXT = "\n".join(
    ["<|im_start|>user\nwhat is two plus two? say hello there<|im_end|>"] * 3
    + ["<|im_start|>assistant\nfour, hello, how can I help?<|im_end|>"] * 3
)
PARAMS = SamplingParams(max_new_tokens=8, temperature=1.0)


def tiny_model(vocab_size: int, max_seq_len: int = 256):
    torch.manual_seed(0)
    spec = {
        "family": "transformer",
        "vocab_size": vocab_size,
        "d_model": 32,
        "n_layers": 1,
        "n_heads": 2,
        "d_ff": 64,
        "max_seq_len": max_seq_len,
    }
    return build_model(spec).eval()


@pytest.fixture(scope="module")
def lm():
    tok = BPETokenizer.train(TEXT, 300, eos_token="<|im_end|>", special_tokens=["<|im_start|>"])
    template = ChatTemplate(CHATML, eos_token="<|im_end|>")
    return LM(tiny_model(tok.vocab_size), tok, chat_template=template)


def items(*texts):
    return [PromptItem(f"p{i}", ({"role": "user", "content": t},)) for i, t in enumerate(texts)]


def scripted(*answers):
    """An ``ask`` that gives ``answers`` in order and records the questions."""
    queue = list(answers)
    questions = []

    def ask(question):
        questions.append(question)
        if not queue:
            raise AssertionError(f"asked more than the {len(answers)} scripted answers")
        return queue.pop(0)

    ask.questions = questions
    return ask


def never(question):
    raise AssertionError(f"asked {question!r} for a prompt already decided")


# ----------------------------------------------------------------------------- prompts


def test_read_prompts_takes_prompt_rows_task_rows_and_text(tmp_path):
    jsonl = tmp_path / "p.jsonl"
    rows = [
        {"prompt": "say hi"},
        {"task": "reverse", "instruction": "Reverse it.", "input": "abc", "output": "cba"},
        {"instruction": "Be brief.", "system": "You are terse.", "id": 7},
    ]
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in rows))
    got = read_prompts(jsonl)
    assert [i.messages[-1]["content"] for i in got] == ["say hi", "Reverse it.\n\nabc", "Be brief."]
    assert got[1].meta == {"task": "reverse", "reference": "cba"}
    assert got[2].prompt_id == "7" and got[2].messages[0]["role"] == "system"
    assert got[0].meta == {} and len(got[0].prompt_id) == 12
    text = tmp_path / "p.txt"
    text.write_text("first prompt\n\n  second prompt \nfirst prompt\n")
    assert [i.text for i in read_prompts(text)] == ["first prompt", "second prompt"]
    # ids depend on the prompt only: the same prompt in either file has the same id
    assert read_prompts(text)[0].prompt_id == read_prompts(text)[0].prompt_id


def test_prompt_file_errors_name_the_problem(tmp_path):
    with pytest.raises(DataNotFoundError, match="does not exist"):
        read_prompts(tmp_path / "missing.jsonl")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(DataError, match="empty"):
        read_prompts(empty)
    blank = tmp_path / "blank.txt"
    blank.write_text("\n  \n")
    with pytest.raises(DataError, match="no prompts"):
        read_prompts(blank)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "ok"}\n{"question": "?"}\n')
    with pytest.raises(DataError, match=r"bad\.jsonl:2: expected 'prompt'"):
        read_prompts(bad)
    bad.write_text('{"prompt": "ok"}\n{"prompt": 3}\n')
    with pytest.raises(DataError, match=r"bad\.jsonl:2: 'prompt' must be a non-empty string"):
        read_prompts(bad)


# ----------------------------------------------------------------------------- rankings


def test_parse_ranking_accepts_orders_skip_and_quit():
    assert parse_ranking("2 1 3", 3) == (1, 0, 2)
    assert parse_ranking(" 3,1, 2 ", 3) == (2, 0, 1)
    assert parse_ranking("213", 3) == (1, 0, 2)
    assert parse_ranking("S", 3) == "skip" and parse_ranking("q", 3) == "quit"
    for bad in ("", "1 2", "1 1 2", "1 2 4", "a b c", "1 2 3 4", "0 1 2"):
        with pytest.raises(ValueError, match=r"1\.\.3 once each.*s to skip, q to quit"):
            parse_ranking(bad, 3)


def test_every_pair_of_the_ranking_is_kept_better_first():
    item = PromptItem("x", ({"role": "user", "content": "q"},), {"task": "t", "reference": "r"})
    pairs = pairs_from_ranking(item, ["a", "b", "c"], (1, 0, 2), {"seed": 5})
    assert [(p.chosen, p.rejected) for p in pairs] == [("b", "a"), ("b", "c"), ("a", "c")]
    assert all(p.prompt == "q" for p in pairs)
    assert pairs[1].meta == {
        "seed": 5,
        "task": "t",
        "reference": "r",
        "prompt_id": "x",
        "ranks": [2, 1, 3],
        "chosen_rank": 1,
        "rejected_rank": 3,
    }
    # identical texts: never paired with themselves, and two texts are compared once
    pairs = pairs_from_ranking(item, ["a", "b", "a"], (0, 1, 2), {})
    assert [(p.chosen, p.rejected) for p in pairs] == [("a", "b")]


# ----------------------------------------------------------------------------- sampling


def test_replies_use_the_chat_template_differ_and_replay_with_the_seed(lm):
    messages = [{"role": "user", "content": "what is two plus two?"}]
    assert render_prompt(lm, messages).endswith("<|im_end|>\n<|im_start|>assistant\n")
    params = SamplingParams(max_new_tokens=8, seed=3)
    replies = sample_replies(lm, messages, 4, params)
    assert len(set(replies)) > 1
    assert sample_replies(lm, messages, 4, params) == replies


# ----------------------------------------------------------------------------- session


def test_scripted_session_writes_the_ranked_pairs(lm, tmp_path):
    out = tmp_path / "prefs.jsonl"
    shown = []
    ask = scripted("1 2", "2 3 1", "s")
    session = RankingSession(
        lm, items("hello there", "what is two plus two?"), out, 3, 0, PARAMS, ask, shown.append
    )
    summary = session.run()
    assert (summary.ranked, summary.skipped, summary.remaining, summary.quit) == (1, 1, 0, False)
    text = "\n".join(shown)
    assert "is not a ranking: give all 3 reply numbers 1..3" in text  # "1 2" was re-asked
    assert "hello there" in text and "  3) " in text
    pairs = load_preferences(out)
    assert summary.pairs == len(pairs) <= 3 and all(p.meta["prompt_id"] == "p0" for p in pairs)
    # the pairs hold the replies as shown: reply 2 beats 3 beats 1
    first = session.decisions["p0"]["replies"]
    for i, reply in enumerate(first, start=1):
        assert f"  {i}) {reply}" in text
    expected = [(first[1], first[2]), (first[1], first[0]), (first[2], first[0])]
    assert [(p.chosen, p.rejected) for p in pairs] == [e for e in expected if e[0] != e[1]]
    assert pairs[0].meta["ranks"] == [3, 1, 2]
    assert pairs[0].meta["seed"] == session.decisions["p0"]["seed"]
    assert session.decisions["p1"] == {"status": "skipped"}


def test_a_restarted_session_never_asks_again(lm, tmp_path):
    out = tmp_path / "prefs.jsonl"
    prompts = items("hello there", "what is two plus two?", "say hello")
    RankingSession(lm, prompts, out, 2, 0, PARAMS, scripted("1 2", "s", "q"), print).run()
    before = out.read_bytes()
    again = RankingSession(lm, prompts, out, 2, 0, PARAMS, scripted("2 1"), lambda s: None)
    summary = again.run()
    assert (summary.ranked, summary.skipped, summary.remaining) == (1, 0, 0)
    assert out.read_bytes().startswith(before)
    done = RankingSession(lm, prompts, out, 2, 0, PARAMS, never, lambda s: None).run()
    assert (done.ranked, done.skipped, done.pairs) == (0, 0, 0)


def test_quit_and_end_of_input_stop_without_writing(lm, tmp_path):
    out = tmp_path / "prefs.jsonl"
    prompts = items("hello there", "say hello")
    summary = RankingSession(lm, prompts, out, 2, 0, PARAMS, scripted("q"), print).run()
    assert summary.quit and summary.remaining == 2 and summary.pairs == 0

    def eof(question):
        raise EOFError

    summary = RankingSession(lm, prompts, out, 2, 0, PARAMS, eof, print).run()
    assert summary.quit and summary.remaining == 2
    assert not (tmp_path / "prefs.jsonl.session.json").exists()


def test_a_crash_mid_write_loses_nothing(lm, tmp_path, monkeypatch):
    out = tmp_path / "prefs.jsonl"
    monkeypatch.setattr(
        rank_module, "sample_replies", lambda lm, messages, n, params: ["a", "b", "c"]
    )
    prompts = items("hello there", "say hello")
    RankingSession(lm, prompts, out, 3, 0, PARAMS, scripted("3 2 1", "q"), print).run()
    whole = out.read_bytes()
    lines = whole.splitlines(keepends=True)
    assert len(lines) == 3
    # the process died while writing the third pair: half a line on disk
    out.write_bytes(b"".join(lines[:2]) + lines[2][:10])
    session = RankingSession(lm, prompts, out, 3, 0, PARAMS, scripted("1 2 3"), print)
    assert out.read_bytes() == whole  # the torn line dropped, the missing pair rewritten
    summary = session.run()  # asks only for the second prompt
    assert summary.ranked == 1 and len(load_preferences(out)) == 6


def test_identical_replies_are_pointed_out_and_still_ranked(lm, tmp_path, monkeypatch):
    monkeypatch.setattr(
        rank_module, "sample_replies", lambda lm, messages, n, params: ["x", "y", "x"]
    )
    shown = []
    out = tmp_path / "prefs.jsonl"
    RankingSession(lm, items("hi"), out, 3, 0, PARAMS, scripted("2 1 3"), shown.append).run()
    assert any("replies 1, 3 are identical" in line for line in shown)
    assert [(p.chosen, p.rejected) for p in load_preferences(out)] == [("y", "x")]


def test_bad_settings_and_a_broken_journal_are_clear_errors(lm, tmp_path):
    with pytest.raises(ConfigError, match="samples=1"):
        RankingSession(lm, items("hi"), tmp_path / "p.jsonl", samples=1)
    journal = tmp_path / "q.jsonl.session.json"
    journal.write_text('{"decisions": {"p0": {"status": "maybe"}}}')
    with pytest.raises(DataError, match="not a ranking-session journal"):
        RankingSession(lm, items("hi"), tmp_path / "q.jsonl")


# ----------------------------------------------------------------------------- CLI


def test_cli_rank_reads_answers_from_the_terminal(tmp_path, monkeypatch, capsys):
    save_checkpoint(tmp_path / "model", tiny_model(256), tokenizer=ByteTokenizer())
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("hello there\nsay hi\n")
    out = tmp_path / "prefs.jsonl"
    argv = ["rank", "--model", str(tmp_path / "model"), "--prompts", str(prompts)]
    argv += ["--out", str(out), "--samples", "2", "--max-new-tokens", "4", "--seed", "1"]
    monkeypatch.setattr("sys.stdin", io.StringIO("2 1\n"))  # then end of input: quit
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert (
        "[1/2]" in printed
        and "stopped: ranked 1 prompts" in printed
        and "1 prompts left" in printed
    )
    assert len(load_preferences(out)) <= 1
    assert main([*argv[:4], str(tmp_path / "nope.txt")]) == 2
    assert "nope.txt' does not exist" in capsys.readouterr().err
