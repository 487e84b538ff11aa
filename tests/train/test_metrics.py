import json
import math
import struct
import sys

import numpy as np
import pytest

from builders import tensorboard_scalars
from lmlab.errors import ConfigError
from lmlab.train import LogConfig, TrainConfig, train
from lmlab.train.metrics import (
    TENSORBOARD_DIR,
    WANDB_DIR,
    MetricsLog,
    event_scalars,
    plot_losses,
    read_metrics,
    truncate_after_checkpoint,
)


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


# ------------------------------------------------------------------ TensorBoard and W&B


def test_event_scalars_are_the_finite_numbers_of_an_event():
    record = {"event": "eval", "step": 5, "val_loss": 1.5, "val_ppl": math.inf, "ok": True}
    assert event_scalars({**record, "path": "x", "changed": {"a": [1, 2]}}) == {
        "eval/val_loss": 1.5
    }
    assert event_scalars({"event": "train", "loss": 1.0}) == {}  # no step: nothing to plot


def test_a_training_run_writes_tensorboard_scalars_at_their_steps(make_toy, tmp_path):
    """The trainer's train and eval events land in out_dir/tensorboard with the steps and
    values of metrics.jsonl (float32 in the event file: rel 1e-6)."""
    data = (np.arange(600) % 15).astype(np.uint16)
    config = TrainConfig(
        out_dir=str(tmp_path / "run"),
        max_steps=6,
        batch_size=2,
        seq_len=8,
        warmup_steps=1,
        log_interval=2,
        eval_interval=3,
        eval_batches=1,
        precision="fp32",
        progress=False,
        log=LogConfig(tensorboard=True),
    )
    train(make_toy(), data, data[:200], config)
    scalars = tensorboard_scalars(tmp_path / "run" / TENSORBOARD_DIR)
    records = read_metrics(tmp_path / "run" / "metrics.jsonl")
    for event, key in (("train", "loss"), ("train", "tokens_per_s"), ("eval", "val_loss")):
        expected = [(r["step"], r[key]) for r in records if r["event"] == event]
        got = scalars[f"{event}/{key}"]
        assert [s for s, _ in got] == [s for s, _ in expected] != []
        np.testing.assert_allclose([v for _, v in got], [v for _, v in expected], rtol=1e-6)
    assert [s for s, _ in scalars["train/loss"]] == [2, 4, 6]
    assert [s for s, _ in scalars["eval/val_loss"]] == [3, 6]


def test_a_resumed_run_replaces_the_tensorboard_steps_it_redoes(tmp_path):
    """TensorBoard's purge_step: what a crashed attempt logged after the checkpoint goes."""
    path = tmp_path / "metrics.jsonl"
    first = MetricsLog(path, LogConfig(tensorboard=True))
    for step in (1, 2, 3):
        first.write({"event": "train", "step": step, "loss": 10.0 + step})
    first.close()
    again = MetricsLog(path, LogConfig(tensorboard=True), start_step=2)
    for step in (2, 3):
        again.write({"event": "train", "step": step, "loss": float(step)})
    again.close()
    loss = tensorboard_scalars(tmp_path / TENSORBOARD_DIR)["train/loss"]
    assert loss == [(1, 11.0), (2, 2.0), (3, 3.0)]
    fresh = MetricsLog(path, LogConfig(tensorboard=True), start_step=0)  # a new run, same folder
    fresh.write({"event": "train", "step": 1, "loss": 7.0})
    fresh.close()
    assert tensorboard_scalars(tmp_path / TENSORBOARD_DIR)["train/loss"] == [(1, 7.0)]


def test_tensorboard_missing_is_one_clear_error_and_default_runs_do_not_need_it(
    tmp_path, monkeypatch
):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import fails
    with pytest.raises(ConfigError, match="log.tensorboard=true needs the tensorboard package"):
        MetricsLog(tmp_path / "metrics.jsonl", LogConfig(tensorboard=True))
    log = MetricsLog(tmp_path / "metrics.jsonl", LogConfig())
    log.write({"event": "train", "step": 1, "loss": 1.0})
    log.close()
    assert not (tmp_path / TENSORBOARD_DIR).exists()


def test_log_settings_are_checked():
    with pytest.raises(ConfigError, match="wandb_mode='ofline' is invalid.*offline"):
        LogConfig(wandb_mode="ofline")
    with pytest.raises(ConfigError, match="LogConfig.tensorboard='yes'"):
        LogConfig(tensorboard="yes")
    assert TrainConfig(log={"tensorboard": True}).log == LogConfig(tensorboard=True)


