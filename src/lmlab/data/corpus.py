"""Text corpora: the bundled Tiny Shakespeare, the user's own files, and train/val splits.

A corpus is one Python string. ``load_corpus`` turns a name or a path into that string,
``split_text`` cuts it into training and validation text the way nanoGPT does (the last
tenth is validation), and ``text_blocks`` cuts a long text, or a stream of pieces such as
the lines of an open file, into blocks of about a megabyte so that tokenizers can encode
a corpus larger than memory one block at a time.

    >>> text = load_corpus("tinyshakespeare")
    >>> len(text), text[:14]
    (1115394, 'First Citizen:')
    >>> train, val = split_text(text, val_fraction=0.1)
    >>> len(train), len(val)
    (1003854, 111540)
"""

from __future__ import annotations

import gzip
import os
from collections.abc import Iterable, Iterator
from importlib import resources
from pathlib import Path

from lmlab.data.documents import encyclopedia_text
from lmlab.errors import ConfigError, DataError, DataNotFoundError, closest

BUNDLED_CORPORA: tuple[str, ...] = ("tinyshakespeare", "encyclopedia")
"""Corpora that ship inside the package, loadable by name with ``load_corpus``:
Tiny Shakespeare (one stream of plays, 1.1 MB) and the generated encyclopedia of
``lmlab.data.documents`` (6,000 short articles, one sentence per line, a blank line
between articles: documents, as BERT's next-sentence prediction expects)."""


def load_corpus(name_or_path: str | os.PathLike[str]) -> str:
    """Load a corpus as one string.

    ``name_or_path`` is a bundled corpus name (``"tinyshakespeare"``, ``"encyclopedia"``,
    see ``BUNDLED_CORPORA``; a name wins over a
    file of the same name in the working directory), a UTF-8 text file, or a folder
    whose ``*.txt`` files, found recursively and sorted by their path relative to the
    folder, are joined with ``"\\n"``. A UTF-8 byte-order mark at the start of a file is
    dropped.

        folder/a.txt = "to be", folder/sub/b.txt = "or not"  ->  "to be\\nor not"

    Raises ``DataNotFoundError`` for a path that does not exist, and ``DataError`` for a
    folder without ``.txt`` files, an empty corpus or a file that is not valid UTF-8.
    """
    if isinstance(name_or_path, str) and name_or_path in BUNDLED_CORPORA:
        return _load_bundled(name_or_path)

    path = Path(name_or_path)
    if not path.exists():
        raise DataNotFoundError(
            f"corpus {str(name_or_path)!r} is neither a bundled corpus nor an existing "
            f"file or folder{closest(str(name_or_path), BUNDLED_CORPORA)}; bundled corpora: "
            f"{', '.join(BUNDLED_CORPORA)}"
        )
    if path.is_dir():
        # Sort by the relative POSIX path, not by os.walk order, so that the same folder
        # gives the same corpus on every machine and file system.
        files = sorted(
            (p for p in path.rglob("*.txt") if p.is_file()),
            key=lambda p: p.relative_to(path).as_posix(),
        )
        if not files:
            raise DataError(f"corpus folder {str(path)!r} contains no .txt files")
        text = "\n".join(_read_utf8(p) for p in files)
    else:
        text = _read_utf8(path)
    if not text:
        raise DataError(f"corpus {str(path)!r} is empty")
    return text


def _load_bundled(name: str) -> str:
    if name == "encyclopedia":
        return encyclopedia_text()
    resource = resources.files("lmlab.data").joinpath(f"{name}.txt.gz")
    with resource.open("rb") as f:
        return gzip.decompress(f.read()).decode("utf-8")


def _read_utf8(path: Path) -> str:
    try:
        data = path.read_bytes()
    except OSError as e:
        raise DataError(f"cannot read corpus file {str(path)!r}: {e.strerror}") from e
    try:
        # utf-8-sig drops a byte-order mark that some Windows editors write; it is not text.
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise DataError(
            f"corpus file {str(path)!r} is not valid UTF-8: byte {data[e.start]:#04x} at "
            f"byte offset {e.start} ({e.reason}); re-save it as UTF-8"
        ) from e


