"""The ReAct loop with scripted models, a tiny real model and (slow) SmolLM2: parsing,
the step budget, both layouts, traces saved and replayed, evaluation, ``lmlab agent``."""

import io
import json
import re
import threading
from contextlib import redirect_stdout
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch

from builders import send_json
from lmlab.cli.main import main
from lmlab.data.documents import documents, example_questions, multihop_questions
from lmlab.data.tokenizers import ByteTokenizer
from lmlab.data.word_problems import word_problems
from lmlab.errors import ConfigError, DataError
from lmlab.lm import LM
from lmlab.models import build_model, get_preset
from lmlab.prompting.agent import Agent, parse_action, replay
from lmlab.prompting.agent_eval import (
    answer_directly,
    answer_matches,
    bootstrap_interval,
    evaluate_agent,
)
from lmlab.prompting.models import LMCompleter, ReplayCompleter
from lmlab.prompting.retrieval import make_retriever
from lmlab.prompting.traces import load_traces, render_markdown, render_text, save_traces

TOOLS = ["search", "lookup", "finish"]


@pytest.fixture(scope="module")
def library():
    """The bundled documents and their BM25 index, built once for the module."""
    docs = documents()
    return {"docs": docs, "retriever": make_retriever(docs, "bm25")}


def gold_replies(item):
    """What a model that calls the tools right writes, step by step."""
    return [f"I {a} {arg}.\nAction: {a}[{arg}]\n" for a, arg in item["actions"]]


class Oracle:
    """A scripted model for any multi-hop question: it reads the question in the prompt and
    writes the next of its gold actions. Records what it was sent."""

    name = "oracle"

    def __init__(self):
        self.items = {q["question"]: q for q in multihop_questions() + example_questions()}
        self.sent = []

    def _next(self, text):
        question = re.findall(r"Question: (.*)", text)[-1]
        done = text.rsplit("Question: ", 1)[1].count("Observation:")
        return gold_replies(self.items[question])[done]

    def complete(self, prompts, max_tokens=256, temperature=0.0, stop=(), seed=None):
        self.sent.append(prompts[0])
        return [self._next(prompts[0])]

    def chat(self, messages, max_tokens=256, temperature=0.0, stop=(), seed=None):
        self.sent.append(messages)
        return self._next("\n".join(m["content"] for m in messages))


# ----------------------------------------------------------------------------- parsing


@pytest.mark.parametrize(
    "reply, want",
    [
        ("I search.\nAction: search[brass loom]\n", ("I search.", "search", "brass loom")),
        ("Thought 2: look\nAction 2: Lookup [born]", ("look", "lookup", "born")),
        ("**Thought:** ok\n**Action:** finish[Kestria]", ("ok", "finish", "Kestria")),
        ("x\nAction: search[a [b] c] then more text ]", ("x", "search", "a [b] c")),
        ("Action: finish[]", ("", "finish", "")),
    ],
)
def test_parse_action_reads_thought_tool_and_argument(reply, want):
    parsed = parse_action(reply, TOOLS)
    assert (parsed.thought, parsed.action, parsed.argument) == want and parsed.error is None


@pytest.mark.parametrize(
    "reply, error",
    [
        ("I think the answer is Kestria.", "Invalid action: write one line 'Action: tool"),
        ("Action: search[brass", "never closed with ]"),
        ("Action: fly[home]", "Unknown tool 'fly'"),
        ("", "Invalid action"),
        ("Action: search brass loom", "Invalid action"),
    ],
)
def test_a_malformed_action_becomes_an_observation_naming_the_format(reply, error):
    parsed = parse_action(reply, TOOLS)
    assert parsed.action is None and error in parsed.error
    assert "search, lookup, finish" in parsed.error


# ----------------------------------------------------------------------------- the loop


def test_the_loop_answers_a_two_hop_question_when_the_model_calls_the_tools_right(library):
    item = next(q for q in multihop_questions() if q["kind"] == "birth_country")
    model = ReplayCompleter(gold_replies(item))
    trace = Agent(model, "search,lookup", **library).run(item["question"])
    assert trace.stopped == "finish" and trace.answer == item["answer"]
    assert [s.action for s in trace.steps] == ["search", "lookup", "search", "finish"]
    born = item["actions"][2][1]  # the city, read from the lookup's observation
    assert born in trace.steps[1].observation and item["answer"] in trace.steps[2].observation


