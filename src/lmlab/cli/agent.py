"""``lmlab agent``: a ReAct agent with tools (``lmlab.prompting.agent``).

lmlab agent --model smollm2 --question "In which country was ... born?" --tools search,lookup
lmlab agent --model smollm2 --base_url http://127.0.0.1:8000/v1 --question "..."   # a server
lmlab agent --replay runs/agent/trace.jsonl         # replay a run (writes replay.jsonl beside it)
lmlab agent --model smollm2 --eval multihop --limit 30 --max_steps 6 --direct     # accuracy

Prints the rendered trace (or, with --eval, the accuracy with its bootstrap 95% interval)
and writes ``trace.jsonl`` and ``trace.md`` (and, for --eval, ``summary.json`` and
``agent.png``: the accuracies and the actions taken at each step) to --out.
"""

from __future__ import annotations

from pathlib import Path

from jsonargparse import ArgumentParser

from lmlab import api
from lmlab.cli.args import add_model_arguments
from lmlab.data.documents import multihop_questions
from lmlab.data.word_problems import word_problems
from lmlab.errors import ConfigError
from lmlab.fileio import atomic_write_json, atomic_write_text
from lmlab.prompting.agent import LAYOUTS, Agent, replay
from lmlab.prompting.agent_eval import answer_directly, answer_matches, evaluate_agent, score
from lmlab.prompting.models import LMCompleter, OpenAICompleter
from lmlab.prompting.retrieval import METHODS
from lmlab.prompting.runs import actions_by_step, plot_agent_eval, repeats_an_action
from lmlab.prompting.tools import parse_tool_names
from lmlab.prompting.traces import load_traces, render_markdown, render_text, save_traces

EVAL_SETS = ("multihop", "word-problems")


def add_arguments(parser: ArgumentParser) -> None:
    parser.add_argument("--model", type=str | None, default=None,
                        help="a model lmlab.load takes (smollm2, a run directory, ...), or the "
                        "model name the --base_url server knows")  # fmt: skip
    parser.add_argument("--question", type=str | None, default=None, help="the question to answer")
    parser.add_argument("--tools", type=str, default="calculator,python,search,lookup",
                        help="comma-separated: calculator, python, search, lookup (finish is "
                        "always there)")  # fmt: skip
    parser.add_argument("--max_steps", type=int, default=8, help="the step budget")
    parser.add_argument("--max_tokens", type=int, default=96, help="new tokens per step at most")
    parser.add_argument("--layout", type=str, default="auto",
                        help="complete (one plain prompt), chat (conversation turns) or auto: "
                        "complete for a local model, chat for a served one")  # fmt: skip
    parser.add_argument("--search", type=str, default="bm25",
                        help="how search ranks: " + ", ".join(METHODS))  # fmt: skip
    parser.add_argument("--temperature", type=float, default=0.0, help="0 is greedy")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--base_url", type=str | None, default=None,
                        help="an OpenAI-compatible endpoint (ending in /v1) instead of a local "
                        "model")  # fmt: skip
    parser.add_argument("--replay", type=str | None, default=None,
                        help="a trace.jsonl to replay with its recorded replies")  # fmt: skip
    parser.add_argument("--eval", type=str | None, default=None,
                        help="evaluate on a question set instead of one question: "
                        + ", ".join(EVAL_SETS))  # fmt: skip
    parser.add_argument("--limit", type=int, default=30, help="--eval: how many questions")
    parser.add_argument("--direct", type=bool, default=False,
                        help="--eval: also score direct answers (no tools) on the same questions")  # fmt: skip
    parser.add_argument("--out", type=str, default="runs/agent",
                        help="folder for trace.jsonl, trace.md (and summary.json, agent.png)")  # fmt: skip
    add_model_arguments(parser)


def _model(args):
    if args.model is None:
        raise ConfigError("give --model (a model to load, or the served model's name) or --replay")
    if args.base_url:
        return OpenAICompleter(args.base_url, args.model), "chat"
    # A local model gets the plain layout: SmolLM2-135M-Instruct keeps the format there and
    # loses it in chat turns (lesson 17).
    return LMCompleter(
        api.load(args.model, dtype=args.dtype, device=args.device), args.model
    ), "complete"


