"""Tests for lmlab.data.corpus: loading corpora, train/val splits and text blocks."""

import io

import pytest

from lmlab.data.corpus import BUNDLED_CORPORA, load_corpus, split_text, text_blocks
from lmlab.errors import ConfigError, DataError, DataNotFoundError


def test_bundled_corpus_loads():
    text = load_corpus("tinyshakespeare")
    assert "tinyshakespeare" in BUNDLED_CORPORA
    assert len(text) == 1115394
    assert text.startswith("First Citizen:\nBefore we proceed any further, hear me speak.")


def test_the_encyclopedia_is_documents_of_sentences_the_same_on_every_call():
    from lmlab.data.documents import build_world

    text = load_corpus("encyclopedia")
    assert "encyclopedia" in BUNDLED_CORPORA and text == load_corpus("encyclopedia")
    articles = text.rstrip("\n").split("\n\n")
    assert len(articles) == 60 * len(build_world(0).documents)
    first = build_world(0).documents[0].text
    assert articles[0].replace("\n", " ") == first  # one sentence per line, nothing lost
    assert all(line.endswith(".") for line in text.splitlines() if line)
    # the held-out tenth (split_text) is the last worlds' articles
    val = split_text(text, 0.1)[1]
    assert all(d.text.split(". ")[0] in val for d in build_world(59).documents)


def test_text_file_loads_and_drops_byte_order_mark(tmp_path):
    path = tmp_path / "my.txt"
    path.write_bytes("\ufeffhéllo\nworld\n".encode())
    assert load_corpus(str(path)) == "héllo\nworld\n"
    assert load_corpus(path) == "héllo\nworld\n"  # a Path works as well as a str


def test_folder_concatenates_txt_files_sorted_by_relative_path(tmp_path):
    # Created out of order; "a/z.txt" sorts before "b.txt" because whole paths are compared.
    (tmp_path / "c.txt").write_text("C")
    (tmp_path / "b.txt").write_text("B")
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "z.txt").write_text("AZ")
    (tmp_path / "notes.md").write_text("not a corpus file")
    assert load_corpus(str(tmp_path)) == "AZ\nB\nC"


def test_missing_path_names_it_and_the_bundled_corpora(tmp_path):
    missing = tmp_path / "nope.txt"
    with pytest.raises(DataNotFoundError) as info:
        load_corpus(str(missing))
    assert str(missing) in str(info.value)
    assert "tinyshakespeare" in str(info.value)
    assert isinstance(info.value, FileNotFoundError)


def test_misspelt_bundled_name_suggests_the_right_one():
    with pytest.raises(DataNotFoundError, match="did you mean 'tinyshakespeare'"):
        load_corpus("tinyshakspeare")


def test_folder_without_txt_files_is_an_error(tmp_path):
    (tmp_path / "readme.md").write_text("hello")
    with pytest.raises(DataError, match="no .txt files") as info:
        load_corpus(str(tmp_path))
    assert str(tmp_path) in str(info.value)


def test_empty_file_is_an_error(tmp_path):
    path = tmp_path / "empty.txt"
    path.write_text("")
    with pytest.raises(DataError, match="empty") as info:
        load_corpus(str(path))
    assert "empty.txt" in str(info.value)


def test_non_utf8_file_names_the_file_and_byte_offset(tmp_path):
    (tmp_path / "good.txt").write_text("fine")
    (tmp_path / "latin1.txt").write_bytes("café".encode("latin-1"))  # é is the lone byte 0xe9
    with pytest.raises(DataError) as info:
        load_corpus(str(tmp_path))
    message = str(info.value)
    assert "latin1.txt" in message
    assert "byte offset 3" in message
    assert "0xe9" in message


def test_split_text_keeps_the_last_fraction_for_validation():
    assert split_text("abcdefghij", 0.2) == ("abcdefgh", "ij")
    text = load_corpus("tinyshakespeare")
    train, val = split_text(text)
    # nanoGPT's prepare.py: train_data = data[:int(n * 0.9)]
    assert train == text[: int(len(text) * 0.9)]
    assert train + val == text


@pytest.mark.parametrize("fraction", [0, 1, -0.1, 1.5, True, "0.1"])
def test_split_text_rejects_bad_fractions(fraction):
    with pytest.raises(ConfigError, match="val_fraction"):
        split_text("abcdefghij", fraction)


def test_split_text_rejects_text_too_short_for_two_parts():
    assert split_text("ab", 0.1) == ("a", "b")
    with pytest.raises(DataError, match="too short"):
        split_text("a", 0.1)  # int(1 * 0.9) == 0: no training text


@pytest.mark.parametrize("block_chars", [1, 7, 100, 1 << 20])
def test_text_blocks_rejoin_to_the_text_and_respect_the_size(block_chars):
    text = load_corpus("tinyshakespeare")[:5000] + "x" * 300  # ends in a line with no break
    blocks = list(text_blocks(text, block_chars))
    assert "".join(blocks) == text
    assert all(0 < len(b) <= block_chars for b in blocks)


def test_text_blocks_of_a_stream_equal_those_of_the_joined_text():
    text = load_corpus("tinyshakespeare")[:20000]
    from_lines = list(text_blocks(io.StringIO(text), 1000))
    assert from_lines == list(text_blocks(text, 1000))


def test_text_blocks_end_after_a_line_break_between_non_space_characters():
    text = "one\ntwo  \nthree\n\n  four five six"
    # The only safe break is "one\n|two"; every later one has space on a side. After it,
    # no safe break is left, so the next block is cut at the size limit.
    assert list(text_blocks(text, 20)) == ["one\n", "two  \nthree\n\n  four ", "five six"]


def test_text_blocks_cut_at_the_size_when_there_is_no_safe_line_break():
    assert list(text_blocks("abcdefgh", 3)) == ["abc", "def", "gh"]


def test_text_blocks_reject_bad_arguments():
    with pytest.raises(ConfigError, match="block_chars"):
        list(text_blocks("abc", 0))
    with pytest.raises(DataError, match="piece 1 is a bytes"):
        list(text_blocks(["ok", b"bytes"], 10))
