"""``lmlab align`` on the command line: its flags, and mistakes as one line before any model
loads (the run itself: tests/align/test_study.py)."""

import contextlib
import io

import pytest

from lmlab.cli.main import main


def test_lmlab_align_help_lists_its_settings():
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
        main(["align", "--help"])
    for flag in ("--methods", "--n_prompts", "--k", "--beta", "--lr", "--reward_lr", "--out"):
        assert flag in out.getvalue()


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--methods", "ppo"], "methods='ppo' is invalid"),
        (["--task", "sums"], "task"),
        (["--k", "1"], "k=1 is invalid"),
        (["--steps", "0"], "steps=0 is invalid"),
    ],
)
def test_lmlab_align_mistake_is_one_line_before_loading(flags, message, capsys):
    assert main(["align", "--model", "no/such/model", *flags]) != 0
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err
