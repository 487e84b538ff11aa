import json
import math

import pytest
import torch

import lmlab
from hf_models import tiny_llama as tiny_hf_llama
from lmlab.api import export_hf, load, model_spec_from, prepare_data, train
from lmlab.cli.main import main
from lmlab.errors import ConfigError, DataNotFoundError, DecodingError
from lmlab.models import build_model, get_preset
from lmlab.quant import quantize_model
from lmlab.train import TrainConfig

TINY = {"d_model": 32, "n_layers": 2, "n_heads": 2, "d_ff": 64, "max_seq_len": 32}


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("api")
    corpus = root / "corpus.txt"
    corpus.write_text("the quick brown fox jumps over the lazy dog. " * 200)
    config = TrainConfig(
        out_dir=str(root / "run"),
        max_steps=30,
        batch_size=8,
        seq_len=32,
        warmup_steps=5,
        eval_interval=15,
        progress=False,
    )
    result = train("gpt-char-tiny", str(corpus), "char", model_overrides=TINY, config=config)
    assert result.step == 30
    return root / "run"


def test_train_then_load_generates_and_scores(run_dir):
    lm = lmlab.load(run_dir)
    assert lm.tokenizer.kind == "char" and lm.model.config.d_model == 32
    text = lm.generate("the quick", max_new_tokens=12, temperature=0)
    assert isinstance(text, str) and len(text) == 12  # char tokenizer: one char per token
    assert lm.generate("the quick", max_new_tokens=12, temperature=0) == text
    pieces = list(lm.stream("the quick", max_new_tokens=12, temperature=0.8, seed=3))
    assert "".join(pieces) == lm.generate("the quick", max_new_tokens=12, temperature=0.8, seed=3)
    ppl = lm.perplexity("the quick brown fox jumps over the lazy dog. " * 3)
    assert 1.0 < ppl < lm.tokenizer.vocab_size  # trained: better than uniform over the vocab


def test_load_dtypes(run_dir):
    exact = load(run_dir)
    assert next(exact.model.parameters()).dtype == torch.float32
    bf16 = load(run_dir, dtype="bfloat16")
    assert next(bf16.model.parameters()).dtype == torch.bfloat16
    with pytest.raises(ConfigError, match="dtype='fp8'"):
        load(run_dir, dtype="fp8")


def test_resumed_run_reuses_its_data_and_refuses_other_data(run_dir):
    data = json.loads((run_dir / "data" / "source.json").read_text())["data"]
    tok, train_ids, val_ids = prepare_data(data, run_dir)  # found, not rebuilt
    assert tok.vocab_size == load(run_dir).tokenizer.vocab_size
    assert len(train_ids) > len(val_ids) > 0
    with pytest.raises(ConfigError, match="prepared from"):
        prepare_data(data + ".other", run_dir)
    with pytest.raises(ConfigError, match="prepared from"):
        prepare_data(data, run_dir, tokenizer="byte")


def test_bad_requests_are_clear_errors(run_dir, tmp_path):
    lm = load(run_dir)
    with pytest.raises(DecodingError, match="top_p"):
        lm.generate("the", top_p=0.0)
    with pytest.raises(DecodingError, match="did you mean 'temperature'"):
        lm.generate("the", temprature=0.5)
    with pytest.raises(DecodingError, match="context"):
        lm.generate("the " * 20, max_new_tokens=10)
    with pytest.raises(DataNotFoundError, match="no model at .*nothing-here.*smollm2"):
        load(tmp_path / "nothing-here")
    with pytest.raises(ConfigError, match="did you mean 'gpt-char-tiny'"):
        model_spec_from("gpt-char-tine")


def test_model_spec_file(tmp_path):
    f = tmp_path / "m.yaml"
    f.write_text("family: transformer\nvocab_size: 10\nd_model: 16\nn_heads: 2\n")
    assert model_spec_from(str(f), {"n_layers": 1}) == {
        "family": "transformer",
        "vocab_size": 10,
        "d_model": 16,
        "n_heads": 2,
        "n_layers": 1,
    }


