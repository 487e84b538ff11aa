import json
import logging

import pytest

from lmlab.data.preferences import (
    PreferenceLog,
    PreferencePair,
    load_preferences,
    write_preferences,
)
from lmlab.errors import DataError, DataNotFoundError

PAIR = {"prompt": "2 + 2 =", "chosen": "4", "rejected": "5", "source": "arithmetic"}
CHAT = {
    "prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
    "chosen": [{"role": "assistant", "content": "Hello."}],
    "rejected": "Go away.",
}


def write_lines(path, lines):
    path.write_text("".join(line + "\n" for line in lines))
    return path


def test_load_plain_and_conversational_pairs(tmp_path):
    file = write_lines(tmp_path / "p.jsonl", [json.dumps(PAIR), json.dumps(CHAT)])
    plain, chat = load_preferences(file)
    assert (plain.prompt, plain.chosen, plain.rejected) == ("2 + 2 =", "4", "5")
    assert plain.meta == {"source": "arithmetic"}
    assert chat.prompt[-1] == {"role": "user", "content": "Hi"}
    assert (chat.chosen, chat.rejected) == ("Hello.", "Go away.")


def test_write_then_load_round_trips(tmp_path):
    pairs = load_preferences(
        write_lines(tmp_path / "a.jsonl", [json.dumps(PAIR), json.dumps(CHAT)])
    )
    write_preferences(pairs, tmp_path / "b.jsonl")
    assert load_preferences(tmp_path / "b.jsonl") == pairs


@pytest.mark.parametrize(
    "line, message",
    [
        ('{"prompt": "x", "chosen": "y"}', r"p.jsonl:2: missing 'rejected'; expected 'prompt'"),
        ('{"prompt": 3, "chosen": "y", "rejected": "z"}', r"p.jsonl:2: 'prompt' must be a string"),
        ('{"prompt": "x", "chosen": 1, "rejected": "z"}', r"p.jsonl:2: 'chosen' must be a string"),
        ("not json", r"p.jsonl:2: invalid JSON"),
        ("", r"p.jsonl:2: blank line"),
        ('["a"]', r"p.jsonl:2: a line must hold a JSON object, got list; expected 'prompt'"),
        (
            '{"prompt": [{"role": "assistant", "content": "a"}], "chosen": "y", "rejected": "z"}',
            r"p.jsonl:2: a conversational prompt must end with a user message",
        ),
        (
            '{"prompt": [], "chosen": "y", "rejected": "z"}',
            r"p.jsonl:2: a conversational prompt must end with a user message",
        ),
        (
            '{"prompt": [{"role": "robot", "content": "a"}], "chosen": "y", "rejected": "z"}',
            r"p.jsonl:2: 'prompt': message 0 has role 'robot'; valid roles",
        ),
        (
            '{"prompt": "x", "chosen": [{"role": "user", "content": "a"}], "rejected": "z"}',
            r"p.jsonl:2: 'chosen' as messages must be one assistant message",
        ),
    ],
)
def test_bad_lines_are_named_by_file_and_line(tmp_path, line, message):
    file = write_lines(tmp_path / "p.jsonl", [json.dumps(PAIR), line])
    with pytest.raises(DataError, match=message):
        load_preferences(file)


def test_missing_file_and_identical_replies(tmp_path, caplog):
    with pytest.raises(DataNotFoundError, match="preference data .* does not exist"):
        load_preferences(tmp_path / "nope.jsonl")
    file = write_lines(tmp_path / "p.jsonl", ['{"prompt": "x", "chosen": "y", "rejected": "y"}'])
    with caplog.at_level(logging.WARNING):
        assert len(load_preferences(file)) == 1
    assert "p.jsonl:1: 'chosen' and 'rejected' are identical" in caplog.text


def test_log_appends_survive_reopening_and_a_torn_last_line(tmp_path, caplog):
    path = tmp_path / "sub" / "ranked.jsonl"
    log = PreferenceLog(path)
    assert log.pairs == []
    first = PreferencePair("a", "b", "c", {"prompt_id": 0})
    log.append(first)
    log.append(PreferencePair("d", "e", "f", {"prompt_id": 1}))
    with open(path, "a") as f:  # a crash in the middle of the third line
        f.write('{"prompt": "g", "cho')
    with caplog.at_level(logging.WARNING):
        reopened = PreferenceLog(path)
    assert "last line is incomplete" in caplog.text
    assert [p.meta["prompt_id"] for p in reopened.pairs] == [0, 1]
    reopened.append(PreferencePair("g", "h", "i"))
    assert [p.prompt for p in load_preferences(path)] == ["a", "d", "g"]
