"""FLAN-style phrasings (``lmlab.data.tasks.rephrase``) and the single-task against mixture
study (``lmlab.finetune.mixture``, ``lmlab mixture``)."""

import json

import pytest
import torch

from lmlab.checkpoint.io import save_checkpoint
from lmlab.cli.main import main
from lmlab.data import BPETokenizer
from lmlab.data.tasks import (
    N_PHRASINGS,
    PHRASINGS,
    TASKS,
    check,
    generate_tasks,
    read_phrasing,
    rephrase,
)
from lmlab.errors import ConfigError, DataError
from lmlab.finetune.mixture import MixtureConfig, measure, study_data, table
from lmlab.models import build_model, get_preset


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_rephrase_keeps_the_row_and_changes_only_the_wording(seed):
    rows = generate_tasks(list(TASKS), 60, seed=seed)
    for row in rows:
        assert rephrase(row, 0) == row  # phrasing 0 is the generator's own
        wordings = set()
        for k in range(N_PHRASINGS):
            new = rephrase(row, k)
            assert {key: v for key, v in new.items() if key != "instruction"} == {
                key: v for key, v in row.items() if key != "instruction"
            }
            wordings.add(new["instruction"])
            # the values the instruction carries survive (the answer stays right)
            assert check(row["task"], row["output"], new["output"])
            for number in [t for t in row["instruction"].replace("?", " ").split() if t.isdigit()]:
                assert number in new["instruction"]
            if row["task"] == "count_letter":
                letter = row["instruction"].split("'")[1]
                assert f"'{letter}'" in new["instruction"]
        assert len(wordings) == N_PHRASINGS


def test_every_task_kind_has_the_same_number_of_phrasings():
    assert all(len(p) == N_PHRASINGS for p in PHRASINGS.values())
    assert {k.split(":")[0] for k in PHRASINGS} == set(TASKS)


def test_rephrase_refuses_rows_it_cannot_read():
    row = generate_tasks(["arithmetic"], 1, seed=0)[0]
    with pytest.raises(DataError, match="none of its phrasings"):
        rephrase({**row, "instruction": "Add these up."}, 1)
    with pytest.raises(DataError, match="phrasings exist for"):
        rephrase({"instruction": "x", "output": "y"}, 1)
    for bad in (N_PHRASINGS, -1, True, 1.0):
        with pytest.raises(ConfigError, match="phrasing"):
            rephrase(row, bad)


def phrasing_0(row):
    """The generator's own instruction for a rephrased row."""
    kind, _, fields = read_phrasing(row)
    return PHRASINGS[kind][0].format(**fields)


@pytest.mark.parametrize("held_out,single", [("format", "arithmetic"), ("reverse", "count_letter")])
def test_study_data_keeps_test_prompts_out_of_training(held_out, single):
    config = MixtureConfig(single=single, held_out=held_out, n_train=50, n_test=12, seed=3)
    data = study_data(config)
    assert len(data["single"]) == len(data["mixture"]) == 50
    assert {r["task"] for r in data["single"]} == {single}
    assert {r["task"] for r in data["mixture"]} == set(TASKS) - {held_out}
    counts = [sum(r["task"] == t for r in data["mixture"]) for t in TASKS if t != held_out]
    assert max(counts) - min(counts) <= 1  # an even share
    phrasings = [read_phrasing(r)[1] for r in data["mixture"]]
    assert set(phrasings) == set(range(N_PHRASINGS - 1))  # the last one is never trained
    assert all(read_phrasing(r)[1] == 0 for r in data["single"])
    trained = {
        (r["task"], r["input"], r["output"], phrasing_0(r))
        for run in ("single", "mixture")
        for r in data[run]
    }
    for task in TASKS:
        test = data[f"test:{task}"]
        assert len(test) == 12 and {r["task"] for r in test} == {task}
        assert not trained & {(r["task"], r["input"], r["output"], r["instruction"]) for r in test}


def test_config_errors_name_what_is_valid():
    with pytest.raises(ConfigError, match="valid tasks: arithmetic"):
        MixtureConfig(single="sums")
    with pytest.raises(ConfigError, match="also held_out"):
        MixtureConfig(single="format", held_out="format")
    with pytest.raises(ConfigError, match="steps=0"):
        MixtureConfig(steps=0)
    with pytest.raises(ConfigError, match="method="):
        MixtureConfig(method="magic")


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    root = tmp_path_factory.mktemp("mix")
    rows = generate_tasks(list(TASKS), 200, seed=0)
    rows = [rephrase(r, k) for r in rows for k in range(N_PHRASINGS)]
    text = "\n".join(f"{r['instruction']} {r['input']} {r['output']}" for r in rows)
    tok = BPETokenizer.train(text + " ### Instruction: Response:", 500)
    torch.manual_seed(0)
    model = build_model({**get_preset("gpt-char-tiny"), "vocab_size": tok.vocab_size})
    save_checkpoint(root / "base", model.eval(), tokenizer=tok)
    return root / "base"


def test_lmlab_mixture_end_to_end(tiny_model, tmp_path, capsys):
    out = tmp_path / "mix"
    args = ["mixture", "--model", str(tiny_model), "--n_train", "24", "--n_test", "4"]
    args += ["--steps", "4", "--batch_size", "4", "--max_new_tokens", "4", "--out", str(out)]
    main([*args, "--general_chars", "200", "--held_out", "reverse"])
    printed = capsys.readouterr().out
    report = json.loads((out / "mixture.json").read_text())
    assert (out / "mixture.png").stat().st_size > 0
    assert list(report["models"]) == ["base", "single", "mixture"]
    assert report["trained"]["mixture"] == ["arithmetic", "count_letter", "format"]
    for result in report["models"].values():
        assert set(result["accuracy"]) == set(TASKS)
        assert all(0 <= a[h] <= 1 for a in result["accuracy"].values() for h in a)
        assert result["perplexity"] > 1
    for run in ("single", "mixture"):  # each run trained only LoRA's weights and was saved
        assert 0 < report["models"][run]["trainable"] < 200_000
        assert (out / run / "model").is_dir()
        rows = [json.loads(line) for line in (out / "data" / f"{run}.jsonl").open()]
        assert len(rows) == 24
    # the tuned models are not the base: training moved their perplexity
    assert report["models"]["base"]["perplexity"] != report["models"]["single"]["perplexity"]
    assert "| single |" in printed and "(held out)" in printed
    assert table(report).count("*") == 1 + 3  # one task for single, three for the mixture


def test_measure_grades_each_task_in_both_wordings(tiny_model, monkeypatch):
    """A model that answers right exactly when asked in the generator's wording scores 1 in
    the seen column and 0 in the unseen one, task by task."""
    import lmlab

    config = MixtureConfig(n_train=12, n_test=5, seed=4)
    data = study_data(config)
    lm = lmlab.load(str(tiny_model))
    answers = {}
    for task in TASKS:
        for row in data[f"test:{task}"]:
            answers[row["instruction"] + "\n\n" + row["input"]] = row["output"]
            answers[row["instruction"]] = row["output"]

    def generate(prompts, **_):
        out = []
        for prompt in prompts:
            hits = [asked for asked in answers if asked in prompt]
            out.append(answers[max(hits, key=len)] if hits else "no idea")
        return out

    monkeypatch.setattr(lm, "generate", generate)
    monkeypatch.setattr(lm, "perplexity", lambda text: float(len(text)))
    result = measure(lm, data, config, "abc", "fake", progress=False)
    assert result["perplexity"] == 3.0
    for task in TASKS:
        assert result["accuracy"][task] == {"seen": 1.0, "unseen": 0.0}
