"""What the sandbox costs per run (issue 19's target: median overhead at most 50 ms).

Each benign program (the kind PAL prompts make: arithmetic in a ``solution()``) is run
three ways, interleaved, ``--repeats`` times each:

- ``exec``: in this process with ``exec`` (what the PAL reference code does; unsafe),
- ``subprocess``: a plain ``python -c`` child with no limits (the least any process costs),
- ``sandbox``: ``lmlab.prompting.sandbox.run_python`` with every layer it can apply.

Printed: the median wall time of each per program, and the sandbox's median overhead over
the other two. From the repository root:

    .venv/bin/python bench/sandbox.py
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from lmlab.prompting.sandbox import run_python  # noqa: E402
from machine import describe_machine  # noqa: E402

PROGRAMS = {
    "arithmetic": "def solution():\n    apples = 23\n    used = 20\n    bought = 6\n    return apples - used + bought",
    "loop": "def solution():\n    return sum(i * i for i in range(10000))",
    "fractions": "from fractions import Fraction\ndef solution():\n    return float(sum(Fraction(1, n) for n in range(1, 50)))",
    "dates": "import datetime\ndef solution():\n    d = datetime.date(2024, 3, 1) - datetime.timedelta(days=45)\n    return d.isoformat()",
}
CALL = "\nprint(solution())"


def time_exec(code: str) -> float:
    start = time.perf_counter()
    namespace: dict = {}
    exec(compile(code, "<program>", "exec"), namespace)
    namespace["solution"]()
    return time.perf_counter() - start


def time_subprocess(code: str) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", code + CALL], check=True, capture_output=True)
    return time.perf_counter() - start


def time_sandbox(code: str) -> float:
    start = time.perf_counter()
    result = run_python(code)
    elapsed = time.perf_counter() - start
    assert result.ok, result
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args()
    print(describe_machine())
    print("isolation:", ", ".join(run_python("pass").isolation))
    ways = {"exec": time_exec, "subprocess": time_subprocess, "sandbox": time_sandbox}
    print(f"{'program':12s} {'exec ms':>9s} {'subproc ms':>11s} {'sandbox ms':>11s}")
    over_sub, over_exec = [], []
    for name, code in PROGRAMS.items():
        times = {way: [] for way in ways}
        for _ in range(args.repeats):
            for way, fn in ways.items():
                times[way].append(fn(code))
        med = {way: statistics.median(t) * 1000 for way, t in times.items()}
        over_sub.append(med["sandbox"] - med["subprocess"])
        over_exec.append(med["sandbox"] - med["exec"])
        print(f"{name:12s} {med['exec']:9.2f} {med['subprocess']:11.1f} {med['sandbox']:11.1f}")
    print(
        f"sandbox median overhead: {statistics.median(over_sub):.1f} ms over a plain "
        f"subprocess, {statistics.median(over_exec):.1f} ms over in-process exec "
        "(target: at most 50 ms)"
    )


if __name__ == "__main__":
    main()
