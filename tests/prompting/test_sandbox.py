"""The sandbox for model-written code (reliability item 27): benign programs work, and a
red-team corpus of known escapes is contained with the parent unharmed.

The corpus follows published escapes from code-executing agents: the getattr leak of
smolagents (CVE-2025-5120), the class-hierarchy walk to subprocess.Popen (CVE-2025-9959),
ctypes (smolagents #2094), ``__import__('o'+'s')`` (#2203), LangChain PALChain's
arbitrary code (CVE-2023-36095, -36258), plus a fork bomb, a memory bomb, an infinite
loop, a connection to 127.0.0.1, reading /etc/passwd and the parent's environment, and
writing outside the scratch directory.
"""

import os
import random
import socket

import pytest

from lmlab.errors import ConfigError
from lmlab.prompting.sandbox import Limits, run_python

FAST = Limits(seconds=3)


def test_a_program_returns_its_solution_its_answer_or_its_output():
    r = run_python(
        "from fractions import Fraction\ndef solution():\n    return 3 * 4 + 5\nprint('hi')"
    )
    assert (r.status, r.answer, r.stdout) == ("ok", 17, "hi\n")
    assert run_python("answer = [1, 2.5, 'x']").answer == [1, 2.5, "x"]
    assert run_python("answer = {1, 2}").answer == "{1, 2}"  # not JSON: its repr
    r = run_python("print(sum(i * i for i in range(10)))")
    assert r.ok and r.answer is None and r.stdout == "285\n"


def test_the_scratch_directory_is_writable_and_private_to_the_run():
    code = (
        "import os\n"
        "with open('notes.txt', 'w') as f:\n    f.write('kept')\n"
        "answer = [open('notes.txt').read(), os.listdir('.')]"
    )
    r = run_python(code)
    assert r.ok and r.answer == ["kept", ["notes.txt"]]
    assert run_python("import os\nanswer = os.listdir('.')").answer == []  # a fresh one


def test_an_exception_is_its_last_line():
    r = run_python("def solution():\n    return 1 / 0")
    assert r.status == "error" and r.error == "ZeroDivisionError: division by zero"
    assert run_python("def f(:").status == "error"


def marker_code(marker):
    return f"open({str(marker)!r}, 'w').write('escaped')"


ESCAPES = {
    "getattr leak": "getattr(__builtins__, '__im' + 'port__')('os').system('touch {marker}')",
    "dunder import": "__import__('o' + 's').system('touch {marker}')",
    "class walk to Popen": (
        "subs = ().__class__.__base__.__subclasses__()\n"
        "popen = [c for c in subs if c.__name__ == 'Popen']\n"
        "if not popen:\n"
        "    __import__('subpro' + 'cess')\n"
        "    popen = [c for c in ().__class__.__base__.__subclasses__() if c.__name__ == 'Popen']\n"
        "popen[0](['touch', '{marker}']).wait()"
    ),
    "builtins walk to os": (
        "for c in ().__class__.__base__.__subclasses__():\n"
        "    g = getattr(getattr(c, '__init__', None), '__globals__', {{}})\n"
        "    if 'os' in g and hasattr(g['os'], 'system'):\n"
        "        g['os'].system('touch {marker}')\n"
        "        break\n"
        "else:  # fewer modules loaded: take os from sys.modules\n"
        "    __import__('sys').modules['os'].system('touch {marker}')"
    ),
    "ctypes": "import ctypes\nctypes.CDLL(None).system(b'touch {marker}')",
    "ctypes left behind": (
        "subs = {{c.__name__: c for c in ().__class__.__base__.__subclasses__()}}\n"
        "cdll = subs.get('CDLL') or subs['_CFuncPtr']\n"
        "cdll(None).system(b'touch {marker}')"
    ),
    "_ctypes by importlib": (
        "import importlib\nc = importlib.import_module('_ctypes')\nc.dlopen(None, 2)"
    ),
    "subprocess by importlib": (
        "import importlib\nimportlib.import_module('subprocess').run(['touch', '{marker}'])"
    ),
    "_posixsubprocess by importlib": "import importlib\nimportlib.import_module('_posixsubprocess')",
    "posix directly": "import posix\nposix.system('touch {marker}')",
    "posix_spawn": "import os\nos.posix_spawn('/usr/bin/touch', ['touch', '{marker}'], {{}})",
    "exec a shell": "import os\nos.execv('/bin/sh', ['sh', '-c', 'touch {marker}'])",
    "_posixsubprocess": "import _posixsubprocess",
    "write outside scratch": "open('{marker}', 'w').write('escaped')",
    "rename outside scratch": "import os\nopen('x', 'w').write('1')\nos.rename('x', '{marker}')",
    "symlink out": "import os\nos.symlink('{marker}', 'link')\nopen('link', 'w').write('escaped')",
    "remove the audit hook": "import sys\nsys.addaudithook(lambda *a: None)\n"
    + "__import__('os').system('touch {marker}')",
    "gc referrers": "import gc\ngc.get_objects()",
    "threads": "import threading",
}


