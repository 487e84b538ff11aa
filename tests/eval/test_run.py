"""``run_task``, ``evaluate`` and ``lmlab eval`` on tiny random models saved to tmp_path."""

import json
import string

import pytest
import torch

from lmlab.api import LM
from lmlab.checkpoint.io import checkpoint_dir, save_checkpoint
from lmlab.cli.main import main
from lmlab.data import load_corpus, split_text
from lmlab.data.tokenizers import CharTokenizer
from lmlab.errors import ConfigError, DataError, DataNotFoundError
from lmlab.eval.calibration import calibration
from lmlab.eval.choice import evaluate_choice
from lmlab.eval.perplexity import surprisal
from lmlab.eval.run import (
    PERPLEXITY_CHARS,
    TaskRun,
    detect_kind,
    evaluate,
    run_task,
    runs_table,
    short_name,
)
from lmlab.eval.tasks import load_task
from lmlab.models import build_model

NO_DIGITS = string.ascii_letters + " .,;:?!'\"-()\n"


def tiny(vocab_size: int, seed: int = 0):
    torch.manual_seed(seed)
    spec = {
        "family": "transformer",
        "vocab_size": vocab_size,
        "d_model": 16,
        "n_layers": 1,
        "n_heads": 2,
        "d_ff": 32,
        "max_seq_len": 128,
    }
    return build_model(spec).eval()


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A model that encodes every printable character, and one without digits."""
    root = tmp_path_factory.mktemp("eval_run")
    full, digitless = CharTokenizer(string.printable), CharTokenizer(NO_DIGITS)
    save_checkpoint(root / "full", tiny(full.vocab_size), tokenizer=full)
    save_checkpoint(root / "digitless", tiny(digitless.vocab_size), tokenizer=digitless)
    return root


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_task_kind_is_detected_from_names_and_files(tmp_path):
    assert detect_kind("world-facts") == "choice"
    assert detect_kind("minimal-pairs-prefix") == "minimal_pairs"
    assert detect_kind("uppercase_mini") == "generation"
    assert detect_kind("perplexity") == "perplexity"
    choice = write_jsonl(tmp_path / "c.jsonl", [{"query": "q", "choices": ["a", "b"], "gold": 0}])
    gen = write_jsonl(tmp_path / "g.jsonl", [{"prompt": "p", "reference": "r"}])
    gens = write_jsonl(tmp_path / "gs.jsonl", [{"prompt": "p", "references": ["r", "s"]}])
    pairs = write_jsonl(tmp_path / "m.jsonl", [{"sentence_good": "a", "sentence_bad": "b"}])
    (tmp_path / "bias.csv").write_text("sent_more,sent_less,stereo_antistereo,bias_type\n")
    (tmp_path / "mmlu.csv").write_text("What?,a,b,c,d,A\n")
    (tmp_path / "glue.tsv").write_text("sentence\tlabel\ngood\t1\n")
    assert detect_kind(choice) == "choice"
    assert detect_kind(gen) == detect_kind(gens) == "generation"
    assert detect_kind(pairs) == "minimal_pairs"
    assert detect_kind(tmp_path / "bias.csv") == "bias_pairs"
    assert detect_kind(tmp_path / "mmlu.csv") == "choice"
    assert detect_kind(tmp_path / "glue.tsv") == "choice"
    other = write_jsonl(tmp_path / "o.jsonl", [{"text": "x"}])
    with pytest.raises(DataError, match=r"o\.jsonl:1: cannot tell the task's layout"):
        detect_kind(other)
    (tmp_path / "t.txt").write_text("x")
    with pytest.raises(DataError, match="suffix '.txt'"):
        detect_kind(tmp_path / "t.txt")


def test_unknown_task_names_the_closest_valid_one(tmp_path):
    with pytest.raises(ConfigError, match=r"'world-fact' is unknown \(did you mean 'world-facts'"):
        detect_kind("world-fact")
    with pytest.raises(ConfigError, match="minimal-pairs, minimal-pairs-prefix"):
        detect_kind("nonsense")
    with pytest.raises(DataNotFoundError, match="does not exist"):
        detect_kind(str(tmp_path / "missing.jsonl"))


def test_unencodable_task_is_an_error_row_and_the_others_still_run(models, tmp_path):
    digits = write_jsonl(
        tmp_path / "digits.jsonl",
        [
            {"query": f"{a}+{a}=", "choices": [str(2 * a), str(2 * a + 1)], "gold": 0}
            for a in (1, 2)
        ],
    )
    runs = evaluate(
        str(models / "digitless"), f"{digits},world-facts,minimal-pairs", dtype="float32"
    )
    assert [r.task for r in runs] == [digits, "world-facts", "minimal-pairs"]
    bad, facts, pairs = runs
    assert bad.kind == "choice" and bad.value is None and bad.scores == {}
    assert "encodes none of its 2 items" in bad.error
    assert bad.value_text().startswith("n/a (task 'digits'")
    # world-facts: the arithmetic items are skipped, the others scored
    assert facts.error is None and facts.value is not None
    assert facts.skipped and all(s.split(":")[0].startswith("wf-") for s in facts.skipped)
    assert facts.n + len(facts.skipped) == len(load_task("world-facts").items)
    assert pairs.error is None and pairs.n == 48 and pairs.value is not None
    table = runs_table(runs)
    assert "n/a (task 'digits'" in table and "minimal-pairs" in table
    assert runs_table(runs, markdown=True).count("\n") == 1 + len(runs)


def test_evaluate_scores_match_the_modules_and_the_json_round_trips(models, tmp_path):
    out = tmp_path / "results.json"
    runs = evaluate(
        str(models / "full"), "world-facts,bias-pairs,perplexity", limit=4, out=str(out),
        dtype="float32",
    )  # fmt: skip
    data = json.loads(out.read_text())
    assert data["model"] == str(models / "full") and data["name"] == "full"
    assert data["settings"]["limit"] == 4 and data["lmlab_version"]
    assert [TaskRun.from_dict(d) for d in data["runs"]] == runs
    # the same numbers as the evaluation modules called directly
    import lmlab

    lm = lmlab.load(models / "full", dtype="float32")
    direct = evaluate_choice(lm, load_task("world-facts"), limit=4, progress=False)
    facts, bias, ppl = runs
    assert facts.value == direct.scores()["acc"] and facts.metric == "acc"
    assert facts.scores["ece"] == pytest.approx(calibration(direct).ece, abs=1e-12)
    assert facts.details["calibration"]["n"] == 4 and len(facts.details["items"]) == 4
    assert bias.metric == "pct_stereotype" and bias.n == 4
    text = split_text(load_corpus("tinyshakespeare"), 0.1)[1][:PERPLEXITY_CHARS]
    assert ppl.value == pytest.approx(surprisal(lm, text).bits_per_byte, rel=1e-9)
    assert ppl.n == PERPLEXITY_CHARS - 1  # one token per character, the first is context


def test_generation_file_takes_its_first_rows_as_demonstrations(tmp_path):
    tok = CharTokenizer(string.printable)
    lm = LM(tiny(tok.vocab_size), tok)
    rows = [{"prompt": f"Say {w}:", "reference": w} for w in ("yes", "no", "ok")]
    run = run_task(lm, write_jsonl(tmp_path / "g.jsonl", rows), num_fewshot=1, progress=False)
    assert run.kind == "generation" and run.n == 2 and run.metric == "exact_match"
    assert [e["references"] for e in run.details["examples"]] == [["no"], ["ok"]]
    assert run.details["settings"]["n_shots"] == 1
    with pytest.raises(ConfigError, match="num_fewshot=3 is invalid"):
        run_task(lm, str(tmp_path / "g.jsonl"), num_fewshot=3)


def test_short_name_is_the_run_folder(tmp_path):
    step = checkpoint_dir(tmp_path / "myrun", 100)
    step.mkdir(parents=True)
    assert short_name(step) == "myrun"
    assert short_name(tmp_path / "myrun") == "myrun"
    assert short_name("smollm2") == "smollm2"


def test_cli_eval_prints_the_table_and_a_bad_task_exits_2(models, tmp_path, capsys):
    out = tmp_path / "r.json"
    code = main(
        ["eval", "--model", str(models / "full"), "--task", "sentiment,minimal-pairs-prefix",
         "--limit", "2", "--dtype", "float32", "--out", str(out)]
    )  # fmt: skip
    printed = capsys.readouterr().out
    assert code == 0
    assert "task" in printed and "metric" in printed and "sentiment" in printed
    assert "minimal-pairs-prefix  accuracy" in printed
    assert f"saved: {out}" in printed and out.is_file()
    code = main(["eval", "--model", str(models / "full"), "--task", "sentimnt"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and "did you mean 'sentiment'" in err
