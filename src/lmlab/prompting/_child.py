"""The sandboxed side of ``lmlab.prompting.sandbox``: run as ``python -I -S -B _child.py``.

Standard library only (it runs without site-packages), and few modules of it: startup
time is the sandbox's cost (no json, re or traceback unless a program needs them). It reads
one request (``marshal``, from the trusted parent) from stdin, then, in this order: enters new user, network and mount namespaces (where the
kernel allows), makes the whole tree read-only and mounts a size-limited tmpfs on the
scratch directory, lowers its resource limits, forgets ctypes, installs the audit hook,
prints the layers that applied as its first line, runs the program with its output
captured, and prints one JSON line with the result (written by ``to_json``: the parent
parses it with ``json``, never with anything that trusts the bytes).
"""

import io
import marshal
import os
import resource
import sys

CLONE_NEWNS, CLONE_NEWUSER, CLONE_NEWNET = 0x00020000, 0x10000000, 0x40000000
MS_NOSUID, MS_NODEV, MS_REC, MS_PRIVATE = 2, 4, 0x4000, 0x40000
AT_FDCWD, AT_RECURSIVE, MOUNT_ATTR_RDONLY = -100, 0x8000, 0x1
SYS_MOUNT_SETATTR = 442  # the same number on x86-64 and arm64 (asm-generic)

# Audit events refused outright: sockets, new processes, foreign calls, signals to others,
# links, permission changes, and anything that would loosen the sandbox from inside.
DENY_EVENTS = {
    "subprocess.Popen", "os.system", "os.exec", "os.spawn", "os.posix_spawn", "os.fork",
    "os.forkpty", "os.kill", "os.killpg", "os.startfile", "pty.spawn", "socket.__new__",
    "socket.bind", "socket.connect", "socket.getaddrinfo", "socket.sendto", "ctypes.dlopen",
    "ctypes.dlsym", "ctypes.cdata", "ctypes.call_function", "ctypes.addressof",
    "ctypes.string_at", "ctypes.wstring_at", "mmap.__new__", "os.symlink", "os.link",
    "os.chmod", "os.chown", "os.setxattr", "os.putenv", "os.unsetenv", "resource.setrlimit",
    "resource.prlimit", "sys.addaudithook", "sys.setprofile", "sys.settrace", "os.chdir",
    "os.chroot", "syslog.openlog", "webbrowser.open", "urllib.Request",
    "http.client.connect", "ftplib.connect", "smtplib.connect", "imaplib.open",
}  # fmt: skip
# Modules whose import is refused (by top-level name): the ways to the above, and the
# introspection that walks to objects the program should not hold.
DENY_IMPORTS = {
    "ctypes", "_ctypes", "subprocess", "_posixsubprocess", "socket", "_socket", "ssl",
    "_ssl", "multiprocessing", "_multiprocessing", "pty", "mmap", "resource", "fcntl",
    "select", "selectors", "asyncio", "signal", "_signal", "urllib", "http", "ftplib",
    "smtplib", "telnetlib", "webbrowser", "concurrent", "threading", "_thread", "pdb",
    "cffi", "gc",
}  # fmt: skip
LISTING = {"os.listdir", "os.scandir", "glob.glob", "os.walk"}
CHANGING = {"os.remove", "os.rename", "os.rmdir", "os.mkdir", "os.truncate", "os.utime"}
CHANGING |= {"shutil.rmtree", "shutil.copyfile", "shutil.move"}
WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC


def isolate(scratch: str, file_mb: int) -> list[str]:
    """New namespaces, a read-only tree and a tmpfs scratch; what applied (best effort)."""
    import ctypes  # forgotten again below, before the program runs (not ctypes.util: it
    # imports subprocess, whose classes would stay reachable)

    try:
        libc = ctypes.CDLL(None, use_errno=True)  # this process's symbols, libc's among them
        libc.unshare, libc.mount, libc.syscall  # noqa: B018 (present, or AttributeError)
    except (OSError, AttributeError):
        return []
    uid, gid = os.geteuid(), os.getegid()
    if libc.unshare(CLONE_NEWUSER | CLONE_NEWNET | CLONE_NEWNS) != 0:
        return []
    applied = ["user-namespace", "no-network"]
    # Map our own ids (the one mapping an unprivileged process may write), so that files
    # on the tmpfs have an owner.
    for name, text in (("setgroups", "deny"), ("uid_map", f"0 {uid} 1"), ("gid_map", f"0 {gid} 1")):
        try:
            with open(f"/proc/self/{name}", "w") as f:
                f.write(text)
        except OSError:
            return applied
    mount = libc.mount
    mount.argtypes = [ctypes.c_char_p] * 3 + [ctypes.c_ulong, ctypes.c_char_p]
    if mount(None, b"/", None, MS_REC | MS_PRIVATE, None) != 0:
        return applied

    class MountAttr(ctypes.Structure):
        _fields_ = [(n, ctypes.c_uint64) for n in ("set", "clr", "propagation", "userns_fd")]

    attr = MountAttr(MOUNT_ATTR_RDONLY, 0, 0, 0)
    size = ctypes.sizeof(attr)
    if libc.syscall(SYS_MOUNT_SETATTR, AT_FDCWD, b"/", AT_RECURSIVE, ctypes.byref(attr), size):
        return applied
    options = f"size={file_mb}m,mode=0777".encode()
    if mount(b"tmpfs", scratch.encode(), b"tmpfs", MS_NOSUID | MS_NODEV, options) != 0:
        return applied
    os.chdir(scratch)  # the working directory predates the mount: enter the tmpfs
    return [*applied, "read-only-tree", "tmpfs-scratch"]


