"""The run folder (reliability item 28 and SIGTERM): one writer, stale locks, stop signals.

Two tests start a real second process (``python -m lmlab train`` on a bigram model, a few
seconds each); it trains "forever" until the test sends it SIGTERM.
"""

import dataclasses
import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from builders import start_lmlab
from lmlab.checkpoint.io import checkpoint_dir, list_checkpoints
from lmlab.cli.main import main
from lmlab.errors import ConfigError
from lmlab.train import TrainConfig, train
from lmlab.train.metrics import read_metrics
from lmlab.train.run import (
    LOCK_FILE,
    RunDir,
    RunInUse,
    RunLock,
    StopSignals,
    ensure_run_dir,
    resume_mode,
    resume_settings,
)

DATA = (np.arange(1200) % 15).astype(np.uint16)
FLAGS = [
    "--model",
    "bigram-char",
    "--train.batch_size",
    "2",
    "--train.seq_len",
    "8",
    "--train.log_interval",
    "1",
    "--train.eval_interval",
    "100000",
    "--train.ckpt_interval",
    "100000",
    "--train.warmup_steps",
    "2",
    "--train.progress",
    "false",
    "--train.precision",
    "fp32",
]


def settings(tmp_path, **overrides) -> TrainConfig:
    base = dict(
        out_dir=str(tmp_path / "run"),
        max_steps=4,
        batch_size=4,
        seq_len=8,
        warmup_steps=1,
        eval_interval=100,
        ckpt_interval=2,
        log_interval=1,
        precision="fp32",
        progress=False,
        seed=0,
    )
    return TrainConfig(**{**base, **overrides})


@pytest.fixture
def corpus(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text("to be or not to be, that is the question. " * 40)
    return path


def start_training(corpus, out_dir) -> subprocess.Popen:
    """`lmlab train` in another process, stopped by the test; waits until it has trained."""
    args = ["--data", str(corpus), "--train.out_dir", str(out_dir), "--train.max_steps"]
    return start_lmlab(["train", *args, "100000000", *FLAGS], out_dir, "train")


def stop(proc: subprocess.Popen) -> tuple[int, str]:
    proc.send_signal(signal.SIGTERM)
    try:
        _, err = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise
    return proc.returncode, err


@pytest.mark.slow  # four real processes, about 10 s
def test_a_second_writer_is_refused_naming_the_owner(corpus, tmp_path):
    """Two real processes: while one trains, another run (fresh or resuming) into the same
    folder gets one line naming the owner, and its start-up cleanup touches nothing."""
    out = tmp_path / "run"
    owner = start_training(corpus, out)
    try:
        saving = checkpoint_dir(out, 7).parent / ".step-00000007.tmp-12345678"
        saving.mkdir(parents=True)  # what a save in progress looks like
        config_before = (out / "config.json").read_text()
        config = settings(tmp_path, resume="auto")
        with pytest.raises(RunInUse, match=f"pid {owner.pid} on host {socket.gethostname()}"):
            train_in_process(config)
        assert saving.is_dir()  # cleanup did not run
        assert (out / "config.json").read_text() == config_before
        # The CLI: one line, exit 2, for a fresh run and for a resume.
        for extra in ([], ["--train.resume", "auto"]):
            proc = subprocess.run(
                [sys.executable, "-m", "lmlab", "train", "--data", str(corpus)]
                + ["--train.out_dir", str(out), *FLAGS, *extra],
                capture_output=True,
                text=True,
                timeout=120,
            )
            assert proc.returncode == 2, proc.stderr
            assert proc.stderr.count("\n") == 1 and f"pid {owner.pid}" in proc.stderr
        assert owner.poll() is None  # the owner trains on
    finally:
        code, err = stop(owner)
    assert code == 128 + signal.SIGTERM, err


def train_in_process(config):
    from lmlab.models import build_model

    return train(build_model({"family": "bigram", "vocab_size": 16}), DATA, None, config)


def test_sigterm_saves_a_checkpoint_and_the_run_resumes(corpus, tmp_path, capsys):
    out = tmp_path / "run"
    proc = start_training(corpus, out)
    time.sleep(0.5)
    code, err = stop(proc)
    assert code == 128 + signal.SIGTERM, err
    assert "Traceback" not in err and "terminated" in err
    events = read_metrics(out / "metrics.jsonl")
    trained = [e["step"] for e in events if e["event"] == "train"]
    [stopped] = [e["step"] for e in events if e["event"] == "checkpoint"]
    # the step logged last, or the next one when the signal came after its update
    assert stopped in (trained[-1], trained[-1] + 1)
    assert [p.name for p in list_checkpoints(out)] == [checkpoint_dir(out, stopped).name]
    assert not (out / LOCK_FILE).exists()  # the lock went with the process
    args = ["train", "--data", str(corpus), "--train.out_dir", str(out), *FLAGS]
    code = main([*args, "--train.resume", "auto", "--train.max_steps", str(stopped + 2)])
    assert code == 0, capsys.readouterr().err
    resumed = [e for e in read_metrics(out / "metrics.jsonl") if e["event"] == "resume"]
    assert [e["step"] for e in resumed] == [stopped]
    assert list_checkpoints(out)[-1] == checkpoint_dir(out, stopped + 2)


def dead_pid() -> int:
    proc = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        check=True,
        capture_output=True,
        text=True,
    )
    return int(proc.stdout)


