"""Tests for lmlab.data.tokenizers: char, byte, BPE and Hugging Face (WordPiece) tokenizers,
saving and loading."""

import json

import numpy as np
import pytest
import tokenizers
import torch
import transformers

from hf_models import tiny_wordpiece as shared_tiny_wordpiece
from lmlab.data.corpus import load_corpus
from lmlab.data.tokenizers import (
    BPETokenizer,
    ByteTokenizer,
    CharTokenizer,
    HFTokenizer,
    SentencePieceTokenizer,
    Tokenizer,
    WordTokenizer,
    find_tokenizer,
    load_tokenizer,
    require_tokenizer,
    train_tokenizer,
)
from lmlab.errors import ConfigError, DataError, DataNotFoundError

# Accents, emoji, CJK, digits, tabs, CRLF, runs of spaces and blank lines: what a
# byte-level tokenizer must give back exactly.
TRICKY = "Héllo, wörld! 🙂 日本語 12345 3.14\n\n\t  indented\r\nend   \n\n\n  "


@pytest.fixture(scope="module")
def shakespeare():
    return load_corpus("tinyshakespeare")


@pytest.fixture(scope="module")
def bpe(shakespeare):
    return BPETokenizer.train(shakespeare, vocab_size=512)


# ---- char ---------------------------------------------------------------------------------


def test_char_tokenizer_matches_nanogpt_on_tiny_shakespeare(shakespeare):
    tok = CharTokenizer.train(shakespeare)
    assert tok.vocab_size == 65
    # nanoGPT's shakespeare_char/prepare.py, written out in plain Python as the reference.
    stoi = {ch: i for i, ch in enumerate(sorted(set(shakespeare)))}
    sample = shakespeare[:20000]
    assert tok.encode(sample) == [stoi[c] for c in sample]
    assert tok.decode(tok.encode(shakespeare)) == shakespeare


def test_char_tokenizer_worked_example():
    tok = CharTokenizer.train("hello")
    assert tok.chars == ["e", "h", "l", "o"]
    assert tok.encode("hell") == [1, 0, 2, 2]
    assert tok.decode([3, 2, 0]) == "ole"
    assert tok.encode("") == []
    assert tok.decode([]) == ""


def test_char_tokenizer_from_a_vocab_string_keeps_its_order():
    tok = CharTokenizer("ba🙂")
    assert tok.encode("ab🙂a") == [1, 0, 2, 1]
    assert tok.decode([2, 0]) == "🙂b"


def test_unknown_character_error_names_it_and_the_fix():
    tok = CharTokenizer.train("abc ")
    with pytest.raises(DataError) as info:
        tok.encode("abc é 😀 é")
    message = str(info.value)
    assert "'é' (first at position 4)" in message
    assert "'😀' (first at position 6)" in message
    assert "unk=True" in message


def test_unk_mode_maps_unknown_characters_to_the_unk_token():
    plain = CharTokenizer.train("abc")
    tok = CharTokenizer.train("abc", unk=True)
    assert tok.vocab_size == 4 and tok.unk_id == 3
    assert tok.encode("abc") == plain.encode("abc")  # known characters keep their ids
    assert tok.encode("axb\ud800") == [0, 3, 1, 3]  # a lone surrogate is unknown too
    assert tok.decode(tok.encode("axb")) == "a<unk>b"


@pytest.mark.parametrize("chars", ["", ["a", "bc"], "abca", [1, 2]])
def test_char_tokenizer_rejects_bad_vocabularies(chars):
    with pytest.raises(DataError, match="char tokenizer"):
        CharTokenizer(chars)


def test_char_tokenizer_cannot_train_on_empty_text():
    with pytest.raises(DataError, match="empty"):
        CharTokenizer.train("")


# ---- decode inputs (shared by all kinds) ----------------------------------------------


def test_decode_takes_lists_arrays_and_tensors():
    tok = CharTokenizer.train("hello")
    assert tok.decode(np.array([1, 0], dtype=np.uint16)) == "he"
    assert tok.decode(torch.tensor([1, 0])) == "he"


@pytest.mark.parametrize("ids", [[0, 4], [-1], [0.5], [[0, 1]]])
def test_decode_rejects_ids_outside_the_vocabulary(ids):
    with pytest.raises(DataError, match="decode|outside"):
        CharTokenizer.train("hello").decode(ids)


