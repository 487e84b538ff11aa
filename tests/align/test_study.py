"""``lmlab align`` (``lmlab.align.study``): pairs from the model's own samples, a reward
model and DPO, and a report that is what the saved models measure."""

import json

import pytest
import torch

import lmlab
from lmlab.align.pairs import reference_pairs
from lmlab.align.reward import load_reward_model, reward_accuracy
from lmlab.align.study import PreferenceConfig
from lmlab.checkpoint.io import save_checkpoint
from lmlab.cli.main import main
from lmlab.data import BPETokenizer
from lmlab.data.preferences import load_preferences
from lmlab.data.tasks import generate_splits, generate_tasks
from lmlab.errors import ConfigError
from lmlab.finetune.run import task_accuracy
from lmlab.models import build_model, get_preset


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A tiny untrained decoder with a BPE tokenizer that covers the arithmetic rows."""
    root = tmp_path_factory.mktemp("study")
    rows = generate_tasks(["arithmetic"], 200, seed=5)
    text = "\n".join(f"{r['instruction']} {r['input']} {r['output']}" for r in rows)
    tok = BPETokenizer.train(text + " ### Instruction: Response: 0123456789", 300)
    torch.manual_seed(0)
    spec = get_preset("gpt-char-tiny") | {"vocab_size": tok.vocab_size, "n_layers": 1}
    model = build_model(spec | {"d_model": 32, "n_heads": 2, "d_ff": 64})
    save_checkpoint(root / "base", model.eval(), tokenizer=tok)
    return root / "base"


SIZES = dict(n_prompts=8, n_val=4, n_test=6, k=2, steps=6, batch_size=2, eval_every=3)


@pytest.mark.slow  # three short training runs and their evaluations: twice: about 30 s of CPU
def test_lmlab_align_reports_what_its_saved_models_measure(base, tmp_path, capsys):
    argv = ["align", "--model", str(base), "--out", str(tmp_path), "--progress", "false"]
    argv += [f"--{k}={v}" for k, v in SIZES.items()] + ["--max_new_tokens", "4", "--lr", "0.01"]
    assert main(argv) == 0
    report = json.loads((tmp_path / "preferences.json").read_text())
    printed = capsys.readouterr().out
    assert "test accuracy after DPO" in printed and "preferences.png" in printed
    assert (tmp_path / "preferences.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    prompts, val_rows, test_rows = generate_splits("arithmetic", 8, 4, 6, seed=0)
    pairs = load_preferences(tmp_path / "data" / "pairs.jsonl")
    val = load_preferences(tmp_path / "data" / "val_pairs.jsonl")
    # An untrained model is never right k times out of k: every prompt gives one pair,
    # and no test question is among them.
    assert len(pairs) == report["pairs"]["train"]["pairs"] == 8 and len(val) == 4
    tests = {f"{r['instruction']}\n\n{r['input']}" for r in test_rows}
    assert not tests & {p.prompt for p in pairs + val}
    assert all(p.chosen != p.rejected for p in pairs)

    rm = load_reward_model(tmp_path / "reward" / "model")
    assert report["reward"]["val_accuracy"] == pytest.approx(reward_accuracy(rm, val))
    near = reference_pairs(test_rows, seed=0)
    assert report["reward"]["near_miss_accuracy"] == pytest.approx(reward_accuracy(rm, near))

    tuned = lmlab.load(tmp_path / "dpo" / "model", dtype="float32")
    assert report["dpo"]["accuracy_after"] == task_accuracy(tuned, test_rows, 4)[0]
    records = [json.loads(x) for x in (tmp_path / "dpo" / "metrics.jsonl").read_text().splitlines()]
    trains = [r for r in records if r.get("event") == "train"]
    assert trains[-1]["margin"] > trains[0]["margin"]  # DPO widened the margin it trains on
    assert report["dpo"]["val"]["val_kl"] > 0  # and moved away from the reference
    # Seeded throughout: run again into the same folder, the same report (the runs of the
    # first are replaced, not resumed).
    assert main(argv) == 0
    assert json.loads((tmp_path / "preferences.json").read_text()) == report


@pytest.mark.parametrize(
    "change, message",
    [
        ({"task": "sums"}, "arithmetic"),
        ({"methods": "dpo,ppo"}, "methods='dpo,ppo' is invalid"),
        ({"methods": "dpo,dpo"}, "at most once"),
        ({"k": 1}, "k=1 is invalid"),
        ({"n_prompts": 0}, "n_prompts=0 is invalid"),
        ({"beta": 0.0}, "beta=0.0 is invalid"),
    ],
)
def test_preference_config_names_what_is_wrong(change, message):
    with pytest.raises(ConfigError, match=message):
        PreferenceConfig(**change)
