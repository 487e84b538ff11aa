import json

import pytest

from lmlab.errors import ConfigError, DataError, DataNotFoundError
from lmlab.eval.tasks import (
    LETTER_CHOICES,
    QA,
    ChoiceItem,
    PromptFormat,
    list_tasks,
    load_task,
    preprocess_hellaswag,
)


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


ITEM = {"query": "2 + 2 =", "choices": ["3", "4"], "gold": 1}


def test_lmlab_jsonl_layout_with_dev_split_and_context_alias(tmp_path):
    path = write_jsonl(
        tmp_path / "t.jsonl",
        [
            {**ITEM, "id": 7, "subject": "maths", "source": "me"},
            {"context": "The sky is", "choices": ["blue", "green", "red"], "gold": 0},
            {**ITEM, "split": "dev"},
        ],
    )
    task = load_task(path)
    assert task.name == "t" and len(task) == 2 and len(task.fewshot) == 1
    first = task.items[0]
    assert (first.query, first.choices, first.gold) == ("2 + 2 =", ("3", "4"), 1)
    assert (first.id, first.subject, first.meta) == ("7", "maths", {"source": "me"})
    assert first.where == f"{path}:1"
    assert task.items[1].query == "The sky is" and task.prompt == QA


@pytest.mark.parametrize(
    "row, message",
    [
        ({"choices": ["a", "b"]}, r"t.jsonl:2: missing field\(s\) 'query', 'gold'"),
        ({**ITEM, "gold": 2}, r"t.jsonl:2: gold=2 is out of range for 2 choices"),
        ({**ITEM, "gold": True}, r"t.jsonl:2: 'gold' must be an integer index"),
        ({**ITEM, "choices": ["only"], "gold": 0}, r"t.jsonl:2: 1 choice\(s\); .* needs >= 2"),
        ({**ITEM, "choices": "ab"}, r"t.jsonl:2: 'choices' must be a list of strings"),
    ],
)
def test_bad_lmlab_rows_are_named_by_file_and_line(tmp_path, row, message):
    path = write_jsonl(tmp_path / "t.jsonl", [ITEM, row])
    with pytest.raises(DataError, match=message):
        load_task(path)


def test_missing_file_bad_json_and_unknown_names(tmp_path):
    with pytest.raises(DataNotFoundError, match="neither a file nor a bundled task"):
        load_task(tmp_path / "nope.jsonl")
    with pytest.raises(DataNotFoundError, match="did you mean 'world-facts'"):
        load_task("world-fact")
    (tmp_path / "bad.jsonl").write_text(json.dumps(ITEM) + "\n{oops\n")
    with pytest.raises(DataError, match=r"bad.jsonl:2: invalid JSON"):
        load_task(tmp_path / "bad.jsonl")
    with pytest.raises(ConfigError, match="format='csvv' is invalid"):
        load_task(tmp_path / "bad.jsonl", format="csvv")


def test_mmlu_csv_layout(tmp_path):
    path = tmp_path / "astronomy_test.csv"
    path.write_text(
        '"Which planet, of these, is largest?",Mars,Jupiter,Venus,Earth,B\nQ2,a,b,c,d,d\n'
    )
    task = load_task(path)
    item = task.items[0]
    assert item.query == "Which planet, of these, is largest?"
    assert item.choices == ("Mars", "Jupiter", "Venus", "Earth")
    assert (item.gold, item.subject, task.items[1].gold) == (1, "astronomy", 3)
    assert task.prompt == LETTER_CHOICES
    assert task.prompt.render(item) == (
        "Which planet, of these, is largest?\nA. Mars\nB. Jupiter\nC. Venus\nD. Earth\nAnswer:"
    )
    assert task.prompt.continuations(item) == [" A", " B", " C", " D"]
    path.write_text("Q,a,b,c,d,B\nQ2,a,b,c,d,E\n")
    with pytest.raises(DataError, match=r"astronomy_test.csv:2: answer 'E' is not one of"):
        load_task(path)
    path.write_text("Q,a,B\n")
    with pytest.raises(DataError, match=r"astronomy_test.csv:1: 3 column\(s\)"):
        load_task(path)