def _layout(requested: str, natural: str) -> str:
    if requested == "auto":
        return natural
    if requested not in LAYOUTS:
        raise ConfigError(f"unknown layout {requested!r}; valid: auto, {', '.join(LAYOUTS)}")
    return requested


def _save(out: Path, traces) -> None:
    save_traces(traces, out / "trace.jsonl")
    atomic_write_text(out / "trace.md", render_markdown(traces))


def run(args) -> None:
    out = Path(args.out)
    if args.replay:
        _replay(Path(args.replay))
        return
    if (args.question is None) == (args.eval is None):
        raise ConfigError(
            "give either --question TEXT or --eval SET (" + ", ".join(EVAL_SETS) + ")"
        )
    tools = parse_tool_names(args.tools)  # before loading a model: a typo fails at once
    model, natural = _model(args)
    agent = Agent(
        model,
        tools=tools,
        max_steps=args.max_steps,
        layout=_layout(args.layout, natural),
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        seed=args.seed,
        search=args.search,
    )
    if args.question is not None:
        trace = agent.run(args.question)
        print(render_text(trace))
        _save(out, [trace])
        print(f"\nsaved: {out / 'trace.jsonl'} and {out / 'trace.md'}")
        return
    _evaluate(agent, model, args, out)


def _evaluate(agent: Agent, model, args, out: Path) -> None:
    if args.eval not in EVAL_SETS:
        raise ConfigError(f"unknown question set {args.eval!r}; valid: {', '.join(EVAL_SETS)}")
    if args.limit < 1:
        raise ConfigError(f"--limit must be at least 1, got {args.limit}")
    if args.eval == "multihop":
        items = multihop_questions(args.limit)  # about the bundled world, which search reads
    else:
        items = word_problems(args.limit, seed=args.seed)
    result = evaluate_agent(agent, items, seed=args.seed)
    scores = [result.score, result.strict]
    if args.direct:
        direct, answers = answer_directly(model, items, agent.layout, seed=args.seed)
        strict = [answer_matches(a, item, "strict") for a, item in zip(answers, items)]
        scores += [direct, score(f"{direct.method}, strict", strict, args.seed)]
    print(render_text(result.traces[0]))
    print()
    for s in scores:
        print(s)
    print(f"well-formed actions: {result.well_formed:.1%} of steps; finished: "
          f"{result.finished:.0%} of runs; actions: {result.actions}")  # fmt: skip
    _save(out, result.traces)
    summary = {
        "set": args.eval,
        "settings": agent.settings,
        "scores": [vars(s) for s in scores],
        "well_formed": result.well_formed,
        "finished": result.finished,
        "actions": result.actions,
        "by_step": actions_by_step(result.traces),
        "repeated": sum(repeats_an_action(t) for t in result.traces),
    }
    print(f"runs that repeated an action word for word: {summary['repeated']} of {len(items)}")
    atomic_write_json(out / "summary.json", summary)
    plot_agent_eval(summary, out / "agent.png")
    print(f"saved: {out / 'summary.json'}, agent.png, trace.jsonl and trace.md")


def _replay(path: Path) -> None:
    """Replay every run in ``path``; write the replayed traces beside it (replay.jsonl,
    replay.md), never over the recording."""
    recorded = load_traces(path)
    again = [replay(t) for t in recorded]
    for old, new in zip(recorded, again):
        print(render_text(new))
        same = (old.steps, old.answer, old.stopped) == (new.steps, new.answer, new.stopped)
        print("replay: identical to the recording" if same else
              "replay: DIFFERS from the recording (the tools or documents changed)")  # fmt: skip
        print()
    save_traces(again, path.with_name("replay.jsonl"))
    atomic_write_text(path.with_name("replay.md"), render_markdown(again))
    print(f"saved: {path.with_name('replay.jsonl')} and {path.with_name('replay.md')}")