def test_decode_error_names_the_bad_id_and_position():
    with pytest.raises(DataError, match=r"token id 4 at position 1 .*\[0, 4\)"):
        CharTokenizer.train("hello").decode([0, 4])


# ---- byte ---------------------------------------------------------------------------------


def test_byte_tokenizer_round_trips_unicode():
    tok = ByteTokenizer()
    assert tok.vocab_size == 256
    assert tok.encode("é!") == [195, 169, 33]
    assert tok.encode(TRICKY) == list(TRICKY.encode("utf-8"))
    assert tok.decode(tok.encode(TRICKY)) == TRICKY


def test_byte_tokenizer_decodes_broken_utf8_with_replacement_characters():
    assert ByteTokenizer().decode([104, 195]) == "h\ufffd"  # a sample cut mid-character


def test_byte_tokenizer_names_a_lone_surrogate():
    with pytest.raises(DataError, match="position 1"):
        ByteTokenizer().encode("a\ud800b")


# ---- BPE ----------------------------------------------------------------------------------


def test_bpe_trains_to_the_asked_vocab_size(bpe, shakespeare):
    assert bpe.kind == "bpe"
    assert bpe.vocab_size == 512
    assert bpe.eos_id == 0 and bpe.tokenizer.id_to_token(0) == "<|endoftext|>"
    sample = shakespeare[:10000]
    ids = bpe.encode(sample)
    assert max(ids) < 512
    assert len(ids) < 0.7 * len(sample)  # merges compress: about 2 characters per token
    assert bpe.decode(ids) == sample


def test_bpe_round_trips_unicode_whitespace_and_digits(bpe):
    # None of the emoji or CJK bytes merged in training, so this exercises byte fallback.
    assert bpe.decode(bpe.encode(TRICKY)) == TRICKY
    assert bpe.decode(bpe.encode(" leading and trailing ")) == " leading and trailing "


def test_bpe_encodes_a_written_special_token_to_its_id_and_decodes_it_back(bpe):
    text = "The end.<|endoftext|>A new start."
    ids = bpe.encode(text)
    assert ids.count(bpe.eos_id) == 1
    assert bpe.decode(ids) == text


def test_bpe_save_then_load_gives_identical_ids(bpe, tmp_path):
    bpe.save(tmp_path / "tok")
    assert (tmp_path / "tok" / "tokenizer.json").is_file()
    for loaded in [
        load_tokenizer(tmp_path / "tok"),
        load_tokenizer(tmp_path / "tok" / "tokenizer.json"),
        BPETokenizer.from_file(tmp_path / "tok" / "tokenizer.json"),
    ]:
        assert isinstance(loaded, BPETokenizer)
        assert loaded.vocab_size == bpe.vocab_size
        assert loaded.eos_id == bpe.eos_id
        assert loaded.encode(TRICKY) == bpe.encode(TRICKY)
        assert loaded.decode(bpe.encode(TRICKY)) == TRICKY


def test_bpe_file_is_a_plain_hugging_face_tokenizer_json(bpe, tmp_path):
    bpe.save(tmp_path)
    hf = tokenizers.Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    assert hf.encode(TRICKY, add_special_tokens=False).ids == bpe.encode(TRICKY)


def test_bpe_custom_special_tokens_keep_their_ids_through_save_and_load(shakespeare, tmp_path):
    tok = BPETokenizer.train(shakespeare[:20000], 300, eos_token="<eos>", special_tokens=["<pad>"])
    assert tok.eos_id == 0 and tok.tokenizer.token_to_id("<pad>") == 1
    tok.save(tmp_path)
    loaded = load_tokenizer(tmp_path)
    assert loaded.eos_id == 0 and loaded.eos_token == "<eos>"
    no_eos = BPETokenizer.train(shakespeare[:20000], 300, eos_token=None)
    assert no_eos.eos_id is None


def test_bpe_from_file_reads_the_eos_token_of_a_hugging_face_config(bpe, tmp_path):
    bpe.save(tmp_path)
    config = tmp_path / "tokenizer_config.json"
    config.write_text('{"eos_token": {"content": "<|endoftext|>", "special": true}}')
    assert load_tokenizer(tmp_path).eos_id == 0
    config.write_text('{"eos_token": "</s>"}')
    with pytest.raises(DataError, match="'</s>' is not in the BPE vocabulary") as info:
        load_tokenizer(tmp_path)
    assert "tokenizer.json" in str(info.value)
    assert (
        BPETokenizer.from_file(tmp_path / "tokenizer.json", eos_token="<|endoftext|>").eos_id == 0
    )


