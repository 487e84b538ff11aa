"""Token files: an encoded corpus on disk, memory-mapped so it never has to fit in memory.

A token file is the raw ids, one after another, as little-endian ``uint16`` (when every id
fits: ``vocab_size <= 65536``) or ``uint32``, the format nanoGPT's ``train.bin`` uses. A
JSON sidecar beside it, ``<path>.json``, records what the bytes mean:

    train.bin       the ids: count * itemsize bytes
    train.bin.json  {"dtype": "uint16", "count": 1003854, "vocab_size": 65}

Writing takes the ids in chunks, so a corpus larger than memory is encoded and written one
block at a time; reading maps the file, so a training loop pages in only the windows it
samples. Both files are written under a temporary name and renamed into place, so a crash
leaves the previous files or none, never a half-written one that looks whole.

    tok = CharTokenizer.train(text)
    encode_to_file(text, tok, "runs/data/train.bin")
    ids = read_tokens("runs/data/train.bin")   # ids.dtype == uint16, ids.shape == (1115394,)
"""

from __future__ import annotations

import itertools
import json
import numbers
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import IO, Any

import numpy as np

from lmlab.data.corpus import text_blocks
from lmlab.data.tokenizers import Tokenizer
from lmlab.errors import ConfigError, DataError, DataNotFoundError
from lmlab.fileio import atomic_write_with

# Stored little-endian whatever the machine, so a file written on one machine reads on any.
_DTYPES = {"uint16": np.dtype("<u2"), "uint32": np.dtype("<u4")}
# How many ids of a flat iterable of ints to gather before converting and writing them.
_FLAT_CHUNK = 1 << 20
_END = object()


def token_dtype(vocab_size: int) -> np.dtype:
    """The smallest dtype that holds every id: ``65 -> uint16``, ``70000 -> uint32``."""
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, numbers.Integral):
        raise ConfigError(f"vocab_size must be an integer, got {vocab_size!r}")
    if not 1 <= vocab_size <= 2**32:
        raise ConfigError(f"vocab_size must be between 1 and 2**32, got {vocab_size}")
    return _DTYPES["uint16"] if vocab_size <= 2**16 else _DTYPES["uint32"]


def sidecar_path(path: str | os.PathLike[str]) -> Path:
    """Where the metadata of token file ``path`` lives: ``train.bin -> train.bin.json``."""
    path = Path(path)
    return path.with_name(path.name + ".json")


def write_tokens(
    path: str | os.PathLike[str],
    ids: np.ndarray | Iterable[int] | Iterable[Sequence[int]],
    vocab_size: int,
) -> Path:
    """Write token ids to ``path`` (and its ``.json`` sidecar); return ``path``.

    ``ids`` is a 1-D array or tensor, an iterable of ints, or an iterable of chunks (lists,
    arrays, tensors) whose concatenation is the token stream; a generator of chunks keeps
    only one chunk in memory. Every id must lie in ``[0, vocab_size)``, and there must be
    at least one (an empty file cannot be memory-mapped).

        write_tokens("a.bin", [[5, 1], [2]], vocab_size=8)   # a.bin holds 5 1 2 as uint16
    """
    path = Path(path)
    dtype = token_dtype(vocab_size)
    count = 0

    def write_ids(f: IO[bytes]) -> None:
        nonlocal count
        for chunk in _chunks(ids):
            array = _checked_chunk(chunk, vocab_size, count, path)
            f.write(array.astype(dtype).tobytes())
            count += len(array)
        if count == 0:
            raise DataError(f"no token ids to write to {str(path)!r}")

    _replace_atomically(path, write_ids)
    meta = {"dtype": dtype.name, "count": count, "vocab_size": int(vocab_size)}
    # The sidecar goes second: a crash between the two renames leaves a sidecar whose
    # count does not match the file's size, which read_tokens reports.
    _replace_atomically(sidecar_path(path), lambda f: f.write(json.dumps(meta).encode()))
    return path


def _chunks(ids: Any) -> Iterator[np.ndarray]:
    """Split the accepted forms of ``ids`` into arrays (still unchecked)."""
    if hasattr(ids, "__array__"):  # a numpy array or a CPU torch tensor: one chunk
        yield np.asarray(ids)
        return
    items = iter(ids)
    first = next(items, _END)
    if first is _END:
        return
    items = itertools.chain([first], items)
    if isinstance(first, numbers.Number):
        # A flat stream of ids: batch it, converting a million at a time (and a float among
        # them makes its batch a float array, which _checked_chunk reports).
        while batch := list(itertools.islice(items, _FLAT_CHUNK)):
            yield np.asarray(batch)
    else:
        for chunk in items:
            yield np.asarray(chunk)


