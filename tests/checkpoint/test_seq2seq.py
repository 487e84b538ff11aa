"""Hugging Face T5 / mT5 / BART folders <-> lmlab's encoder-decoder (``checkpoint.seq2seq``).

Parity: tiny random transformers models (tests/hf_models.py) saved with save_pretrained,
loaded with ``lmlab.load``; logits compared with transformers given the same source (with
padding) and decoder inputs, fp32. Tolerance: atol 1e-4, rtol 1e-5 on logits of magnitude up
to ~30 (observed differences are 0 for ReLU/GELU and ~7e-6 for T5 v1.1's tanh GELU, which
transformers computes with its own formula). Generation compares token ids exactly.
"""

import io
import json
from dataclasses import replace

import pytest
import sentencepiece
import tokenizers
import torch
import transformers
from safetensors.torch import load_file, save_file

import lmlab
from hf_models import tiny_bart, tiny_t5
from lmlab.checkpoint.io import load_model, save_checkpoint
from lmlab.checkpoint.seq2seq import load_hf_seq2seq, save_hf_seq2seq, to_hf_seq2seq
from lmlab.cli.main import main
from lmlab.errors import CheckpointError, ConfigError
from lmlab.generate import SamplingParams
from lmlab.generate.seq2seq import seq2seq_generate
from lmlab.models import build_model, get_preset

TOL = dict(atol=1e-4, rtol=1e-5)
V = 61

HF_CASES = {
    "t5-relu-tied": lambda: tiny_t5(),
    "t5-gated-gelu-untied": lambda: tiny_t5(feed_forward_proj="gated-gelu", tied=False),
    "mt5": lambda: tiny_t5("mt5", feed_forward_proj="gated-gelu", tied=False),
    "bart": lambda: tiny_bart(),
    "bart-scaled-relu-untied": lambda: tiny_bart(
        scale_embedding=True, activation_function="relu", tied=False
    ),
    "marian": lambda: tiny_bart("marian", scale_embedding=True, activation_function="swish"),
    "pegasus": lambda: tiny_bart("pegasus", scale_embedding=True, tied=False),
}


def saved(hf, path):
    hf.save_pretrained(path)
    return path


def reference(path):
    """What transformers itself reads from the folder."""
    return transformers.AutoModelForSeq2SeqLM.from_pretrained(path).eval()


def random_batch(model, seed):
    """Sources [3, 11] right-padded to lengths 11, 7, 4; decoder inputs [3, 9] from bos."""
    g = torch.Generator().manual_seed(seed)
    c = model.config
    src = torch.randint(3, c.vocab_size, (3, 11), generator=g)
    src[1, 7:], src[2, 4:] = c.pad_id, c.pad_id
    tgt = torch.randint(3, c.vocab_size, (3, 9), generator=g)
    tgt[:, 0] = c.bos_id
    return src, tgt


def hf_logits(hf, src, tgt, pad):
    with torch.no_grad():
        return hf(input_ids=src, attention_mask=(src != pad).long(), decoder_input_ids=tgt).logits


@pytest.mark.parametrize("case", sorted(HF_CASES))
def test_logits_match_transformers(case, tmp_path):
    for seed in range(3):  # a random model and a random batch each
        torch.manual_seed(seed)
        path = saved(HF_CASES[case](), tmp_path / str(seed))
        model, hf = lmlab.load(path, device="cpu").model, reference(path)
        src, tgt = random_batch(model, seed)
        expected = hf_logits(hf, src, tgt, model.config.pad_id)
        with torch.no_grad():
            torch.testing.assert_close(model(src, tgt), expected, **TOL)
            # decoding with the cache, a few target tokens at a time, gives the same logits
            view = model.conditioned(src)
            cache = view.new_cache(3, 16)
            steps = [view(tgt[:, a:b], cache) for a, b in ((0, 4), (4, 5), (5, 9))]
            torch.testing.assert_close(torch.cat(steps, dim=1), expected, **TOL)


