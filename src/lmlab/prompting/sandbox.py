"""A sandbox for model-written Python (program-aided prompting, agent tools).

Code a model wrote never runs in lmlab's own process. ``run_python(code)`` starts a fresh
interpreter and contains it with several independent layers, so that a hole in one is not
an escape:

1. **A separate process**, started with ``python -I -S`` (no site-packages, no user
   paths, no ``PYTHON*`` variables), a stripped environment, no inherited file
   descriptors, its own session, killed with its whole process group at the time limit.
2. **Resource limits** (``setrlimit``): CPU seconds, address space (memory), the size of
   any file it writes, open files, no core dumps, and no new processes or threads
   (``RLIMIT_NPROC`` 0: a fork bomb's first fork fails).
3. **Namespaces**, where the kernel allows an unprivileged user namespace: a new network
   namespace (no interface but a downed loopback: nothing to connect to), and a mount
   namespace whose whole tree is read-only except a fresh, size-limited tmpfs mounted on
   the scratch directory. ``SandboxResult.isolation`` lists what applied.
4. **An audit hook** (PEP 578) installed before the program runs, which cannot be removed
   from Python: it refuses sockets, process creation (``subprocess``, ``os.system``,
   ``fork``, ``exec``, ``posix_spawn``), ``ctypes`` and loading its modules, signals to
   other processes, opening files outside the standard library for reading, and writing
   anywhere but the scratch directory.

A program's answer is the value of ``solution()`` when it defines one (as PAL's prompts
ask), else of a variable ``answer``, else its printed output. Each run reports its output,
the answer (JSON-encodable values; others as their ``repr``), and why it stopped:
``"ok"``, ``"error"`` (an exception: its last line), ``"timeout"``, ``"memory"``,
``"output"`` (more than ``Limits.output_bytes`` printed) or ``"killed"`` (a signal).
"""

from __future__ import annotations

import json
import marshal
import os
import selectors
import signal
import subprocess
import sys
import sysconfig
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from lmlab.errors import ConfigError


@dataclass(frozen=True)
class Limits:
    """What one run may use."""

    seconds: float = 5.0
    """Wall-clock time before the process group is killed."""
    memory_mb: int = 512
    """Address space of the interpreter (RLIMIT_AS)."""
    file_mb: int = 16
    """Largest file it may write, and the size of the scratch tmpfs."""
    output_bytes: int = 65_536
    """Printed output kept; a program that prints more is stopped."""
    open_files: int = 64

    def __post_init__(self):
        if not self.seconds > 0 or self.memory_mb < 64 or self.file_mb < 1:
            raise ConfigError(
                f"sandbox limits must be positive with at least 64 MB of memory; got "
                f"seconds={self.seconds}, memory_mb={self.memory_mb}, file_mb={self.file_mb}"
            )


@dataclass
class SandboxResult:
    """How a run ended and what it produced."""

    status: str
    """ok, error, timeout, memory, output or killed."""
    answer: Any = None
    stdout: str = ""
    error: str = ""
    """The exception's last line (or the reason the sandbox stopped it)."""
    seconds: float = 0.0
    isolation: tuple[str, ...] = field(default_factory=tuple)

    @property
    def ok(self) -> bool:
        return self.status == "ok"


# ----------------------------------------------------------------------------- the parent

CHILD = Path(__file__).with_name("_child.py")  # the sandboxed side: standard library only


def _read_roots() -> list[str]:
    """Where the program may read: the standard library (imports read their sources)."""
    paths = sysconfig.get_paths()
    return sorted({os.path.realpath(paths["stdlib"]), os.path.realpath(paths["platstdlib"])})


def run_python(code: str, limits: Limits = Limits(), _audit: bool = True) -> SandboxResult:
    """Run ``code`` in the sandbox and return how it ended (see the module docstring).

    ``_audit=False`` leaves the audit hook out: only for tests that check the other layers
    hold on their own."""
    if not isinstance(code, str):
        raise ConfigError(f"the sandbox runs Python source text, got {type(code).__name__}")
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="lmlab-sandbox-") as scratch:
        os.chmod(scratch, 0o777)
        scratch = os.path.realpath(scratch)
        request = {
            "code": code,
            "scratch": scratch,
            "read_roots": _read_roots(),
            "audit": _audit,
            "root": os.getuid() == 0,
            **asdict(limits),
        }
        # No preexec_fn: the child sets up its own isolation, so this (possibly large)
        # process is spawned with vfork rather than copied.
        proc = subprocess.Popen(
            [os.path.realpath(sys.executable), "-I", "-S", "-B", str(CHILD)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            cwd=scratch,
            env={"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": scratch},
            close_fds=True,
            start_new_session=True,
        )
        stdout, stderr, why = _communicate(proc, marshal.dumps(request), limits)
    seconds = time.perf_counter() - start
    return _result(proc.returncode, stdout, stderr, why, seconds, limits)


def _communicate(proc: subprocess.Popen, request: bytes, limits: Limits):
    """Feed the request, read both pipes up to the output cap, kill at the deadline.
    -> (stdout bytes, stderr bytes, None | "timeout" | "output")."""
    deadline = time.monotonic() + limits.seconds
    cap = limits.output_bytes * 2 + 4096  # the JSON line quotes the output once
    try:
        proc.stdin.write(request)
        proc.stdin.close()
    except BrokenPipeError:
        pass
    chunks = {proc.stdout.fileno(): [], proc.stderr.fileno(): []}
    total, why = 0, None
    with selectors.DefaultSelector() as sel:
        for pipe in (proc.stdout, proc.stderr):
            sel.register(pipe, selectors.EVENT_READ)
        while sel.get_map():
            left = deadline - time.monotonic()
            if left <= 0:
                why = "timeout"
                break
            for key, _ in sel.select(left):
                data = os.read(key.fd, 65536)
                if not data:
                    sel.unregister(key.fileobj)
                    continue
                chunks[key.fd].append(data)
                total += len(data)
            if total > cap:
                why = "output"
                break
    if why is not None:
        _kill(proc)
    try:
        proc.wait(timeout=max(0.1, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        why = why or "timeout"
        _kill(proc)
    out, err = (b"".join(chunks[p.fileno()]) for p in (proc.stdout, proc.stderr))
    proc.stdout.close()
    proc.stderr.close()
    return out, err, why


def _kill(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def _result(returncode, stdout, stderr, why, seconds, limits) -> SandboxResult:
    lines = stdout.decode("utf-8", "replace").strip().splitlines()
    layers = tuple(x for x in lines[0].split(",") if x) if lines else ()
    common = {"seconds": seconds, "isolation": layers}
    if why == "timeout":
        return SandboxResult("timeout", error=f"stopped after {limits.seconds:g} s", **common)
    if why == "output":
        return SandboxResult("output", error="the program printed too much", **common)
    try:
        data = json.loads(lines[1])
    except (IndexError, ValueError):
        text = stderr.decode("utf-8", "replace").strip().splitlines()
        last = text[-1] if text else ""
        if returncode is not None and returncode < 0:
            name = signal.Signals(-returncode).name
            status = "timeout" if -returncode == signal.SIGXCPU else "killed"
            return SandboxResult(status, error=f"killed by {name}", **common)
        status = "memory" if "MemoryError" in last else "error"
        return SandboxResult(status, error=last or f"exit status {returncode}", **common)
    return SandboxResult(data["status"], data["answer"], data["stdout"], data["error"], **common)


__all__ = ["Limits", "SandboxResult", "run_python"]
