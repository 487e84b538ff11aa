"""Small C and C++ kernels, built once per machine with its compiler: C ones are called
through ctypes, C++ ones register a PyTorch operator (``torch.ops.lmlab.*``).

Where a loop is a few dependent memory reads per element (the n-gram stream scorer's hash
lookups), PyTorch pays a dispatch, an allocation and a pass over memory per op, twenty-odd
ops per order; one C loop over the positions reads each table entry once and keeps the
rest in registers. Each kernel has a PyTorch twin in the module that uses it, which gives
the same numbers bit for bit (tested), or up to a stated rounding, and runs wherever the
kernel cannot: no compiler, a failed build, another platform, tensors not on the CPU.

Build: ``$CC`` (else ``cc``, ``gcc`` or ``clang`` on the PATH) with ``-O2 -fPIC -shared
-ffp-contract=off``: no fused multiply-add and no fast-math, so each float64 operation
rounds as torch's eager op does. A ``.cpp`` source is built with ``$CXX`` (else ``c++``,
``g++`` or ``clang++``) against torch's headers and ``libtorch_cpu``, and holds an operator
written to torch's stable C++ ABI (``torch/csrc/stable``: header-only, a few seconds to
build); loading it registers the operator. The library is cached in ``cache_dir()`` under
a name that hashes the source, the compiler and the flags (torch's version and headers
too, for C++), written atomically
(``lmlab.fileio.atomic_write_with``), in a directory only this user may write: a process loads only a library
that it or an earlier process of the same user built from the same source.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shlex
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch

from lmlab.fileio import atomic_write_with

log = logging.getLogger(__name__)

FLAGS = ("-O2", "-fPIC", "-shared", "-ffp-contract=off")


def cache_dir() -> Path:
    """Where built kernels are kept: ``$LMLAB_NATIVE_CACHE``, else ~/.cache/lmlab/native."""
    return Path(os.environ.get("LMLAB_NATIVE_CACHE") or Path.home() / ".cache" / "lmlab" / "native")


def compiler(cxx: bool = False) -> list[str] | None:
    """The command that compiles C: ``$CC`` (``gcc``, ``ccache gcc``, ...) if set, else the
    first of cc, gcc, clang on the PATH; None if there is none. With ``cxx``, C++:
    ``$CXX``, else c++, g++, clang++."""
    try:
        named = shlex.split(os.environ.get("CXX" if cxx else "CC", ""))
    except ValueError:  # unbalanced quotes: no usable command
        return None
    if named:
        found = shutil.which(named[0])
        return [found, *named[1:]] if found else None
    for name in ("c++", "g++", "clang++") if cxx else ("cc", "gcc", "clang"):
        found = shutil.which(name)
        if found:
            return [found]
    return None


def _torch_flags() -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(compile flags, link flags) of a C++ operator library: torch's headers and
    ``libtorch_cpu`` (found again at load time through the rpath)."""
    root = Path(torch.__file__).parent
    lib = str(root / "lib")
    return ("-std=c++17", f"-I{root / 'include'}"), (f"-L{lib}", "-ltorch_cpu", f"-Wl,-rpath,{lib}")


@functools.cache
def load(source: Path) -> ctypes.CDLL | None:
    """The C or C++ file ``source`` built as a shared library and loaded, once per process;
    None (and one log line saying why) where it cannot be: callers then take their PyTorch
    path."""
    if sys.platform == "win32":
        log.info("no native kernels on Windows: %s runs in PyTorch", source.name)
        return None
    cxx = source.suffix == ".cpp"
    cc = compiler(cxx)
    if cc is None:
        names = "$CXX, c++, g++, clang++" if cxx else "$CC, cc, gcc, clang"
        log.info(
            "no %s compiler found (%s): %s runs in PyTorch",
            "C++" if cxx else "C",
            names,
            source.name,
        )
        return None
    try:
        digest = hashlib.sha256(source.read_bytes())
    except OSError as e:  # an installation without its .c files
        log.warning("cannot read %s (%s): PyTorch instead", source, e)
        return None
    flags, link = _torch_flags() if cxx else ((), ())
    versions = (torch.__version__,) if cxx else ()
    for part in (*cc, *FLAGS, *flags, *link, *versions, platform.machine(), sys.platform):
        digest.update(b"\0" + part.encode())
    folder = _private(cache_dir())
    library = folder / f"{source.stem}-{digest.hexdigest()[:20]}.so"
    for _ in range(2):  # a damaged file is built again, once
        if not library.exists() and not _build([*cc, *FLAGS, *flags], source, link, library):
            return None
        try:
            return ctypes.CDLL(str(library))
        except OSError as e:
            log.warning("cannot load %s (%s): building it again", library, e)
            library.unlink(missing_ok=True)
    return None


def load_operator(source: Path, name: str, fake: Callable, missing: set[str] = frozenset()):
    """``torch.ops.lmlab.<name>``, the operator that the C++ file ``source`` registers,
    built and loaded by ``load``, with ``fake`` (its output's shape and dtype from its
    arguments') registered for tracing, so that a compiled step can call it; None, with
    one log line, where the CPU lacks the instruction sets ``missing`` (the caller's check
    of its flags) or ``load`` gives None. Callers cache the result (one build and
    registration per process)."""
    if missing:
        log.info("the CPU lacks %s: %s runs in PyTorch", " ".join(sorted(missing)), source.name)
        return None
    if load(source) is None:
        return None
    torch.library.register_fake(f"lmlab::{name}")(fake)
    return getattr(torch.ops.lmlab, name)


def _build(command: list[str], source: Path, link: tuple[str, ...], library: Path) -> bool:
    """Compile ``source`` into ``library`` (atomically: ``lmlab.fileio``); False, with the
    compiler's last words logged, if that fails."""

    def compile_to(tmp: Path) -> None:
        run = subprocess.run(
            [*command, "-o", str(tmp), str(source), *link],
            capture_output=True,
            text=True,
            timeout=300,
        )
        if run.returncode != 0:
            raise OSError(run.stderr[-500:].strip() or f"{command[0]} exited with {run.returncode}")

    try:
        atomic_write_with(library, compile_to)
        return True
    except (OSError, subprocess.TimeoutExpired) as e:
        log.warning("cannot build %s (%s): PyTorch instead", source.name, e)
        return False


def _private(folder: Path) -> Path:
    """``folder``, created 0700, if this user owns it and nobody else may write to it; else
    a fresh private temporary directory (a library is never loaded from a shared one)."""
    try:
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        st = folder.stat()
        if st.st_uid == os.getuid() and not st.st_mode & 0o022:
            return folder
        log.warning("%s is not private to this user: building in a temporary folder", folder)
    except OSError as e:
        log.warning("cannot use %s (%s): building in a temporary folder", folder, e)
    return Path(tempfile.mkdtemp(prefix="lmlab-native-"))
