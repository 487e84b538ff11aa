"""The agent's tools: a calculator that knows only arithmetic, the sandboxed python tool,
search and lookup over the bundled documents."""

import ast
import random

import pytest

from lmlab.data.documents import documents, multihop_questions
from lmlab.errors import ConfigError
from lmlab.prompting.retrieval import make_retriever
from lmlab.prompting.tools import (
    MAX_OBSERVATION,
    build_tools,
    calculator,
    cap,
    parse_tool_names,
    sentences,
)


def test_calculator_does_arithmetic():
    assert calculator("3 * (4 + 5) - 2 ** 3") == "19"
    assert calculator("7 / 2") == "3.5"
    assert calculator("12 / 4") == "3"
    assert calculator(" -7 // 2 ") == "-4"
    assert calculator("17 % 5") == "2"
    assert calculator("2^10") == "1024"  # a model's caret means power
    assert calculator("1,200 + 3") == "1203"
    assert calculator("6 * 7 =") == "42"
    assert calculator("0.1 + 0.2") == "0.3"


def test_calculator_agrees_with_python_on_random_expressions():
    """Seeded random expressions over + - * // % and parentheses: the walker gives what
    Python's own evaluation of the same (trusted, generated) text gives."""
    rng = random.Random(0)

    def expression(depth):
        if depth == 0 or rng.random() < 0.3:
            return str(rng.randint(-20, 20))
        op = rng.choice(["+", "-", "*", "//", "%"])
        return f"({expression(depth - 1)} {op} {expression(depth - 1)})"

    for _ in range(300):
        text = expression(4)
        try:
            want = str(eval(compile(ast.parse(text, mode="eval"), "<test>", "eval")))  # our text
        except ZeroDivisionError:
            want = "error: division by zero"
        assert calculator(text) == want, text


@pytest.mark.parametrize(
    "code",
    [
        "__import__('os').system('echo hi')",
        "open('/etc/passwd').read()",
        "x",
        "(1).__class__",
        "abs(-3)",
        "'a' * 3",
        "[1, 2]",
        "1 < 2",
        "lambda: 1",
        "2 if 1 else 3",
        "1 << 100",
        "True + 1",
        "().__class__.__bases__[0].__subclasses__()",
    ],
)
def test_calculator_refuses_names_calls_attributes_and_everything_but_arithmetic(code):
    out = calculator(code)
    assert out.startswith("error:") and "arithmetic" in out


def test_calculator_bounds_sizes_and_reports_errors_as_text():
    assert "too large" in calculator("9 ** 9 ** 9")
    assert "too large" in calculator("10 ** 5000")
    assert "too large" in calculator("(10 ** 900) * (10 ** 900)")
    assert calculator("1 / 0") == "error: division by zero"
    assert calculator("1 +").startswith("error: not an arithmetic expression")
    assert calculator("(" * 200 + "1" + ")" * 200).startswith("error")
    assert "longer than" in calculator("1 + " * 200 + "1")
    assert calculator("(-8) ** 0.5").startswith("error")  # complex
    assert calculator("2 ** -2") == "0.25"


def test_python_tool_runs_in_the_sandbox():
    tools = build_tools("python")
    assert tools["python"].run("print(6 * 7)") == "42"
    assert tools["python"].run("```python\ndef solution():\n    return 5 * 5\n```") == "25"
    assert tools["python"].run("1 / 0").startswith("error: ZeroDivisionError")
    assert tools["python"].run("import socket; socket.socket().connect(('127.0.0.1', 9))")[:5] in (
        "error",
        "kille",
    )
    assert tools["python"].run("x = 1") == "(the program printed nothing; print the result)"


def test_observations_are_one_capped_line():
    assert cap("a\nb  c") == "a b c"
    long = cap("word " * 500)
    assert len(long) <= MAX_OBSERVATION and long.endswith("(cut)")


@pytest.fixture(scope="module")
def library_tools():
    docs = documents()
    retriever = make_retriever(docs, "bm25")
    return lambda: build_tools("search,lookup", docs, retriever)


def test_search_shows_titles_and_first_sentences_and_an_exact_title_opens_its_page(library_tools):
    tools = library_tools()
    docs = documents()
    person = next(d for d in docs if d.kind == "person" and any(
        x.title.startswith(d.title + " ") for x in docs))  # fmt: skip
    out = tools["search"].run(person.title)
    # the distractor (a ship or a school named after them) scores higher but the page opens
    assert out.startswith(f"[1] {person.title}: {sentences(person.text)[0]}")
    assert f"[2] {person.title} " in out  # the distractor is still shown
    assert tools["search"].run("qqqq zzzz").startswith("No document matches")


def test_lookup_walks_the_sentences_of_the_last_page(library_tools):
    tools = library_tools()
    assert tools["lookup"].run("born").startswith("error: nothing to look in")
    docs = documents()
    city = next(d for d in docs if d.kind == "city" and "river" in d.text.lower())
    tools["search"].run(city.title)
    first = tools["lookup"].run("river")
    assert first.startswith("(Result 1 / ") and "River" in first
    again = [tools["lookup"].run("River") for _ in range(3)]
    assert again[-1].startswith("No more results")
    assert tools["lookup"].run("zebra") == f"No sentence of {city.title} contains 'zebra'."


def test_search_and_lookup_answer_every_multihop_question_along_its_gold_actions(library_tools):
    """The world and the tools fit: following each question's gold actions, every entity the
    next action names is in the observation before it, and the answer is in the last one."""
    for item in multihop_questions():
        tools = library_tools()
        actions = item["actions"]
        observations = [tools[a].run(arg) for a, arg in actions[:-1]]
        assert actions[-1] == ("finish", item["answer"])
        assert item["answer"].lower() in observations[-1].lower(), item
        for i, (action, argument) in enumerate(actions[1:-1], 1):
            if action == "search":
                assert argument in observations[i - 1], (item["question"], i)


def test_tool_names_are_checked():
    assert parse_tool_names("search, lookup") == ["search", "lookup", "finish"]
    assert parse_tool_names(["calculator"]) == ["calculator", "finish"]
    with pytest.raises(ConfigError, match="unknown tool 'serch' \\(did you mean 'search'\\?\\)"):
        parse_tool_names("serch")
    with pytest.raises(ConfigError, match="add search too"):
        parse_tool_names("lookup")
    with pytest.raises(ConfigError, match="needs documents"):
        build_tools("search")