def test_bpe_rejects_a_vocab_too_small_for_bytes_and_specials(shakespeare):
    with pytest.raises(ConfigError, match=r">= 257"):
        BPETokenizer.train(shakespeare[:1000], vocab_size=256)


def test_bpe_decode_rejects_ids_outside_the_vocabulary(bpe):
    # tokenizers alone would silently drop the unknown id 600
    with pytest.raises(DataError, match="token id 600"):
        bpe.decode([5, 600])


def test_bpe_from_file_rejects_a_non_bpe_model(tmp_path):
    wordpiece = tokenizers.Tokenizer(
        tokenizers.models.WordPiece({"[UNK]": 0, "a": 1}, unk_token="[UNK]")
    )
    wordpiece.save(str(tmp_path / "tokenizer.json"))
    with pytest.raises(DataError, match="WordPiece"):
        BPETokenizer.from_file(tmp_path / "tokenizer.json")
    assert isinstance(load_tokenizer(tmp_path), HFTokenizer)  # load_tokenizer dispatches


def test_bpe_names_a_lone_surrogate(bpe):
    with pytest.raises(DataError, match="lone surrogate"):
        bpe.encode("a\ud800")


# ---- train_tokenizer / load_tokenizer ---------------------------------------------------


def test_train_tokenizer_builds_each_kind():
    text = "hello world"
    assert isinstance(train_tokenizer("char", text), CharTokenizer)
    assert train_tokenizer("char", text, unk=True).unk_id == 8
    assert isinstance(train_tokenizer("byte", text, vocab_size=256), ByteTokenizer)
    bpe = train_tokenizer("bpe", text, vocab_size=260, eos_token=None)
    assert isinstance(bpe, BPETokenizer) and isinstance(bpe, Tokenizer)


def test_train_tokenizer_unknown_kind_suggests_and_lists_the_valid_ones():
    with pytest.raises(ConfigError, match=r"did you mean 'bpe'.*char, byte, bpe"):
        train_tokenizer("bep", "hello")


def test_train_tokenizer_rejects_options_of_another_kind():
    with pytest.raises(ConfigError, match=r"'unkk' \(did you mean 'unk'\?\)"):
        train_tokenizer("char", "hello", unkk=True)
    with pytest.raises(ConfigError, match="eos_token"):
        train_tokenizer("char", "hello", eos_token="<eos>")


def test_train_tokenizer_checks_vocab_size():
    with pytest.raises(ConfigError, match="needs vocab_size"):
        train_tokenizer("bpe", "hello")
    with pytest.raises(ConfigError, match="vocab_size 4, not the 65"):
        train_tokenizer("char", "hello", vocab_size=65)


@pytest.mark.parametrize("unk", [False, True])
def test_char_tokenizer_save_then_load_is_identical(tmp_path, unk):
    tok = CharTokenizer.train("héllo wörld 🙂\n", unk=unk)
    tok.save(tmp_path)
    saved = json.loads((tmp_path / "tokenizer.json").read_text())
    assert saved["model"]["type"] == "WordLevel"  # a Hugging Face file, not lmlab's own
    loaded = load_tokenizer(tmp_path)
    assert isinstance(loaded, CharTokenizer)
    assert (loaded.chars, loaded.unk, loaded.vocab_size) == (tok.chars, tok.unk, tok.vocab_size)


def test_byte_tokenizer_save_then_load(tmp_path):
    ByteTokenizer().save(tmp_path)
    assert json.loads((tmp_path / "tokenizer.json").read_text())["model"]["type"] == "BPE"
    assert isinstance(load_tokenizer(tmp_path / "tokenizer.json"), ByteTokenizer)


@pytest.mark.parametrize(
    ("old", "kind"),
    [
        ({"kind": "char", "chars": list("ab\n"), "unk": True}, CharTokenizer),
        ({"kind": "byte"}, ByteTokenizer),
    ],
)
def test_files_in_lmlabs_older_format_still_load(tmp_path, old, kind):
    """Runs saved before tokenizer.json became a Hugging Face file keep loading."""
    (tmp_path / "tokenizer.json").write_text(json.dumps(old))
    tok = load_tokenizer(tmp_path)
    assert isinstance(tok, kind)
    if kind is CharTokenizer:
        assert (tok.chars, tok.unk, tok.encode("ba\nc")) == (["a", "b", "\n"], True, [1, 0, 2, 3])


