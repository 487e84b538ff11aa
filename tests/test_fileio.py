import os
import stat

from lmlab.fileio import atomic_write_json, atomic_write_text


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
