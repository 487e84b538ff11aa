import json
import random

import pytest

from lmlab.data.instructions import load_examples
from lmlab.data.tasks import (
    TASKS,
    Task,
    accuracy,
    check,
    check_exact,
    generate_splits,
    generate_tasks,
    mixed_demonstrators,
    write_jsonl,
)
from lmlab.errors import ConfigError, DataError

ALL = list(TASKS)

WRONG = {
    "arithmetic": lambda ref: str(int(ref) + 1),
    "reverse": lambda ref: ref[::-1] + "x",
    "count_letter": lambda ref: str(int(ref) + 1),
    "format": lambda ref: ref.lower() if ref != ref.lower() else ref.upper() + "!",
}


@pytest.mark.parametrize("name", ALL)
def test_generators_are_seeded_and_deterministic(name):
    make = TASKS[name].make
    rows = [make(random.Random(5)) for _ in range(3)]
    assert rows[0] == rows[1] == rows[2]
    assert set(rows[0]) == {"instruction", "input", "output"}
    assert all(isinstance(v, str) for v in rows[0].values())
    assert generate_tasks(name, 20, seed=1) == generate_tasks(name, 20, seed=1)
    assert generate_tasks(name, 20, seed=1) != generate_tasks(name, 20, seed=2)


@pytest.mark.parametrize("name", ALL)
def test_checkers_accept_the_reference_and_reject_a_wrong_answer(name):
    for row in generate_tasks(name, 30, seed=0):
        assert check(name, row["output"], row["output"])
        assert check(name, f"  {row['output']}\n", row["output"])  # whitespace is forgiven
        assert not check(name, WRONG[name](row["output"]), row["output"])
        assert not check(name, "", row["output"])


def test_task_answers_are_right():
    rows = generate_tasks(ALL, 200, seed=0)
    for row in rows:
        if row["task"] == "arithmetic":
            expression = row["instruction"].removeprefix("What is ").split("?")[0]
            a, op, b = expression.split()
            value = {"+": int(a) + int(b), "-": int(a) - int(b), "*": int(a) * int(b)}[op]
            assert row["output"] == str(value)
        elif row["task"] == "reverse":
            assert row["output"] == row["input"][::-1]
        elif row["task"] == "count_letter":
            letter = row["instruction"].split("'")[1]
            assert row["output"] == str(row["input"].count(letter))


def test_checker_normalisation():
    assert check("arithmetic", "42.", "42") and not check("arithmetic", "The answer is 42", "42")
    assert check("reverse", "Tenalp", "tenalp")
    assert check("format", '{ "city":"paris" }', '{"city": "paris"}')
    assert not check("format", "{'city': 'paris'}", '{"city": "paris"}')
    assert not check("format", "good morning", "GOOD MORNING")  # case is the format
    assert check("format", "GOOD   MORNING", "GOOD MORNING")


def test_mixing_is_balanced_or_weighted_and_rows_are_distinct():
    rows = generate_tasks(ALL, 10, seed=0)
    counts = {name: sum(r["task"] == name for r in rows) for name in ALL}
    assert counts == {"arithmetic": 3, "reverse": 3, "count_letter": 2, "format": 2}
    weighted = generate_tasks(["arithmetic", "reverse"], 100, seed=0, weights=[3, 1])
    assert sum(r["task"] == "arithmetic" for r in weighted) == 75
    assert [r["task"] for r in weighted] != sorted(r["task"] for r in weighted)  # shuffled
    big = generate_tasks(ALL, 400, seed=0)
    assert len({(r["instruction"], r["input"]) for r in big}) == 400


def test_adding_a_task_keeps_the_other_tasks_rows():
    alone = generate_tasks("arithmetic", 5, seed=0)
    mixed = generate_tasks(["arithmetic", "reverse"], 10, seed=0)
    assert sorted(map(json.dumps, alone)) == sorted(
        json.dumps(r) for r in mixed if r["task"] == "arithmetic"
    )