# Random text for the parity tests: the vocabulary's characters, characters outside it
# (accents, a combining mark, CJK, emoji, a zero-width joiner, "<unk>" spelled out), and
# every kind of whitespace (spaces, tabs, newlines, CRLF, a no-break space).
PIECES = list("abc ehlo,.!") + ["\n", "\t", "\r\n", "  ", "\u00a0"]
OUTSIDE = ["é", "e\u0301", "ö", "日本", "🙂", "👩\u200d👩\u200d👧", "<unk>", "Ω", "\x00", "ﬁ"]


def random_texts(seed, n=40, outside=True):
    rng = np.random.default_rng(seed)
    pool = PIECES + (OUTSIDE if outside else [])
    return [
        "".join(pool[i] for i in rng.integers(0, len(pool), size=rng.integers(0, 60)))
        for _ in range(n)
    ]


def hf_loaders(folder):
    """The saved tokenizer as the tokenizers library and as transformers load it."""
    lib = tokenizers.Tokenizer.from_file(str(folder / "tokenizer.json"))
    auto = transformers.AutoTokenizer.from_pretrained(folder)
    return lib, auto


def test_char_tokenizer_json_matches_tokenizers_and_transformers(tmp_path):
    tok = CharTokenizer(PIECES[:11] + ["\n", "\t", "\r", "\u00a0"], unk=True)
    tok.save(tmp_path)
    lib, auto = hf_loaders(tmp_path)
    texts = random_texts(seed=0)
    assert any(tok.unk_id in tok.encode(t) for t in texts)  # unknown characters are covered
    for text in texts:
        ids = tok.encode(text)
        assert lib.encode(text).ids == ids, text
        assert auto(text, add_special_tokens=False)["input_ids"] == ids, text
        assert auto.decode(ids) == lib.decode(ids) == tok.decode(ids), text


def test_char_tokenizer_without_unk_fails_alike_on_unknown_characters(tmp_path):
    """Without unk, lmlab refuses unknown characters; the saved file refuses them too
    (it never drops them silently, which would encode text to fewer ids)."""
    tok = CharTokenizer(PIECES[:11] + ["\n", "\t", "\r", "\u00a0"])
    tok.save(tmp_path)
    lib, auto = hf_loaders(tmp_path)
    for text in random_texts(seed=1, n=20, outside=False):
        assert lib.encode(text).ids == tok.encode(text)
        assert auto(text, add_special_tokens=False)["input_ids"] == tok.encode(text)
    with pytest.raises(DataError, match="not in the char tokenizer"):
        tok.encode("ab日")
    with pytest.raises(Exception, match="UNK"):
        lib.encode("ab日")
    with pytest.raises(Exception, match="UNK"):
        auto("ab日")


def test_byte_tokenizer_json_matches_tokenizers_and_transformers(tmp_path):
    tok = ByteTokenizer()
    tok.save(tmp_path)
    lib, auto = hf_loaders(tmp_path)
    for text in random_texts(seed=2) + [TRICKY]:
        ids = tok.encode(text)
        assert lib.encode(text).ids == ids, text
        assert auto(text, add_special_tokens=False)["input_ids"] == ids, text
        assert auto.decode(ids) == lib.decode(ids) == tok.decode(ids) == text
    # Random bytes are mostly broken UTF-8: both put U+FFFD in the same places.
    rng = np.random.default_rng(3)
    for _ in range(20):
        ids = rng.integers(0, 256, size=rng.integers(1, 40)).tolist()
        assert lib.decode(ids) == tok.decode(ids), ids


def test_to_config_is_a_small_json_summary(bpe):
    assert CharTokenizer.train("hello").to_config() == {
        "kind": "char",
        "vocab_size": 4,
        "eos_id": None,
    }
    assert json.loads(json.dumps(bpe.to_config())) == {
        "kind": "bpe",
        "vocab_size": 512,
        "eos_id": 0,
    }


def test_load_tokenizer_missing_path(tmp_path):
    with pytest.raises(DataNotFoundError, match="tokenizer.json"):
        load_tokenizer(tmp_path)  # a folder with no tokenizer.json
    with pytest.raises(DataNotFoundError, match="nope.json"):
        load_tokenizer(tmp_path / "nope.json")