def wandb_history(run_file) -> list[dict[str, float]]:
    """The logged rows of an offline W&B run file (``run-<id>.wandb``): a 7-byte file
    header, then LevelDB log records (32 KiB blocks; each record a 7-byte header: crc32,
    uint16 length, kind 1 = whole, 2/3/4 = first/middle/last piece) holding protobuf
    ``Record`` messages, of which the ``history`` ones are the rows of ``wandb.log``."""
    from wandb.proto import wandb_internal_pb2

    data, block, pos, piece, rows = run_file.read_bytes(), 32768, 7, b"", []
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if (length, kind) == (0, 0):
            break
        piece += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(piece)
            piece = b""
            if record.WhichOneof("record_type") == "history":
                rows.append(
                    {
                        i.key or "/".join(i.nested_key): json.loads(i.value_json)
                        for i in record.history.item
                    }
                )
    return rows


@pytest.mark.slow
def test_wandb_offline_run_holds_the_logged_scalars(tmp_path, monkeypatch):
    """W&B in offline mode (no network; about 1.5 s, it starts wandb's service): the run's
    file goes to out_dir/wandb and holds each logged row at its step."""
    pytest.importorskip("wandb", reason="wandb is optional: pip install wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    log = MetricsLog(
        tmp_path / "metrics.jsonl",
        LogConfig(wandb=True, wandb_mode="offline", wandb_project="lmlab-test"),
        settings={"train": {"lr": 0.1}},
    )
    for step in (1, 2):
        log.write({"event": "train", "step": step, "loss": 3.0 - step, "lr": 0.1})
    log.write({"event": "eval", "step": 2, "val_loss": 0.5})
    log.close()
    (run_file,) = (tmp_path / WANDB_DIR).glob("offline-run-*/run-*.wandb")
    rows = [
        {k: v for k, v in r.items() if not k.startswith("_") or k == "_step"}
        for r in wandb_history(run_file)
    ]
    assert rows == [
        {"_step": 1, "train/loss": 2.0, "train/lr": 0.1},
        {"_step": 2, "train/loss": 1.0, "train/lr": 0.1, "eval/val_loss": 0.5},
    ]


# ------------------------------------------------------------------ plots with few points


def write_events(path, events):
    path.write_text("".join(json.dumps(e) + "\n" for e in events))


def texts(fig) -> list[str]:
    return [t.get_text() for ax in fig.axes for t in ax.texts]


def markers(fig) -> list[str]:
    return [line.get_marker() for ax in fig.axes for line in ax.get_lines()]


@pytest.mark.parametrize("n", [0, 1, 2])
def test_loss_plot_with_few_points_is_written_with_markers_or_a_note(tmp_path, n):
    """0, 1 or 2 logged steps: the PNG is written; the points carry markers (a lone point
    of a bare line would not show); a missing curve is explained inside the panel."""
    path = tmp_path / "metrics.jsonl"
    write_events(path, [{"event": "train", "step": s, "loss": 3.0 / s} for s in range(1, n + 1)])
    fig = plot_losses(path, tmp_path / "loss.png", val_note="no validation yet: runs every 9 steps")
    assert (tmp_path / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    if n == 0:
        assert texts(fig) == ["no step logged yet: the loss is logged every log_interval steps"]
        assert markers(fig) == []
    else:
        assert texts(fig) == ["no validation yet: runs every 9 steps"]
        assert markers(fig) == ["o"]
    write_events(path, [{"event": "eval", "step": 1, "val_loss": 1.0}])
    fig = plot_losses(path, tmp_path / "loss.png")
    assert texts(fig) == [] and markers(fig) == ["o"]


def test_a_long_loss_curve_is_a_plain_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    write_events(path, [{"event": "train", "step": s, "loss": 1.0} for s in range(1, 200)])
    assert markers(plot_losses(path, tmp_path / "loss.png")) == ["None"]


def test_a_short_training_run_says_why_its_loss_plot_has_no_validation(
    make_toy, tmp_path, monkeypatch
):
    """A run of one step without validation data: loss.png shows the step's marker and
    says there is no validation data (the trainer's note, checked on the figure drawn)."""
    from lmlab.train import trainer as trainer_module

    figures = []
    monkeypatch.setattr(
        trainer_module,
        "plot_losses",
        lambda *a, **k: figures.append(plot_losses(*a, **k)),
    )
    data = (np.arange(600) % 15).astype(np.uint16)
    config = TrainConfig(
        out_dir=str(tmp_path / "run"),
        max_steps=1,
        batch_size=2,
        seq_len=8,
        warmup_steps=1,
        log_interval=1,
        precision="fp32",
        progress=False,
    )
    train(make_toy(), data, None, config)
    assert (tmp_path / "run" / "loss.png").is_file()
    (fig,) = figures
    assert markers(fig) == ["o"] and texts(fig) == ["no validation data"]
