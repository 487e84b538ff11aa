"""Tests for lmlab.data.tokens: memory-mapped token files and their sidecars."""

import io
import json
import random

import numpy as np
import pytest
import torch

from lmlab.data import tokens
from lmlab.data.corpus import load_corpus
from lmlab.data.tokenizers import BPETokenizer, ByteTokenizer, CharTokenizer
from lmlab.data.tokens import (
    encode_to_file,
    read_token_meta,
    read_tokens,
    sidecar_path,
    token_dtype,
    write_tokens,
)
from lmlab.errors import ConfigError, DataError, DataNotFoundError


@pytest.fixture(scope="module")
def shakespeare():
    return load_corpus("tinyshakespeare")


def test_dtype_is_the_smallest_that_holds_every_id():
    assert token_dtype(65) == np.uint16
    assert token_dtype(65536) == np.uint16  # ids 0..65535
    assert token_dtype(65537) == np.uint32
    for bad in [0, 2**32 + 1, 1.5, True]:
        with pytest.raises(ConfigError, match="vocab_size"):
            token_dtype(bad)


def test_write_then_read_round_trips_uint16(tmp_path):
    ids = np.random.default_rng(0).integers(0, 65, size=10_000)
    path = write_tokens(tmp_path / "train.bin", ids, vocab_size=65)
    assert path == tmp_path / "train.bin"
    assert json.loads(sidecar_path(path).read_text()) == {
        "dtype": "uint16",
        "count": 10_000,
        "vocab_size": 65,
    }
    read = read_tokens(path, validate=True)
    assert isinstance(read, np.memmap)
    assert read.dtype == np.uint16 and read.shape == (10_000,)
    np.testing.assert_array_equal(read, ids)
    # Little-endian on disk whatever the machine, two bytes per id.
    assert path.read_bytes() == ids.astype("<u2").tobytes()


def test_write_then_read_round_trips_uint32(tmp_path):
    ids = np.array([0, 1, 65535, 65536, 69_999])  # the last two do not fit in uint16
    path = write_tokens(tmp_path / "big.bin", ids, vocab_size=70_000)
    read = read_tokens(path, validate=True)
    assert read.dtype == np.uint32
    np.testing.assert_array_equal(read, ids)
    assert read_token_meta(path) == {"dtype": "uint32", "count": 5, "vocab_size": 70_000}


def test_read_tokens_is_read_only(tmp_path):
    path = write_tokens(tmp_path / "t.bin", [1, 2, 3], vocab_size=4)
    with pytest.raises(ValueError, match="read-only"):
        read_tokens(path)[0] = 0


def test_chunked_writing_equals_one_shot(tmp_path, monkeypatch):
    ids = np.random.default_rng(0).integers(0, 1000, size=1000)
    one_shot = write_tokens(tmp_path / "one.bin", ids, vocab_size=1000).read_bytes()

    def chunks():  # lists, arrays and tensors, including an empty chunk
        yield ids[:100].tolist()
        yield ids[100:100]
        yield ids[100:500]
        yield torch.from_numpy(ids[500:])

    assert write_tokens(tmp_path / "chunks.bin", chunks(), 1000).read_bytes() == one_shot
    # A flat stream of ints is batched; make the batches small so several are written.
    monkeypatch.setattr(tokens, "_FLAT_CHUNK", 7)
    flat = (int(i) for i in ids)
    assert write_tokens(tmp_path / "flat.bin", flat, 1000).read_bytes() == one_shot
    assert write_tokens(tmp_path / "tensor.bin", torch.tensor(ids), 1000).read_bytes() == one_shot


@pytest.mark.parametrize(
    ("ids", "match"),
    [
        ([1, 2, 70_000], "token id 70000 at position 2"),
        ([[1, 2], [3, -1]], "token id -1 at position 3"),
        ([0.5, 1.5], "must be integers"),
        (np.zeros((2, 2), dtype=np.int64), "1-D"),
        ([], "no token ids"),
    ],
)
def test_write_tokens_rejects_bad_ids_naming_the_file(tmp_path, ids, match):
    path = tmp_path / "bad.bin"
    with pytest.raises(DataError, match=match) as info:
        write_tokens(path, ids, vocab_size=65536)
    assert str(path) in str(info.value)
    assert list(tmp_path.iterdir()) == []  # no partial file, no temporary left behind


def test_a_failed_write_leaves_the_previous_file_intact(tmp_path):
    path = write_tokens(tmp_path / "t.bin", [1, 2, 3], vocab_size=10)

    def chunks_that_go_bad():
        yield [4, 5, 6, 7]
        yield [99]  # >= vocab_size, after a chunk was already written to the temporary file

    with pytest.raises(DataError):
        write_tokens(path, chunks_that_go_bad(), vocab_size=10)
    np.testing.assert_array_equal(read_tokens(path), [1, 2, 3])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.bin", "t.bin.json"]


def test_read_tokens_missing_files(tmp_path):
    with pytest.raises(DataNotFoundError, match="nope.bin"):
        read_tokens(tmp_path / "nope.bin")
    (tmp_path / "raw.bin").write_bytes(b"\x00\x01")
    with pytest.raises(DataNotFoundError, match="raw.bin.json"):
        read_tokens(tmp_path / "raw.bin")