@pytest.mark.parametrize(
    ("content", "match"),
    [
        ("{not json", "not valid JSON"),
        ("[1, 2]", "neither a 'kind'"),
        ('{"kind": "chr", "chars": ["a"]}', "did you mean 'char'"),
        ('{"kind": "char", "chars": "ab"}', "needs 'chars'"),
        ('{"kind": "char", "chars": ["a", "a"]}', "repeats 'a'"),
        ('{"model": {"type": "BPE", "vocab": 3}}', "not a valid Hugging Face"),
    ],
)
def test_load_tokenizer_malformed_file_names_it(tmp_path, content, match):
    path = tmp_path / "tokenizer.json"
    path.write_text(content)
    with pytest.raises(DataError, match=match) as info:
        load_tokenizer(path)
    assert str(path) in str(info.value)


# ---- Hugging Face tokenizers of other models (WordPiece) ---------------------------------


def tiny_wordpiece(padding: bool = False) -> tokenizers.Tokenizer:
    words = ["hello", "world", "un", "##aff", "##able", "!", ",", "the", "a", "b", "##s"]
    return shared_tiny_wordpiece(words + ["日", "本"], padding)


WORDPIECE_TEXTS = ["Hello, world!", "unaffable", "HELLO the worlds", "日本 a b c", "", "[MASK] a"]


@pytest.fixture
def wordpiece_dir(tmp_path):
    tiny_wordpiece(padding=True).save(str(tmp_path / "tokenizer.json"))
    return tmp_path


def test_hf_tokenizer_worked_example(wordpiece_dir):
    tok = load_tokenizer(wordpiece_dir)
    assert isinstance(tok, HFTokenizer) and isinstance(tok, Tokenizer)
    assert tok.encode("Hello, world!") == [5, 11, 6, 10]  # no template, no padding
    assert tok.encode("Hello, world!", add_special_tokens=True) == [2, 5, 11, 6, 10, 3]
    assert tok.encode("unaffable") == [7, 8, 9]  # un ##aff ##able
    assert tok.decode([2, 5, 7, 8, 9, 3]) == "[CLS] hello unaffable [SEP]"
    assert tok.decode([2, 5, 3], skip_special_tokens=True) == "hello"
    ids = (tok.pad_id, tok.unk_id, tok.cls_id, tok.sep_id, tok.mask_id, tok.eos_id)
    assert ids == (0, 1, 2, 3, 4, None)
    assert tok.to_config() == {"kind": "hf", "vocab_size": 18, "eos_id": None}


def test_hf_tokenizer_matches_transformers(wordpiece_dir):
    tok = HFTokenizer.from_file(wordpiece_dir / "tokenizer.json")
    ref = transformers.PreTrainedTokenizerFast(
        tokenizer_file=str(wordpiece_dir / "tokenizer.json"), pad_token="[PAD]"
    )
    for text in WORDPIECE_TEXTS:
        assert tok.encode(text, add_special_tokens=True) == ref(text)["input_ids"], text
        assert tok.encode(text) == ref(text, add_special_tokens=False)["input_ids"], text
    batch = tok.encode_batch(WORDPIECE_TEXTS)
    expected = ref(WORDPIECE_TEXTS, padding=True)
    assert batch["ids"].tolist() == expected["input_ids"]
    assert batch["attention_mask"].tolist() == expected["attention_mask"]
    pairs = ["a", "b b", "", "the", "hello", "world"]
    batch = tok.encode_batch(WORDPIECE_TEXTS, pairs, max_length=6)
    expected = ref(
        WORDPIECE_TEXTS,
        pairs,
        padding=True,
        truncation=True,
        max_length=6,
        return_token_type_ids=True,
    )
    for key, ours in (("input_ids", "ids"), ("token_type_ids", "token_type_ids")):
        assert batch[ours].tolist() == expected[key]
    assert batch["ids"].dtype == np.int64 and batch["ids"].shape == (6, 6)


def test_hf_tokenizer_encode_batch_pads_on_the_right():
    tok = HFTokenizer(tiny_wordpiece())
    batch = tok.encode_batch(["a b", "a"])
    assert batch["ids"].tolist() == [[2, 13, 14, 3], [2, 13, 3, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 1, 0]]
    assert batch["token_type_ids"].tolist() == [[0, 0, 0, 0], [0, 0, 0, 0]]
    assert tok.encode_batch([])["ids"].shape == (0, 0)
    plain = tok.encode_batch(["a b", "a"], add_special_tokens=False)
    assert plain["ids"].tolist() == [[13, 14], [13, 0]]
    with pytest.raises(ConfigError, match="max_length=0"):
        tok.encode_batch(["a"], max_length=0)
    with pytest.raises(DataError, match="2 texts but 1 pairs"):
        tok.encode_batch(["a", "b"], ["c"])