def split_text(text: str, val_fraction: float = 0.1) -> tuple[str, str]:
    """Split ``text`` into ``(train, val)``: the last ``val_fraction`` of it is validation.

    The cut is at character ``int(len(text) * (1 - val_fraction))``, as in nanoGPT, so the
    split is deterministic and validation text is never seen in training.

        split_text("abcdefghij", 0.2)  ->  ("abcdefgh", "ij")

    ``val_fraction`` must lie strictly between 0 and 1 (``ConfigError`` otherwise); a text
    too short to give both parts a character raises ``DataError``.
    """
    if isinstance(val_fraction, bool) or not isinstance(val_fraction, int | float):
        raise ConfigError(f"val_fraction must be a number, got {val_fraction!r}")
    if not 0 < val_fraction < 1:
        raise ConfigError(
            f"val_fraction must be strictly between 0 and 1 (e.g. 0.1), got {val_fraction!r}"
        )
    cut = int(len(text) * (1 - val_fraction))
    if cut == 0 or cut == len(text):
        raise DataError(
            f"a text of {len(text)} characters is too short to split with "
            f"val_fraction={val_fraction}: one of the parts would be empty"
        )
    return text[:cut], text[cut:]


def text_blocks(texts: str | Iterable[str], block_chars: int = 1 << 20) -> Iterator[str]:
    """Cut a text, or a stream of text pieces, into consecutive blocks of about ``block_chars``.

    The pieces are treated as one text (joined with nothing: pass the lines of an open
    file and their newlines are kept), and only ``block_chars`` plus one piece is held in
    memory at a time. A block ends, where it can, just after a line break that has a
    non-space character on each side, ``"...speak.\\n|Before..."``. A byte-level BPE with
    the GPT-2 pre-tokenizer never merges across such a point (the ``"\\n"`` is a
    pre-token of its own), so encoding block by block gives exactly the ids of encoding
    the whole text. A block with no such line break is cut at ``block_chars``, which is
    still exact for character and byte tokenizers.

        "".join(text_blocks(text, n)) == text     for every text and n >= 1
    """
    if isinstance(block_chars, bool) or not isinstance(block_chars, int) or block_chars < 1:
        raise ConfigError(f"block_chars must be a positive integer, got {block_chars!r}")
    if isinstance(texts, str):
        texts = (texts,)

    pending: list[str] = []
    pending_chars = 0
    for i, piece in enumerate(texts):
        if not isinstance(piece, str):
            raise DataError(f"text piece {i} is a {type(piece).__name__}, expected str")
        pending.append(piece)
        pending_chars += len(piece)
        if pending_chars <= block_chars:
            continue
        # Walk through the joined buffer with an index instead of slicing off each block,
        # so a gigabyte string given in one piece is not copied once per block.
        buffer = "".join(pending)
        start = 0
        while len(buffer) - start > block_chars:
            cut = _block_end(buffer, start, start + block_chars)
            yield buffer[start:cut]
            start = cut
        pending = [buffer[start:]]
        pending_chars = len(buffer) - start
    tail = "".join(pending)
    if tail:
        yield tail


def _block_end(buffer: str, start: int, end: int) -> int:
    """The last position in ``(start, end]`` just after a ``"\\S\\n"`` followed by ``\\S``.

    Callers guarantee ``end < len(buffer)``, so the character after the cut is known.
    Python's ``str.isspace`` counts a few control characters as space that Rust's regex
    does not, which only makes this test stricter than the tokenizer's.
    """
    newline = buffer.rfind("\n", start, end)
    while newline > start:
        if not buffer[newline - 1].isspace() and not buffer[newline + 1].isspace():
            return newline + 1
        newline = buffer.rfind("\n", start, newline)
    return end
