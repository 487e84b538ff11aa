"""Small C kernels, built once per machine with its C compiler and called through ctypes.

Where a loop is a few dependent memory reads per element (the n-gram stream scorer's hash
lookups), PyTorch pays a dispatch, an allocation and a pass over memory per op, twenty-odd
ops per order; one C loop over the positions reads each table entry once and keeps the
rest in registers. Each kernel has a PyTorch twin in the module that uses it, which gives
the same numbers bit for bit (tested) and runs wherever the kernel cannot: no C compiler,
a failed build, another platform, tensors not on the CPU.

Build: ``$CC`` (else ``cc``, ``gcc`` or ``clang`` on the PATH) with ``-O2 -fPIC -shared
-ffp-contract=off``: no fused multiply-add and no fast-math, so each float64 operation
rounds as torch's eager op does. The library is cached in ``cache_dir()`` under a name
that hashes the source, the compiler and the flags, written atomically
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
from pathlib import Path

from lmlab.fileio import atomic_write_with

log = logging.getLogger(__name__)

FLAGS = ("-O2", "-fPIC", "-shared", "-ffp-contract=off")


def cache_dir() -> Path:
    """Where built kernels are kept: ``$LMLAB_NATIVE_CACHE``, else ~/.cache/lmlab/native."""
    return Path(os.environ.get("LMLAB_NATIVE_CACHE") or Path.home() / ".cache" / "lmlab" / "native")


def compiler() -> list[str] | None:
    """The command that compiles C: ``$CC`` (``gcc``, ``ccache gcc``, ...) if set, else the
    first of cc, gcc, clang on the PATH; None if there is none."""
    try:
        named = shlex.split(os.environ.get("CC", ""))
    except ValueError:  # unbalanced quotes: no usable command
        return None
    if named:
        found = shutil.which(named[0])
        return [found, *named[1:]] if found else None
    for name in ("cc", "gcc", "clang"):
        found = shutil.which(name)
        if found:
            return [found]
    return None


@functools.cache
def load(source: Path) -> ctypes.CDLL | None:
    """The C file ``source`` built as a shared library and loaded, once per process; None
    (and one log line saying why) where it cannot be: callers then take their PyTorch path."""
    if sys.platform == "win32":
        log.info("no C kernels on Windows: %s runs in PyTorch", source.name)
        return None
    cc = compiler()
    if cc is None:
        log.info("no C compiler found ($CC, cc, gcc, clang): %s runs in PyTorch", source.name)
        return None
    try:
        digest = hashlib.sha256(source.read_bytes())
    except OSError as e:  # an installation without its .c files
        log.warning("cannot read %s (%s): PyTorch instead", source, e)
        return None
    for part in (*cc, *FLAGS, platform.machine(), sys.platform):
        digest.update(b"\0" + part.encode())
    folder = _private(cache_dir())
    library = folder / f"{source.stem}-{digest.hexdigest()[:20]}.so"
    for _ in range(2):  # a damaged file is built again, once
        if not library.exists() and not _build(cc, source, library):
            return None
        try:
            return ctypes.CDLL(str(library))
        except OSError as e:
            log.warning("cannot load %s (%s): building it again", library, e)
            library.unlink(missing_ok=True)
    return None


def _build(cc: list[str], source: Path, library: Path) -> bool:
    """Compile ``source`` into ``library`` (atomically: ``lmlab.fileio``); False, with the
    compiler's last words logged, if that fails."""

    def compile_to(tmp: Path) -> None:
        run = subprocess.run(
            [*cc, *FLAGS, "-o", str(tmp), str(source)], capture_output=True, text=True, timeout=120
        )
        if run.returncode != 0:
            raise OSError(run.stderr[-500:].strip() or f"{cc[0]} exited with {run.returncode}")

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
