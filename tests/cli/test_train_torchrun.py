"""``torchrun --nproc_per_node 2 -m lmlab train``: two CPU processes (gloo, 127.0.0.1)
train one run; rank 0 alone reports and writes the run's files."""

import os
import subprocess
import sys

import pytest

from distributed_runs import free_port
from lmlab.checkpoint.io import checkpoint_dir, latest_checkpoint
from lmlab.train.distributed import DCP_DIR
from lmlab.train.metrics import read_metrics

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

TINY = '{"d_model": 16, "n_layers": 2, "n_heads": 2, "d_ff": 32, "max_seq_len": 16}'


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_torchrun_trains_one_run_on_two_processes(tmp_path, parallel):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("to be or not to be, that is the question. " * 40)
    out = tmp_path / "run"
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        str(free_port()),
        "-m",
        "lmlab",
        "train",
        "--data",
        str(corpus),
        "--model_overrides",
        TINY,
        "--train.out_dir",
        str(out),
        "--train.parallel",
        parallel,
        "--train.grad_checkpoint",
        "true",
        "--train.batch_size",
        "2",
        "--train.seq_len",
        "16",
        "--train.grad_accum",
        "2",
        "--train.max_steps",
        "4",
        "--train.log_interval",
        "1",
        "--train.warmup_steps",
        "1",
        "--train.device",
        "cpu",
        "--train.progress",
        "false",
    ]
    env = {"GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        command,
        capture_output=True,
        text=True,
        timeout=240,
        env={**os.environ, **env},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("trained 4 steps") == 1  # rank 0 reports, once
    steps = [e["step"] for e in read_metrics(out / "metrics.jsonl") if e["event"] == "train"]
    assert steps == [1, 2, 3, 4]  # one writer: no line twice
    ckpt = latest_checkpoint(out)
    assert ckpt == checkpoint_dir(out, 4) and (ckpt / DCP_DIR).is_dir()
    assert not (out / "run.lock").exists()