def test_splits_never_share_a_prompt_and_match_generate_tasks():
    train, val, test = generate_splits(ALL, 200, 40, 40, seed=7)
    assert (len(train), len(val), len(test)) == (200, 40, 40)
    prompts = [{(r["instruction"], r["input"]) for r in part} for part in (train, val, test)]
    assert not (prompts[0] & prompts[1]) and not (prompts[0] & prompts[2])
    assert not (prompts[1] & prompts[2])
    assert sorted(map(json.dumps, train)) == sorted(
        map(json.dumps, generate_tasks(ALL, 200, seed=7))
    )
    assert {r["task"] for r in test} == set(ALL)


def test_bad_arguments_name_the_valid_choices():
    with pytest.raises(ConfigError, match="did you mean 'reverse'"):
        generate_tasks("revers", 3)
    with pytest.raises(ConfigError, match="valid tasks: arithmetic"):
        check("nope", "1", "1")
    with pytest.raises(ConfigError, match="weights"):
        generate_tasks(ALL, 3, weights=[1, 2])
    with pytest.raises(ConfigError, match="n_train"):
        generate_tasks(ALL, -1)


def test_a_task_with_few_distinct_rows_says_so(monkeypatch):
    coin = Task(
        "coin",
        lambda rng: {"instruction": "Flip.", "input": "", "output": rng.choice("HT")},
        check_exact,
    )
    monkeypatch.setitem(TASKS, "coin", coin)
    assert len(generate_tasks("coin", 1)) == 1
    with pytest.raises(ConfigError, match="'coin' ran out of distinct examples after 1"):
        generate_tasks("coin", 2)


def test_write_jsonl_round_trips_through_load_examples(tmp_path):
    rows = generate_tasks(ALL, 12, seed=0)
    path = tmp_path / "sub" / "tasks.jsonl"
    write_jsonl(rows, path)
    assert [json.loads(line) for line in path.read_text().splitlines()] == rows
    examples = load_examples(path)
    assert len(examples) == 12
    assert all(e.messages[-1]["content"] == r["output"] for e, r in zip(examples, rows))
    assert [p.name for p in path.parent.iterdir()] == ["tasks.jsonl"]  # no temp file left


def test_accuracy():
    rows = generate_tasks(ALL, 8, seed=0)
    assert accuracy(rows, [r["output"] for r in rows]) == 1.0
    predictions = [
        r["output"] if i % 2 else WRONG[r["task"]](r["output"]) for i, r in enumerate(rows)
    ]
    assert accuracy(rows, predictions) == 0.5
    with pytest.raises(DataError, match="8 rows but 7 predictions"):
        accuracy(rows, predictions[:7])
    with pytest.raises(DataError, match="no rows"):
        accuracy([], [])
    with pytest.raises(DataError, match="missing 'task'"):
        accuracy([{"output": "1"}], ["1"])


def test_mixed_demonstrators_answer_a_share_in_a_sentence_the_checkers_reject():
    rows = generate_tasks(ALL, 40, seed=0)
    mixed = mixed_demonstrators(rows, share=0.25, seed=3)
    chatty = [m for m in mixed if m["demonstrator"] == "chatty"]
    assert len(chatty) == 10  # exactly round(share * n), not a coin per row
    for row, m in zip(rows, mixed):
        assert {k: v for k, v in m.items() if k not in ("output", "demonstrator")} == {
            k: v for k, v in row.items() if k != "output"
        }
        if m["demonstrator"] == "chatty":
            assert m["output"] == f"The answer is {row['output']}."
            assert not check(row["task"], m["output"], row["output"])
        else:
            assert m["output"] == row["output"] and check(row["task"], m["output"], row["output"])
    assert mixed_demonstrators(rows, share=0.25, seed=3) == mixed  # seeded
    assert mixed_demonstrators(rows, share=0.25, seed=4) != mixed
    assert rows[0]["output"] != "" and "demonstrator" not in rows[0]  # the input is untouched
    assert all(m["demonstrator"] == "terse" for m in mixed_demonstrators(rows, share=0))
    with pytest.raises(ConfigError, match=r"share=1.5 is invalid: must be a number in \[0, 1\]"):
        mixed_demonstrators(rows, share=1.5)
    with pytest.raises(ConfigError, match="must contain {output}"):
        mixed_demonstrators(rows, sentence="Done.")
    with pytest.raises(DataError, match="row 0 has no 'output'"):
        mixed_demonstrators([{"instruction": "x"}])
