"""Run every lesson's command at full size, time it and check its figure (`make lessons`).

Each lesson page opens with its command: the first ``sh``/``bash`` (or ``python``) block
of the page. The
line after that block may promise what the command writes::

    <!-- makes: runs/lessons/cot/methods.png -->

This script runs each page's block with ``bash -e`` from the repository root (``lmlab`` is
the venv's), times it (wall clock and the CPU time of the processes it ran), checks that
every promised file exists and was written by this run, and records the figures in
docs/lessons/timings.json. It then rewrites the table of docs/lessons/README.md (between
its ``index`` markers) in course order, with each page's time. The small-budget version of
the same check is tests/test_docs_commands.py (every documented command runs, shrunk, and
writes what its page promises).

    .venv/bin/python docs/lessons/run.py               # every lesson (about an hour)
    .venv/bin/python docs/lessons/run.py 15 16         # lessons 15 and 16 only
    .venv/bin/python docs/lessons/run.py --index-only  # rewrite the index from timings.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import resource
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
TIMINGS = HERE / "timings.json"
INDEX = HERE / "README.md"
MAKES = re.compile(r"<!--\s*makes:\s*(.+?)\s*-->")
RUN = re.compile(r"<!--\s*lesson-run:\s*(.+?)\s*-->")

# The course's topics in teaching order, each with the lesson pages (by number) that teach it.
COURSE: list[tuple[str, list[int]]] = [
    ("optimization and loss", [23]),
    ("tokenization", [28]),
    ("n-grams", [3]),
    ("the fixed-window MLP", [4]),
    ("bag of context", [5]),
    ("RNN, vanishing gradients", [2, 6]),
    ("LSTM and GRU", [6]),
    ("a tiny GPT, self-attention step by step", [1, 29, 11]),
    ("positional encodings", [26]),
    ("residual connections and layer norm", [27]),
    ("teacher forcing and scheduled sampling", [7]),
    ("perplexity", [1, 3]),
    ("decoding methods and temperature", [22]),
    ("beam search", [22]),
    ("encoder vs decoder vs encoder-decoder", [21, 20]),
    ("MLM and NSP", [18]),
    ("BERT heads", [19]),
    ("embeddings", [24]),
    ("in-context learning", [14]),
    ("chain of thought", [15]),
    ("PAL", [16]),
    ("ReAct", [17]),
    ("SFT with masked prompts; LoRA and QLoRA", [8]),
    ("forgetting and KL-SFT; multi-task mixtures", [8, 30]),
    ("adapters and soft prompts", [31]),
    ("quantization", [32]),
    ("reward models, PPO, DPO", [9]),
    ("BLEU and ROUGE", [20, 33]),
    ("benchmarks, minimal pairs, calibration and HELM", [10]),
    ("probing and attribution", [11, 12]),
    ("logit lens and patching", [13]),
    ("scaling laws and Chinchilla", [25]),
]


def pages() -> dict[int, Path]:
    """Lesson number -> page."""
    return {int(p.name[:2]): p for p in sorted(HERE.glob("[0-9][0-9]-*.md"))}


def lesson_command(page: Path) -> tuple[str, list[str]] | None:
    """(the page's first sh/bash/python block as a bash script, the files its makes-line
    promises), or None."""
    lines = page.read_text(encoding="utf-8").splitlines()
    for line in lines:  # a page whose command never ends (a server) names a finite one
        instead = RUN.fullmatch(line.strip())
        if instead:
            runs, _, makes = instead.group(1).partition(" makes: ")
            return runs.strip(), [m.strip() for m in makes.split(",") if m.strip()]
    for i, line in enumerate(lines):
        lang = re.fullmatch(r"```(sh|bash|python)\s*", line)
        if lang:
            end = next(j for j in range(i + 1, len(lines)) if lines[j].startswith("```"))
            after = next((lines[j] for j in range(end + 1, len(lines)) if lines[j].strip()), "")
            match = MAKES.fullmatch(after.strip())
            makes = [p.strip() for p in match.group(1).split(",")] if match else []
            code = "\n".join(lines[i + 1 : end])
            if lang.group(1) == "python":  # a Python block runs in the venv's interpreter
                code = f"python - <<'LESSON'\n{code}\nLESSON"
            return code, makes
    return None


def title(page: Path) -> str:
    first = page.read_text(encoding="utf-8").splitlines()[0]
    return re.sub(r"^#\s*(Lesson \d+:\s*)?", "", first)


def set_aside(makes: list[str]) -> list[Path]:
    """Rename the run folders a lesson writes its promised files into (the folder right
    above each file, under runs/) to ``<folder>.before-<time>``, so a rerun starts clean
    (``lmlab compare`` refuses a folder that holds checkpoints) and nothing is deleted."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    moved = []
    for folder in sorted({(ROOT / m).parent for m in makes}):
        if folder.is_dir() and ROOT / "runs" in folder.parents:
            target = folder.with_name(f"{folder.name}.before-{stamp}")
            folder.rename(target)
            moved.append(target)
    return moved