def _checked_chunk(array: np.ndarray, vocab_size: int, offset: int, path: Path) -> np.ndarray:
    if array.size == 0:
        return array.reshape(0)
    if array.ndim != 1:
        raise DataError(
            f"token ids for {str(path)!r} must come as 1-D chunks; the chunk at position "
            f"{offset} has shape {array.shape}"
        )
    if not np.issubdtype(array.dtype, np.integer):
        raise DataError(
            f"token ids for {str(path)!r} must be integers; the chunk at position "
            f"{offset} has dtype {array.dtype}"
        )
    bad = (array < 0) | (array >= vocab_size)
    if bad.any():
        at = int(np.argmax(bad))
        raise DataError(
            f"token id {array[at]} at position {offset + at} for {str(path)!r} is outside "
            f"[0, vocab_size={vocab_size})"
        )
    return array


def _replace_atomically(path: Path, write: Callable[[IO[bytes]], object]) -> None:
    def write_file(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            write(f)

    atomic_write_with(path, write_file)


def encode_to_file(
    texts: str | Iterable[str],
    tokenizer: Tokenizer,
    path: str | os.PathLike[str],
    block_chars: int = 1 << 20,
) -> Path:
    """Encode a text, or a stream of text pieces, into the token file ``path``.

    The text is encoded in blocks of about ``block_chars`` characters (see
    ``lmlab.data.corpus.text_blocks``), so memory holds one block and its ids. The pieces
    are one text: pass an open file and its lines are joined back as they were. For
    character and byte tokenizers the ids are exactly ``tokenizer.encode(whole_text)``;
    for a byte-level BPE they are too wherever a block can end at a line break between
    two non-space characters, which every ordinary prose or code file has. Only a block
    without one (a megabyte on one line) is cut mid-line, where a BPE token may be split.

        encode_to_file(open("big.txt"), tok, "big.bin")  ->  Path("big.bin")
    """
    id_chunks = (tokenizer.encode(block) for block in text_blocks(texts, block_chars))
    return write_tokens(path, id_chunks, tokenizer.vocab_size)


def read_token_meta(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The checked sidecar of token file ``path``: ``{"dtype", "count", "vocab_size"}``."""
    path = Path(path)
    meta_path = sidecar_path(path)
    if not path.is_file():
        raise DataNotFoundError(f"token file {str(path)!r} does not exist")
    if not meta_path.is_file():
        raise DataNotFoundError(
            f"token file {str(path)!r} has no sidecar {meta_path.name!r} saying its dtype and "
            "length; write token files with lmlab.data.write_tokens"
        )
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"token sidecar {str(meta_path)!r} is not valid JSON: {e}") from e

    def field_ok(key: str) -> bool:
        value = meta.get(key) if isinstance(meta, dict) else None
        return isinstance(value, int) and not isinstance(value, bool) and value >= 0

    if not (field_ok("count") and field_ok("vocab_size") and meta.get("dtype") in _DTYPES):
        raise DataError(
            f"token sidecar {str(meta_path)!r} must hold {{'dtype': 'uint16' or 'uint32', "
            f"'count': int, 'vocab_size': int}}, got {meta!r}"
        )
    try:
        expected = token_dtype(meta["vocab_size"])
    except ConfigError as e:
        raise DataError(f"token sidecar {str(meta_path)!r}: {e}") from e
    if meta["dtype"] != expected.name:
        raise DataError(
            f"token sidecar {str(meta_path)!r} says dtype {meta['dtype']} for vocab_size "
            f"{meta['vocab_size']}, which needs {expected.name}"
        )
    size = path.stat().st_size
    if size != meta["count"] * expected.itemsize:
        raise DataError(
            f"token file {str(path)!r} has {size} bytes but its sidecar says {meta['count']} "
            f"{meta['dtype']} ids ({meta['count'] * expected.itemsize} bytes); the file is "
            "truncated or belongs to another sidecar, so write it again"
        )
    if meta["count"] == 0:
        raise DataError(f"token file {str(path)!r} is empty")
    return {"dtype": meta["dtype"], "count": meta["count"], "vocab_size": meta["vocab_size"]}


def read_tokens(path: str | os.PathLike[str], validate: bool = False) -> np.memmap:
    """Map token file ``path`` read-only: a 1-D ``uint16``/``uint32`` array of ``count`` ids.

    Nothing is read until it is indexed, so this is instant for any size. The sidecar is
    always checked against the file's size; ``validate=True`` also reads every id once,
    block by block, and raises ``DataError`` at the first one ``>= vocab_size``.

        ids = read_tokens("train.bin")
        x = torch.from_numpy(ids[i : i + T].astype(np.int64))   # one window, int64
    """
    meta = read_token_meta(path)
    ids = np.memmap(path, dtype=_DTYPES[meta["dtype"]], mode="r", shape=(meta["count"],))
    if validate:
        vocab_size = meta["vocab_size"]
        for start in range(0, len(ids), 1 << 24):  # 16M ids (32-64 MB) in memory at a time
            block = ids[start : start + (1 << 24)]
            bad = block >= vocab_size
            if bad.any():
                at = start + int(np.argmax(bad))
                raise DataError(
                    f"token file {str(path)!r} holds id {ids[at]} at position {at}, outside "
                    f"[0, vocab_size={vocab_size}) of its sidecar"
                )
    return ids


# ----------------------------------------------------------------------------- shards

SHARD_INDEX = "shards.json"


def write_shards(
    folder: str | os.PathLike[str],
    ids: np.ndarray | Iterable[int] | Iterable[Sequence[int]],
    vocab_size: int,
    shard_tokens: int = 1 << 26,
) -> Path:
    """Write a token stream as token files of ``shard_tokens`` ids each (the last one
    shorter) in ``folder``, with an index; return ``folder``.

    ``ids`` takes the forms ``write_tokens`` takes; a generator of chunks keeps one chunk
    and one shard's worth of ids in memory at most, so a corpus larger than memory is
    written shard by shard. The index ``shards.json`` goes last (``{"vocab_size": 65,
    "shards": ["shard-00000.bin", ...]}``): a folder without it is not a finished set.

        write_shards("data/", [[5, 1, 2, 7, 3]], vocab_size=8, shard_tokens=2)
        -> shard-00000.bin (5 1), shard-00001.bin (2 7), shard-00002.bin (3)
    """
    if isinstance(shard_tokens, bool) or not isinstance(shard_tokens, int) or shard_tokens < 2:
        raise ConfigError(f"shard_tokens={shard_tokens!r} is invalid: must be an integer >= 2")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    names: list[str] = []
    pending: list[np.ndarray] = []
    held = 0

    def flush(count: int) -> None:
        nonlocal pending, held
        joined = np.concatenate(pending)
        name = f"shard-{len(names):05d}.bin"
        write_tokens(folder / name, joined[:count], vocab_size)
        names.append(name)
        pending, held = [joined[count:]], len(joined) - count

    total = 0
    for chunk in _chunks(ids):
        pending.append(_checked_chunk(chunk, vocab_size, total, folder))
        held += len(pending[-1])
        total += len(pending[-1])
        while held >= shard_tokens:
            flush(shard_tokens)
    if held:
        flush(held)
    if not names:
        raise DataError(f"no token ids to write to {str(folder)!r}")
    meta = {"vocab_size": int(vocab_size), "shards": names}
    _replace_atomically(folder / SHARD_INDEX, lambda f: f.write(json.dumps(meta).encode()))
    return folder


def encode_to_shards(
    texts: str | Iterable[str],
    tokenizer: Tokenizer,
    folder: str | os.PathLike[str],
    shard_tokens: int = 1 << 26,
) -> Path:
    """Encode a text, or a stream of text pieces (an open file), into token shards in
    ``folder`` (``write_shards``), one block of text in memory at a time."""
    id_chunks = (tokenizer.encode(block) for block in text_blocks(texts))
    return write_shards(folder, id_chunks, tokenizer.vocab_size, shard_tokens)


class TokenShards:
    """A folder of token files written by ``write_shards``, each memory-mapped (nothing
    is read until indexed). ``shards``: the 1-D ``uint16``/``uint32`` memmaps in order.

        shards = TokenShards("data/")
        len(shards.shards), shards.vocab_size, len(shards)   # files, vocabulary, ids
    """

    def __init__(self, folder: str | os.PathLike[str]):
        self.folder = Path(folder)
        index = self.folder / SHARD_INDEX
        if not index.is_file():
            raise DataNotFoundError(
                f"{str(self.folder)!r} holds no {SHARD_INDEX}: write token shards there with "
                "lmlab.data.write_shards or encode_to_shards"
            )
        try:
            meta = json.loads(index.read_text(encoding="utf-8"))
            names, self.vocab_size = list(meta["shards"]), int(meta["vocab_size"])
        except (ValueError, KeyError, TypeError) as e:
            raise DataError(
                f"{str(index)!r} must hold {{'vocab_size': int, 'shards': [file names]}}: {e}"
            ) from e
        if not names or not all(isinstance(n, str) and "/" not in n for n in names):
            raise DataError(f"{str(index)!r} lists no shard files (or paths outside the folder)")
        self.shards = [read_tokens(self.folder / name) for name in names]

    def __len__(self) -> int:
        return sum(len(shard) for shard in self.shards)
