import subprocess
import sys

import pytest

from lmlab.cli.main import main, normalise_flags

TINY = '{"d_model": 32, "n_layers": 2, "n_heads": 2, "d_ff": 64, "max_seq_len": 32}'


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    corpus = root / "c.txt"
    corpus.write_text("to be or not to be, that is the question. " * 100)
    code = main(
        [
            "train",
            "--data",
            str(corpus),
            "--model_overrides",
            TINY,
            "--train.out_dir",
            str(root / "run"),
            "--train.max_steps",
            "12",
            "--train.batch-size",
            "4",
            "--train.seq_len",
            "32",
            "--train.progress",
            "false",
        ]
    )
    assert code == 0
    return root / "run"


def test_train_writes_a_run_directory(run_dir, capsys):
    for name in (
        "config.json",
        "metrics.jsonl",
        "loss.png",
        "data/source.json",
        "data/tokenizer.json",
    ):
        assert (run_dir / name).is_file(), name
    assert len(list((run_dir / "checkpoints").iterdir())) == 1


def test_generate_streams_with_dashed_flags(run_dir, capsys):
    code = main(
        [
            "generate",
            "--ckpt",
            str(run_dir),
            "--max-new-tokens",
            "15",
            "--top-p",
            "0.9",
            "--seed",
            "4",
            "to be",
        ]
    )
    out = capsys.readouterr().out
    assert code == 0 and out.startswith("to be") and len(out.rstrip("\n")) == len("to be") + 15
    assert (
        main(
            [
                "generate",
                "--ckpt",
                str(run_dir),
                "--max_new_tokens",
                "15",
                "--top_p",
                "0.9",
                "--seed",
                "4",
                "--no_stream",
                "true",
                "to be",
            ]
        )
        == 0
    )
    assert capsys.readouterr().out == out  # streamed == not streamed, same seed


@pytest.mark.parametrize(
    "args, message",
    [
        (["--top_p", "0"], "top_p"),
        (["--temperature", "-1"], "temperature"),
        (["--num_beams", "0"], "num_beams"),
        (["--max_new_tokens", "0"], "max_new_tokens"),
        ([], "truncate_prompt=True"),
    ],
)
def test_bad_decoding_settings_exit_2_with_one_line(run_dir, capsys, args, message):
    prompt = "to be" if args else "to be or not " * 3  # 39 characters > the context of 32
    code = main(["generate", "--ckpt", str(run_dir), *args, prompt])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("lmlab: error:") and message in err and err.count("\n") == 1
    assert "Traceback" not in err


@pytest.mark.slow
@pytest.mark.parametrize("beams", ["1", "3"])
def test_compiled_generate_prints_the_eager_text_and_a_compile_note(run_dir, capsys, beams):
    from lmlab.generate.compiled import reset

    reset()  # nothing compiled yet in this process
    argv = ["generate", "--ckpt", str(run_dir), "--max_new_tokens", "20", "--num_beams", beams]
    argv += ["--temperature", "0", "to be"]
    assert main(argv) == 0
    eager = capsys.readouterr()
    assert main([*argv[:-1], "--compile", "true", "to be"]) == 0
    compiled = capsys.readouterr()
    assert compiled.out == eager.out
    assert "lmlab: note: compiling (or loading) the decoding step took" in compiled.err
    assert "compiling" not in eager.err


def test_compile_without_a_cpp_compiler_exits_2_with_one_line(run_dir, capsys, monkeypatch):
    monkeypatch.setattr("lmlab.generate.compiled.shutil.which", lambda name: None)
    assert main(["generate", "--ckpt", str(run_dir), "--compile", "true", "to be"]) == 2
    err = capsys.readouterr().err
    assert (
        err.startswith("lmlab: error: compile=True needs a C++ compiler") and err.count("\n") == 1
    )
    assert "Traceback" not in err


@pytest.mark.parametrize("beams", ["1", "3"])
def test_generate_past_the_context_slides_with_one_note(run_dir, capsys, beams):
    args = ["--max_new_tokens", "60", "--num_beams", beams, "--seed", "0", "to be"]
    assert main(["generate", "--ckpt", str(run_dir), *args]) == 0
    out, err = capsys.readouterr()
    assert out.startswith("to be") and len(out.rstrip("\n")) >= len("to be") + 30
    # 5 prompt + 59 fed tokens, of which the model holds 32: 32 dropped out of view.
    assert err.count("\n") == 1 and "context of 32 tokens" in err and "32 oldest" in err


