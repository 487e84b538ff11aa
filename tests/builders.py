"""Small lmlab models and run helpers shared by several test files (import:
``from builders import ...``)."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from lmlab.data import BPETokenizer
from lmlab.data.chat import ChatTemplate
from lmlab.lm import LM
from lmlab.models import build_model, get_preset
from lmlab.train.metrics import read_metrics


def tiny_llama(seed=0):
    """A 2-layer llama-small over 64 tokens, randomly initialised from ``seed``, eval mode."""
    torch.manual_seed(seed)
    spec = {**get_preset("llama-small"), "vocab_size": 64, "n_layers": 2}
    return build_model(spec).eval()


def logits(model, seed=1):
    """The float32 logits [2, 16, 64] of ``model`` on random ids drawn from ``seed``."""
    ids = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model(ids).float()


def start_lmlab(argv, out_dir, event):
    """``lmlab *argv`` in another process, left running for the test to stop; returns once
    the run has logged its first ``event`` ("train", "ppo") in out_dir/metrics.jsonl."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "lmlab", *argv],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 120
    while not any(e["event"] == event for e in read_metrics(out_dir / "metrics.jsonl")):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"lmlab {argv[0]} did not start: {proc.communicate()}")
        time.sleep(0.1)
    return proc


def tensorboard_scalars(log_dir) -> dict[str, list[tuple[int, float]]]:
    """Every scalar of the event files under ``log_dir``, read back with TensorBoard's own
    reader: {tag: [(step, value), ...]}."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(log_dir))
    events.Reload()
    return {
        tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]
    }


def send_json(handler, reply, status=200):
    """Answer a request of a fake HTTP server (a ``BaseHTTPRequestHandler``) with JSON."""
    data = json.dumps(reply).encode()
    handler.send_response(status)
    handler.send_header("Content-Length", str(len(data)))
    handler.end_headers()
    handler.wfile.write(data)


# ChatML as SmolLM2 writes it, without the default system prompt.
CHATML = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + "
    "message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def tiny_chat_lm(seed=0, sharpen=1.0, text="", max_seq_len=256):
    """A 1-layer random GPT with a BPE tokenizer trained on ChatML turns (plus ``text``)
    whose specials are ChatML's, and the ChatML template: an ``LM`` that chats.
    ``sharpen`` scales the final norm's weight, so the logits spread wider and the
    next-token distribution is peaked like a trained model's rather than near uniform."""
    turns = [
        "<|im_start|>user\nhello there<|im_end|>",
        "<|im_start|>assistant\nhello, how can I help?<|im_end|>",
        "<|im_start|>system\nyou are a helpful assistant<|im_end|>",
    ]
    tokenizer = BPETokenizer.train(
        "\n".join(turns * 5) + text, 300, eos_token="<|im_end|>", special_tokens=["<|im_start|>"]
    )
    torch.manual_seed(seed)
    spec = {"family": "transformer", "vocab_size": tokenizer.vocab_size, "d_model": 32}
    spec |= {"n_layers": 1, "n_heads": 2, "d_ff": 64, "max_seq_len": max_seq_len}
    model = build_model(spec).eval()
    with torch.no_grad():
        model.norm.weight.mul_(sharpen)
    return LM(model, tokenizer, chat_template=ChatTemplate(CHATML, eos_token="<|im_end|>"))


# Run before a memory test's script: ``reset_peak()`` maps in every page of the files the
# process has mapped so far (torch's libraries: about 0.5 GB of code, of which a process
# touches what its CPU's kernels need), then restarts the peak counter and returns the
# resident set. What the peak then adds is the process's own memory (and any file it maps
# afterwards), not which library pages a load happens to run through: that part grew by
# 12 MiB here for SmolLM2's 4-bit load and decoding, and by more on CI's machine.
_PEAK_PRELUDE = """
import ctypes

def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) * 1024

def reset_peak():
    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    for line in open("/proc/self/maps"):
        fields = line.split()
        if len(fields) < 6 or not fields[5].startswith("/") or "r" not in fields[1]:
            continue
        start, end = (int(a, 16) for a in fields[0].split("-"))
        libc.madvise(start, end - start, 22)  # MADV_POPULATE_READ (Linux 5.14+; older ones refuse)
    open("/proc/self/clear_refs", "w").write("5")  # the peak counter restarts here
    return status("VmRSS")
"""


def load_peak_in_subprocess(script: str, compilers: bool = False) -> dict:
    """Run ``script`` in a fresh Python (this checkout's src first, no PATH) and return the
    JSON object its last line prints; skips where Linux's /proc peak counters are missing.
    The memory tests use it to read a load's peak (``VmHWM``) apart from pytest's own: the
    script may call ``status(key)`` (a /proc/self/status line, bytes) and ``reset_peak()``
    (above), defined before it runs. ``compilers`` keeps PATH (and HOME), so that lmlab's
    native kernels build or load from their cache as in a user's process."""
    if not Path("/proc/self/clear_refs").exists():
        pytest.skip("peak memory is read from Linux's /proc/self/status")
    src = str(Path(__file__).resolve().parents[1] / "src")
    env = {"PYTHONPATH": src, "PATH": ""}
    if compilers:
        env.update({k: os.environ[k] for k in ("PATH", "HOME") if k in os.environ})
    run = subprocess.run(
        [sys.executable, "-c", _PEAK_PRELUDE + script],
        capture_output=True,
        text=True,
        check=True,
        env=env,
        timeout=600,
    )
    return json.loads(run.stdout.strip().splitlines()[-1])


def assert_rows_and_threads_agree(layer, x):
    """``layer(x)`` row by row equals it on the whole batch ``x`` [M, K], and on 1 thread
    equals it on the default count: a kernel's numbers depend on neither (decoding one
    token and reading a prompt agree bit for bit)."""
    batch = layer(x)
    for i in range(x.shape[0]):
        assert torch.equal(layer(x[i : i + 1]), batch[i : i + 1]), f"row {i}"
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert torch.equal(layer(x), batch), "1 thread"
    finally:
        torch.set_num_threads(threads)