def test_read_tokens_detects_a_file_that_does_not_match_its_sidecar(tmp_path):
    path = write_tokens(tmp_path / "t.bin", [1, 2, 3, 4], vocab_size=10)
    path.write_bytes(path.read_bytes()[:6])  # truncated: 3 ids where the sidecar says 4
    with pytest.raises(DataError, match=r"has 6 bytes but its sidecar says 4 uint16") as info:
        read_tokens(path)
    assert str(path) in str(info.value)


@pytest.mark.parametrize(
    ("sidecar", "match"),
    [
        ("{broken", "not valid JSON"),
        ('{"dtype": "int8", "count": 4, "vocab_size": 10}', "must hold"),
        ('{"dtype": "uint16", "count": "4", "vocab_size": 10}', "must hold"),
        ('{"dtype": "uint32", "count": 2, "vocab_size": 10}', "which needs uint16"),
    ],
)
def test_read_tokens_rejects_a_malformed_sidecar_naming_it(tmp_path, sidecar, match):
    path = write_tokens(tmp_path / "t.bin", [1, 2, 3, 4], vocab_size=10)
    sidecar_path(path).write_text(sidecar)
    with pytest.raises(DataError, match=match) as info:
        read_tokens(path)
    assert "t.bin.json" in str(info.value)


def test_validate_finds_ids_outside_the_vocabulary(tmp_path):
    path = write_tokens(tmp_path / "t.bin", [1, 2, 300, 4], vocab_size=1000)
    # Claim a smaller vocabulary, as if the file were paired with the wrong tokenizer.
    sidecar_path(path).write_text(json.dumps({"dtype": "uint16", "count": 4, "vocab_size": 65}))
    assert len(read_tokens(path)) == 4  # the cheap check cannot see ids
    with pytest.raises(DataError, match="id 300 at position 2") as info:
        read_tokens(path, validate=True)
    assert str(path) in str(info.value)


@pytest.mark.parametrize("tokenizer", [CharTokenizer.train, lambda text: ByteTokenizer()])
def test_encode_to_file_in_blocks_equals_encoding_the_whole_text(tmp_path, shakespeare, tokenizer):
    text = shakespeare[:100_000] + " ünïcödé 🙂 at the end"
    tok = tokenizer(text)
    expected = tok.encode(text)
    path = encode_to_file(text, tok, tmp_path / "t.bin", block_chars=999)
    np.testing.assert_array_equal(read_tokens(path), expected)
    # The same text as a stream of lines (what iterating an open file gives).
    path = encode_to_file(io.StringIO(text), tok, tmp_path / "lines.bin", block_chars=999)
    np.testing.assert_array_equal(read_tokens(path), expected)
    assert read_token_meta(path)["vocab_size"] == tok.vocab_size


def test_encode_to_file_with_bpe_is_exact_on_prose(tmp_path, shakespeare):
    # Blocks end at "\S\n\S" line breaks, which no GPT-2 pre-token spans; so encoding
    # block by block must equal encoding the whole text, blank lines and all.
    text = shakespeare[:200_000]
    tok = BPETokenizer.train(text, vocab_size=400)
    path = encode_to_file(text, tok, tmp_path / "bpe.bin", block_chars=4096)
    np.testing.assert_array_equal(read_tokens(path), tok.encode(text))


def test_encode_to_file_with_bpe_is_exact_on_indented_lines(tmp_path):
    # Lines with indents, trailing spaces and blank lines, where a naive cut goes wrong: at
    # the end of a block the pre-tokenizer keeps "a  \n" as "a" | "  \n" where before "b"
    # it splits "a" | "  " | "\n"; and ":\n    b" gives "\n   " | " b" but ":\n" | "    b"
    # across a cut. Random lines put the block ends at every kind of line break.
    rng = random.Random(0)
    words = ["def", "return", "x", "y", "=", "f():", "(1)", "#", "42"]
    lines = []
    for _ in range(3000):
        indent, trail = rng.choice(["", "", "    "]), rng.choice(["", "", "  "])
        lines.append(f"{indent}{rng.choice(words)} {rng.choice(words)}{trail}")
        if rng.random() < 0.2:
            lines.append("")
    text = "\n".join(lines)
    tok = BPETokenizer.train(text, vocab_size=400)
    path = encode_to_file(text, tok, tmp_path / "code.bin", block_chars=200)
    np.testing.assert_array_equal(read_tokens(path), tok.encode(text))


def test_encode_to_file_reports_unknown_characters(tmp_path):
    tok = CharTokenizer.train("abc")
    with pytest.raises(DataError, match="'z'"):
        encode_to_file("abcz", tok, tmp_path / "t.bin")
    assert list(tmp_path.iterdir()) == []


def test_token_files_have_ordinary_permissions(tmp_path):
    """They were written through mkstemp, which makes 0600 files; now what open() makes."""
    import os
    import stat

    old = os.umask(0o022)
    try:
        path = encode_to_file("hello world", ByteTokenizer(), tmp_path / "t.bin")
    finally:
        os.umask(old)
    assert {stat.S_IMODE(f.stat().st_mode) for f in tmp_path.iterdir()} == {0o644}
    assert path.is_file()
