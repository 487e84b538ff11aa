"""docs/lessons/run.py (``make lessons``): a rerun sets the earlier run folders aside
instead of failing on them or deleting them."""

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _runner():
    spec = importlib.util.spec_from_file_location("lessons_run", ROOT / "docs/lessons/run.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_earlier_run_folders_are_renamed_not_deleted(tmp_path, monkeypatch):
    run = _runner()
    monkeypatch.setattr(run, "ROOT", tmp_path)
    earlier = tmp_path / "runs/lessons/mlp"
    (earlier / "checkpoints").mkdir(parents=True)
    (earlier / "compare.png").write_bytes(b"old")
    outside = tmp_path / "docs"
    outside.mkdir()
    makes = ["runs/lessons/mlp/compare.png", "runs/lessons/new/fig.png", "docs/x.png"]
    moved = run.set_aside(makes)
    assert len(moved) == 1 and moved[0].name.startswith("mlp.before-")
    assert (moved[0] / "compare.png").read_bytes() == b"old"
    assert not earlier.exists() and outside.is_dir()  # nothing outside runs/ is touched
    assert run.set_aside(makes) == []  # nothing left to move