def test_the_settings_read_from_the_configs(tmp_path):
    t5 = load_hf_seq2seq(saved(tiny_t5(), tmp_path / "t5"))[0].config
    assert (t5.positions, t5.norm, t5.norm_kind, t5.bias, t5.scale_attention) == (
        "relative", "pre", "rmsnorm", False, False,
    )  # fmt: skip
    assert t5.tie_output and t5.output_scale == pytest.approx(32**-0.5)
    assert (t5.d_head, t5.n_decoder_layers, t5.bos_id, t5.eos_id) == (6, 3, 0, 1)
    v11 = load_hf_seq2seq(
        saved(tiny_t5(feed_forward_proj="gated-gelu", tied=False), tmp_path / "v")
    )
    assert (v11[0].config.gated, v11[0].config.activation, v11[0].config.tie_output) == (
        True, "gelu_tanh", False,
    )  # fmt: skip
    assert v11[0].config.output_scale == 1.0
    bart = load_hf_seq2seq(saved(tiny_bart(), tmp_path / "bart"))[0].config
    assert (bart.positions, bart.position_offset, bart.norm, bart.embed_norm) == (
        "learned", 2, "post", True,
    )  # fmt: skip
    assert (bart.pad_id, bart.bos_id, bart.eos_id, bart.output_bias) == (1, 2, 2, True)


def hf_generate(hf, sources, pad, **kwargs):
    """transformers' generate on right-padded sources: the new tokens of each (the decoder
    start token dropped), cut after eos."""
    S = max(map(len, sources))
    src = torch.tensor([s + [pad] * (S - len(s)) for s in sources])
    out = hf.generate(
        src,
        attention_mask=(src != pad).long(),
        pad_token_id=pad,
        forced_eos_token_id=None,
        do_sample=False,
        **kwargs,
    )[:, 1:].tolist()
    eos = kwargs["eos_token_id"]
    return [row[: row.index(eos) + 1] if eos in row else row for row in out]


GENERATION_CASES = {
    # transformers' generate sizes T5's cache by num_layers: its decoder must be as deep
    "t5-gated-gelu-untied": lambda: tiny_t5(
        feed_forward_proj="gated-gelu", tied=False, num_decoder_layers=2
    ),
    "bart": HF_CASES["bart"],
    "marian": HF_CASES["marian"],
}


@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(GENERATION_CASES))
def test_greedy_and_beam_search_match_transformers_generate(case, tmp_path):
    torch.manual_seed(0)
    path = saved(GENERATION_CASES[case](), tmp_path)
    model, hf = lmlab.load(path, device="cpu").model, reference(path)
    sources = [[5, 6, 7, 8, 9, 10, 11], [12, 13, 14], [20, 21, 22, 23]]
    free = seq2seq_generate(model, sources, SamplingParams(temperature=0, max_new_tokens=12)).ids
    eos = free[0][3]  # a token greedy decoding is known to produce: some rows stop early
    for kwargs in (
        dict(num_beams=1),
        dict(num_beams=3, length_penalty=1.0, early_stopping=False),
        dict(num_beams=2, length_penalty=0.0, early_stopping=True),
    ):
        params = SamplingParams(temperature=0, max_new_tokens=12, eos_id=eos, **kwargs)
        ours = seq2seq_generate(model, sources, params).ids
        theirs = hf_generate(
            hf, sources, model.config.pad_id, max_new_tokens=12, eos_token_id=eos, **kwargs
        )
        assert ours == theirs, kwargs


# ----------------------------------------------------------------------------- export

T5_LIKE = dict(
    family="seq2seq",
    vocab_size=V,
    d_model=32,
    n_heads=4,
    d_head=6,
    n_encoder_layers=2,
    n_decoder_layers=1,
    d_ff=48,
    max_seq_len=40,
    norm="pre",
    positions="relative",
    relative_buckets=8,
    relative_max_distance=20,
    norm_kind="rmsnorm",
    norm_eps=1e-6,
    activation="gelu_tanh",
    gated=True,
    bias=False,
    scale_embeddings=False,
    scale_attention=False,
    pad_id=0,
    bos_id=0,
    eos_id=1,
)
BART_LIKE = dict(
    family="seq2seq",
    vocab_size=V,
    d_model=32,
    n_heads=4,
    n_encoder_layers=1,
    n_decoder_layers=2,
    d_ff=48,
    max_seq_len=40,
    positions="learned",
    position_offset=2,
    embed_norm=True,
    activation="gelu",
    output_bias=True,
    pad_id=1,
    bos_id=2,
    eos_id=2,
)
DEFAULT = dict(  # the paper's layout: no setting beyond the shape
    family="seq2seq",
    vocab_size=V,
    d_model=32,
    n_heads=4,
    n_encoder_layers=2,
    n_decoder_layers=1,
    d_ff=48,
    max_seq_len=40,
    eos_id=2,
)
EXPORT_CASES = {
    "marian-default-post": DEFAULT,
    "pegasus-default-pre": {**DEFAULT, "norm": "pre", "tie_output": False},
    "t5-tied": {**T5_LIKE, "output_scale": 32**-0.5},
    "t5-untied-relu": {**T5_LIKE, "tie_output": False, "activation": "relu", "gated": False},
    "bart": BART_LIKE,
    "bart-untied-scaled": {**BART_LIKE, "tie_output": False, "scale_embeddings": False},
}


