"""``report`` and ``lmlab report`` on two tiny models (a random transformer and an n-gram)."""

import json
import string

import pytest
import torch

from lmlab.checkpoint.io import checkpoint_dir, save_checkpoint
from lmlab.cli.main import main
from lmlab.data.tokenizers import CharTokenizer
from lmlab.errors import ConfigError
from lmlab.eval.report import model_memory, report
from lmlab.models import build_model
from lmlab.models.ngram import NGramConfig, NGramLM

PNG = b"\x89PNG\r\n\x1a\n"
TASKS = "world-facts,minimal-pairs,perplexity"


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval_report")
    tok = CharTokenizer(string.printable)
    torch.manual_seed(0)
    spec = {
        "family": "transformer",
        "vocab_size": tok.vocab_size,
        "d_model": 16,
        "n_layers": 1,
        "n_heads": 2,
        "d_ff": 32,
        "max_seq_len": 128,
    }
    save_checkpoint(checkpoint_dir(root / "gpt", 10), build_model(spec).eval(), tok)
    text = "The cat sat on the mat. What is 2 + 3? 5. The dogs are asleep.\n" * 10
    ngram = NGramLM(NGramConfig(vocab_size=tok.vocab_size, order=3)).fit(tok.encode(text))
    save_checkpoint(root / "ngram", ngram, tok)
    return root


@pytest.fixture(scope="module")
def result(models):
    return report(
        [str(models / "gpt"), str(models / "ngram")],
        tasks=TASKS,
        out_dir=str(models / "reports"),
        limit=3,
        dtype="float32",
        decode_tokens=8,
    )


def test_report_writes_each_model_and_the_comparison(models, result):
    out = models / "reports"
    assert [m.name for m in result.models] == ["gpt", "ngram"]  # the run folder's name
    for name in ("gpt", "ngram"):
        folder = out / name
        for file in ("report.md", "report.html", "results.json", "calibration_world-facts.png"):
            assert (folder / file).is_file(), file
        assert (folder / "calibration_world-facts.png").read_bytes().startswith(PNG)
        md = (folder / "report.md").read_text()
        for section in ("## Tasks", "## Robustness", "## Calibration", "## Efficiency"):
            assert section in md
        page = (folder / "report.html").read_text()
        assert page.startswith("<!DOCTYPE html>") and "data:image/png;base64," in page
        saved = json.loads((folder / "results.json").read_text())
        assert [r["task"] for r in saved["runs"]] == TASKS.split(",")
        assert saved["robustness"]["task"] == "world-facts"
        assert set(saved["robustness"]["scores"]) >= {"none", "lowercase", "typos"}
        assert saved["efficiency"]["decode"]["tokens"] == 8
    assert (out / "comparison.png").read_bytes().startswith(PNG)
    assert (out / "comparison.md").read_text().count(result.table) == 1
    assert "data:image/png;base64," in (out / "comparison.html").read_text()


def test_comparison_table_has_one_column_per_model(result):
    lines = result.table.splitlines()
    assert lines[0] == "| task | metric | gpt | ngram |"
    assert all(line.count(" | ") == 3 for line in lines if not line.startswith("|---"))
    tasks = [line.split(" | ")[0].lstrip("| ") for line in lines[2:]]
    assert tasks[:3] == TASKS.split(",") and "robustness" in tasks and "efficiency" in tasks
    ppl = next(line for line in lines if line.startswith("| perplexity"))
    values = [float(v) for v in ppl.strip("| ").split(" | ")[2:]]
    runs = [next(r for r in m.runs if r.task == "perplexity") for m in result.models]
    assert values == [pytest.approx(r.value, abs=1e-4) for r in runs]


def test_efficiency_counts_every_parameter(models, result):
    import lmlab

    lm = lmlab.load(models / "gpt", dtype="float32")
    n = sum(p.numel() for p in lm.model.parameters())
    eff = result.models[0].efficiency
    assert eff["parameters"] == n and eff["parameter_bytes"] == 4 * n
    assert eff["decode"]["tokens_per_s"] > 0 and eff["peak_rss_bytes"] > 0
    ngram = result.models[1].efficiency  # count tables are buffers, not parameters
    assert ngram["parameters"] == 0 and ngram["buffer_bytes"] > 0
    assert model_memory(lm.model)["buffer_bytes"] == eff["buffer_bytes"]


def test_report_rejects_bad_settings(models, tmp_path):
    gpt = str(models / "gpt")
    with pytest.raises(ConfigError, match="repeat a name"):
        report([gpt, gpt], tasks="perplexity", out_dir=str(tmp_path))
    with pytest.raises(ConfigError, match="must be a multiple-choice task"):
        report([gpt], tasks="perplexity", robustness_task="bias-pairs", out_dir=str(tmp_path))
    with pytest.raises(ConfigError, match="did you mean 'perplexity'"):
        report([gpt], tasks="perplexty", out_dir=str(tmp_path))
    assert not any(tmp_path.iterdir())  # nothing written before the settings are checked


def test_cli_report_prints_the_comparison(models, tmp_path, capsys):
    code = main(
        ["report", "--models", f"{models / 'gpt'},{models / 'ngram'}", "--names", "a,b",
         "--tasks", "sentiment", "--limit", "2", "--robustness_task", "null",
         "--decode_tokens", "4", "--dtype", "float32", "--out_dir", str(tmp_path)]
    )  # fmt: skip
    printed = capsys.readouterr().out
    assert code == 0
    assert "| task | metric | a | b |" in printed and "| sentiment |" in printed
    assert f"comparison: {tmp_path / 'comparison.md'}" in printed
    assert (tmp_path / "a" / "report.md").is_file() and (tmp_path / "b" / "report.html").is_file()


@pytest.mark.parametrize("method", ["int8", "int4", "nf4"])
def test_a_quantized_model_counts_its_weights_not_its_float_tensors(method):
    """Quantized layers keep their weights in buffers; the parameter count is the same as
    the float model's (a quantized SmolLM2 counted 28 M of its 134.5 M before)."""
    from builders import tiny_llama
    from lmlab.quant import quantize_model

    model = tiny_llama()
    n = sum(p.numel() for p in model.parameters())
    quantized = quantize_model(tiny_llama(), method, dtype=torch.bfloat16)
    assert sum(p.numel() for p in quantized.parameters()) < n  # the weights moved to buffers
    assert model_memory(quantized)["parameters"] == n


def test_weight_bytes_count_a_4bit_layer_in_its_stored_form():
    """weight_bytes is the model's stored size (model_size_bytes), so a 4-bit model's
    packed weights show up where buffer_bytes misses them."""
    from builders import tiny_llama
    from lmlab.quant import model_size_bytes, quantize_model

    model = quantize_model(tiny_llama(), "int4", dtype=torch.bfloat16, group_size=32)
    memory = model_memory(model)
    assert memory["weight_bytes"] == model_size_bytes(model) > 0
    assert memory["weight_bytes"] < model_size_bytes(tiny_llama()) / 2
