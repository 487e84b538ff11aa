"""What an agent did, step by step: saved as JSONL, read back, rendered for people.

A trace file holds one or more runs, one JSON object per line, each tagged with its run:

    {"type": "run", "run": 0, "question": "...", "settings": {...}, "meta": {...}}
    {"type": "step", "run": 0, "step": 1, "thought": "...", "action": "search",
     "argument": "brass loom", "observation": "[1] ...", "raw": "<the model's text>"}
    {"type": "end", "run": 0, "answer": "Kestria", "stopped": "finish", "reason": "..."}

``raw`` is the model's reply exactly as it came, so the run replays from the file alone
(``lmlab.prompting.agent.replay``). Files are written atomically (``lmlab.fileio``).
"""

from __future__ import annotations

import json
import os
import textwrap
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from lmlab.errors import DataError
from lmlab.fileio import atomic_write_text


@dataclass
class Step:
    thought: str
    action: str | None
    """The tool called, or None when the reply held no valid action."""
    argument: str | None
    observation: str
    raw: str
    """The model's reply, unedited."""


@dataclass
class Trace:
    question: str
    steps: list[Step] = field(default_factory=list)
    answer: str | None = None
    stopped: str = ""
    """finish, max_steps or error."""
    reason: str = ""
    settings: dict[str, Any] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)
    """Anything a caller adds (an evaluation's reference answer and verdict)."""

    @property
    def well_formed(self) -> int:
        """Steps whose reply held a valid action."""
        return sum(s.action is not None for s in self.steps)


def trace_lines(traces: Sequence[Trace]) -> str:
    lines = []
    for run, t in enumerate(traces):
        head = {"type": "run", "run": run, "question": t.question, "settings": t.settings}
        lines.append({**head, "meta": t.meta})
        for number, step in enumerate(t.steps, 1):
            lines.append({"type": "step", "run": run, "step": number, **asdict(step)})
        end = {"type": "end", "run": run, "answer": t.answer, "stopped": t.stopped}
        lines.append({**end, "reason": t.reason})
    return "".join(json.dumps(line, ensure_ascii=False) + "\n" for line in lines)


def save_traces(traces: Trace | Sequence[Trace], path: str | os.PathLike) -> None:
    """Write one trace or several to ``path`` as JSONL, atomically."""
    atomic_write_text(path, trace_lines([traces] if isinstance(traces, Trace) else traces))


def load_traces(path: str | os.PathLike) -> list[Trace]:
    """The traces in a file ``save_traces`` wrote; a malformed line is a DataError naming it."""
    try:
        text = open(path, encoding="utf-8").read()
    except OSError as e:
        raise DataError(f"cannot read the trace file {str(path)!r}: {e.strerror}") from None
    traces: dict[int, Trace] = {}
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            kind, run = record["type"], record["run"]
            if kind == "run":
                traces[run] = Trace(record["question"], settings=record["settings"],
                                    meta=record.get("meta", {}))  # fmt: skip
            elif kind == "step":
                fields = {k: record[k] for k in ("thought", "action", "argument", "observation")}
                traces[run].steps.append(Step(**fields, raw=record["raw"]))
            elif kind == "end":
                t = traces[run]
                t.answer, t.stopped, t.reason = (
                    record["answer"],
                    record["stopped"],
                    record["reason"],
                )
            else:
                raise KeyError("type")
        except (ValueError, KeyError, TypeError) as e:
            raise DataError(
                f"{path}:{number}: not a trace line (type run, step or end; missing {e})"
            ) from None
    if not traces:
        raise DataError(f"{path}: no trace in the file")
    return [traces[run] for run in sorted(traces)]


# ----------------------------------------------------------------------------- rendering


def _action(step: Step) -> str:
    return f"{step.action}[{step.argument}]" if step.action else "(no valid action)"


def _ending(trace: Trace) -> str:
    if trace.stopped == "finish":
        ending = f"Answer: {trace.answer}  (finished after {len(trace.steps)} steps)"
    else:
        ending = f"No answer: {trace.reason}"
    if "reference" in trace.meta:  # an evaluation's verdict
        verdict = "right" if trace.meta.get("correct") else "wrong"
        ending += f"; reference: {trace.meta['reference']} ({verdict})"
    return ending


def render_text(trace: Trace, width: int = 100) -> str:
    """The trace for a terminal: numbered steps, long lines wrapped under their label."""

    def block(label: str, text: str, indent: str) -> list[str]:
        wrapped = textwrap.wrap(text or "(empty)", width - len(indent) - len(label)) or [""]
        pad = " " * len(label)
        return [f"{indent}{label}{wrapped[0]}", *(f"{indent}{pad}{w}" for w in wrapped[1:])]

    lines = block("Question: ", trace.question, "")
    for number, step in enumerate(trace.steps, 1):
        lines.append(f"{number:>2}")
        lines += block("Thought:     ", step.thought, "   ")
        lines += block("Action:      ", _action(step), "   ")
        if step.action != "finish":
            lines += block("Observation: ", step.observation, "   ")
    lines.append(_ending(trace))
    return "\n".join(lines)


def render_markdown(traces: Trace | Sequence[Trace]) -> str:
    """Traces as markdown: a section per question, a numbered item per step."""
    out = []
    for trace in [traces] if isinstance(traces, Trace) else traces:
        out.append(f"### {trace.question}\n")
        for number, step in enumerate(trace.steps, 1):
            out.append(f"{number}. **Thought:** {step.thought or '(empty)'}  ")
            out.append(f"   **Action:** `{_action(step)}`  ")
            if step.action != "finish":
                out.append(f"   **Observation:** {step.observation}")
            out.append("")
        out.append(f"**{_ending(trace)}**\n")
    return "\n".join(out)
