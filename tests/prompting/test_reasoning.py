"""Direct, chain-of-thought, self-consistency and PAL answering with a scripted model."""

import pytest

from lmlab.data.instructions import load_examples
from lmlab.data.tasks import write_jsonl
from lmlab.data.word_problems import word_problems
from lmlab.errors import ConfigError
from lmlab.prompting.extract import extract_answer, extract_code
from lmlab.prompting.reasoning import (
    HELD_OUT,
    SYSTEM,
    ZERO_SHOT_COT,
    bootstrap_interval,
    build_messages,
    build_prompt,
    maj_curve,
    solve,
    summarise,
    training_conversations,
)
from lmlab.prompting.sandbox import run_python

PROBLEMS = [
    {"question": "Ann has 3 pens and buys 4. How many?", "answer": "7"},
    {"question": "Bo had 10 cards and gave away 6. How many?", "answer": "4"},
]


class Scripted:
    """Replies by the question at the end of the prompt; a list of replies is served in
    turn (for sampling)."""

    name = "scripted"

    def __init__(self, replies):
        self.replies, self.calls = replies, []

    def complete(self, prompts, max_tokens=256, temperature=0.0, stop=(), seed=None):
        self.calls.append(
            {"n": len(prompts), "temperature": temperature, "stop": stop, "seed": seed}
        )
        out = []
        for p in prompts:
            question = next(q for q in self.replies if q in p.rsplit("Question:", 1)[-1])
            reply = self.replies[question]
            out.append(reply.pop(0) if isinstance(reply, list) else reply)
        return out


def test_prompts_have_the_shape_each_method_asks_for():
    direct = build_prompt("Q?", "direct", shots=2)
    assert direct.count("Question:") == 3 and direct.endswith("Question: Q?\nAnswer:")
    cot = build_prompt("Q?", "cot", shots=2)
    assert cot.count("The answer is") == 2
    assert build_prompt("Q?", "cot", shots=0) == f"Question: Q?\nAnswer: {ZERO_SHOT_COT}"
    pal = build_prompt("Q?", "pal", shots=2)
    assert pal.count("def solution():") == 2 and pal.endswith("Question: Q?\n```python\n")
    with pytest.raises(ConfigError, match="unknown method 'tot'"):
        build_prompt("Q?", "tot")


def test_direct_reads_a_bare_number_strictly_and_any_number_flexibly():
    model = Scripted(
        {PROBLEMS[0]["question"]: "7\nQuestion", PROBLEMS[1]["question"]: "He has 4 left"}
    )
    a, b = solve(model, PROBLEMS, "direct", progress=False)
    assert (a.strict, a.flexible, a.correct()) == ("7", "7", True)
    assert (b.strict, b.flexible) == (None, "4") and b.correct("flexible") and not b.correct()
    assert model.calls[0]["temperature"] == 0.0 and model.calls[0]["n"] == 2


def test_cot_and_self_consistency_vote_on_final_answers():
    q0, q1 = PROBLEMS[0]["question"], PROBLEMS[1]["question"]
    model = Scripted({q0: "3 + 4 = 7. The answer is 7.", q1: "10 - 6 = 4, so 4"})
    a, b = solve(model, PROBLEMS, "cot", progress=False)
    assert a.correct() and not b.correct() and b.correct("flexible")
    replies = {
        q0: ["The answer is 8.", "The answer is 7.", "The answer is 7."],
        q1: ["The answer is 4.", "so 5", "The answer is 6."],
    }
    model = Scripted(replies)
    a, b = solve(model, PROBLEMS, "self-consistency", samples=3, temperature=0.7, progress=False)
    assert a.votes == ["8", "7", "7"] and a.strict == "7" and a.correct()
    assert b.strict == "4" and b.flexible == "4"
    assert {c["temperature"] for c in model.calls} == {0.7}
    # one batch per question: its prompt three times, under a seed of its own
    assert [c["n"] for c in model.calls] == [3, 3]
    assert len({c["seed"] for c in model.calls}) == 2
    assert maj_curve([a, b]) == [0.5, 0.5, 1.0]


def test_a_questions_samples_do_not_depend_on_the_others_in_the_run():
    """So a run over the first n problems, or one in chunks, draws the same samples."""
    seeds = {}
    for problems in (PROBLEMS, PROBLEMS[1:], PROBLEMS[::-1]):
        model = Scripted({p["question"]: "The answer is 1." for p in problems})
        solve(model, problems, "self-consistency", samples=4, batch_size=3, progress=False)
        for problem, calls in zip(problems, (model.calls[:2], model.calls[2:])):
            assert [c["n"] for c in calls] == [3, 1]
            seeds.setdefault(problem["question"], set()).add(tuple(c["seed"] for c in calls))
    assert all(len(s) == 1 for s in seeds.values())
    assert seeds[PROBLEMS[0]["question"]] != seeds[PROBLEMS[1]["question"]]
    model = Scripted({p["question"]: "The answer is 1." for p in PROBLEMS})
    solve(model, PROBLEMS[:1], "self-consistency", samples=4, batch_size=3, seed=1, progress=False)
    assert {tuple(c["seed"] for c in model.calls)} != seeds[PROBLEMS[0]["question"]]


