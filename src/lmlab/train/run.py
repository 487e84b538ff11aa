"""The run folder of a training command: one owner, its record, its log, its checkpoints.

Every command that trains writes one folder (``out_dir``)::

    run = RunDir(out_dir)
    with run.owned():                      # run.lock: pid + host, taken with O_CREAT|O_EXCL
        run.clean()                        # a crashed save's temporaries (only once owned)
        source = run.resume_source(resume) # "never" | "auto" | a checkpoint or run folder
        run.record({...})                  # config.json: the resolved settings
        with run.stop_signals() as stop:   # SIGINT and SIGTERM raise Interrupted ...
            with stop.deferred():          # ... but never inside an optimizer update
                optimizer.step()
            run.save(step, model, ...)     # checkpoints/step-N, then rotation
            run.emit({"event": ...})       # metrics.jsonl (TensorBoard, W&B) and the callbacks

One process owns a folder at a time (reliability item 28): a second writer gets
``RunInUse`` naming the owner, and a lock left by a process that died on this host is
taken over with a warning. Cleanup of a crashed save runs only under the lock, so it can
never delete the checkpoint that a live run is writing. The same process may take the
lock again (``api.train`` holds it while preparing the data, the trainer inside it).

``resume`` has one vocabulary for every command: ``"never"`` (a fresh run; the folder
must hold no checkpoint), ``"auto"`` (the newest complete checkpoint, or fresh when there
is none) or a path. A resumed run restores its recorded settings
(``resume_settings``): what the resume command names replaces them and is recorded; what
cannot change mid-run is refused.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import signal
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from lmlab.checkpoint.io import (
    latest_checkpoint,
    list_checkpoints,
    remove_stale_temporaries,
    resolve_checkpoint,
    rotate_checkpoints,
    save_checkpoint,
)
from lmlab.errors import CheckpointError, ConfigError, LMLabError
from lmlab.fileio import atomic_write_json
from lmlab.train.config import LogConfig
from lmlab.train.metrics import MetricsLog

log = logging.getLogger(__name__)

LOCK_FILE = "run.lock"
RUN_CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.jsonl"
# A lock file still empty after this long was left by a process that died while taking it.
_TORN_LOCK_AGE_S = 10.0


class RunInUse(LMLabError):
    """The run folder is owned by another live process."""


class Interrupted(KeyboardInterrupt):
    """A run stopped by a signal (SIGTERM from ``kill``, ``timeout`` or a scheduler).

    A ``KeyboardInterrupt``, so that it takes the path Ctrl-C takes: save, then stop.
    """

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


# ----------------------------------------------------------------------------- the lock


def _host() -> str:
    return socket.gethostname()


def _start_ticks(pid: int) -> int | None:
    """When process ``pid`` started (clock ticks since boot, Linux), to tell a reused pid."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # Field 22; the command name (field 2) may hold spaces, so count after its ")".
    return int(stat.rsplit(")", 1)[1].split()[19])


def pid_alive(pid: int, start_ticks: int | None = None) -> bool:
    """Whether process ``pid`` (on this host) still runs; a reused pid counts as dead."""
    if not isinstance(pid, int) or pid <= 0:
        return False
    if os.name == "nt":  # no signal 0 there: assume alive (the user removes the lock)
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by another user
        return True
    if start_ticks is not None:
        now = _start_ticks(pid)
        if now is not None and now != start_ticks:
            return False
    return True


def _is_me(owner: dict[str, Any], me: dict[str, Any]) -> bool:
    """The lock names this very process (not an earlier one that had the same pid)."""
    if (owner.get("pid"), owner.get("host")) != (me["pid"], me["host"]):
        return False
    ticks = owner.get("start_ticks")
    return ticks is None or me["start_ticks"] is None or ticks == me["start_ticks"]


