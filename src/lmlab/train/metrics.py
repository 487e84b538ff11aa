"""A run's metrics.jsonl (one JSON object per event) and its loss-curve plot.

Events, each with ``"event"`` and ``"step"`` (optimizer steps applied so far)::

    {"event": "train", "step": 10, "loss": 3.21, "lr": 0.001, "grad_norm": 0.8,
     "tokens": 40960, "tokens_per_s": 51234.0, "elapsed_s": 0.8}
        # "tokens": every token fed to the model; supervised batches (fine-tuning, DPO,
        # reward models) add "sup_tokens" and "sup_tokens_per_s", the tokens the loss is on
    {"event": "eval", "step": 250, "val_loss": 1.9, "val_ppl": 6.7}
    {"event": "skip", "step": 37, "reason": "nonfinite_loss", "loss": null, "grad_norm": null}
    {"event": "checkpoint", "step": 500, "path": "runs/x/checkpoints/step-00000500"}
    {"event": "resume", "step": 500, "from": "runs/x/checkpoints/step-00000500",
     "changed": {"max_steps": [1000, 2000]}}     # "changed": only when settings changed
    {"event": "oom", "step": 12, "micro_batch": 16, "grad_accum": 2}  # out of memory: halved

Non-finite numbers are written as null (JSON has no NaN).

With ``LogConfig(tensorboard=True)`` or ``LogConfig(wandb=True)`` every finite number of
an event also goes to TensorBoard (event files in ``out_dir/tensorboard``) or Weights &
Biases (files in ``out_dir/wandb``) as the scalar ``<event>/<field>`` at the event's step:
``train/loss``, ``train/tokens_per_s``, ``eval/val_loss``, ``ppo/kl``, ...
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from lmlab.errors import ConfigError
from lmlab.fileio import atomic_write_text
from lmlab.train.config import LogConfig

TENSORBOARD_DIR = "tensorboard"
WANDB_DIR = "wandb"


class MetricsLog:
    """Appends events to a metrics.jsonl file, one flushed line each, and hands their
    numbers to TensorBoard and W&B when ``log`` asks for them.

    ``start_step``: the step this run starts from (0 when fresh, the checkpoint's step
    when resumed); TensorBoard drops what an earlier attempt logged in the folder from
    that step on, since this run logs those steps again. None keeps everything.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        log: LogConfig | None = None,
        start_step: int | None = None,
        settings: dict[str, Any] | None = None,
    ):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        log = log or LogConfig()
        self._sinks = []
        try:
            if log.tensorboard:
                self._sinks.append(TensorBoardSink(self.path.parent / TENSORBOARD_DIR, start_step))
            if log.wandb:
                self._sinks.append(WandbSink(self.path.parent, log, settings))
        except BaseException:
            self.close_sinks()  # one sink failed (a missing package): close the others
            raise
        self._file = open(self.path, "a", encoding="utf-8")

    def write(self, record: dict[str, Any]) -> None:
        self._file.write(json.dumps(_finite_or_null(record)) + "\n")
        self._file.flush()
        scalars = event_scalars(record)
        if scalars:
            for sink in self._sinks:
                sink.write(scalars, record["step"])

    def close(self) -> None:
        self._file.close()
        self.close_sinks()

    def close_sinks(self) -> None:
        for sink in self._sinks:
            sink.close()
        self._sinks = []


def event_scalars(record: dict[str, Any]) -> dict[str, float]:
    """The finite numbers of an event as ``{"<event>/<field>": value}`` (step aside).

    ``{"event": "eval", "step": 5, "val_loss": 1.9, "path": "x"} -> {"eval/val_loss": 1.9}``
    """
    event, step = record.get("event"), record.get("step")
    if not isinstance(event, str) or not isinstance(step, int):
        return {}
    return {
        f"{event}/{key}": float(value)
        for key, value in record.items()
        if key not in ("event", "step")
        and isinstance(value, (int, float))
        and not isinstance(value, bool)
        and math.isfinite(value)
    }