def test_mmlu_dev_file_is_the_fewshot_pool(tmp_path):
    (tmp_path / "x_test.csv").write_text("Q1,a,b,A\nQ2,a,b,B\n")
    (tmp_path / "x_dev.csv").write_text("D1,a,b,A\n")
    task = load_task(tmp_path / "x_test.csv", fewshot_path=tmp_path / "x_dev.csv")
    assert [it.query for it in task.fewshot] == ["D1"] and len(task) == 2


def test_hellaswag_layout_and_preprocessing(tmp_path):
    row = {
        "ind": 4,
        "activity_label": "Baking cookies",
        "ctx_a": "A woman mixes dough in a bowl.",
        "ctx_b": "she",
        "endings": ["puts it in the oven. [title] Bake  well.", "sings [header] loudly."],
        "label": "0",
    }
    task = load_task(write_jsonl(tmp_path / "hs.jsonl", [row]))
    item = task.items[0]
    assert item.query == "Baking cookies: A woman mixes dough in a bowl. She"
    assert item.choices == ("puts it in the oven.. Bake well.", "sings loudly.")
    assert (item.gold, item.id, item.subject) == (0, "4", "Baking cookies")
    assert task.prompt.render(item) == item.query
    assert preprocess_hellaswag(" a [step] b ") == "a b"
    bad = {k: v for k, v in row.items() if k != "endings"}
    with pytest.raises(DataError, match=r"hs.jsonl:2: missing field\(s\) 'endings'"):
        load_task(write_jsonl(tmp_path / "hs.jsonl", [row, bad]), format="hellaswag")


def test_glue_tsv_layout_with_verbalised_labels(tmp_path):
    path = tmp_path / "sst2.tsv"
    path.write_text("sentence\tlabel\na fine film\t1\nawful\tnegative\n")
    task = load_task(path, label_names=["negative", "positive"])
    assert [(it.query, it.choices, it.gold) for it in task.items] == [
        ("a fine film", ("negative", "positive"), 1),
        ("awful", ("negative", "positive"), 0),
    ]
    path.write_text("idx\ttext\ty\n0\tgood\t1\n")
    task = load_task(path, text_column="text", label_column="y", label_names=["no", "yes"])
    assert task.items[0].meta == {"idx": "0"} and task.items[0].gold == 1
    with pytest.raises(DataError, match=r"sst2.tsv:1: no column 'sentence'"):
        load_task(path, label_names=["no", "yes"])
    path.write_text("sentence\tlabel\ngood\t1\nbad\n")
    with pytest.raises(DataError, match=r"sst2.tsv:3: 1 column\(s\), the header has 2"):
        load_task(path, label_names=["no", "yes"])
    path.write_text("sentence\tlabel\ngood\t5\n")
    with pytest.raises(DataError, match=r"sst2.tsv:2: gold=5 is out of range"):
        load_task(path, label_names=["no", "yes"])
    with pytest.raises(ConfigError, match="needs label_names"):
        load_task(path)


def test_prompt_format_fields_are_checked():
    with pytest.raises(ConfigError, match=r"uses \{question\}; valid fields"):
        PromptFormat(template="Q: {question}")
    item = ChoiceItem("Hi {there}", ("a", "b"), 0)  # braces in data are not fields
    assert PromptFormat(template="<{query}>").render(item) == "<Hi {there}>"


def test_bundled_tasks_load_with_their_formats():
    names = list_tasks()
    assert set(names) == {"world-facts", "shakespeare-cloze", "sentiment"}
    sizes = {n: len(load_task(n)) for n in names}
    assert sizes == {"world-facts": 40, "shakespeare-cloze": 40, "sentiment": 40}
    wf = load_task("world-facts")
    assert len(wf.fewshot) == 5 and {it.subject for it in wf.items} == {
        "geography",
        "arithmetic",
        "animals",
        "language",
    }
    for name in names:  # every gold index is used, so a position bias cannot score well
        task = load_task(name)
        assert len({it.gold for it in task.items}) == len(task.items[0].choices)
    cloze = load_task("shakespeare-cloze").items[0]
    assert cloze.meta["line"].startswith(cloze.query + " " + cloze.choices[cloze.gold])