def test_perplexity_matches_exp_of_mean_training_loss_definition(run_dir):
    lm = load(run_dir)
    ids = lm.tokenizer.encode("the lazy dog jumps")  # shorter than the 32-token context
    logits = lm.model(torch.tensor([ids[:-1]]))[0]
    expected = torch.nn.functional.cross_entropy(logits, torch.tensor(ids[1:]))
    assert lm.perplexity("the lazy dog jumps") == pytest.approx(math.exp(expected.item()), rel=1e-5)


def test_ngram_is_fitted_saved_and_loaded(tmp_path):
    corpus = tmp_path / "c.txt"
    corpus.write_text("the cat sat on the mat. the dog sat on the log. " * 50)
    config = TrainConfig(out_dir=str(tmp_path / "ng"), seq_len=32, progress=False)
    result = train("ngram-char", str(corpus), "char", config=config)
    assert result.step == 0 and math.isfinite(result.val_losses[0][1])
    lm = load(tmp_path / "ng")  # count tables of data-dependent size load back
    assert lm.model.config.order == 5
    text = "the dog sat on the mat."
    assert lm.perplexity(text) < 3.0  # a 5-gram on this repetitive text is nearly certain
    assert lm.generate("the c", max_new_tokens=10, temperature=0) == "at sat on "
    with pytest.raises(ConfigError, match="already holds a fitted model"):
        train("ngram-char", str(corpus), "char", config=config)


def test_load_takes_a_hugging_face_folder(tmp_path):
    """An exported model comes back through lmlab.load with its tokenizer and decodes."""
    from lmlab.checkpoint.hf import save_hf
    from lmlab.data.tokenizers import BPETokenizer

    torch.manual_seed(0)
    tok = BPETokenizer.train("to be or not to be, that is the question " * 20, 300)
    model = build_model({**get_preset("llama-small"), "vocab_size": 300, "n_layers": 1})
    save_hf(model.eval(), tmp_path / "hf", tok)
    lm = load(tmp_path / "hf")
    assert lm.config["format"] == "hf" and lm.chat_template is None
    ids = tok.encode("to be")
    with torch.no_grad():
        torch.testing.assert_close(lm.model(torch.tensor([ids])), model(torch.tensor([ids])))
    text = lm.generate("to be", max_new_tokens=5, temperature=0)
    assert text == lm.generate("to be", max_new_tokens=5, temperature=0)


def test_load_minilm_embeds_sentences_and_refuses_to_generate():
    lm = load("minilm")
    e = lm.embed(["A cat sits on the mat.", "A kitten rests on a rug.", "Stocks fell today."])
    assert e.shape == (3, 384)
    torch.testing.assert_close(e.norm(dim=1), torch.ones(3))  # normalised
    assert e[0] @ e[1] > 0.5 > e[0] @ e[2]  # paraphrases are close, unrelated text is not
    with pytest.raises(ConfigError, match="is an encoder .*use it for embeddings"):
        lm.generate("hello")


def test_export_cli_writes_a_folder_transformers_loads(tmp_path, capsys):
    import transformers

    from lmlab.checkpoint.io import save_checkpoint
    from lmlab.cli.main import main
    from lmlab.data.tokenizers import BPETokenizer

    torch.manual_seed(0)
    tok = BPETokenizer.train("to be or not to be, that is the question " * 20, 300)
    model = build_model({**get_preset("gpt-char-tiny"), "vocab_size": 300, "n_layers": 1})
    save_checkpoint(tmp_path / "ckpt", model.eval(), tok)
    assert main(["export", "--model", str(tmp_path / "ckpt"), "--out", str(tmp_path / "hf")]) == 0
    assert "wrote" in capsys.readouterr().out
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    ids = torch.tensor([tok.encode("to be or not")])
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, model(ids), atol=1e-5, rtol=1e-5)


def _bare_hf_folder(tmp_path, vocab_size=300):
    """A random Llama-layout HF folder with weights and config.json but no tokenizer."""
    from lmlab.checkpoint.hf import save_hf

    torch.manual_seed(0)
    model = build_model({**get_preset("llama-small"), "vocab_size": vocab_size, "n_layers": 1})
    return save_hf(model.eval(), tmp_path / "bare"), model