def random_lmlab(spec, seed=0):
    """An lmlab model of ``spec`` with random norms and biases (they start at 1 and 0)."""
    torch.manual_seed(seed)
    model = build_model(spec).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
            elif name.endswith("bias"):
                p.normal_(0, 0.5)
        if spec.get("output_bias"):
            model.final_logits_bias.normal_(0, 0.5)
    return model


@pytest.mark.parametrize("case", sorted(EXPORT_CASES))
def test_exported_folder_loads_in_transformers_with_equal_logits(case, tmp_path):
    model = random_lmlab(EXPORT_CASES[case])
    hf = reference(save_hf_seq2seq(model, tmp_path))
    expected = {"t5": "T5ForConditionalGeneration", "bart": "BartForConditionalGeneration"}
    expected |= {"marian": "MarianMTModel", "pegasus": "PegasusForConditionalGeneration"}
    assert type(hf).__name__ == expected[case.split("-")[0]]
    for seed in range(3):
        src, tgt = random_batch(model, seed)
        with torch.no_grad():
            ours = model(src, tgt)
        torch.testing.assert_close(hf_logits(hf, src, tgt, model.config.pad_id), ours, **TOL)
    # and lmlab reads its own export back to the same model (Marian and Pegasus always
    # have an output bias: zeros when the model had none)
    again = lmlab.load(tmp_path, device="cpu").model
    assert again.config == replace(model.config, output_bias=again.config.output_bias)
    for name, t in model.state_dict().items():
        assert torch.equal(again.state_dict()[name], t), name
    src, tgt = random_batch(model, 0)
    with torch.no_grad():
        assert torch.equal(again(src, tgt), model(src, tgt))


@pytest.mark.parametrize("case", sorted(HF_CASES))
def test_hf_to_lmlab_to_hf_round_trip_is_exact(case, tmp_path):
    torch.manual_seed(3)
    first = saved(HF_CASES[case](), tmp_path / "hf")
    model = lmlab.load(first, device="cpu").model
    second = save_hf_seq2seq(model, tmp_path / "back")
    a, b = reference(first).state_dict(), reference(second).state_dict()
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_lmlab_checkpoint_of_t5_and_bart_settings_saves_and_loads_exactly(tmp_path):
    for i, spec in enumerate((EXPORT_CASES["t5-untied-relu"], BART_LIKE)):
        model = random_lmlab(spec)
        loaded, _, _ = load_model(save_checkpoint(tmp_path / str(i), model))
        src, tgt = random_batch(model, 0)
        with torch.no_grad():
            assert torch.equal(loaded(src, tgt), model(src, tgt))


def test_lmlab_export_writes_an_encoder_decoder_for_auto_model_for_seq2seq(tmp_path, capsys):
    model = random_lmlab(BART_LIKE)
    save_checkpoint(tmp_path / "ckpt", model)
    assert main(["export", "--model", str(tmp_path / "ckpt"), "--out", str(tmp_path / "hf")]) == 0
    assert "AutoModelForSeq2SeqLM" in capsys.readouterr().out
    hf = reference(tmp_path / "hf")
    src, tgt = random_batch(model, 0)
    with torch.no_grad():
        torch.testing.assert_close(hf_logits(hf, src, tgt, 1), model(src, tgt), **TOL)


def test_settings_no_hf_class_computes_are_refused_in_one_line_naming_what_exports():
    # learned positions without BART's embedding norm: neither BART nor Marian
    model = build_model({**DEFAULT, "positions": "learned", "position_offset": 2})
    with pytest.raises(ConfigError) as info:
        to_hf_seq2seq(model)
    message = str(info.value)
    assert "\n" not in message and "no Hugging Face class" in message
    for name in ("T5ForConditionalGeneration", "MarianMTModel", "positions=relative"):
        assert name in message
    assert "closest, BartForConditionalGeneration, needs embed_norm=False (needs True)" in message


@pytest.mark.parametrize(
    "preset,architecture",
    [
        ("seq2seq-tiny", "PegasusForConditionalGeneration"),
        ("t5-tiny", "T5ForConditionalGeneration"),
        ("bart-tiny", "BartForConditionalGeneration"),
    ],
)
def test_every_encoder_decoder_preset_exports(preset, architecture):
    cfg, _ = to_hf_seq2seq(build_model({**get_preset(preset), "vocab_size": V}))
    assert cfg["architectures"] == [architecture]


