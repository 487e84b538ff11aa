import json
import math

from lmlab.train.metrics import MetricsLog, plot_losses, read_metrics, truncate_after_checkpoint


def test_non_finite_numbers_are_written_as_null(tmp_path):
    log = MetricsLog(tmp_path / "metrics.jsonl")
    log.write({"event": "skip", "step": 3, "loss": math.nan, "grad_norm": math.inf})
    log.close()
    line = (tmp_path / "metrics.jsonl").read_text()
    assert json.loads(line) == {"event": "skip", "step": 3, "loss": None, "grad_norm": None}


def test_torn_last_line_is_ignored(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"event": "train", "step": 1, "loss": 2.0}\n{"event": "tr')
    assert read_metrics(path) == [{"event": "train", "step": 1, "loss": 2.0}]


def test_truncate_after_checkpoint_drops_the_redone_steps(tmp_path):
    path = tmp_path / "metrics.jsonl"
    events = [
        {"event": "train", "step": 1},
        {"event": "checkpoint", "step": 2, "path": "x"},
        {"event": "train", "step": 3},
        {"event": "skip", "step": 3},
    ]
    path.write_text("".join(json.dumps(e) + "\n" for e in events))
    truncate_after_checkpoint(path, 7)  # unknown checkpoint: unchanged
    assert read_metrics(path) == events
    truncate_after_checkpoint(path, 2)
    assert read_metrics(path) == events[:2]


def test_plot_losses_writes_a_png(tmp_path):
    path = tmp_path / "metrics.jsonl"
    events = [{"event": "train", "step": s, "loss": 3.0 / s} for s in range(1, 6)]
    events.append({"event": "eval", "step": 5, "val_loss": 0.7, "val_ppl": 2.0})
    path.write_text("".join(json.dumps(e) + "\n" for e in events))
    plot_losses(path, tmp_path / "loss.png")
    assert (tmp_path / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