def test_hf_tokenizer_without_a_pad_token_cannot_pad_a_ragged_batch():
    vocab = {"<unk>": 0, "a": 1, "b": 2}
    model = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
    model.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tok = HFTokenizer(model)
    assert tok.pad_id is None and tok.encode("a b c") == [1, 2, 0]
    assert tok.encode_batch(["a b", "b a"])["ids"].tolist() == [[1, 2], [2, 1]]
    with pytest.raises(DataError, match="no pad token"):
        tok.encode_batch(["a b", "a"])


def test_hf_tokenizer_reads_special_tokens_from_tokenizer_config(wordpiece_dir):
    config = {"pad_token": {"content": "[MASK]"}, "eos_token": "[SEP]", "cls_token": "[CLS]"}
    (wordpiece_dir / "tokenizer_config.json").write_text(json.dumps(config))
    tok = load_tokenizer(wordpiece_dir)
    assert (tok.pad_id, tok.eos_id, tok.cls_id, tok.unk_id) == (4, 3, 2, 1)
    (wordpiece_dir / "tokenizer_config.json").write_text(json.dumps({"sep_token": "[END]"}))
    with pytest.raises(DataError, match=r"sep_token '\[END\]' is not in the WordPiece"):
        load_tokenizer(wordpiece_dir)


def test_hf_tokenizer_save_then_load_gives_identical_ids_and_keeps_the_file(
    wordpiece_dir, tmp_path
):
    tok = load_tokenizer(wordpiece_dir)
    out = tmp_path / "saved"
    tok.save(out)
    saved = json.loads((out / "tokenizer.json").read_text())
    assert saved["padding"] is not None and saved["truncation"]["max_length"] == 12
    loaded = load_tokenizer(out)
    assert isinstance(loaded, HFTokenizer)
    for text in WORDPIECE_TEXTS:
        assert loaded.encode(text, add_special_tokens=True) == tok.encode(text, True)
    assert (loaded.pad_id, loaded.mask_id) == (tok.pad_id, tok.mask_id)


def test_hf_tokenizer_decode_rejects_ids_outside_the_vocabulary(wordpiece_dir):
    with pytest.raises(DataError, match="token id 18"):
        load_tokenizer(wordpiece_dir).decode([2, 18])


# ---- older layouts: GPT-2's vocab.json + merges.txt, SentencePiece --------------------------


def test_gpt2_vocab_and_merges_match_the_tokenizer_and_transformers(bpe, shakespeare, tmp_path):
    bpe.tokenizer.model.save(str(tmp_path))  # writes exactly GPT-2's vocab.json + merges.txt
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merges.txt", "vocab.json"]
    tok = find_tokenizer(tmp_path)
    assert isinstance(tok, BPETokenizer) and tok.vocab_size == bpe.vocab_size
    assert tok.eos_token == "<|endoftext|>" and tok.eos_id == bpe.eos_id == 0
    text = shakespeare[:3000] + TRICKY + "<|endoftext|>next"
    assert tok.encode(text) == bpe.encode(text)
    assert tok.decode(tok.encode(text)) == text
    reference = transformers.GPT2Tokenizer.from_pretrained(tmp_path)
    assert tok.encode(text) == reference.encode(text)


def test_gpt2_vocab_without_merges_is_named(bpe, tmp_path):
    bpe.tokenizer.model.save(str(tmp_path))
    (tmp_path / "merges.txt").unlink()
    with pytest.raises(DataNotFoundError, match="merges.txt' does not exist"):
        find_tokenizer(tmp_path)


@pytest.fixture(scope="module")
def sentencepiece_model(shakespeare):
    """A small SentencePiece BPE model trained on Tiny Shakespeare, as bytes."""
    import io

    import sentencepiece

    out = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(shakespeare[:50_000].splitlines()),
        model_writer=out,
        vocab_size=400,  # 256 byte pieces, 3 control tokens, the rest merges
        model_type="bpe",
        byte_fallback=True,  # any character encodes, as in Llama's tokenizer
        minloglevel=2,
    )
    return out.getvalue()