@pytest.mark.slow
def test_an_encoder_decoder_trained_by_lmlab_seq2seq_exports_to_t5(tmp_path, capsys):
    run = tmp_path / "run"
    argv = ["seq2seq", "--model", "t5-tiny", "--task", "copy", "--eval_n", "2",
            "--train.max_steps", "2", "--train.eval_interval", "2", "--train.eval_batches", "1",
            "--train.batch_size", "4", "--train.progress", "false", "--train.out_dir", str(run)]  # fmt: skip
    assert main(argv) == 0
    assert main(["export", "--model", str(run), "--out", str(tmp_path / "hf")]) == 0
    model, hf = lmlab.load(run, device="cpu").model, reference(tmp_path / "hf")
    assert type(hf).__name__ == "T5ForConditionalGeneration"
    src, tgt = random_batch(model, 0)
    with torch.no_grad():
        torch.testing.assert_close(
            hf_logits(hf, src, tgt, model.config.pad_id), model(src, tgt), **TOL
        )


def test_t5_output_scale_that_transformers_cannot_express_is_refused():
    model = build_model({**T5_LIKE, "output_scale": 1.0})  # tied but unscaled
    with pytest.raises(ConfigError, match="output_scale"):
        to_hf_seq2seq(model)


# ----------------------------------------------------------------------------- guards


def edit_config(path, **changes):
    file = path / "config.json"
    cfg = json.loads(file.read_text())
    file.write_text(json.dumps({**cfg, **changes}))
    return path


def one_line_error(path, *words):
    with pytest.raises(CheckpointError) as info:
        lmlab.load(path, device="cpu")
    message = str(info.value)
    assert "\n" not in message, message
    for word in words:
        assert word in message, message


def test_unknown_t5_feed_forward_is_refused_naming_the_option(tmp_path):
    path = edit_config(saved(tiny_t5(), tmp_path), feed_forward_proj="gated-tanh")
    one_line_error(path, "feed_forward_proj", "'gated-tanh'", "gated-gelu")


@pytest.mark.parametrize(
    "changes,words",
    [
        (dict(add_final_layer_norm=True), ("add_final_layer_norm", "mBART")),
        (dict(normalize_before=True), ("normalize_before",)),
        (dict(activation_function="tanh"), ("activation_function", "'tanh'", "gelu")),
        (dict(decoder_attention_heads=2), ("decoder_attention_heads=2", "encoder_attention_heads")),
    ],
)
def test_unsupported_bart_options_are_refused(changes, words, tmp_path):
    one_line_error(edit_config(saved(tiny_bart(), tmp_path), **changes), *words)


def test_unsupported_encoder_decoder_types_are_refused_naming_the_supported(tmp_path):
    cfg = transformers.MBartConfig(
        vocab_size=V,
        d_model=16,
        encoder_layers=1,
        decoder_layers=1,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_ffn_dim=32,
        decoder_ffn_dim=32,
    )
    path = saved(transformers.MBartForConditionalGeneration(cfg), tmp_path)
    one_line_error(path, "'mbart'", "t5, mt5, bart")


def test_weights_that_do_not_match_the_config_are_refused(tmp_path):
    path = edit_config(saved(tiny_t5(), tmp_path / "t5"), d_ff=64)
    one_line_error(path, "config.json implies", "DenseReluDense")
    path = edit_config(saved(tiny_bart(), tmp_path / "bart"), max_position_embeddings=50)
    one_line_error(path, "embed_positions")


@pytest.mark.parametrize(
    "changes", [dict(d_model="wide"), dict(num_layers=-1), dict(relative_attention_num_buckets=2)]
)
def test_a_config_that_describes_no_valid_model_is_one_line(changes, tmp_path):
    one_line_error(edit_config(saved(tiny_t5(), tmp_path), **changes), "describes no valid model")


@pytest.mark.parametrize(
    "changes,words",
    [
        (dict(d_model=2**20, vocab_size=2**24), ("config.json implies", "model.shared.weight")),
        (dict(encoder_layers=10**9), ("1000000003-layer model", "only")),  # no such build
    ],
)
def test_a_config_far_larger_than_the_weights_is_refused_before_any_tensor_is_read(
    changes, words, tmp_path, monkeypatch
):
    path = edit_config(saved(tiny_bart(), tmp_path), **changes)

    def no_read(*args, **kwargs):
        raise AssertionError("tensors were read before the config was checked")

    monkeypatch.setattr("lmlab.checkpoint.seq2seq.read_hf_weights", no_read)
    one_line_error(path, *words)