@pytest.mark.parametrize("name", ESCAPES)
def test_escapes_are_refused_and_leave_nothing_behind(name, tmp_path):
    marker = tmp_path / "escaped"
    r = run_python(ESCAPES[name].format(marker=marker), FAST)
    assert r.status in ("error", "killed"), (name, r)
    assert not marker.exists(), name
    assert "not allowed" in r.error or "Read-only" in r.error or "killed" in r.error, r.error


def test_a_fork_bomb_is_stopped_and_leaves_no_process(tmp_path):
    before = len(os.listdir("/proc"))
    r = run_python("import os\nwhile True:\n    os.fork()", FAST)
    assert r.status == "error" and "os.fork is not allowed" in r.error
    assert len(os.listdir("/proc")) < before + 20  # nothing multiplied


def test_a_memory_bomb_stops_at_the_memory_limit():
    r = run_python("x = ' ' * (8 * 10**9)", Limits(seconds=5, memory_mb=256))
    assert r.status == "memory"


def test_an_infinite_loop_is_killed_at_the_time_limit():
    r = run_python("while True:\n    pass", Limits(seconds=1))
    assert r.status == "timeout" and r.seconds < 3


def test_printing_forever_stops_at_the_output_cap():
    r = run_python("while True:\n    print('x' * 1000)", Limits(seconds=5, output_bytes=10_000))
    assert r.status == "output"


def test_a_large_file_stops_at_the_file_size_limit():
    r = run_python("open('big', 'wb').write(b'x' * (4 << 20))", Limits(seconds=5, file_mb=1))
    assert r.status in ("killed", "error")  # SIGXFSZ, or ENOSPC on the 1 MB scratch


def test_a_connection_to_the_parent_never_arrives():
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        server.setblocking(False)
        port = server.getsockname()[1]
        for code in (
            f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=1)",
            f"import _socket\ns = _socket.socket()\ns.connect(('127.0.0.1', {port}))",
        ):
            r = run_python(code, FAST)
            assert r.status == "error" and "not allowed" in r.error
        with pytest.raises(BlockingIOError):
            server.accept()


def test_secrets_of_the_machine_and_the_parent_stay_out(monkeypatch):
    monkeypatch.setenv("LMLAB_TEST_SECRET", "hunter2")
    r = run_python("answer = open('/etc/passwd').read()", FAST)
    assert r.status == "error" and "reading /etc/passwd is not allowed" in r.error
    r = run_python("import os\nanswer = dict(os.environ)", FAST)
    assert r.ok and "hunter2" not in str(r.answer) and "LMLAB_TEST_SECRET" not in r.answer
    r = run_python(f"answer = open('/proc/{os.getpid()}/environ', 'rb').read().decode()", FAST)
    assert r.status == "error" and "hunter2" not in str(r.answer)
    assert os.environ["LMLAB_TEST_SECRET"] == "hunter2"  # the parent is as it was


def test_the_isolation_layers_are_reported():
    layers = run_python("pass").isolation
    assert {"rlimits", "audit-hook"} <= set(layers)


def test_bad_limits_and_code_get_one_line():
    with pytest.raises(ConfigError, match="at least 64 MB"):
        Limits(memory_mb=1)
    with pytest.raises(ConfigError, match="source text"):
        run_python(b"print(1)")


def test_without_the_audit_hook_the_process_layers_still_contain(tmp_path):
    """Defence in depth: a hole in the audit hook is not an escape. Where the kernel gives
    namespaces, the tree is read-only and there is no network; the rlimits hold anywhere."""
    layers = set(run_python("pass", _audit=False).isolation)
    assert "audit-hook" not in layers
    r = run_python("x = ' ' * (8 * 10**9)", Limits(seconds=5, memory_mb=256), _audit=False)
    assert r.status == "memory"
    marker = tmp_path / "escaped"
    if "read-only-tree" in layers:
        r = run_python(marker_code(marker), FAST, _audit=False)
        assert r.status == "error" and "Read-only file system" in r.error
        assert not marker.exists()
    if "no-network" in layers:
        with socket.socket() as server:
            server.bind(("127.0.0.1", 0))
            server.listen()
            port = server.getsockname()[1]
            code = f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=1)"
            r = run_python(code, FAST, _audit=False)
            assert r.status == "error" and ("unreachable" in r.error or "refused" in r.error)
    if "no-new-processes" in layers:
        r = run_python("import os\nos.fork()", FAST, _audit=False)
        assert r.status == "error" and "Resource temporarily unavailable" in r.error


def test_answers_come_back_exactly_through_the_childs_own_json():
    rng = random.Random(0)
    alphabet = "ab\"\\\n\r\t\x00\x01\x1f\x7fé漢 🙂'"
    texts = ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 30))) for _ in range(5)]
    value = {"texts": texts, "n": -12345678901234567890, "x": 0.1 + 0.2, "nested": [[None, True]]}
    r = run_python(f"answer = {value!r}")
    assert r.ok and r.answer == value
    assert run_python("answer = float('nan')").answer == "nan"  # not JSON: its repr