class TensorBoardSink:
    """Scalars to TensorBoard event files, through ``torch.utils.tensorboard``."""

    def __init__(self, log_dir: Path, purge_step: int | None = None):
        try:
            # deferred: needs the optional tensorboard package, only when asked for
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as e:
            raise ConfigError(
                "log.tensorboard=true needs the tensorboard package: pip install tensorboard "
                "(or lmlab's dev extra), or leave log.tensorboard false"
            ) from e
        self.writer = SummaryWriter(log_dir=str(log_dir), purge_step=purge_step)

    def write(self, scalars: dict[str, float], step: int) -> None:
        for tag, value in scalars.items():
            self.writer.add_scalar(tag, value, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class WandbSink:
    """Scalars to a Weights & Biases run (its files in ``run_dir/wandb``)."""

    def __init__(self, run_dir: Path, log: LogConfig, settings: dict[str, Any] | None):
        try:
            import wandb  # deferred: optional, only when asked for
        except ImportError as e:
            raise ConfigError(
                "log.wandb=true needs the wandb package: pip install wandb, or leave "
                "log.wandb false"
            ) from e
        (run_dir / WANDB_DIR).mkdir(parents=True, exist_ok=True)
        self.run = wandb.init(
            project=log.wandb_project,
            name=log.wandb_name or run_dir.resolve().name,
            dir=str(run_dir),
            mode=log.wandb_mode,
            config=settings,
            reinit="create_new",
        )

    def write(self, scalars: dict[str, float], step: int) -> None:
        self.run.log(scalars, step=step)

    def close(self) -> None:
        self.run.finish()


def _finite_or_null(record: dict[str, Any]) -> dict[str, Any]:
    return {
        k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()
    }


def read_metrics(path: str | os.PathLike) -> list[dict[str, Any]]:
    """All events of a metrics.jsonl file (a torn last line, from a crash, is ignored)."""
    records = []
    path = Path(path)
    if not path.is_file():
        return records
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def truncate_after_checkpoint(path: str | os.PathLike, step: int) -> None:
    """Drop the events logged after the checkpoint of ``step``, before resuming from it.

    A run that crashed after its last checkpoint logged steps that the resumed run will
    redo; keeping them would show those steps twice. Nothing changes when no checkpoint
    event of ``step`` is found (say, resuming from another run's checkpoint).
    """
    path = Path(path)
    lines = path.read_text(encoding="utf-8").splitlines() if path.is_file() else []
    cut = None
    for i, line in enumerate(lines):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if record.get("event") == "checkpoint" and record.get("step") == step:
            cut = i + 1
    if cut is None or cut == len(lines):
        return
    atomic_write_text(path, "".join(line + "\n" for line in lines[:cut]))


# Up to this many points a series shows its markers: the lone point of a run that logged
# one step is invisible as a bare line; longer curves stay clean lines.
MARKERS_UP_TO = 50


def draw_series(ax, points, style: str = "-", markers: bool | None = None, **kwargs) -> None:
    """(x, y) ``points`` as a line on ``ax``, with markers when asked or when there are
    few of them (``markers=None``); nothing when there are none."""
    if not points:
        return
    if markers or (markers is None and len(points) <= MARKERS_UP_TO):
        kwargs = {"marker": "o", "markersize": 3, **kwargs}
    ax.plot(*zip(*points), style, **kwargs)


def note(ax, why: str, y: float = 0.5) -> None:
    """Say inside the panel why it is (partly) empty, at height ``y`` (axes fraction)."""
    ax.text(0.5, y, why, transform=ax.transAxes, ha="center", va="center", color="0.35")


def plot_losses(
    metrics_path: str | os.PathLike,
    png_path: str | os.PathLike,
    val_note: str = "no validation loss logged",
):
    """Train and validation loss against step, from metrics.jsonl, saved as a PNG.

    A panel with no points says so (``val_note`` when only the validation loss is
    missing, e.g. "no validation yet: runs every 250 steps"). Returns the Figure.
    """
    # A bare Figure renders with Agg and leaves pyplot's global backend alone.
    from matplotlib.figure import Figure  # deferred: slow to import, only for plots

    records = read_metrics(metrics_path)
    train = [(r["step"], r["loss"]) for r in records if r.get("event") == "train" and r["loss"]]
    val = [
        (r["step"], r["val_loss"]) for r in records if r.get("event") == "eval" and r["val_loss"]
    ]
    fig = Figure(figsize=(6, 4), dpi=100)
    ax = fig.add_subplot()
    draw_series(ax, train, label="train", linewidth=1)
    draw_series(ax, val, markers=True, label="validation")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.grid(alpha=0.3)
    if not train and not val:
        note(ax, "no step logged yet: the loss is logged every log_interval steps")
    elif not val:
        note(ax, val_note, y=0.92)
    if train or val:
        ax.legend()
    fig.tight_layout()
    fig.savefig(png_path)
    return fig
