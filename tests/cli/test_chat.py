"""``lmlab chat`` on a tiny checkpoint.

``lmlab.load`` does not read chat templates from checkpoints yet, so the tests that need
one patch ``lmlab.api.load`` to attach a ChatML template to what it loads.
"""

import dataclasses
import io

import pytest
import torch

from lmlab import api
from lmlab.checkpoint.io import save_checkpoint
from lmlab.cli.main import main
from lmlab.data import BPETokenizer
from lmlab.data.chat import ChatTemplate
from lmlab.generate.chat import ChatSession
from lmlab.models import build_model

CHATML = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + "
    "message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
TEXT = "<|im_start|>user\nhello there<|im_end|>\n<|im_start|>assistant\nhi, how can I help?\n" * 5
DECODING = {"max_new_tokens": 5, "seed": 0, "temperature": 1.0}
FLAGS = ["--max-new-tokens", "5", "--seed", "0", "--temperature", "1.0", "--dtype", "float32"]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    tok = BPETokenizer.train(TEXT, 300, eos_token="<|im_end|>", special_tokens=["<|im_start|>"])
    torch.manual_seed(0)
    model = build_model(
        {
            "family": "transformer",
            "vocab_size": tok.vocab_size,
            "d_model": 32,
            "n_layers": 1,
            "n_heads": 2,
            "d_ff": 64,
            "max_seq_len": 128,
        }
    )
    return save_checkpoint(tmp_path_factory.mktemp("chat") / "ckpt", model, tokenizer=tok)


@pytest.fixture
def with_template(monkeypatch):
    real = api.load

    def load(path, dtype=None):
        lm = real(path, dtype=dtype)
        return dataclasses.replace(lm, chat_template=ChatTemplate(CHATML, eos_token="<|im_end|>"))

    monkeypatch.setattr(api, "load", load)


class FakeTerminal(io.StringIO):
    def isatty(self):
        return True


def replies(ckpt, *messages, system=None):
    chat = ChatSession(api.load(ckpt, dtype="float32"), system=system, params=DECODING)
    return [chat.ask(m) for m in messages]


def test_one_shot_prints_the_reply(ckpt, with_template, capsys):
    code = main(["chat", "--model", str(ckpt), "--message", "hello", "--system", "sys", *FLAGS])
    out = capsys.readouterr().out
    assert code == 0
    assert out == replies(ckpt, "hello", system="sys")[0] + "\n"


def test_repeated_message_is_a_multi_turn_conversation(ckpt, with_template, capsys):
    argv = ["chat", "--model", str(ckpt), "--message", "hello", "--message", "more", *FLAGS]
    assert main(argv) == 0
    first, second = replies(ckpt, "hello", "more")
    assert capsys.readouterr().out == f"{first}\n{second}\n"


def test_piped_stdin_is_one_message(ckpt, with_template, capsys, monkeypatch):
    monkeypatch.setattr("sys.stdin", io.StringIO("hello\nworld\n"))
    assert main(["chat", "--model", str(ckpt), *FLAGS]) == 0
    assert capsys.readouterr().out == replies(ckpt, "hello\nworld\n")[0] + "\n"


def test_interactive_reset_and_exit(ckpt, with_template, capsys, monkeypatch):
    lines = "hello\n/reset\nhello\n\n/bogus\n/exit\nnever read\n"
    monkeypatch.setattr("sys.stdin", FakeTerminal(lines))
    assert main(["chat", "--model", str(ckpt), *FLAGS]) == 0
    captured = capsys.readouterr()
    reply = replies(ckpt, "hello")[0]
    # After /reset the conversation starts over, so the seeded reply repeats exactly.
    assert captured.out == f"> {reply}\n> > {reply}\n> > > "
    assert "(conversation cleared)" in captured.err
    assert "unknown command /bogus; valid: /reset, /exit" in captured.err


def test_interactive_keeps_history_until_eof(ckpt, with_template, capsys, monkeypatch):
    monkeypatch.setattr("sys.stdin", FakeTerminal("hello\nmore\n"))
    assert main(["chat", "--model", str(ckpt), *FLAGS]) == 0
    first, second = replies(ckpt, "hello", "more")
    assert capsys.readouterr().out == f"> {first}\n> {second}\n> \n"


def test_interactive_error_is_reported_and_the_chat_goes_on(
    ckpt, with_template, capsys, monkeypatch
):
    monkeypatch.setattr("sys.stdin", FakeTerminal("hello " * 100 + "\nhello\n"))
    assert main(["chat", "--model", str(ckpt), *FLAGS]) == 0
    captured = capsys.readouterr()
    assert "lmlab: error: the conversation is" in captured.err
    assert captured.out == f"> > {replies(ckpt, 'hello')[0]}\n> \n"


def test_model_without_template_exits_2_with_one_line(ckpt, capsys):
    code = main(["chat", "--model", str(ckpt), "--message", "hello"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and "has no chat template" in err and "smollm2" in err


def test_bad_decoding_flag_exits_2(ckpt, with_template, capsys):
    code = main(["chat", "--model", str(ckpt), "--message", "hi", "--top-p", "2"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "top_p=2" in err


def test_model_is_required(capsys):
    assert main(["chat", "--message", "hi"]) == 2
    assert "model" in capsys.readouterr().err
