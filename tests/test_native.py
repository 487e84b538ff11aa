"""lmlab.native: C kernels built once per machine, loaded by later processes, rebuilt when
damaged, never loaded from a folder others may write to; without a compiler, None (the
callers' PyTorch paths, whose equality with the kernels is tested where they are used)."""

import ctypes
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from lmlab import native

SOURCE = Path(native.__file__).parent / "models" / "ngram_stream.c"
LOAD = (  # in another process, with the log on stderr
    "import logging; logging.basicConfig(); from pathlib import Path; from lmlab import native; "
    f"print(native.load(Path({str(SOURCE)!r})))"
)
needs_compiler = pytest.mark.skipif(
    native.compiler() is None, reason="no C compiler on this machine ($CC, cc, gcc, clang)"
)


@pytest.fixture
def fresh(tmp_path, monkeypatch):
    """An empty cache folder and a process that has loaded nothing yet."""
    monkeypatch.setenv("LMLAB_NATIVE_CACHE", str(tmp_path / "native"))
    native.load.cache_clear()
    yield tmp_path / "native"
    native.load.cache_clear()


def built(folder: Path) -> list[Path]:
    return sorted(folder.glob("ngram_stream-*.so"))


@needs_compiler
def test_a_kernel_is_built_once_and_loaded_by_later_processes(fresh):
    library = native.load(SOURCE)
    assert isinstance(library, ctypes.CDLL) and library.ngram_score_stream
    (path,) = built(fresh)
    assert fresh.stat().st_mode & 0o777 == 0o700
    assert not list(fresh.glob(".*.tmp"))  # the temporary file was renamed
    stamp = path.stat().st_mtime_ns
    native.load.cache_clear()
    assert native.load(SOURCE) is not None
    # another process finds the library and builds nothing
    out = subprocess.run([sys.executable, "-c", LOAD], capture_output=True, text=True, check=True)
    assert "CDLL" in out.stdout
    assert built(fresh) == [path] and path.stat().st_mtime_ns == stamp


@needs_compiler
def test_another_source_gets_its_own_library(fresh, tmp_path):
    native.load(SOURCE)
    other = tmp_path / "ngram_stream.c"
    other.write_text(SOURCE.read_text() + "\nint lmlab_extra(void) { return 7; }\n")
    assert native.load(other).lmlab_extra() == 7
    assert len(built(fresh)) == 2  # named by the source's hash: never the old one


@needs_compiler
def test_a_damaged_library_is_built_again(fresh):
    native.load(SOURCE)
    (path,) = built(fresh)
    path.unlink()  # a new file: this process still maps the old one (and dlopen would
    path.write_bytes(b"not a shared library")  # hand it back by name), so ask another
    out = subprocess.run([sys.executable, "-c", LOAD], capture_output=True, text=True, check=True)
    assert "CDLL" in out.stdout and "building it again" in out.stderr
    assert built(fresh) == [path] and path.read_bytes() != b"not a shared library"


@needs_compiler
def test_a_folder_others_may_write_to_is_not_used(fresh):
    fresh.mkdir(mode=0o700)
    os.chmod(fresh, 0o777)
    assert native.load(SOURCE) is not None
    assert built(fresh) == []  # built in a private temporary folder instead


@needs_compiler
def test_cc_may_name_a_command_with_words(fresh, monkeypatch):
    # ``CC="ccache gcc"``-style: the first word is looked up, the rest passed on
    monkeypatch.setenv("CC", f"env {native.compiler()[0]}")
    assert native.compiler()[0].endswith("env") and len(native.compiler()) == 2
    assert native.load(SOURCE) is not None and len(built(fresh)) == 1


def test_a_missing_source_means_none(fresh, tmp_path):
    assert native.load(tmp_path / "absent.c") is None


@pytest.mark.parametrize("cc", ["no-such-compiler-anywhere", "false"])
def test_no_compiler_or_a_failed_build_means_none(fresh, monkeypatch, cc):
    monkeypatch.setenv("CC", cc)
    if cc == "false" and native.compiler() is None:
        pytest.skip("no 'false' program on this machine")
    assert native.load(SOURCE) is None
    assert built(fresh) == [] and not list(fresh.glob(".*.tmp"))


@pytest.mark.parametrize("cxx", ["no-such-compiler-anywhere", "false"])
def test_a_cpp_source_is_built_with_cxx_and_without_one_means_none(
    fresh, tmp_path, monkeypatch, cxx
):
    """A .cpp source (a torch operator) takes $CXX, not $CC; no C++ compiler, or a failed
    build, gives None (int4.py then keeps to torch's kernel)."""
    source = tmp_path / "op.cpp"
    source.write_text("int lmlab_op_marker = 1;\n")
    monkeypatch.setenv("CXX", cxx)
    if cxx == "false" and native.compiler(cxx=True) is None:
        pytest.skip("no 'false' program on this machine")
    expected = [shutil.which("false")] if cxx == "false" else None
    assert native.compiler(cxx=True) == expected  # from $CXX; $CC is not asked
    assert native.load(source) is None
    assert list(fresh.glob("op-*.so")) == [] and not list(fresh.glob(".*.tmp"))