def test_a_folder_without_tokenizer_loads_for_token_ids_and_text_needs_one(tmp_path):
    folder, model = _bare_hf_folder(tmp_path)
    lm = load(folder)
    assert lm.tokenizer is None
    ids = torch.tensor([[1, 2, 3]])
    with torch.no_grad():
        torch.testing.assert_close(lm.model(ids), model(ids))
    for call in (lambda: lm.generate("to be"), lambda: lm.perplexity("to be")):
        with pytest.raises(ConfigError, match="works on text, but model .* has no tokenizer") as e:
            call()
        assert str(folder) in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(ConfigError, match="has no tokenizer"):
        lm.stream("to be")


def test_a_folder_with_gpt2_vocab_and_merges_or_sentencepiece_generates(tmp_path):
    import io

    import sentencepiece

    from lmlab.data.tokenizers import BPETokenizer

    text = "to be or not to be, that is the question " * 20
    folder, _ = _bare_hf_folder(tmp_path)
    BPETokenizer.train(text, 300).tokenizer.model.save(str(folder))  # vocab.json, merges.txt
    lm = load(folder)
    assert lm.tokenizer.kind == "bpe" and lm.tokenizer.eos_token == "<|endoftext|>"
    assert isinstance(lm.generate("to be", max_new_tokens=3, temperature=0), str)
    folder, _ = _bare_hf_folder(tmp_path / "spm", vocab_size=20)
    spm = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(text.split(", ")), model_writer=spm, vocab_size=20, minloglevel=2
    )
    (folder / "tokenizer.model").write_bytes(spm.getvalue())
    lm = load(folder)
    assert lm.tokenizer.kind == "sentencepiece" and lm.tokenizer.vocab_size == 20
    assert isinstance(lm.generate("to be", max_new_tokens=3, temperature=0), str)
    out, notes = export_hf(folder, tmp_path / "exported")  # the tokenizer travels along
    assert notes == [] and (out / "tokenizer.model").is_file()
    assert load(out).tokenizer.encode("to be or not") == lm.tokenizer.encode("to be or not")


@pytest.mark.parametrize("fmt", ["int8", "int4", "nf4"])
def test_quantize_writes_a_checkpoint_every_command_loads(run_dir, tmp_path, fmt, capsys):
    """``lmlab quantize`` on an lmlab run: ``lmlab.load`` reads the folder back with the
    logits of the quantized model in memory, exactly (the same stored tensors through
    the same layers), and ``lmlab generate`` uses it."""
    out = tmp_path / fmt
    assert main(["quantize", "--model", str(run_dir), "--format", fmt, "--out", str(out)]) == 0
    assert "MB ->" in capsys.readouterr().out
    model = quantize_model(load(run_dir, dtype="float32").model, fmt)
    loaded = load(out)
    assert type(loaded.model.blocks[0].attn.q_proj) is type(model.blocks[0].attn.q_proj)
    ids = torch.tensor([loaded.tokenizer.encode("the quick brown")])
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(ids), model.eval()(ids), rtol=0, atol=0)
    assert main(["generate", "--ckpt", str(out), "--max_new_tokens", "4", "the"]) == 0
    # A quantized model goes to transformers only dequantized: export refuses it, then merges.
    with pytest.raises(ConfigError, match="merge"):
        export_hf(out, tmp_path / "hf")
    assert export_hf(out, tmp_path / "hf", merge=True)[0].is_dir()


def test_quantize_takes_a_hugging_face_folder(tmp_path):
    tiny_hf_llama().save_pretrained(tmp_path / "hf")
    path, sizes = lmlab.api.quantize(str(tmp_path / "hf"), "nf4", tmp_path / "q")
    assert sizes["after"] < sizes["before"] / 2
    model = quantize_model(load(tmp_path / "hf").model, "nf4")
    ids = torch.randint(0, 97, (1, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(load(path).model(ids), model.eval()(ids), rtol=0, atol=0)