def test_malformed_replies_get_the_format_and_the_run_goes_on(library):
    replies = ["I think.", "Action: search[", "Action: jump[x]", "Done.\nAction: finish[Kestria]"]
    trace = Agent(ReplayCompleter(replies), "search,lookup", **library).run("Where?")
    assert [s.action for s in trace.steps] == [None, None, None, "finish"]
    assert all("Action: tool[argument]" in s.observation for s in trace.steps[:3])
    assert trace.answer == "Kestria" and trace.well_formed == 1


def test_the_step_budget_stops_a_run_without_an_answer(library):
    replies = ["Action: search[river]"] * 3
    trace = Agent(ReplayCompleter(replies), "search,lookup", max_steps=3, **library).run("Q?")
    assert len(trace.steps) == 3 and trace.answer is None and trace.stopped == "max_steps"
    assert "budget of 3 steps" in trace.reason and "No answer" in render_text(trace)


def test_complete_layout_grows_one_prompt_and_chat_layout_sends_turns(library):
    item = next(q for q in multihop_questions() if q["kind"] == "birth_river")
    oracle = Oracle()
    plain = Agent(oracle, "search,lookup", layout="complete", **library).run(item["question"])
    prompts = oracle.sent
    assert prompts[0].startswith("Answer the question in steps.")
    assert prompts[0].endswith(f"Question: {item['question']}\nThought:")
    assert prompts[1].startswith(prompts[0][: -len("Thought:")])  # the history is kept
    assert prompts[1].endswith(f"Observation: {plain.steps[0].observation}\nThought:")
    assert "lookup[keyword]" in prompts[0] and "calculator" not in prompts[0]

    chat_oracle = Oracle()
    chat = Agent(chat_oracle, "search,lookup", layout="chat", **library).run(item["question"])
    assert chat.answer == plain.answer == item["answer"]
    last = chat_oracle.sent[-1]
    assert last[0]["role"] == "system" and last[1]["content"].startswith("Question: ")
    assert [m["role"] for m in last[-3:]] == ["user", "assistant", "user"]
    assert last[-1]["content"] == f"Observation: {chat.steps[-2].observation}"


def test_examples_follow_the_tools():
    calc = Agent(ReplayCompleter([]), "calculator")
    assert [t.question.split()[0] for t in calc.examples] == ["Ava"]
    assert calc.examples[0].steps[0].observation == "33"
    everything = Agent(ReplayCompleter([]), "calculator,python,search,lookup")
    assert len(everything.examples) == 4 and everything.examples[-1].steps[0].observation == "10"
    assert all(t.answer == t.steps[-1].argument for t in everything.examples)
    with pytest.raises(ConfigError, match="unknown layout 'json'"):
        Agent(ReplayCompleter([]), "calculator", layout="json")


# ----------------------------------------------------------------------------- traces and replay


def tiny_byte_lm(context=1024):
    """A random 1-layer byte-level GPT (by default its context holds the calculator prompt)."""
    torch.manual_seed(0)
    tok = ByteTokenizer()
    spec = {**get_preset("gpt-char-tiny"), "vocab_size": tok.vocab_size, "n_layers": 1,
            "d_model": 32, "n_heads": 2, "d_ff": 64, "max_seq_len": context}  # fmt: skip
    return LM(build_model(spec).eval(), tok)


def test_a_real_model_run_saves_and_replays_identically(tmp_path):
    model = LMCompleter(tiny_byte_lm(), name="tiny")
    agent = Agent(model, "calculator", max_steps=2, max_tokens=8, temperature=1.0, seed=5)
    trace = agent.run("What is 6 times 7?")
    assert len(trace.steps) == 2 and trace.stopped in ("max_steps", "finish")
    save_traces(trace, tmp_path / "trace.jsonl")
    loaded = load_traces(tmp_path / "trace.jsonl")
    assert loaded == [trace]
    again = replay(loaded[0])
    assert again == trace


def test_a_prompt_past_the_context_ends_the_run_with_its_reason():
    model = LMCompleter(tiny_byte_lm(context=64), name="tiny")
    trace = Agent(model, "calculator", max_steps=2, max_tokens=4).run("What is 6 times 7?")
    assert trace.steps == [] and trace.answer is None and trace.stopped == "error"
    assert "could not go on" in trace.reason and "No answer" in render_text(trace)