def test_pal_runs_the_models_program_in_the_sandbox():
    q0, q1 = PROBLEMS[0]["question"], PROBLEMS[1]["question"]
    model = Scripted(
        {
            q0: "def solution():\n    return 3 + 4\n",
            q1: "import os\ndef solution():\n    os.system('echo hi')\n    return 4\n",
        }
    )
    a, b = solve(model, PROBLEMS, "pal", progress=False)
    assert a.correct() and a.program_status == "ok" and "return 3 + 4" in a.program
    assert b.strict is None and b.program_status == "error"
    assert "```" in model.calls[0]["stop"]
    assert summarise([a, b])["programs"] == {"error": 1, "ok": 1}


def test_bootstrap_interval_brackets_the_mean_and_is_seeded():
    correct = [True] * 30 + [False] * 70
    lo, hi = bootstrap_interval(correct, seed=1)
    assert lo < 0.3 < hi and 0.15 < lo and hi < 0.45
    assert (lo, hi) == bootstrap_interval(correct, seed=1)
    assert bootstrap_interval([True] * 5) == (1.0, 1.0)
    summary = summarise(
        solve(
            Scripted({p["question"]: p["answer"] for p in PROBLEMS}),
            PROBLEMS,
            "direct",
            progress=False,
        )
    )
    assert summary["strict"]["accuracy"] == 1.0 and summary["n"] == 2


class Renderer(Scripted):
    """A Scripted model that renders conversations as a chat template would."""

    def render(self, messages):
        turns = "".join(f"<{m['role']}>{m['content']}</{m['role']}>" for m in messages)
        return turns + "<assistant>"


def test_chat_layout_sends_the_methods_format_as_turns():
    messages = build_messages("Q?", "cot", shots=2)
    roles = ["system", "user", "assistant", "user", "assistant", "user"]
    assert [m["role"] for m in messages] == roles
    assert messages[0]["content"] == SYSTEM["cot"] and messages[-1]["content"] == "Q?"
    assert messages[2]["content"].endswith(".") and "The answer is" in messages[2]["content"]
    pal = build_messages("Q?", "pal", shots=1)
    assert pal[2]["content"].startswith("```python\ndef solution():")
    assert pal[2]["content"].endswith("\n```")
    # rendered by the model's template; the chat reply opens its own code block
    q0 = PROBLEMS[0]["question"]
    model = Renderer({q0: "```python\ndef solution():\n    return 3 + 4\n```"})
    (a,) = solve(model, PROBLEMS[:1], "pal", shots=0, layout="chat", progress=False)
    assert a.correct() and a.program_status == "ok"
    assert "```" not in model.calls[0]["stop"]
    with pytest.raises(ConfigError, match="unknown layout 'chats'.*valid: plain, chat"):
        solve(model, PROBLEMS, "cot", layout="chats", progress=False)


def test_chat_layout_without_a_renderer_asks_one_conversation_at_a_time():
    class Chatter:
        name = "served"

        def __init__(self):
            self.conversations = []

        def chat(self, messages, max_tokens=256, temperature=0.0, stop=(), seed=None):
            self.conversations.append(messages)
            return "The answer is 7."

    model = Chatter()
    a, b = solve(model, PROBLEMS, "cot", shots=1, layout="chat", progress=False)
    assert a.correct() and not b.correct() and len(model.conversations) == 2
    assert model.conversations[1][-1] == {"role": "user", "content": PROBLEMS[1]["question"]}


def test_training_conversations_teach_the_format_on_problems_no_evaluation_asks():
    rows = training_conversations(40, ("cot", "pal"), seed=0)
    assert len(rows) == 40
    questions = [r["messages"][1]["content"] for r in rows]
    held_out = {p["question"] for p in word_problems(HELD_OUT, seed=0)}
    assert len(set(questions)) == 40 and not held_out & set(questions)
    by_answer = {p["question"]: p for p in word_problems(HELD_OUT + 400, seed=0)}
    for i, row in enumerate(rows):
        system, user, assistant = row["messages"]
        method = ("cot", "pal")[i % 2]
        assert system == {"role": "system", "content": SYSTEM[method]}
        # the reply is the method's worked solution of this very problem
        problem = by_answer[user["content"]]
        if method == "cot":
            assert extract_answer(assistant["content"], "strict") == problem["answer"]
        else:
            program = extract_code(assistant["content"])
            assert run_python(program).answer == int(problem["answer"])
    assert training_conversations(5, ("direct",), seed=3) == training_conversations(
        5, ("direct",), seed=3
    )
    with pytest.raises(ConfigError, match="self-consistency"):
        training_conversations(5, ("self-consistency",))


def test_training_conversations_are_what_lmlab_finetune_reads(tmp_path):
    write_jsonl(training_conversations(6, ("cot", "pal", "direct"), seed=2), tmp_path / "t.jsonl")
    examples = load_examples(tmp_path / "t.jsonl")
    assert len(examples) == 6
    assert [m["role"] for m in examples[0].messages] == ["system", "user", "assistant"]
    assert examples[2].messages[-1]["content"].lstrip("-").isdigit()  # direct: the number
