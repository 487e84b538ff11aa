"""Weight formats compared (``lmlab.eval.quantization``) and ``lmlab quantize --compare``."""

import json

import pytest
import torch

from lmlab.checkpoint.io import save_checkpoint
from lmlab.cli.main import main
from lmlab.data import CharTokenizer, load_corpus
from lmlab.errors import ConfigError
from lmlab.eval.quantization import check_formats, compare_formats, held_out_ids
from lmlab.generate.likelihood import perplexity
from lmlab.models import build_model, get_preset


@pytest.fixture(scope="module")
def model_and_tokenizer():
    tok = CharTokenizer.train(load_corpus("tinyshakespeare"))
    torch.manual_seed(0)
    spec = {**get_preset("gpt-char-tiny"), "vocab_size": tok.vocab_size, "d_model": 64}
    model = build_model({**spec, "n_layers": 2, "n_heads": 2, "d_ff": 128, "max_seq_len": 32})
    with torch.no_grad():  # weights of a trained model's size, not the init's 0.02
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.2)
    return model.eval(), tok


def test_formats_shrink_the_model_and_the_errors_grow_as_bits_fall(model_and_tokenizer):
    model, tok = model_and_tokenizer
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = compare_formats(model, tok, "fp32,bf16,int8,int4,nf4", tokens=200)
    rows = {r["format"]: r for r in result["rows"]}
    assert result["tokens"] == 200 and len(result["layers"]) == 2 * 6  # q k v o up down
    # fp32 is the model itself: no error, the same perplexity
    assert rows["fp32"]["weight_error"] == [0.0] * 12
    ids = held_out_ids(tok, 200)
    assert rows["fp32"]["perplexity"] == pytest.approx(perplexity(model, ids), rel=1e-6)
    # bits per weight: 32 > 16 > 8 + 32/K > 4 + 32/32 (int4: bf16 scale and zero) > ~4.13
    sizes = [rows[f]["size_bytes"] for f in ("fp32", "int8", "int4", "nf4")]
    assert sizes == sorted(sizes, reverse=True) and len(set(sizes)) == 4
    assert rows["bf16"]["size_bytes"] * 2 == rows["fp32"]["size_bytes"]
    errors = [rows[f]["mean_weight_error"] for f in ("bf16", "int8", "int4")]
    assert errors == sorted(errors) and errors[0] > 0
    assert rows["nf4"]["mean_weight_error"] > rows["int8"]["mean_weight_error"]
    # the model compared is left as it was
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_int8_weight_error_is_absmax_rounding_by_hand(model_and_tokenizer):
    model, tok = model_and_tokenizer
    result = compare_formats(model, tok, ["int8"], tokens=50)
    for name, error in zip(result["layers"], result["rows"][0]["weight_error"]):
        w = model.get_submodule(name).weight.detach()
        scale = w.abs().amax(dim=1, keepdim=True) / 127  # one scale per output row
        by_hand = (torch.round(w / scale) * scale - w).norm() / w.norm()
        assert error == pytest.approx(float(by_hand), rel=1e-5), name


def test_bad_formats_and_tokens_are_one_line_errors(model_and_tokenizer):
    model, tok = model_and_tokenizer
    with pytest.raises(ConfigError, match="'nf3'.*valid: fp32, bf16, int8, int4, nf4"):
        check_formats("fp32,nf3")
    with pytest.raises(ConfigError, match="no weight format"):
        check_formats(" , ")
    with pytest.raises(ConfigError, match="too few"):
        compare_formats(model, tok, ["fp32"], tokens=1)


def test_cli_compare_writes_figures_and_json(model_and_tokenizer, tmp_path, capsys):
    model, tok = model_and_tokenizer
    ckpt = str(save_checkpoint(tmp_path / "ckpt", model, tokenizer=tok))
    out = tmp_path / "quant"
    argv = ["quantize", "--model", ckpt, "--compare", "fp32,int4,nf4", "--out", str(out)]
    assert main(argv + ["--tokens", "64", "--progress", "false"]) == 0
    report = json.loads((out / "quant.json").read_text())
    assert [r["format"] for r in report["rows"]] == ["fp32", "int4", "nf4"]
    assert report["grid_layer"] == "blocks.0.attn.q_proj"
    assert (out / "quant.png").stat().st_size > 10_000 and (out / "grid.png").is_file()
    assert "nf4" in capsys.readouterr().out
    assert main(argv + ["--layer", "blocks.0.attn.q_prog", "--progress", "false"]) == 2
    assert "blocks.0.attn.q_proj" in capsys.readouterr().err
    assert main(["quantize", "--model", ckpt, "--out", str(out)]) == 2  # neither flag
