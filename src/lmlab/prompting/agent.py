"""ReAct: a language model that reasons and acts in turn (Yao et al. 2022).

One episode, for a question:

    prompt  = instructions + the tools' one-line descriptions + example trajectories
              + "Question: <question>"
    repeat up to max_steps:
        reply = model(prompt), stopped at "Observation:"     # "Thought: ... Action: tool[arg]"
        thought, tool, argument = parse_action(reply)        # malformed: say the valid format
        if tool is finish: the answer is argument; stop
        observation = tools[tool].run(argument)              # tools.py; never raises
        prompt += thought, action, "Observation: " + observation
    no finish within max_steps: the answer is None, and the trace says why

The model is anything with the ``Completer`` interface (``models.py``): an lmlab model or an
OpenAI-compatible endpoint. Two layouts: ``complete`` grows one plain-text prompt (as the
paper does with PaLM), ``chat`` sends the same turns as a conversation (the examples as
earlier user/assistant turns, each observation as a user turn), for instruction-tuned
models. Every step's raw reply is kept in the trace (``traces.py``), so a run replays
exactly with a ``ReplayCompleter`` (``replay``).

The example trajectories are not the paper's: they are made here, from the bundled world
(``lmlab.data.documents``) with its gold actions, by running the real tools, so every
observation in a prompt is what the tool really says.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from lmlab.data.documents import Document, documents, example_questions
from lmlab.errors import ConfigError, DecodingError
from lmlab.prompting.models import Completer, Message, ReplayCompleter
from lmlab.prompting.retrieval import Retriever, make_retriever
from lmlab.prompting.tools import build_tools, parse_tool_names
from lmlab.prompting.traces import Step, Trace

LAYOUTS = ("complete", "chat")
STOP = ("Observation:", "\nQuestion:")
INSTRUCTIONS = (
    "Answer the question in steps. In each step, write a Thought (what you know and what to "
    "do next) and then one Action. After each Action you see its Observation. Use the tools "
    "to find facts; do not guess. The actions are:"
)

# ----------------------------------------------------------------------------- parsing

_ACTION = re.compile(r"Action\s*\d*\s*:[\s*]*([A-Za-z_]\w*)\s*\[", flags=re.IGNORECASE)
_THOUGHT_LABEL = re.compile(r"^[\s*#]*Thought\s*\d*\s*:[\s*]*", flags=re.IGNORECASE)


@dataclass(frozen=True)
class Parsed:
    thought: str
    action: str | None
    argument: str | None
    error: str | None
    """Why the reply holds no valid action (the observation the model gets instead)."""


def _closing(text: str, start: int) -> int | None:
    """Index of the ``]`` that closes the ``[`` just before ``start`` (brackets nest)."""
    depth = 1
    for i in range(start, len(text)):
        if text[i] == "[":
            depth += 1
        elif text[i] == "]":
            depth -= 1
            if depth == 0:
                return i
    return None


def parse_action(reply: str, tools: Sequence[str]) -> Parsed:
    """Read ``Thought: ... Action: tool[argument]`` from a reply (labels may carry step
    numbers or markdown stars; the tool's name is case-blind; the argument may hold
    brackets). Never raises: a reply without a valid action gets ``error``, the text the
    model is shown instead of an observation.

    ``"I should search.\\nAction: search[brass loom]"`` ->
    ``Parsed("I should search.", "search", "brass loom", None)``."""
    valid = f"write one line 'Action: tool[argument]' with a tool among {', '.join(tools)}"
    match = _ACTION.search(reply)
    if match is None:
        thought = _THOUGHT_LABEL.sub("", reply.strip()).strip()
        return Parsed(thought, None, None, f"Invalid action: {valid}.")
    thought = _THOUGHT_LABEL.sub("", reply[: match.start()].strip()).strip().rstrip("*").strip()
    name = match.group(1).lower()
    end = _closing(reply, match.end())
    if end is None:
        return Parsed(thought, None, None, f"Invalid action: the [ after {name} is never "
                      f"closed with ]; {valid}.")  # fmt: skip
    if name not in tools:
        return Parsed(thought, None, None, f"Unknown tool {name!r}: {valid}.")
    return Parsed(thought, name, reply[match.end() : end].strip(), None)


# ----------------------------------------------------------------------------- examples

# Thoughts for the gold trajectories of example_questions, by kind; {aN} is the argument
# of action N.
THOUGHTS = {
    "birth_country": [
        "I need who made {a0}, where they were born, and the country of that place.",
        "The first result made it. I look up where they were born.",
        "They were born in {a2}. I search {a2} to find its country.",
        "{a2} is in {a3}. So the answer is {a3}.",
    ],
    "work_currency": [
        "I need the city where {a0} worked, its country, and the currency there.",
        "I look up where {a0} worked.",
        "{a0} worked in {a2}. I search {a2} to find its country.",
        "{a2} is in {a3}. I search {a3} to find its currency.",
        "I look up the currency of {a3}.",
        "The currency of {a3} is the {a5}. So the answer is {a5}.",
    ],
}
ARITHMETIC_EXAMPLES = {
    "calculator": (
        "Ava has 12 shells. She buys 3 bags with 7 shells each. How many shells does she have?",
        [("She buys 3 * 7 shells and had 12, so I compute 12 + 3 * 7.", "calculator",
          "12 + 3 * 7"), ("She has 33 shells.", "finish", "33")],
    ),
    "python": (
        "Ben has 45 cards. He keeps 5 and shares the rest equally among 4 friends. How many "
        "cards does each friend get?",
        [("I write a program: the rest is 45 - 5, shared by 4 friends.", "python",
          "print((45 - 5) // 4)"), ("Each friend gets 10 cards.", "finish", "10")],
    ),
}  # fmt: skip


def example_trajectories(make_tools: Callable[[], dict], world_seed: int = 0) -> list[Trace]:
    """Worked example traces for the prompt, for the tools ``make_tools()`` gives (fresh
    ones per example): two multi-hop questions when search and lookup are there, one word
    problem per arithmetic tool. Observations come from running the tools."""
    names = set(make_tools())
    scripts = []
    if {"search", "lookup"} <= names:
        for item in example_questions(world_seed):
            args = {f"a{i}": arg for i, (_, arg) in enumerate(item["actions"])}
            thoughts = [t.format(**args) for t in THOUGHTS[item["kind"]]]
            steps = [(t, a, arg) for t, (a, arg) in zip(thoughts, item["actions"])]
            scripts.append((item["question"], steps))
    scripts += [ARITHMETIC_EXAMPLES[n] for n in ("calculator", "python") if n in names]
    out = []
    for question, steps in scripts:
        fresh = make_tools()
        trace = Trace(question, stopped="finish")
        for thought, action, argument in steps:
            observation = "" if action == "finish" else fresh[action].run(argument)
            text = f"{thought}\nAction: {action}[{argument}]"
            trace.steps.append(Step(thought, action, argument, observation, text))
        trace.answer = steps[-1][2]
        out.append(trace)
    return out


# ----------------------------------------------------------------------------- prompts


def _turn(step: Step) -> str:
    """What the model wrote in a step, cleaned: its thought and its (first) action."""
    action = f"\nAction: {step.action}[{step.argument}]" if step.action else ""
    return f"Thought: {step.thought}{action}"


def _header(tools: dict) -> str:
    return INSTRUCTIONS + "\n" + "\n".join(t.description for t in tools.values())


def plain_prompt(tools: dict, examples: Sequence[Trace], trace: Trace) -> str:
    """The ``complete`` layout: one text, ending where the model writes its next thought."""
    parts = [_header(tools), ""]
    for t in [*examples, trace]:
        parts.append(f"Question: {t.question}")
        for step in t.steps:
            parts.append(_turn(step))
            if step.action != "finish":
                parts.append(f"Observation: {step.observation}")
        if t is not trace:
            parts.append("")
    return "\n".join(parts) + "\nThought:"


def chat_messages(tools: dict, examples: Sequence[Trace], trace: Trace) -> list[Message]:
    """The ``chat`` layout: the examples and this episode as conversation turns."""
    messages = [{"role": "system", "content": _header(tools)}]
    for t in [*examples, trace]:
        messages.append({"role": "user", "content": f"Question: {t.question}"})
        for step in t.steps:
            messages.append({"role": "assistant", "content": _turn(step)})
            if step.action != "finish":
                messages.append({"role": "user", "content": f"Observation: {step.observation}"})
    return messages


# ----------------------------------------------------------------------------- the loop


class Agent:
    """A ReAct agent: a model, tools and a step budget. ``run(question) -> Trace``.

    ``tools``: names among calculator, python, search, lookup (finish is always there).
    ``search``: how the search tool ranks (``bm25`` or ``embedding``: MiniLM), over
    ``docs`` (default: the bundled collection). ``examples``: put the worked example
    trajectories in the prompt."""

    def __init__(
        self,
        model: Completer,
        tools: str | Sequence[str] = "search,lookup",
        max_steps: int = 8,
        layout: str = "complete",
        max_tokens: int = 128,
        temperature: float = 0.0,
        seed: int = 0,
        search: str = "bm25",
        docs: Sequence[Document] | None = None,
        retriever: Retriever | None = None,
        examples: bool = True,
    ):
        if layout not in LAYOUTS:
            raise ConfigError(f"unknown layout {layout!r}; valid: {', '.join(LAYOUTS)}")
        if max_steps < 1 or max_tokens < 1:
            raise ConfigError(
                f"max_steps and max_tokens must be >= 1; got {max_steps}, {max_tokens}"
            )
        self.model, self.max_steps, self.layout = model, max_steps, layout
        self.max_tokens, self.temperature, self.seed = max_tokens, temperature, seed
        self.names = parse_tool_names(tools)
        self.docs = (
            list(docs if docs is not None else documents()) if "search" in self.names else []
        )
        if "search" in self.names and retriever is None:
            retriever = make_retriever(self.docs, search)
        self.retriever = retriever
        self.settings = {
            "model": getattr(model, "name", type(model).__name__),
            "tools": [n for n in self.names if n != "finish"],
            "max_steps": max_steps,
            "layout": layout,
            "max_tokens": max_tokens,
            "temperature": temperature,
            "seed": seed,
            "search": search if "search" in self.names else None,
            "examples": examples,
        }
        self.examples = example_trajectories(self._tools) if examples else []

    def _tools(self) -> dict:
        return build_tools(self.names, self.docs, self.retriever)

    def _reply(self, tools: dict, trace: Trace, step: int) -> str:
        options = {
            "max_tokens": self.max_tokens,
            "temperature": self.temperature,
            "stop": STOP,
            "seed": self.seed + step,
        }
        if self.layout == "chat":
            return self.model.chat(chat_messages(tools, self.examples, trace), **options)
        return self.model.complete([plain_prompt(tools, self.examples, trace)], **options)[0]

    def run(self, question: str) -> Trace:
        tools = self._tools()
        trace = Trace(question, settings=dict(self.settings))
        for step in range(self.max_steps):
            try:
                raw = self._reply(tools, trace, step)
            except DecodingError as e:  # the prompt outgrew the model's context
                trace.stopped, trace.reason = "error", f"the model could not go on: {e}"
                return trace
            parsed = parse_action(raw, list(tools))
            if parsed.action is None:
                trace.steps.append(Step(parsed.thought, None, None, parsed.error, raw))
                continue
            result = tools[parsed.action].run(parsed.argument)
            trace.steps.append(Step(parsed.thought, parsed.action, parsed.argument, result, raw))
            if parsed.action == "finish":
                trace.answer, trace.stopped = result, "finish"
                trace.reason = f"finish after {step + 1} steps"
                return trace
        trace.stopped = "max_steps"
        trace.reason = f"no finish[...] within the budget of {self.max_steps} steps"
        return trace


def replay(trace: Trace, docs: Sequence[Document] | None = None) -> Trace:
    """Run ``trace``'s question again with its settings, the model replaced by its recorded
    replies: the tools run for real, so a faithful recording gives an identical trace."""
    s = trace.settings
    model = ReplayCompleter([step.raw for step in trace.steps], name=s.get("model", "replay"))
    agent = Agent(
        model,
        tools=s.get("tools", []),
        max_steps=s.get("max_steps", 8),
        layout=s.get("layout", "complete"),
        max_tokens=s.get("max_tokens", 128),
        temperature=s.get("temperature", 0.0),
        seed=s.get("seed", 0),
        search=s.get("search") or "bm25",
        docs=docs,
        examples=s.get("examples", True),
    )
    again = agent.run(trace.question)
    again.meta = dict(trace.meta)
    return again