def test_generate_takes_model_as_another_name_for_ckpt(run_dir, capsys):
    argv = ["generate", "--max_new_tokens", "12", "--temperature", "0", "to be"]
    assert main([*argv[:-1], "--ckpt", str(run_dir), "to be"]) == 0
    by_ckpt = capsys.readouterr().out
    assert main([*argv[:-1], "--model", str(run_dir), "to be"]) == 0
    assert capsys.readouterr().out == by_ckpt and len(by_ckpt.rstrip("\n")) == len("to be") + 12


def test_generate_short_of_the_context_prints_no_note(run_dir, capsys):
    assert main(["generate", "--ckpt", str(run_dir), "--max_new_tokens", "20", "to be"]) == 0
    assert capsys.readouterr().err == ""


def test_truncated_prompt_says_how_many_tokens_were_dropped(run_dir, capsys):
    prompt = "to be or not " * 3  # 39 characters
    args = ["--truncate_prompt", "true", "--max_new_tokens", "4", "--temperature", "0"]
    assert main(["generate", "--ckpt", str(run_dir), *args, prompt]) == 0
    out, err = capsys.readouterr()
    assert out.startswith(prompt)
    lines = err.splitlines()
    assert "first 7 tokens were dropped" in lines[0] and "context of 32" in lines[0]
    assert len(lines) == 2 and "3 oldest" in lines[1]  # 32 + 3 fed tokens - 32


def test_generate_and_chat_share_the_librarys_default_max_new_tokens():
    from lmlab.cli.main import build_parser
    from lmlab.generate import SamplingParams

    parser, _ = build_parser()
    generate = parser.parse_args(["generate", "x"]).generate
    chat = parser.parse_args(["chat", "--model", "m"]).chat
    assert generate.max_new_tokens == chat.max_new_tokens == SamplingParams().max_new_tokens


def test_user_errors_exit_2(tmp_path, capsys):
    assert main(["generate", "--ckpt", str(tmp_path / "missing"), "x"]) == 2
    assert "missing" in capsys.readouterr().err
    assert main(["train", "--model", "gpt-tiny", "--train.out_dir", str(tmp_path / "r")]) == 2
    assert "did you mean" in capsys.readouterr().err
    assert (
        main(
            ["train", "--data", str(tmp_path / "none.txt"), "--train.out_dir", str(tmp_path / "r")]
        )
        == 2
    )
    assert "none.txt" in capsys.readouterr().err
    assert not (tmp_path / "r" / "checkpoints").exists()  # nothing was trained
    assert main(["frobnicate"]) == 2


def test_debug_shows_the_traceback(tmp_path, capsys):
    assert main(["--debug", "generate", "--ckpt", str(tmp_path / "missing"), "x"]) == 2
    assert "Traceback" in capsys.readouterr().err


def test_normalise_flags_keeps_values():
    assert normalise_flags(["--top-p=0.9", "--stop", "--a-b", "-x", "a-b"]) == [
        "--top_p=0.9",
        "--stop",
        "--a_b",
        "-x",
        "a-b",
    ]


def test_python_dash_m_and_help():
    out = subprocess.run(
        [sys.executable, "-m", "lmlab", "generate", "--help"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "--top_p" in out and "Nucleus sampling" in out  # field docs reach --help


def test_side_by_side_columns_and_narrow_fallback():
    from lmlab.cli.demo import side_by_side

    out = side_by_side({"greedy": "ab\ncd", "beam": "xyz long line here"}, width=60)
    lines = out.splitlines()
    assert lines[0].startswith("greedy") and "beam" in lines[0]
    assert lines[2].startswith("ab") and "xyz long line here" in lines[2]
    assert lines[3].startswith("cd")
    assert all(len(line) <= 60 for line in lines)
    narrow = side_by_side({"greedy": "ab", "beam": "xy"}, width=40)
    assert narrow == "--- greedy\nab\n\n--- beam\nxy"


def test_a_named_command_builds_its_parser_alone_and_a_typo_lists_them_all(capsys):
    from lmlab.cli.main import COMMANDS, build_parser

    _, runners = build_parser("tokenize")
    assert list(runners) == ["tokenize"]
    assert main(["tokenze"]) == 2
    err = capsys.readouterr().err
    assert "invalid choice: 'tokenze'" in err and all(f"'{name}'" in err for name in COMMANDS)
    assert main(["--debug", "tokenize", "--bogus", "1"]) == 2
    assert "unrecognized arguments: --bogus 1" in capsys.readouterr().err
