"""Builders for the server tests (``tests/serve``): a tiny chat model (random Llama, BPE
tokenizer with ChatML's specials) and ``lmlab serve`` in a subprocess on a free loopback
port. The fixtures that use them are in ``tests/serve/conftest.py``."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time

import httpx
import pytest
import torch

from lmlab.models import build_model, get_preset

# ChatML as SmolLM2 writes it, without the default system prompt.
CHATML = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + "
    "message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
TEXT = (
    "the quick brown fox jumps over the lazy dog. "
    * 20
    + "<|im_start|>user\nhello there<|im_end|>\n<|im_start|>assistant\nhello, how can I help?"
    "<|im_end|>\n" * 10
)
PROMPTS = [
    "the quick",
    "hello there, how",
    "the lazy dog jumps over the quick brown fox and then",
    "h",
    "fox",
    "brown dog, lazy fox: the",
    "over and over",
    "a",
]


def tiny_model(vocab_size: int, max_seq_len: int = 160, seed: int = 0, **spec):
    torch.manual_seed(seed)
    small = {"n_layers": 2, "d_model": 64, "n_heads": 4, "d_ff": 128, "max_seq_len": max_seq_len}
    return build_model({**get_preset("llama-small"), "vocab_size": vocab_size, **small, **spec})


class Server:
    """``lmlab serve`` in a subprocess; ``url`` is its base (http://127.0.0.1:PORT)."""

    def __init__(self, argv: list[str], env: dict[str, str] | None = None, timeout: float = 120):
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "lmlab", "serve", "--port", "0", *argv],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, **(env or {})},
        )
        deadline = time.monotonic() + timeout
        line = self.proc.stderr.readline()  # "lmlab: serving 'x' at http://127.0.0.1:PORT/v1"
        match = re.search(r"at (http://[^ ]+)/v1", line)
        if not match:
            self.stop()
            pytest.fail(f"lmlab serve did not start: {line}{self.proc.communicate()}")
        self.url = match.group(1)
        while True:  # the socket listens already; wait until the app answers
            try:
                if httpx.get(f"{self.url}/health", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                pytest.fail(f"lmlab serve did not answer: {self.proc.communicate()}")
            time.sleep(0.1)

    def health(self) -> dict:
        return httpx.get(f"{self.url}/health", timeout=10).json()

    def stop(self, timeout: float = 60) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait(10)
