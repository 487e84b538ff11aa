"""Fixtures of the server tests: the tiny chat model, its checkpoint, a running server."""

from __future__ import annotations

import pytest

from lmlab.checkpoint.io import save_checkpoint
from lmlab.data import BPETokenizer
from lmlab.data.chat import ChatTemplate
from lmlab.lm import LM
from servers import CHATML, TEXT, Server, tiny_model


@pytest.fixture(scope="session")
def tokenizer():
    return BPETokenizer.train(TEXT, 300, eos_token="<|im_end|>", special_tokens=["<|im_start|>"])


@pytest.fixture(scope="session")
def lm(tokenizer) -> LM:
    """A float32 tiny Llama with a chat template (context 160 tokens)."""
    model = tiny_model(tokenizer.vocab_size).eval()
    template = ChatTemplate(CHATML, eos_token="<|im_end|>")
    return LM(model, tokenizer, {"loaded_from": "tiny"}, chat_template=template)


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory, lm):
    """The same model saved as an lmlab checkpoint (with its chat template), for
    ``lmlab serve --ckpt``."""
    path = tmp_path_factory.mktemp("serve") / "model"
    save_checkpoint(path, lm.model, tokenizer=lm.tokenizer)
    (path / "chat_template.jinja").write_text(CHATML)
    (path / "tokenizer_config.json").write_text('{"eos_token": "<|im_end|>"}')
    return path


@pytest.fixture(scope="module")
def server(checkpoint):
    """One ``lmlab serve --ckpt`` for a test module, stopped at its end."""
    server = Server(["--ckpt", str(checkpoint), "--dtype", "float32", "--name", "tiny"])
    yield server
    server.stop()