class RunLock:
    """``out_dir/run.lock``: which process (pid, host) writes into this run folder.

    Taken atomically (``os.open`` with ``O_CREAT | O_EXCL``); released by the owner at the
    end (an exception included). A lock of a dead process on this host is taken over with
    a warning; one from another host cannot be checked, so it is refused with the way out.
    """

    def __init__(self, run_dir: str | os.PathLike):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_FILE
        self.token: str | None = None  # set while this object holds the lock
        self.nested = False  # taken again by the process that holds it

    @property
    def held(self) -> bool:
        """Whether this process owns the folder (through this object or an outer one)."""
        return self.token is not None or self.nested

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def owner(self) -> dict[str, Any] | None:
        """The lock file's contents, or None when it is missing, empty or torn."""
        try:
            owner = json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        return owner if isinstance(owner, dict) else None

    def acquire(self) -> None:
        me = {"pid": os.getpid(), "host": _host(), "start_ticks": _start_ticks(os.getpid())}
        for _ in range(5):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                owner = self.owner()
                if owner is not None and _is_me(owner, me):
                    self.nested = True  # held by this process already: not ours to free
                    return
                self._take_over_or_refuse(owner)
                continue
            token = uuid.uuid4().hex
            record = {**me, "token": token, "since": time.strftime("%Y-%m-%d %H:%M:%S")}
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")
                f.flush()
                os.fsync(f.fileno())
            self.token = token
            return
        raise RunInUse(
            f"could not take the lock {str(self.path)!r}: other processes keep taking it"
        )

    def _take_over_or_refuse(self, owner: dict[str, Any] | None) -> None:
        where = str(self.run_dir)
        if owner is None:
            try:
                age = time.time() - self.path.stat().st_mtime
            except FileNotFoundError:
                return  # released meanwhile: try again
            if age < _TORN_LOCK_AGE_S:
                raise RunInUse(f"run directory {where!r} is being taken by another process")
            log.warning("taking over the unreadable lock file %s (left by a crash)", self.path)
        else:
            pid, host, since = owner.get("pid"), owner.get("host"), owner.get("since", "?")
            if host != _host():
                raise RunInUse(
                    f"run directory {where!r} is in use by pid {pid} on host {host} (since "
                    f"{since}); if that process is gone, delete {str(self.path)!r}"
                )
            if pid_alive(pid, owner.get("start_ticks")):
                raise RunInUse(
                    f"run directory {where!r} is in use by another process (pid {pid} on host "
                    f"{host}, since {since}): wait for it, stop it, or choose another out_dir"
                )
            log.warning(
                "taking over the lock of %s left by pid %s on host %s, which is no longer running",
                where,
                pid,
                host,
            )
        # Move the stale lock aside and check that it is still the one judged stale: a
        # process that took it over meanwhile keeps its lock.
        aside = self.path.with_name(f".{LOCK_FILE}.stale-{uuid.uuid4().hex[:8]}")
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return
        try:
            moved = json.loads(aside.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            moved = None
        if moved != owner:
            os.rename(aside, self.path)
            raise RunInUse(f"run directory {where!r} was just taken by another process")
        aside.unlink(missing_ok=True)

    def release(self) -> None:
        self.nested = False
        if self.token is None:
            return
        owner = self.owner()
        if owner is not None and owner.get("token") == self.token:
            self.path.unlink(missing_ok=True)
        self.token = None


# ----------------------------------------------------------------------------- signals


class StopSignals:
    """SIGINT and SIGTERM raise ``KeyboardInterrupt`` / ``Interrupted``, except inside
    ``deferred()`` (an optimizer update): there the signal waits for the block to end.

    Installed only in the main thread (Python delivers signals there); elsewhere it does
    nothing and Ctrl-C keeps Python's behaviour.
    """

    def __init__(self):
        self._depth = 0
        self._pending: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGINT, signal.SIGTERM):
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    def _handle(self, signum, frame) -> None:
        if self._depth > 0:
            self._pending = signum
            return
        self._raise(signum)

    @staticmethod
    def _raise(signum: int) -> None:
        if signum == signal.SIGINT:
            raise KeyboardInterrupt
        raise Interrupted(signum)

    @contextlib.contextmanager
    def deferred(self) -> Iterator[None]:
        self._depth += 1
        try:
            yield
        finally:
            self._depth -= 1
        if self._depth == 0 and self._pending is not None:
            signum, self._pending = self._pending, None
            self._raise(signum)


# ----------------------------------------------------------------------------- the folder


def ensure_run_dir(out_dir: str | os.PathLike) -> Path:
    """Create ``out_dir`` (and its parents) or say in one line why it cannot be a run folder."""
    path = Path(out_dir)
    if path.exists() and not path.is_dir():
        raise ConfigError(f"out_dir {str(path)!r} is a file, not a folder: choose another out_dir")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        reason = e.strerror or type(e).__name__
        raise ConfigError(
            f"out_dir {str(path)!r} cannot be created ({reason}"
            + (f": {e.filename!r}" if e.filename and str(e.filename) != str(path) else "")
            + "): choose another out_dir"
        ) from e
    if not os.access(path, os.W_OK | os.X_OK):
        raise ConfigError(f"out_dir {str(path)!r} is not writable: choose another out_dir")
    return path