def test_a_scripted_run_replays_identically_and_a_changed_world_shows(tmp_path, library):
    items = multihop_questions(3)
    oracle = Oracle()
    traces = [Agent(oracle, "search,lookup", **library).run(q["question"]) for q in items]
    save_traces(traces, tmp_path / "t.jsonl")
    loaded = load_traces(tmp_path / "t.jsonl")
    assert [replay(t) for t in loaded] == traces
    other = documents(seed=1)  # another world: the same replies meet other observations
    assert replay(loaded[0], docs=other).steps != traces[0].steps


def test_trace_files_are_read_strictly(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"type": "run", "run": 0, "question": "q", "settings": {}}\n{"type": "x"}\n')
    with pytest.raises(DataError, match="bad.jsonl:2: not a trace line"):
        load_traces(bad)
    with pytest.raises(DataError, match="cannot read the trace file"):
        load_traces(tmp_path / "missing.jsonl")


def test_renderings_show_every_step(library):
    item = multihop_questions(1)[0]
    trace = Agent(Oracle(), "search,lookup", **library).run(item["question"])
    text, md = render_text(trace), render_markdown(trace)
    for step in trace.steps:
        assert (
            f"{step.action}[{step.argument}]" in text and f"`{step.action}[{step.argument}]`" in md
        )
    assert f"Answer: {item['answer']}" in text and md.startswith(f"### {item['question']}")


# ----------------------------------------------------------------------------- evaluation


def test_answers_match_aliases_articles_and_numbers():
    river = {"answer": "Arvon River", "aliases": ["Arvon"]}
    assert answer_matches("the Arvon River.", river) and answer_matches("arvon", river)
    assert not answer_matches("Arvon Lake", river) and not answer_matches(None, river)
    assert answer_matches("The answer is 42.", {"answer": "42"})
    assert not answer_matches("43", {"answer": "42"})
    # strict: a numeric answer is the number alone; names read the same both ways
    for prediction, strict in [("42", True), ("42.0.", True), ("$42", True), ("42 apples", False)]:
        assert answer_matches(prediction, {"answer": "42"}, "strict") is strict, prediction
        assert answer_matches(prediction, {"answer": "42"})
    assert not answer_matches("41", {"answer": "42"}, "strict")
    assert answer_matches("the Arvon River.", river, "strict")
    with pytest.raises(ConfigError, match="valid: strict, flexible"):
        answer_matches("42", {"answer": "42"}, "exact")


def test_bootstrap_interval_is_seeded_and_near_the_normal_one():
    outcomes = [True, False] * 50  # p = 0.5, n = 100: normal interval 0.5 +- 0.098
    low, high = bootstrap_interval(outcomes, seed=3)
    assert (low, high) == bootstrap_interval(outcomes, seed=3)
    assert low == pytest.approx(0.402, abs=0.03) and high == pytest.approx(0.598, abs=0.03)
    assert bootstrap_interval([True] * 5) == (1.0, 1.0)
    with pytest.raises(ConfigError):
        bootstrap_interval([])


def test_evaluate_agent_scores_the_oracle_perfectly_and_a_guesser_at_zero(library):
    items = multihop_questions(6)
    result = evaluate_agent(Agent(Oracle(), "search,lookup", **library), items, progress=False)
    assert result.score.accuracy == 1.0 and result.well_formed == 1.0 and result.finished == 1.0
    assert result.actions["finish"] == 6 and all(t.meta["correct"] for t in result.traces)
    assert f"reference: {items[0]['answer']} (right)" in render_text(result.traces[0])
    guesser = Agent(ReplayCompleter(["Action: finish[Nowhere]"] * 6), "search,lookup", **library)
    assert evaluate_agent(guesser, items, progress=False).score.accuracy == 0.0
    direct, answers = answer_directly(
        ReplayCompleter([q["answer"] + "." for q in items[:3]] + ["no"] * 3), items, progress=False
    )
    assert direct.correct == 3 and answers[0] == items[0]["answer"]


def test_word_problems_are_scored_by_their_number():
    problem = word_problems(1, seed=2)[0]
    replies = [
        "I compute.\nAction: calculator[2 * 3]",
        f"So.\nAction: finish[{problem['answer']}.0]",
    ]
    agent = Agent(ReplayCompleter(replies * 2), "calculator,python")
    result = evaluate_agent(agent, [problem], progress=False)
    assert result.score.correct == 1 and result.strict.correct == 1
    assert result.traces[0].meta == {
        "reference": problem["answer"],
        "correct": True,
        "strict": True,
    }
    wordy = [replies[0], f"So.\nAction: finish[{problem['answer']} apples]"]
    result = evaluate_agent(Agent(ReplayCompleter(wordy), "calculator"), [problem], progress=False)
    assert result.score.correct == 1 and result.strict.correct == 0
    wrong = {**problem, "answer": str(int(problem["answer"]) + 1)}
    assert evaluate_agent(agent, [wrong], progress=False).score.correct == 0