def lower_limits(request: dict) -> list[str]:
    """RLIMIT_NPROC binds every user but root (the kernel exempts uid 0 outside any user
    namespace's mapping), so as root new processes are stopped by the audit hook alone."""
    for kind, value in (
        (resource.RLIMIT_CPU, int(request["seconds"]) + 1),
        (resource.RLIMIT_AS, request["memory_mb"] << 20),
        (resource.RLIMIT_FSIZE, request["file_mb"] << 20),
        (resource.RLIMIT_NOFILE, request["open_files"]),
        (resource.RLIMIT_CORE, 0),
        (resource.RLIMIT_NPROC, 0),
    ):
        resource.setrlimit(kind, (value, value))
    return ["rlimits"] if request["root"] else ["rlimits", "no-new-processes"]


def inside(path: str, roots: tuple[str, ...]) -> bool:
    real = os.path.realpath(path)
    return any(real == r or real.startswith(r.rstrip("/") + "/") for r in roots)


def make_audit(scratch: str, read_roots: tuple[str, ...]):
    def audit(event, args):
        if event in DENY_EVENTS or event.startswith("ctypes."):
            raise PermissionError(f"sandbox: {event} is not allowed")
        if event == "import" and args[0].partition(".")[0] in DENY_IMPORTS:
            raise PermissionError(f"sandbox: importing {args[0]} is not allowed")
        if event == "open":
            path, mode, flags = args
            if path is None or isinstance(path, int):
                return
            path = os.fsdecode(path)
            writing = any(c in str(mode or "") for c in "wax+") or bool((flags or 0) & WRITE_FLAGS)
            if not inside(path, (scratch,) if writing else read_roots):
                what = "writing" if writing else "reading"
                raise PermissionError(
                    f"sandbox: {what} {path} is not allowed (only the scratch directory)"
                )
        elif event in LISTING or event in CHANGING:
            roots = read_roots if event in LISTING else (scratch,)
            for path in args:
                if isinstance(path, (str, bytes, os.PathLike)) and not inside(
                    os.fsdecode(path), roots
                ):
                    raise PermissionError(f"sandbox: {event} on {os.fsdecode(path)} is not allowed")

    return audit


class Capped(io.StringIO):
    """Captured output that stops the program once it passes the limit."""

    def __init__(self, limit: int):
        super().__init__()
        self.limit = limit

    def write(self, s):
        if self.tell() + len(s) > self.limit:
            raise SystemExit("__output__")
        return super().write(s)


def run(code: str, limit: int) -> dict:
    captured = Capped(limit)
    sys.stdout = sys.stderr = captured
    result = {"status": "ok", "answer": None, "error": ""}
    namespace = {"__name__": "__main__", "__builtins__": __builtins__}
    try:
        exec(compile(code, "<program>", "exec"), namespace)
        if callable(namespace.get("solution")):
            result["answer"] = namespace["solution"]()
        elif "answer" in namespace:
            result["answer"] = namespace["answer"]
    except MemoryError:
        result.update(status="memory", error="MemoryError: the program ran out of memory")
    except SystemExit as e:
        if e.code == "__output__":
            result.update(status="output", error=f"the program printed more than {limit} bytes")
        elif e.code not in (None, 0):
            result.update(status="error", error=f"SystemExit: {e.code}")
    except BaseException as e:
        result.update(status="error", error=f"{type(e).__name__}: {e}".splitlines()[0])
    result["stdout"] = captured.getvalue()[:limit]
    try:
        to_json(result["answer"])
    except (TypeError, ValueError, RecursionError):
        result["answer"] = repr(result["answer"])
    return result


ESCAPES = {'"': '\\"', "\\": "\\\\", "\n": "\\n", "\r": "\\r", "\t": "\\t"}


def to_json(value) -> str:
    """JSON text for None, bools, ints, finite floats, strings, lists, tuples and dicts with
    string keys; anything else is a TypeError (the caller sends its repr instead)."""
    if value is None or value is True or value is False:
        return {None: "null", True: "true", False: "false"}[value]
    if type(value) is int:
        return str(value)
    if type(value) is float:
        if value != value or value in (float("inf"), float("-inf")):
            raise ValueError("not finite")
        return repr(value)
    if type(value) is str:
        out = [ESCAPES.get(c) or (f"\\u{ord(c):04x}" if ord(c) < 32 else c) for c in value]
        return '"' + "".join(out) + '"'
    if type(value) in (list, tuple):
        return "[" + ",".join(to_json(v) for v in value) + "]"
    if type(value) is dict and all(type(k) is str for k in value):
        return "{" + ",".join(f"{to_json(k)}:{to_json(v)}" for k, v in value.items()) + "}"
    raise TypeError(type(value).__name__)


def main() -> None:
    request = marshal.loads(sys.stdin.buffer.read())
    sys.stdin = io.StringIO("")
    out = os.fdopen(os.dup(1), "w")
    scratch = request["scratch"]
    layers = isolate(scratch, request["file_mb"]) + lower_limits(request)
    for name in [m for m in sys.modules if m == "ctypes" or m.startswith(("ctypes.", "_ctypes"))]:
        del sys.modules[name]  # importing it again is an audited (and refused) event
    assert "subprocess" not in sys.modules and "_posixsubprocess" not in sys.modules
    if request["audit"]:
        sys.addaudithook(make_audit(scratch, (*request["read_roots"], scratch)))
        layers.append("audit-hook")
    out.write(",".join(layers) + "\n")
    out.flush()
    out.write(to_json(run(request["code"], request["output_bytes"])) + "\n")
    out.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