class RunDir:
    """The folder of one training run, owned by this process while ``owned()`` is open."""

    def __init__(self, out_dir: str | os.PathLike, callbacks: Sequence[Callable] = ()):
        self.path = Path(out_dir)
        self.lock = RunLock(self.path)
        self.callbacks = tuple(callbacks)
        self.metrics: MetricsLog | None = None
        self.last_saved: int | None = None

    @contextlib.contextmanager
    def owned(self) -> Iterator[RunDir]:
        """Create the folder, take its lock, and give both back (metrics closed) at the end."""
        ensure_run_dir(self.path)
        with self.lock:
            try:
                yield self
            finally:
                if self.metrics is not None:
                    self.metrics.close()
                    self.metrics = None

    def clean(self) -> None:
        """Repair or delete what a crashed save left (call only while owned)."""
        if not self.lock.held:
            raise RunInUse(f"cleaning {str(self.path)!r} needs its lock")
        remove_stale_temporaries(self.path)

    def resume_source(self, resume: str, flag: str = "resume='auto'") -> Path | None:
        """The checkpoint to resume from, None for a fresh run, or a clear error.

        ``resume``: "never", "auto" or a checkpoint / run folder path; ``flag`` is how the
        command spells "auto" in its error messages.
        """
        if resume == "never":
            if list_checkpoints(self.path):
                raise ConfigError(
                    f"out_dir {str(self.path)!r} already holds checkpoints of an earlier run; "
                    f"use {flag} to continue it, or choose another out_dir"
                )
            return None
        if resume == "auto":
            return latest_checkpoint(self.path)  # None: nothing yet, start fresh
        if not Path(resume).exists():
            raise CheckpointError(
                f"resume={resume!r}: no such checkpoint or run directory; give an "
                "existing path, resume='auto' (continue out_dir if possible) or 'never'"
            )
        try:
            return resolve_checkpoint(resume)
        except CheckpointError as e:
            raise CheckpointError(f"resume={resume!r}: nothing to resume: {e}") from e

    def recorded(self) -> dict[str, Any] | None:
        """The run's config.json (what the last start recorded), or None."""
        return read_json(self.path / RUN_CONFIG_FILE)

    def record(self, config: dict[str, Any]) -> None:
        atomic_write_json(self.path / RUN_CONFIG_FILE, config)

    def open_metrics(self, log: LogConfig | None = None, start_step: int | None = None) -> None:
        """Open metrics.jsonl (and TensorBoard, W&B as ``log`` asks; see ``MetricsLog``)."""
        self.metrics = MetricsLog(
            self.path / METRICS_FILE, log, start_step=start_step, settings=self.recorded()
        )

    def emit(self, record: dict[str, Any]) -> None:
        """Append one event to metrics.jsonl, then hand it to every callback."""
        self.metrics.write(record)
        for callback in self.callbacks:
            callback(record)

    def save(
        self,
        path: Path,
        model,
        step: int,
        tokenizer: Any | None = None,
        train_state: dict[str, Any] | None = None,
        extra_config: dict[str, Any] | None = None,
        keep_last: int | None = None,
        keep_best: bool = False,
        **parts: Any,
    ) -> Path:
        """Write one checkpoint (atomically), rotate the old ones, log a checkpoint event.
        ``parts``: ``save_checkpoint``'s ``weights`` and ``extra_dirs`` (distributed runs)."""
        saved = save_checkpoint(
            path,
            model,
            tokenizer=tokenizer,
            train_state=train_state,
            extra_config=extra_config,
            **parts,
        )
        self.last_saved = step
        if keep_last is not None:
            rotate_checkpoints(self.path, keep_last, 1 if keep_best else None)
        self.emit({"event": "checkpoint", "step": step, "path": str(saved)})
        return saved

    @contextlib.contextmanager
    def stop_signals(self) -> Iterator[StopSignals]:
        with StopSignals() as stop:
            yield stop


def read_json(file: Path) -> dict[str, Any] | None:
    try:
        value = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


# ----------------------------------------------------------------------------- resuming


def resume_mode(resume: bool | str) -> str:
    """The one vocabulary from a command's own: True -> "auto", False -> "never" (PPO's
    ``resume: bool``); strings ("never", "auto", a path) pass through."""
    if isinstance(resume, bool):
        return "auto" if resume else "never"
    return resume


def resume_settings(
    config_type: type,
    recorded: dict[str, Any],
    given: dict[str, Any],
    fixed: Sequence[str] = (),
    keep: dict[str, Any] | None = None,
) -> tuple[Any, dict[str, tuple[Any, Any]]]:
    """A resumed run's settings: the ``recorded`` ones with the ``given`` ones replacing
    them -> (config, {field: (recorded, given)} of what changed).

    ``config_type``: the settings dataclass; ``recorded``: its fields as the run saved
    them (unknown names, from another version, are dropped); ``given``: the fields the
    resume command named; ``fixed``: fields that cannot change mid-run (a different value
    is a ``ConfigError``); ``keep``: values that always win (out_dir, resume itself).
    """
    names = {f.name for f in dataclasses.fields(config_type)}
    base = {k: v for k, v in recorded.items() if k in names}
    base = json.loads(json.dumps(base))  # lists, as a fresh JSON record would give
    for name in fixed:
        if name in given and name in base and not _same(given[name], base[name]):
            raise ConfigError(
                f"{name}={given[name]!r} cannot change mid-run (the run has {name}="
                f"{base[name]!r}): drop it to resume, or start a new run in another out_dir"
            )
    changed = {
        k: (base.get(k), v) for k, v in given.items() if k in names and not _same(v, base.get(k))
    }
    merged = {**base, **given, **(keep or {})}
    return config_type(**merged), changed


def _same(a: Any, b: Any) -> bool:
    return json.loads(json.dumps(a)) == json.loads(json.dumps(b))