def write_lock(folder, **owner):
    folder.mkdir(parents=True, exist_ok=True)
    record = {"pid": dead_pid(), "host": socket.gethostname(), "since": "2026-01-01 00:00:00"}
    (folder / LOCK_FILE).write_text(json.dumps({**record, **owner}))


def test_a_stale_lock_of_a_dead_process_is_taken_over_with_a_warning(tmp_path, caplog):
    config = settings(tmp_path)
    write_lock(tmp_path / "run")
    with caplog.at_level("WARNING", logger="lmlab.train.run"):
        result = train_in_process(config)
    assert result.step == 4
    assert "taking over the lock" in caplog.text and "no longer running" in caplog.text
    assert not (tmp_path / "run" / LOCK_FILE).exists()


def test_a_lock_from_another_host_is_refused_with_the_way_out(tmp_path):
    write_lock(tmp_path / "run", host="elsewhere", pid=1)
    with pytest.raises(RunInUse, match="pid 1 on host elsewhere.*delete .*run.lock"):
        train_in_process(settings(tmp_path))


def test_a_live_owner_on_this_host_is_refused(tmp_path):
    write_lock(tmp_path / "run", pid=os.getppid())  # the parent process: alive
    with pytest.raises(RunInUse, match=f"in use by another process \\(pid {os.getppid()}"):
        train_in_process(settings(tmp_path))
    assert list_checkpoints(tmp_path / "run") == []


def test_the_lock_is_released_after_a_crash_and_taken_again_by_the_same_process(tmp_path):
    config = settings(tmp_path)

    def crash(event):
        if event["event"] == "train" and event["step"] == 3:
            raise RuntimeError("crash")

    from lmlab.models import build_model

    model = build_model({"family": "bigram", "vocab_size": 16})
    with pytest.raises(RuntimeError, match="crash"):
        train(model, DATA, None, config, callbacks=[crash])
    assert not (tmp_path / "run" / LOCK_FILE).exists()
    # api.train holds the lock while it prepares the data; the trainer takes it again.
    with RunLock(tmp_path / "run") as outer:
        train_in_process(TrainConfig(**{**vars(config), "resume": "auto"}))
        assert json.loads((tmp_path / "run" / LOCK_FILE).read_text())["token"] == outer.token
    assert not (tmp_path / "run" / LOCK_FILE).exists()


def test_cleanup_needs_the_lock(tmp_path):
    with pytest.raises(RunInUse, match="needs its lock"):
        RunDir(tmp_path / "run").clean()


def test_a_signal_inside_the_update_waits_for_its_end():
    seen = []
    with StopSignals() as stop, pytest.raises(KeyboardInterrupt):
        with stop.deferred():
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.05)  # the handler runs here and must not raise
            seen.append("updated")
    assert seen == ["updated"]
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL


def test_resume_settings_keep_the_record_and_replace_only_what_is_given():
    recorded = {
        **dataclasses.asdict(TrainConfig(out_dir="a", batch_size=8, max_steps=20, lr=0.01)),
        "a_field_of_another_version": 1,
    }
    config, changed = resume_settings(
        TrainConfig, recorded, {"max_steps": 40}, fixed=("seed",), keep={"resume": "auto"}
    )
    assert (config.batch_size, config.max_steps, config.lr) == (8, 40, 0.01)
    assert config.resume == "auto" and config.betas == (0.9, 0.95)
    assert changed == {"max_steps": (20, 40)}
    with pytest.raises(ConfigError, match="seed=5 cannot change mid-run \\(the run has seed=1337"):
        resume_settings(TrainConfig, recorded, {"seed": 5}, fixed=("seed",))
    same = resume_settings(TrainConfig, recorded, {"seed": 1337, "betas": [0.9, 0.95]}, ("seed",))
    assert same[1] == {}  # naming the recorded value is no change


def test_ensure_run_dir_says_why_a_path_cannot_be_a_run_folder(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match="is a file"):
        ensure_run_dir(tmp_path / "file")
    with pytest.raises(ConfigError, match="cannot be created"):
        ensure_run_dir(tmp_path / "file" / "run")
    assert ensure_run_dir(tmp_path / "a" / "b").is_dir()


def test_resume_mode_maps_a_commands_bool_to_the_one_vocabulary(tmp_path):
    assert [resume_mode(r) for r in (True, False, "auto", "never")] == ["auto", "never"] * 2
    run = RunDir(tmp_path / "run")
    assert run.resume_source(resume_mode(True)) is None  # auto with nothing yet: fresh
