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

import ctypes
import ctypes.util
import json
import os
import resource
import selectors
import signal
import subprocess
import sys
import sysconfig
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lmlab.errors import ConfigError

CLONE_NEWNS, CLONE_NEWUSER, CLONE_NEWNET = 0x00020000, 0x10000000, 0x40000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_REC, MS_PRIVATE = 1, 2, 4, 0x4000, 0x40000
AT_RECURSIVE, MOUNT_ATTR_RDONLY = 0x8000, 0x1
SYS_MOUNT_SETATTR = 442  # the same number on x86-64 and arm64 (asm-generic)


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


# ----------------------------------------------------------------------------- the child

# Runs inside the sandboxed interpreter. It reads {code, scratch, read_roots} from stdin,
# installs the audit hook, runs the code with its printed output captured, and writes one
# JSON line with the result to the original stdout.
CHILD = r"""
import sys, json, io, os, traceback
request = json.loads(sys.stdin.read())
SCRATCH = request["scratch"]
READ_ROOTS = tuple(request["read_roots"]) + (SCRATCH,)
LIMIT = request["output_bytes"]
out = os.fdopen(os.dup(1), "w")
sys.stdin = io.StringIO("")
DENY_EVENTS = {
    "subprocess.Popen", "os.system", "os.exec", "os.spawn", "os.posix_spawn", "os.fork",
    "os.forkpty", "os.kill", "os.killpg", "os.startfile", "pty.spawn", "socket.__new__",
    "socket.bind", "socket.connect", "socket.getaddrinfo", "socket.sendto", "ctypes.dlopen",
    "ctypes.dlsym", "ctypes.cdata", "ctypes.call_function", "ctypes.addressof",
    "ctypes.string_at", "ctypes.wstring_at", "mmap.__new__", "os.symlink", "os.link",
    "os.chmod", "os.chown", "os.setxattr", "os.putenv", "os.unsetenv", "resource.setrlimit",
    "resource.prlimit", "sys.addaudithook", "sys.setprofile", "sys.settrace", "os.chdir",
    "os.chroot", "syslog.openlog", "winreg.OpenKey", "webbrowser.open", "urllib.Request",
    "http.client.connect", "ftplib.connect", "smtplib.connect", "imaplib.open",
}
DENY_IMPORTS = {
    "ctypes", "_ctypes", "subprocess", "_posixsubprocess", "socket", "_socket", "ssl",
    "_ssl", "multiprocessing", "_multiprocessing", "pty", "mmap", "resource", "fcntl",
    "select", "selectors", "asyncio", "signal", "_signal", "urllib", "http", "ftplib",
    "smtplib", "telnetlib", "webbrowser", "concurrent", "threading", "_thread", "pdb",
    "cffi", "gc",
}
WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC
def inside(path, roots):
    real = os.path.realpath(path)
    return any(real == r or real.startswith(r.rstrip("/") + "/") for r in roots)
def audit(event, args):
    if event in DENY_EVENTS:
        raise PermissionError(f"sandbox: {event} is not allowed")
    if event == "import" and args[0].partition(".")[0] in DENY_IMPORTS:
        raise PermissionError(f"sandbox: importing {args[0]} is not allowed")
    if event == "open":
        path, mode, flags = args
        if path is None or isinstance(path, int):
            return
        path = os.fsdecode(path)
        writing = any(c in str(mode or "") for c in "wax+") or bool((flags or 0) & WRITE_FLAGS)
        if not inside(path, (SCRATCH,) if writing else READ_ROOTS):
            what = "writing" if writing else "reading"
            raise PermissionError(f"sandbox: {what} {path} is not allowed (only the scratch directory)")
    if event in ("os.remove", "os.rename", "os.rmdir", "os.mkdir", "os.listdir",
                 "os.scandir", "os.truncate", "os.utime", "shutil.rmtree", "shutil.copyfile",
                 "glob.glob", "os.walk", "shutil.move"):
        for path in args:
            if isinstance(path, (str, bytes, os.PathLike)) and not inside(os.fsdecode(path), READ_ROOTS if event in ("os.listdir", "os.scandir", "glob.glob", "os.walk") else (SCRATCH,)):
                raise PermissionError(f"sandbox: {event} on {os.fsdecode(path)} is not allowed")
if request["audit"]:
    sys.addaudithook(audit)
class Capped(io.StringIO):
    def write(self, s):
        if self.tell() + len(s) > LIMIT:
            raise SystemExit("__output__")
        return super().write(s)
captured = Capped()
sys.stdout = sys.stderr = captured
result = {"status": "ok", "answer": None, "error": ""}
namespace = {"__name__": "__main__", "__builtins__": __builtins__}
try:
    exec(compile(request["code"], "<program>", "exec"), namespace)
    if callable(namespace.get("solution")):
        result["answer"] = namespace["solution"]()
    elif "answer" in namespace:
        result["answer"] = namespace["answer"]
except MemoryError:
    result.update(status="memory", error="MemoryError: the program ran out of its memory limit")
except SystemExit as e:
    if e.code == "__output__":
        result.update(status="output", error=f"the program printed more than {LIMIT} bytes")
    elif e.code not in (None, 0):
        result.update(status="error", error=f"SystemExit: {e.code}")
except BaseException as e:
    line = traceback.format_exception_only(type(e), e)[-1].strip()
    result.update(status="error", error=line)
result["stdout"] = captured.getvalue()[:LIMIT]
try:
    json.dumps(result["answer"])
except (TypeError, ValueError):
    result["answer"] = repr(result["answer"])
out.write(json.dumps(result))
out.flush()
os._exit(0)
"""


