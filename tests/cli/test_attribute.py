"""``lmlab attribute`` on a tiny checkpoint: it writes the PNG, HTML and JSON it promises,
and its numbers are those of the Python API."""

import json

import pytest
import torch

from lmlab import api
from lmlab.checkpoint.io import save_checkpoint
from lmlab.cli.main import main
from lmlab.data import CharTokenizer
from lmlab.interp.attribution import attribute_prompt, integrated_gradients, next_token_score
from lmlab.models import build_model, get_preset

TEXT = "the cat sat on the mat. the dog sat on the <log>."


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    tok = CharTokenizer.train(TEXT)
    torch.manual_seed(0)
    spec = {**get_preset("gpt-char-tiny"), "vocab_size": tok.vocab_size}
    model = build_model({**spec, "d_model": 32, "n_layers": 1, "n_heads": 2, "d_ff": 64})
    return save_checkpoint(tmp_path_factory.mktemp("attr") / "ckpt", model, tokenizer=tok)


def test_attribute_writes_figures_and_numbers(ckpt, tmp_path, capsys):
    out = tmp_path / "out"
    argv = ["attribute", "--model", str(ckpt), "--prompt", "the cat <s", "--target", "a"]
    assert main(argv + ["--steps", "8", "--out", str(out)]) == 0
    assert "wrote" in capsys.readouterr().out
    data = json.loads((out / "attribution.json").read_text())
    assert set(data["methods"]) == {"ig", "saliency", "gxi", "occlusion"}
    assert data["tokens"] == list("the cat <s") and data["target"] == "a"
    assert (out / "attribution.png").read_bytes()[:4] == b"\x89PNG"
    assert "&lt;" in (out / "attribution.html").read_text()
    # the same numbers as the API gives
    lm = api.load(str(ckpt), dtype="float32")
    ids = torch.tensor(lm.tokenizer.encode("the cat <s"))
    ig = integrated_gradients(lm.model, ids, next_token_score(data["target_id"]), steps=8)
    assert data["methods"]["ig"]["values"] == pytest.approx(ig.values.tolist(), abs=1e-6)


def test_default_target_is_the_most_likely_token(ckpt):
    lm = api.load(str(ckpt), dtype="float32")
    result = attribute_prompt(lm, "the d", methods="saliency,occlusion")
    with torch.no_grad():
        best = int(lm.model(torch.tensor([lm.tokenizer.encode("the d")]))[0, -1].argmax())
    assert result.target_id == best and set(result.results) == {"saliency", "occlusion"}


def test_mistakes_exit_with_status_2(ckpt, tmp_path, capsys):
    base = ["attribute", "--model", str(ckpt), "--prompt", "the", "--out", str(tmp_path)]
    assert main(base + ["--target", "at"]) == 2
    assert "2 tokens" in capsys.readouterr().err
    assert main(base + ["--method", "lime"]) == 2
    assert "lime" in capsys.readouterr().err
