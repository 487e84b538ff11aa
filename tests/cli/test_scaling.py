"""``lmlab scaling`` from the command line."""

import pytest

from lmlab.cli.main import main


@pytest.mark.slow  # six tiny runs and two fits, about 15 s of CPU
def test_scaling_command_prints_fits_and_saves_them(tmp_path, capsys):
    out = tmp_path / "sweep"
    argv = ["scaling", "--sizes", "1x8,1x16", "--tokens", "512,1k,2k", "--batch_size", "2",
            "--seq_len", "8", "--bootstrap", "2", "--progress", "false", "--out_dir", str(out)]  # fmt: skip
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "| 1x16-2k |" in printed and "L(N, D), N = all parameters" in printed
    assert "held out 1x16-2k: predicted" in printed
    assert (out / "scaling.json").is_file() and (out / "scaling.png").is_file()


@pytest.mark.parametrize(
    "flags, words",
    [
        (["--sizes", "2by48"], "size '2by48' is invalid"),
        (["--tokens", "1M,1M"], "each once"),
    ],
)
def test_bad_flags_are_one_line_errors(tmp_path, capsys, flags, words):
    assert main(["scaling", *flags, "--out_dir", str(tmp_path / "s")]) == 2
    err = capsys.readouterr().err.strip()
    assert words in err and len(err.splitlines()) == 1


def test_an_unknown_preset_names_the_valid_ones(tmp_path, capsys):
    assert main(["scaling", "--preset", "huge", "--out_dir", str(tmp_path / "s")]) == 2
    err = capsys.readouterr().err
    assert "preset" in err and "'sweep', 'lesson'" in err
