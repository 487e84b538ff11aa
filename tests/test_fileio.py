import os
import stat

import pytest

from lmlab.fileio import atomic_write_json, atomic_write_text, atomic_write_with


def test_atomic_write_replaces_the_file_and_respects_the_umask(tmp_path):
    file = tmp_path / "sub" / "a.json"
    atomic_write_json(file, {"x": 1})
    atomic_write_text(file, "hello")
    assert file.read_text() == "hello"
    assert [p.name for p in file.parent.iterdir()] == ["a.json"]  # no temporary left
    old = os.umask(0o022)
    try:
        atomic_write_text(file, "again")
    finally:
        os.umask(old)
    assert stat.S_IMODE(file.stat().st_mode) == 0o644  # as open() would make it, not 0600


def test_files_written_by_a_library_get_ordinary_permissions(tmp_path):
    """safetensors' save_file makes its file 0600 (the exported model.safetensors of issue
    24); written through atomic_write_with it gets what open() gives: 0644 under umask 022."""
    import torch
    from safetensors.torch import save_file

    file = tmp_path / "model.safetensors"
    old = os.umask(0o022)
    try:
        save_file({"w": torch.zeros(2)}, str(tmp_path / "direct.safetensors"))
        atomic_write_with(file, lambda tmp: save_file({"w": torch.zeros(2)}, str(tmp)))
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "direct.safetensors").stat().st_mode) == 0o600  # the cause
    assert stat.S_IMODE(file.stat().st_mode) == 0o644
    assert sorted(p.name for p in tmp_path.iterdir()) == ["direct.safetensors", "model.safetensors"]


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    file = tmp_path / "a.txt"
    atomic_write_text(file, "old")

    def fail(tmp):
        tmp.write_text("half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        atomic_write_with(file, fail)
    assert file.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["a.txt"]
