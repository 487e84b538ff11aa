"""The experiments behind ``lmlab prompt`` and ``lmlab icl`` write their tables and figures."""

import json

from lmlab.data.word_problems import word_problems
from lmlab.prompting.agent import replay
from lmlab.prompting.runs import (
    actions_by_step,
    compare_methods,
    icl_sweep,
    plot_agent_eval,
    repeats_an_action,
)
from lmlab.prompting.traces import Step, Trace, load_traces
from prompting.test_models import byte_lm


class Oracle:
    """Answers every word problem correctly, in each method's form."""

    name = "oracle"

    def __init__(self):
        self.answers = {p["question"]: p for p in word_problems(6, seed=0)}

    def complete(self, prompts, max_tokens=256, temperature=0.0, stop=(), seed=None):
        out = []
        for prompt in prompts:
            question = prompt.rsplit("Question: ", 1)[-1].split("\n")[0]
            p = self.answers[question]
            if prompt.endswith("\nThought:"):  # react: a calculator call, then finish
                episode = prompt.rsplit("Question: ", 1)[-1]
                if "Observation:" in episode:
                    out.append(f" Done.\nAction: finish[{p['answer']}]")
                else:
                    out.append(f" I add nothing.\nAction: calculator[{p['answer']} + 0]")
            elif prompt.endswith("```python\n"):
                out.append(p["program"] + "\n")
            elif "The answer is" in prompt:
                out.append(" " + p["rationale"])
            else:
                out.append(" " + p["answer"])
        return out


def test_compare_methods_writes_summary_attempts_and_figure(tmp_path):
    summary = compare_methods(Oracle(), tmp_path, n=6, shots=2, samples=3)
    for method in ("direct", "cot", "self-consistency", "pal"):
        assert summary["methods"][method]["strict"]["accuracy"] == 1.0, method
    assert summary["methods"]["self-consistency"]["maj_at_k"]["strict"] == [1.0, 1.0, 1.0]
    assert summary["methods"]["pal"]["programs"] == {"ok": 6}
    assert json.loads((tmp_path / "methods.json").read_text()) == summary
    rows = (tmp_path / "attempts.jsonl").read_text().splitlines()
    assert len(rows) == 4 * 6 and (tmp_path / "methods.png").stat().st_size > 10_000


def test_icl_sweep_covers_every_format_k_and_seed(tmp_path):
    table = icl_sweep(byte_lm(), tmp_path, ks=(0, 2), formats=("qa", "arrow"), seeds=(0, 1))
    cells = {(r["format"], r["k"], r["seed"]) for r in table["rows"]}
    assert cells == {
        ("qa", 0, 0),
        ("qa", 2, 0),
        ("qa", 2, 1),
        ("arrow", 0, 0),
        ("arrow", 2, 0),
        ("arrow", 2, 1),
    }
    assert (tmp_path / "icl.png").stat().st_size > 10_000


def test_react_joins_the_table_and_its_traces_replay(tmp_path):
    summary = compare_methods(Oracle(), tmp_path, methods=("direct", "react"), n=3, shots=1)
    react = summary["methods"]["react"]
    assert react["strict"]["accuracy"] == 1.0 and react["flexible"]["accuracy"] == 1.0
    traces = load_traces(tmp_path / "trace.jsonl")
    assert [[s.action for s in t.steps] for t in traces] == [["calculator", "finish"]] * 3
    assert [replay(t) for t in traces] == traces
    assert traces[0].meta == {"reference": traces[0].answer, "correct": True, "strict": True}
    rows = [json.loads(r) for r in (tmp_path / "attempts.jsonl").read_text().splitlines()]
    assert rows[-1]["method"] == "react" and rows[-1]["trace"]["answer"] == rows[-1]["reference"]
    assert "calculator[" in (tmp_path / "trace.md").read_text()


def _trace(*actions):
    """A trace whose steps call ``actions`` ((tool or None, argument) pairs)."""
    return Trace("q", [Step("t", a, arg, "obs", "raw") for a, arg in actions])


def test_actions_by_step_counts_each_action_at_each_step_and_finds_loops(tmp_path):
    looping = _trace(("search", "A"), (None, None), ("search", "A"))
    finished = _trace(("search", "B"), ("lookup", "born"), ("search", "C"), ("finish", "X"))
    short = _trace(("lookup", "born"))
    counts = actions_by_step([looping, finished, short])
    assert counts == {
        "search": [2, 0, 2, 0],
        "invalid": [0, 1, 0, 0],
        "lookup": [1, 1, 0, 0],
        "finish": [0, 0, 0, 1],
    }
    assert [repeats_an_action(t) for t in (looping, finished, short)] == [True, False, False]
    # the same tool with another argument is no repeat; an invalid reply is never one
    assert not repeats_an_action(
        _trace(("search", "A"), ("search", "B"), (None, None), (None, None))
    )
    summary = {
        "set": "multihop",
        "scores": [
            {
                "method": "react (complete)",
                "n": 3,
                "correct": 1,
                "accuracy": 1 / 3,
                "low": 0.0,
                "high": 1.0,
            }
        ],  # fmt: skip
        "by_step": counts,
    }
    plot_agent_eval(summary, tmp_path / "agent.png")
    assert (tmp_path / "agent.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
