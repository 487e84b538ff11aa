"""``lmlab serve``'s command line: its mistakes are one line and status 2; ``--check``
loads the model and answers one request in-process. The server itself (a real process on
a free port, SIGTERM, the API key) is tested in ``tests/serve/test_server.py``."""

import pytest

from lmlab.cli.main import main


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    import torch

    from lmlab.checkpoint.io import save_checkpoint
    from lmlab.data import BPETokenizer
    from lmlab.models import build_model

    tok = BPETokenizer.train("hello there, how are you? " * 20, 280, eos_token="<|endoftext|>")
    torch.manual_seed(0)
    spec = {"family": "transformer", "vocab_size": tok.vocab_size, "d_model": 32}
    spec |= {"n_layers": 1, "n_heads": 2, "d_ff": 64, "max_seq_len": 64}
    path = tmp_path_factory.mktemp("serve") / "model"
    save_checkpoint(path, build_model(spec).eval(), tokenizer=tok)
    return path


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        ([], "one of --model or --ckpt"),
        (["--model", "a", "--ckpt", "b"], "one of --model or --ckpt"),
        (["--model", "no/such/model", "--port", "0"], "no model at 'no/such/model'"),
        (["--model", "x", "--port", "70000"], "--port 70000 is invalid"),
        (["--model", "x", "--max_batch", "0"], "--max_batch 0 is invalid"),
    ],
)
def test_mistakes_are_one_line_and_status_2(argv, message, capsys):
    assert main(["serve", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("lmlab: error:") and message in err and "\n" not in err


def test_a_port_in_use_is_a_clear_error(ckpt, capsys):
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        assert main(["serve", "--ckpt", str(ckpt), "--port", str(port)]) == 2
    assert f"cannot listen on 127.0.0.1:{port}" in capsys.readouterr().err


def test_check_answers_one_completion_and_exits(ckpt, capsys):
    assert main(["serve", "--ckpt", str(ckpt), "--dtype", "float32", "--check", "true"]) == 0
    assert capsys.readouterr().out.startswith("lmlab: check: 'Hello' -> ")


def test_host_defaults_to_loopback(capsys):
    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    help_text = capsys.readouterr().out
    assert "--host HOST" in help_text and "127.0.0.1" in help_text