def test_sentencepiece_model_matches_the_library_and_round_trips(sentencepiece_model, tmp_path):
    import sentencepiece

    (tmp_path / "tokenizer.model").write_bytes(sentencepiece_model)
    tok = find_tokenizer(tmp_path)
    assert isinstance(tok, SentencePieceTokenizer) and tok.vocab_size == 400
    assert tok.eos_id == 2  # sentencepiece's default </s>
    reference = sentencepiece.SentencePieceProcessor(model_proto=sentencepiece_model)
    text = "ROMEO: But soft, what light through yonder window breaks? é 🙂"
    assert tok.encode(text) == reference.encode(text) and tok.encode(text)[0] != reference.bos_id()
    assert tok.decode(tok.encode(text)) == text
    with pytest.raises(DataError, match="outside the sentencepiece tokenizer's vocabulary"):
        tok.decode([400])
    tok.save(tmp_path / "saved")
    assert find_tokenizer(tmp_path / "saved").encode(text) == tok.encode(text)


def test_broken_sentencepiece_file_is_named(tmp_path):
    (tmp_path / "tokenizer.model").write_bytes(b"not a model")
    with pytest.raises(DataError, match="tokenizer.model' is not a valid SentencePiece model"):
        find_tokenizer(tmp_path)


def test_a_folder_without_tokenizer_has_none_and_text_needs_one(tmp_path):
    assert find_tokenizer(tmp_path) is None
    with pytest.raises(ConfigError) as caught:
        require_tokenizer(None, "models/bare", "generate")
    message = str(caught.value)
    assert message.startswith("generate works on text, but model 'models/bare' has no tokenizer")
    assert "tokenizer.json, vocab.json + merges.txt, tokenizer.model" in message


# ---- word tokenizer (n-grams) -----------------------------------------------------------


def test_word_tokenizer_rules():
    # words keep inner apostrophes; each other non-space character is a token; a line
    # break gives </s>; a last line without one (a prompt) does not; blank lines vanish
    text = "I'll go, o'er   the hill!\n\n  'Tis 2nd_day.\nthe end"
    tok = WordTokenizer.train(text)
    words = [tok.words[i] for i in tok.encode(text)]
    assert words == (
        ["I'll", "go", ",", "o'er", "the", "hill", "!", "</s>"]
        + ["'", "Tis", "2nd_day", ".", "</s>", "the", "end"]
    )
    assert tok.words[:2] == ["<unk>", "</s>"] and (tok.unk_id, tok.eos_id) == (0, 1)
    assert tok.words[2] == "the"  # most frequent first (2), then ties in code-point order
    assert tok.words[3:] == sorted(tok.words[3:])
    assert tok.decode(tok.encode("the hill!\ngo")) == "the hill !\ngo"


def test_word_tokenizer_case_min_count_and_max_vocab():
    text = "The the THE cat cat dog\n"
    assert WordTokenizer.train(text).vocab_size == 2 + 5
    folded = WordTokenizer.train(text, lowercase=True)
    assert folded.words == ["<unk>", "</s>", "the", "cat", "dog"]
    assert folded.encode("THE Cat") == [2, 3]
    rare = WordTokenizer.train(text, lowercase=True, min_count=2)
    assert rare.encode("the dog bird\n") == [2, 0, 0, 1]  # dog (once) and bird are <unk>
    capped = train_tokenizer("word", text, vocab_size=3, lowercase=True)
    assert capped.words == ["<unk>", "</s>", "the"]
    with pytest.raises(ConfigError, match="max_vocab=1"):
        WordTokenizer.train(text, max_vocab=1)
    with pytest.raises(ConfigError, match="min_count=0"):
        WordTokenizer.train(text, min_count=0)
    with pytest.raises(DataError, match="without words"):
        WordTokenizer.train(" \n\t")


def test_word_tokenizer_saves_and_loads(tmp_path):
    tok = WordTokenizer.train(load_corpus("tinyshakespeare")[:20_000], lowercase=True)
    tok.save(tmp_path)
    loaded = load_tokenizer(tmp_path)
    assert isinstance(loaded, WordTokenizer) and loaded.words == tok.words and loaded.lowercase
    text = "ROMEO: Wherefore art thou?\n"
    assert loaded.encode(text) == tok.encode(text)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"kind": "word", "words": ["a", "b"], "lowercase": False}))
    with pytest.raises(DataError, match="starts with '<unk>', '</s>'") as info:
        load_tokenizer(bad)
    assert str(bad) in str(info.value)