# ----------------------------------------------------------------------------- the parent


def _libc():
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    except OSError:
        return None


_LIBC = _libc()


class _MountAttr(ctypes.Structure):
    _fields_ = [
        ("attr_set", ctypes.c_uint64),
        ("attr_clr", ctypes.c_uint64),
        ("propagation", ctypes.c_uint64),
        ("userns_fd", ctypes.c_uint64),
    ]


def _isolate(scratch: str, file_mb: int) -> list[str]:
    """In the forked child, before exec: new user, network and mount namespaces, the tree
    read-only but a tmpfs on ``scratch``. Returns what applied (best effort; the rlimits and
    the audit hook hold either way)."""
    applied = []
    uid, gid = os.geteuid(), os.getegid()
    if _LIBC is None or _LIBC.unshare(CLONE_NEWUSER | CLONE_NEWNET | CLONE_NEWNS) != 0:
        return applied
    applied += ["user-namespace", "no-network"]
    # Map our own ids (the one mapping an unprivileged process may write), so files on
    # the tmpfs below have an owner.
    for name, text in (("setgroups", "deny"), ("uid_map", f"0 {uid} 1"), ("gid_map", f"0 {gid} 1")):
        try:
            with open(f"/proc/self/{name}", "w") as f:
                f.write(text)
        except OSError:
            return applied
    mount = _LIBC.mount
    mount.argtypes = [ctypes.c_char_p] * 3 + [ctypes.c_ulong, ctypes.c_char_p]
    if mount(None, b"/", None, MS_REC | MS_PRIVATE, None) != 0:
        return applied
    attr = _MountAttr(MOUNT_ATTR_RDONLY, 0, 0, 0)
    AT_FDCWD = -100
    if (
        _LIBC.syscall(
            SYS_MOUNT_SETATTR, AT_FDCWD, b"/", AT_RECURSIVE, ctypes.byref(attr), ctypes.sizeof(attr)
        )
        != 0
    ):
        return applied
    options = f"size={file_mb}m,mode=0777".encode()
    if mount(b"tmpfs", scratch.encode(), b"tmpfs", MS_NOSUID | MS_NODEV, options) != 0:
        return applied
    os.chdir(scratch)  # the working directory was set before the mount: enter the tmpfs
    return [*applied, "read-only-tree", "tmpfs-scratch"]


def _read_roots() -> list[str]:
    paths = sysconfig.get_paths()
    roots = {paths["stdlib"], paths["platstdlib"]}
    return sorted(os.path.realpath(r) for r in roots)


def _preexec(limits: Limits, scratch: str, report: int, audit: bool):
    seconds = int(limits.seconds) + 1

    def setup():
        root = os.getuid() == 0
        applied = _isolate(scratch, limits.file_mb)
        memory = limits.memory_mb << 20
        for kind, value in (
            (resource.RLIMIT_CPU, seconds),
            (resource.RLIMIT_AS, memory),
            (resource.RLIMIT_FSIZE, limits.file_mb << 20),
            (resource.RLIMIT_NOFILE, limits.open_files),
            (resource.RLIMIT_CORE, 0),
            (resource.RLIMIT_NPROC, 0),
        ):
            resource.setrlimit(kind, (value, value))
        # RLIMIT_NPROC binds every user but root (the kernel exempts uid 0): as root, new
        # processes are stopped by the audit hook alone.
        layers = [*applied, "rlimits", *([] if root else ["no-new-processes"])]
        layers += ["audit-hook"] if audit else []
        os.write(report, (",".join(layers) + "\n").encode())
        os.close(report)

    return setup


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
        request = json.dumps(
            {
                "code": code,
                "scratch": scratch,
                "read_roots": _read_roots(),
                "output_bytes": limits.output_bytes,
                "audit": _audit,
            }
        ).encode()
        report_r, report_w = os.pipe()
        try:
            proc = subprocess.Popen(
                [os.path.realpath(sys.executable), "-I", "-S", "-B", "-c", CHILD],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                cwd=scratch,
                env={"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": scratch},
                close_fds=True,
                pass_fds=(report_w,),
                start_new_session=True,
                preexec_fn=_preexec(limits, scratch, report_w, _audit),
            )
        finally:
            os.close(report_w)
        with os.fdopen(report_r) as report:
            isolation = tuple(x for x in report.read().strip().split(",") if x)
        stdout, stderr, why = _communicate(proc, request, limits)
    seconds = time.perf_counter() - start
    return _result(proc.returncode, stdout, stderr, why, seconds, isolation, limits)


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


def _result(returncode, stdout, stderr, why, seconds, isolation, limits) -> SandboxResult:
    common = {"seconds": seconds, "isolation": isolation}
    if why == "timeout":
        return SandboxResult("timeout", error=f"stopped after {limits.seconds:g} s", **common)
    if why == "output":
        return SandboxResult("output", error="the program printed too much", **common)
    try:
        data = json.loads(stdout.decode("utf-8", "replace").strip().splitlines()[-1])
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


def sandbox_available() -> list[str]:
    """The isolation layers this machine gives (runs ``pass`` once)."""
    return list(run_python("pass").isolation)


__all__ = ["Limits", "SandboxResult", "run_python", "sandbox_available", "Path"]