def run_lesson(page: Path) -> dict:
    found = lesson_command(page)
    if found is None:
        return {"ok": False, "error": "the page has no sh/bash/python block"}
    block, makes = found
    for target in set_aside(makes):
        print(f"   an earlier run moved to {target.relative_to(ROOT)}", flush=True)
    env = {**os.environ, "PATH": f"{ROOT / '.venv' / 'bin'}{os.pathsep}{os.environ['PATH']}"}
    start, cpu_before = time.time(), resource.getrusage(resource.RUSAGE_CHILDREN)
    proc = subprocess.run(["bash", "-e", "-o", "pipefail", "-c", block], cwd=ROOT, env=env)
    cpu_after = resource.getrusage(resource.RUSAGE_CHILDREN)
    record = {
        "seconds": round(time.time() - start, 1),
        "cpu_s": round(
            cpu_after.ru_utime - cpu_before.ru_utime + cpu_after.ru_stime - cpu_before.ru_stime,
            1,
        ),
        "ok": proc.returncode == 0,
        "makes": makes,
    }
    if proc.returncode:
        record["error"] = f"exit status {proc.returncode}"
    missing = [m for m in makes if not (ROOT / m).exists() or (ROOT / m).stat().st_mtime < start]
    if missing:
        record["ok"], record["error"] = False, f"did not write {', '.join(missing)}"
    return record


def machine() -> str:
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{model}, {os.cpu_count()} cores"


def write_index(timings: dict) -> None:
    found = pages()
    rows = ["| topic | lesson | command time (2 CPU cores) |", "| --- | --- | --: |"]
    for topic, numbers in COURSE:
        links, times = [], []
        for n in numbers:
            page = found.get(n)
            if page is None:
                links.append(f"{n:02d} (to write)")
                continue
            links.append(f"[{n:02d} {title(page)}]({page.name})")
            t = timings.get(page.name)
            if t and t.get("ok"):
                times.append(f"{t['seconds'] / 60:.1f} min")
            elif t:
                times.append(f"failed: {t.get('error', '?')}")
            else:
                times.append("not timed")
        rows.append(f"| {topic} | {'<br>'.join(links)} | {'<br>'.join(times)} |")
    text = INDEX.read_text(encoding="utf-8")
    start, end = "<!-- index:start -->", "<!-- index:end -->"
    head, rest = text.split(start, 1)
    tail = rest.split(end, 1)[1]
    INDEX.write_text(f"{head}{start}\n" + "\n".join(rows) + f"\n{end}{tail}", encoding="utf-8")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("lessons", nargs="*", type=int, help="lesson numbers (default: all)")
    ap.add_argument("--index-only", action="store_true")
    args = ap.parse_args()
    timings = json.loads(TIMINGS.read_text()) if TIMINGS.exists() else {}
    failed = []
    if not args.index_only:
        for n, page in pages().items():
            if args.lessons and n not in args.lessons:
                continue
            print(f"== lesson {n:02d}: {page.name}", flush=True)
            record = run_lesson(page)
            record["machine"], record["date"] = machine(), datetime.date.today().isoformat()
            timings[page.name] = record
            print(f"   {record}", flush=True)
            if not record["ok"]:
                failed.append(page.name)
            tmp = TIMINGS.with_suffix(".tmp")
            tmp.write_text(json.dumps(timings, indent=1, sort_keys=True) + "\n")
            tmp.replace(TIMINGS)  # atomic: an interrupted run keeps the earlier figures
    write_index(timings)
    if failed:
        print("failed:", ", ".join(failed), file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