# ----------------------------------------------------------------------------- lmlab agent


class Scripted(BaseHTTPRequestHandler):
    """An OpenAI-compatible chat endpoint that answers with gold actions (the Oracle)."""

    oracle = Oracle()

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        messages = body["messages"]
        if messages[0]["content"].startswith("Answer the question with a short answer"):
            content = Scripted.oracle.items[messages[-1]["content"]]["answer"]  # direct
        else:
            content = Scripted.oracle.chat(messages)
        send_json(self, {"choices": [{"message": {"content": content}}]})

    def log_message(self, *args):
        pass


def test_lmlab_agent_against_a_server_then_replayed(tmp_path):
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Scripted)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    item = multihop_questions(1)[0]
    url = f"http://127.0.0.1:{httpd.server_address[1]}/v1"
    argv = ["agent", "--model", "gold", "--base_url", url, "--question", item["question"]]
    out = io.StringIO()
    try:
        with redirect_stdout(out):
            assert main([*argv, "--tools", "search,lookup", "--out", str(tmp_path)]) == 0
    finally:
        httpd.shutdown()
    assert f"Answer: {item['answer']}" in out.getvalue()
    assert (tmp_path / "trace.md").read_text().startswith(f"### {item['question']}")
    out = io.StringIO()
    with redirect_stdout(out):
        assert main(["agent", "--replay", str(tmp_path / "trace.jsonl")]) == 0
    assert "replay: identical to the recording" in out.getvalue()
    assert load_traces(tmp_path / "replay.jsonl") == load_traces(tmp_path / "trace.jsonl")


def test_lmlab_agent_eval_scores_react_and_direct_answers(tmp_path):
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Scripted)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{httpd.server_address[1]}/v1"
    argv = ["agent", "--model", "gold", "--base_url", url, "--eval", "multihop", "--limit", "3"]
    out = io.StringIO()
    try:
        with redirect_stdout(out):
            assert (
                main(
                    [*argv, "--tools", "search,lookup", "--direct", "true", "--out", str(tmp_path)]
                )
                == 0
            )
    finally:
        httpd.shutdown()
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert [(s["method"], s["correct"], s["n"]) for s in summary["scores"]] == [
        ("react (chat)", 3, 3),
        ("react (chat), strict", 3, 3),
        ("direct (chat)", 3, 3),
        ("direct (chat), strict", 3, 3),
    ]
    assert "react (chat): 1.000 (3/3), 95% CI [1.000, 1.000]" in out.getvalue()
    assert len(load_traces(tmp_path / "trace.jsonl")) == 3 and summary["well_formed"] == 1.0
    # the oracle never loops and finishes every run: three finish actions in the figure's counts
    assert summary["repeated"] == 0 and sum(summary["by_step"]["finish"]) == 3
    assert (tmp_path / "agent.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_lmlab_agent_mistakes_are_one_line(capsys):
    assert main(["agent", "--model", "x", "--base_url", "http://127.0.0.1:9/v1"]) == 2
    assert "give either --question TEXT or --eval SET" in capsys.readouterr().err
    assert main(["agent", "--model", "x", "--question", "q", "--tools", "web"]) == 2
    assert "unknown tool 'web'" in capsys.readouterr().err


# ----------------------------------------------------------------------------- SmolLM2


@pytest.mark.slow
def test_smollm2_runs_the_loop_end_to_end(tmp_path):
    import lmlab

    model = LMCompleter(lmlab.load("smollm2", dtype="auto"), name="smollm2")
    items = multihop_questions(1)
    for layout in ("chat", "complete"):
        agent = Agent(model, "search,lookup", max_steps=2, layout=layout, max_tokens=32)
        result = evaluate_agent(agent, items, progress=False)
        save_traces(result.traces, tmp_path / f"{layout}.jsonl")
        for trace in load_traces(tmp_path / f"{layout}.jsonl"):
            assert 1 <= len(trace.steps) <= 2 and trace.stopped in ("finish", "max_steps")
            assert all(s.raw is not None and s.observation for s in trace.steps)
            assert replay(trace) == trace