def test_extra_and_missing_tensors_are_refused(tmp_path):
    path = saved(tiny_bart(), tmp_path)
    file = path / "model.safetensors"
    state = load_file(file)
    save_file({**state, "model.encoder.extra.weight": torch.zeros(2)}, file)
    one_line_error(path, "unexpected tensors", "model.encoder.extra.weight")
    del state["model.decoder.layers.1.fc2.bias"]
    save_file(state, file)
    one_line_error(path, "model.decoder.layers.1.fc2.bias", "missing")


def test_separate_encoder_and_decoder_embeddings_are_refused(tmp_path):
    # transformers >= 5 builds BART with tie_word_embeddings=False with three embeddings
    path = saved(tiny_bart(tie_word_embeddings=False), tmp_path)
    one_line_error(path, "embed_tokens", "one embedding matrix")


def test_remote_code_in_the_config_is_ignored(tmp_path, caplog):
    path = edit_config(saved(tiny_bart(), tmp_path), auto_map={"AutoModel": "evil.Model"})
    (path / "evil.py").write_text("raise SystemExit('remote code ran')\n")
    assert lmlab.load(path, device="cpu").model.config.embed_norm
    assert "remote code" in caplog.text


# ----------------------------------------------------------------------------- tokenizers

WORDS = [
    "the quick brown fox jumps over the lazy dog",
    "a stitch in time saves nine",
    "to be or not to be that is the question",
    "all that glitters is not gold",
] * 20
SAMPLES = ["the lazy fox saves time", "to be gold or not", "a question of nine dogs"]


def t5_with_sentencepiece(tmp_path):
    """A T5 folder with T5's tokenizer file, spiece.model (pad 0, eos 1, unk 2)."""
    writer = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(WORDS),
        model_writer=writer,
        vocab_size=40,
        model_type="unigram",
        pad_id=0,
        eos_id=1,
        unk_id=2,
        bos_id=-1,
        minloglevel=2,
    )
    path = saved(tiny_t5(), tmp_path)
    (path / "spiece.model").write_bytes(writer.getvalue())
    return path, transformers.T5Tokenizer.from_pretrained(path, extra_ids=0)


def bart_with_byte_level_bpe(tmp_path, tokenizer_json=False):
    """A BART folder with GPT-2-style vocab.json + merges.txt (or, through transformers'
    save_pretrained, tokenizer.json alone)."""
    bpe = tokenizers.ByteLevelBPETokenizer()
    specials = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]
    bpe.train_from_iterator(WORDS, vocab_size=300, special_tokens=specials, show_progress=False)
    path = saved(tiny_bart(vocab_size=300), tmp_path)
    bpe.save_model(str(path))
    hf_tokenizer = transformers.BartTokenizer.from_pretrained(path)
    if tokenizer_json:
        (path / "vocab.json").unlink()
        (path / "merges.txt").unlink()
        hf_tokenizer.save_pretrained(path)
        assert (path / "tokenizer.json").is_file()
    return path, hf_tokenizer


@pytest.mark.parametrize(
    "make",
    [
        t5_with_sentencepiece,
        bart_with_byte_level_bpe,
        lambda tmp_path: bart_with_byte_level_bpe(tmp_path, tokenizer_json=True),
    ],
    ids=["t5-spiece", "bart-vocab-merges", "bart-tokenizer-json"],
)
def test_tokenizers_encode_as_transformers_does(make, tmp_path):
    path, hf_tokenizer = make(tmp_path)
    lm = lmlab.load(path, device="cpu")
    for text in SAMPLES:
        expected = hf_tokenizer(text, add_special_tokens=False).input_ids
        assert lm.tokenizer.encode(text) == expected
        assert len(expected) > 1


def test_marian_folders_load_for_ids_without_their_tokenizer_pair(tmp_path):
    path = saved(tiny_bart("marian"), tmp_path)
    (path / "vocab.json").write_text(json.dumps({"<pad>": 1, "</s>": 0}))  # as Marian has
    for name in ("source.spm", "target.spm"):
        (path / name).write_bytes(b"not read")
    lm = lmlab.load(path, device="cpu")
    assert lm.tokenizer is None and lm.model.config.positions == "sinusoidal"
