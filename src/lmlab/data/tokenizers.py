"""Tokenizers: text <-> token ids, with one interface for characters, bytes and BPE.

Every tokenizer answers the same questions: ``encode(text) -> ids``, ``decode(ids) ->
text``, how many ids there are (``vocab_size``), which id ends a document (``eos_id``,
or ``None``), and how to save itself as ``tokenizer.json`` in a directory.

- ``CharTokenizer``: one id per distinct character of the training text, sorted, as in
  nanoGPT's Shakespeare example (65 ids for Tiny Shakespeare).
- ``ByteTokenizer``: one id per UTF-8 byte value, 256 in all; it can encode any text.
- ``BPETokenizer``: byte-level byte-pair encoding (Sennrich et al. 2016, with the byte
  alphabet and pre-tokenizer of GPT-2, Radford et al. 2019), trained and run by the
  Hugging Face ``tokenizers`` library and saved in its ``tokenizer.json`` format.
- ``HFTokenizer``: any other model of a Hugging Face ``tokenizer.json`` (BERT's WordPiece,
  Unigram, WordLevel), loaded, not trained; it adds what an encoder needs: the template
  (``[CLS] text [SEP]``), padded batches with an attention mask, and the special ids.
- ``WordTokenizer``: words and punctuation, one sentence per line ending in ``</s>``, rare
  words as ``<unk>``: the units of word-level n-gram models and of KenLM (its rules are
  in its docstring).
- ``SentencePieceTokenizer``: a SentencePiece ``tokenizer.model`` (Llama 1 and 2, Mistral,
  T5), run by the ``sentencepiece`` library, loaded, not trained.

``find_tokenizer`` reads whichever layout a model folder has: ``tokenizer.json``, GPT-2's
older ``vocab.json`` + ``merges.txt``, or ``tokenizer.model``; a folder with none has no
tokenizer (None), and ``require_tokenizer`` turns that into one clear error when text is
needed.

Character and byte tokenizers are written here because they are a few lines each; BPE
training is the ``tokenizers`` library's job, so there is no parity test to write: it
*is* the reference. Every kind is saved as a Hugging Face ``tokenizer.json`` that the
``tokenizers`` library and transformers' ``AutoTokenizer`` load and run to the same ids
(``hf_char_tokenizer``, ``hf_byte_tokenizer``; parity test over random text in
tests/data/test_tokenizers.py); lmlab's older files (``{"kind": "char", ...}``) still load.

    >>> tok = CharTokenizer.train("hello")
    >>> tok.vocab_size, tok.encode("hell")
    (4, [1, 0, 2, 2])
    >>> tok.decode([3, 2, 0])
    'ole'
    >>> ByteTokenizer().encode("é!")
    [195, 169, 33]
"""

from __future__ import annotations

import abc
import inspect
import itertools
import json
import os
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import tokenizers

from lmlab.data.corpus import text_blocks
from lmlab.errors import ConfigError, DataError, DataNotFoundError, closest
from lmlab.fileio import atomic_write_bytes, atomic_write_json, atomic_write_text

TOKENIZER_FILE = "tokenizer.json"
GPT2_VOCAB_FILE, GPT2_MERGES_FILE = "vocab.json", "merges.txt"
SENTENCEPIECE_FILE = "tokenizer.model"
TOKENIZER_LAYOUTS = (
    f"{TOKENIZER_FILE}, {GPT2_VOCAB_FILE} + {GPT2_MERGES_FILE}, {SENTENCEPIECE_FILE}"
)
"""The tokenizer files ``find_tokenizer`` looks for in a model folder, in that order."""
# Beside a BPE tokenizer.json, as in Hugging Face model folders: tokenizer.json has no
# field for "this special token ends a document", tokenizer_config.json does.
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
# What a char or byte tokenizer's tokenizer_config.json says, so that transformers'
# AutoTokenizer runs tokenizer.json as it is (not through a model family's own tokenizer
# class) and decodes without "cleaning up" spaces before punctuation, as lmlab does not.
PLAIN_TOKENIZER_CONFIG = {
    "tokenizer_class": "PreTrainedTokenizerFast",
    "clean_up_tokenization_spaces": False,
}
# One match per character (a code point); "." would not match a newline.
_ONE_CHAR = r"[\s\S]"


class Tokenizer(abc.ABC):
    """What every lmlab tokenizer provides; see the module docstring."""

    kind: str
    """``"char"``, ``"byte"`` or ``"bpe"``: the name ``train_tokenizer`` takes (``"hf"`` for
    a loaded Hugging Face tokenizer of another model type, which cannot be trained here)."""
    vocab_size: int
    """Number of ids: every id lies in ``[0, vocab_size)``, the model's embedding rows."""
    eos_id: int | None
    """Id of the end-of-document token, or ``None`` when the vocabulary has none."""

    @abc.abstractmethod
    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``."""

    @abc.abstractmethod
    def decode(self, ids: Sequence[int]) -> str:
        """Text of the token ids ``ids`` (a list, a 1-D array or a 1-D tensor)."""

    @abc.abstractmethod
    def save(self, directory: str | os.PathLike[str]) -> None:
        """Write ``tokenizer.json`` into ``directory`` (created if missing)."""

    def to_config(self) -> dict[str, Any]:
        """A small JSON summary for a run's ``config.json``, e.g. ``{"kind": "char", ...}``."""
        return {"kind": self.kind, "vocab_size": self.vocab_size, "eos_id": self.eos_id}

    def __repr__(self) -> str:
        return f"{type(self).__name__}(vocab_size={self.vocab_size}, eos_id={self.eos_id})"


class CharTokenizer(Tokenizer):
    """One id per character, in the order of ``chars`` (``train`` sorts them).

    A character outside the vocabulary raises ``DataError`` that names it; with
    ``unk=True`` the vocabulary gains one more token, ``"<unk>"`` (the last id), and
    unknown characters map to it, so decoding shows where text was lost.

        CharTokenizer("ab", unk=True).encode("abc")  ->  [0, 1, 2]      # 2 is "<unk>"
    """

    kind = "char"
    UNK_TOKEN = "<unk>"

    def __init__(self, chars: str | Sequence[str], unk: bool = False) -> None:
        chars = list(chars)
        if not chars:
            raise DataError("a char tokenizer needs at least one character")
        for c in chars:
            if not isinstance(c, str) or len(c) != 1:
                raise DataError(
                    f"char tokenizer vocabulary entries must be single characters, got {c!r}"
                )
        if len(set(chars)) != len(chars):
            repeated = sorted({c for c in chars if chars.count(c) > 1})
            raise DataError(f"char tokenizer vocabulary repeats {', '.join(map(repr, repeated))}")
        self.chars: list[str] = chars
        self.unk = bool(unk)
        self.unk_id: int | None = len(chars) if self.unk else None
        self.vocab_size = len(chars) + self.unk
        self.eos_id = None
        self._itos = chars + [self.UNK_TOKEN] if self.unk else chars
        # Encoding looks up each code point in a sorted array with np.searchsorted, which
        # runs a megabyte of text in milliseconds where a Python loop would take a second.
        points = np.array([ord(c) for c in chars], dtype=np.uint32)
        order = np.argsort(points)
        self._sorted_points = points[order]
        self._sorted_ids = order.astype(np.int64)

    @classmethod
    def train(cls, text: str, unk: bool = False) -> CharTokenizer:
        """The sorted set of characters of ``text``: ``"hello" -> ['e', 'h', 'l', 'o']``."""
        if not text:
            raise DataError("cannot train a char tokenizer on empty text")
        return cls(sorted(set(text)), unk=unk)

    def encode(self, text: str) -> list[int]:
        _check_str(text)
        # UTF-32 has exactly one 4-byte unit per Python character, so this is the array of
        # code points; surrogatepass keeps lone surrogates (they are just unknown chars).
        points = np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype="<u4")
        slot = np.searchsorted(self._sorted_points, points)
        slot = np.minimum(slot, len(self._sorted_points) - 1)
        known = self._sorted_points[slot] == points
        ids = self._sorted_ids[slot]
        if not known.all():
            if not self.unk:
                raise DataError(self._unknown_message(points, ~known))
            ids[~known] = self.unk_id
        return ids.tolist()

    def _unknown_message(self, points: np.ndarray, unknown: np.ndarray) -> str:
        positions = np.flatnonzero(unknown)
        distinct, first = np.unique(points[positions], return_index=True)
        shown = sorted(zip(positions[first].tolist(), distinct.tolist()))[:5]
        listed = ", ".join(f"{chr(c)!r} (first at position {p})" for p, c in shown)
        more = ", ..." if len(distinct) > len(shown) else ""
        return (
            f"{len(distinct)} character(s) not in the char tokenizer's vocabulary of "
            f"{len(self.chars)} ({len(positions)} occurrence(s)): {listed}{more}; train the "
            f"tokenizer on text that contains them, or build it with unk=True to map them "
            f"to {self.UNK_TOKEN!r}"
        )

    def decode(self, ids: Sequence[int]) -> str:
        itos = self._itos
        return "".join([itos[i] for i in _checked_ids(ids, self.vocab_size, self.kind).tolist()])

    def save(self, directory: str | os.PathLike[str]) -> None:
        """Write ``tokenizer.json`` (``hf_char_tokenizer``) and ``tokenizer_config.json``."""
        _save_plain(directory, hf_char_tokenizer(self))


class ByteTokenizer(Tokenizer):
    """The 256 byte values of UTF-8: any text encodes, with no training.

    Decoding an id sequence that is not valid UTF-8 (say, a model's sample that stops in
    the middle of a character) puts U+FFFD where the bad bytes were instead of failing.

        "é" -> [195, 169]          decode([195]) -> "\\ufffd"
    """

    kind = "byte"

    def __init__(self) -> None:
        self.vocab_size = 256
        self.eos_id = None

    def encode(self, text: str) -> list[int]:
        _check_str(text)
        return list(_utf8(text))

    def decode(self, ids: Sequence[int]) -> str:
        data = _checked_ids(ids, self.vocab_size, self.kind).astype(np.uint8).tobytes()
        return data.decode("utf-8", errors="replace")

    def save(self, directory: str | os.PathLike[str]) -> None:
        """Write ``tokenizer.json`` (``hf_byte_tokenizer``) and ``tokenizer_config.json``."""
        _save_plain(directory, hf_byte_tokenizer())


def hf_char_tokenizer(tok: CharTokenizer) -> tokenizers.Tokenizer:
    """``tok`` as a ``tokenizers`` pipeline that encodes every text to the same ids.

    The pre-tokenizer splits the text into single characters (code points, as Python's
    ``str`` counts them; no normalizer, so whitespace and newlines stay), a ``WordLevel``
    model looks each one up, and the ``Fuse`` decoder joins them back without spaces.
    An unknown character maps as lmlab maps it: to ``"<unk>"`` (the last id) when the
    tokenizer has ``unk=True``; without it, encoding fails, as ``CharTokenizer.encode``
    raises (the library says "Missing [UNK] token") rather than dropping characters.
    ``"<unk>"`` is an ordinary vocabulary entry, not an added special token, so the five
    characters ``<unk>`` written in text are looked up one by one, as lmlab does.

        CharTokenizer("ab", unk=True) -> vocab {"a": 0, "b": 1, "<unk>": 2}, unk "<unk>"
    """
    vocab = {token: i for i, token in enumerate(tok._itos)}
    unk = CharTokenizer.UNK_TOKEN if tok.unk else None
    model = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token=unk))
    model.pre_tokenizer = tokenizers.pre_tokenizers.Split(
        tokenizers.Regex(_ONE_CHAR), behavior="isolated"
    )
    model.decoder = tokenizers.decoders.Fuse()
    return model


def hf_byte_tokenizer() -> tokenizers.Tokenizer:
    """The byte tokenizer as a ``tokenizers`` pipeline: id = UTF-8 byte value.

    GPT-2's byte-level pre-tokenizer (without its word regex) spells each byte as one
    printable character (``bytes_to_unicode``); a BPE model with those 256 symbols and no
    merges maps each to its byte value; the byte-level decoder turns ids back into bytes
    and decodes them as UTF-8, with U+FFFD for broken sequences, as ``ByteTokenizer.decode``.
    """
    spell = bytes_to_unicode()
    model = tokenizers.Tokenizer(
        tokenizers.models.BPE(vocab={spell[b]: b for b in range(256)}, merges=[])
    )
    model.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(
        add_prefix_space=False, use_regex=False
    )
    model.decoder = tokenizers.decoders.ByteLevel()
    return model


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table: byte-level BPE spells tokens in it.

    Printable bytes map to themselves (``ord("A") -> "A"``); the other 68 (space, control
    bytes...) to characters from U+0100 on, so ``0x20 (space) -> "Ġ"``, ``0x0A -> "Ċ"``.
    """
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1)]
    keep += range(ord("®"), ord("ÿ") + 1)
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def _save_plain(directory: str | os.PathLike[str], model: tokenizers.Tokenizer) -> None:
    directory = Path(directory)
    atomic_write_text(directory / TOKENIZER_FILE, model.to_str(pretty=True))
    atomic_write_json(directory / TOKENIZER_CONFIG_FILE, PLAIN_TOKENIZER_CONFIG)


class BPETokenizer(Tokenizer):
    """Byte-level BPE: a wrapped ``tokenizers.Tokenizer`` with the lmlab interface.

    Special tokens written literally in the text (``"<|endoftext|>"``) encode to their
    id, so documents can be separated in plain text; decoding keeps them, so
    ``decode(encode(text)) == text`` for every text. ``encode`` adds no template tokens
    (no BOS or ``[CLS]``): ids are exactly the text's.

    ``eos_token`` names the special token that ends a document; ``save`` records it in
    ``tokenizer_config.json`` beside ``tokenizer.json``, as Hugging Face model folders do.
    """

    kind = "bpe"

    def __init__(self, tokenizer: tokenizers.Tokenizer, eos_token: str | None = None) -> None:
        self.tokenizer = tokenizer
        # Ids of a loaded tokenizer need not be contiguous, so size by the largest id.
        self.vocab_size = max(tokenizer.get_vocab(with_added_tokens=True).values()) + 1
        self.eos_token = eos_token
        self.eos_id = None
        if eos_token is not None:
            self.eos_id = tokenizer.token_to_id(eos_token)
            if self.eos_id is None:
                raise DataError(f"eos_token {eos_token!r} is not in the BPE vocabulary")

    @classmethod
    def train(
        cls,
        text: str | Iterable[str],
        vocab_size: int,
        eos_token: str | None = "<|endoftext|>",
        special_tokens: Sequence[str] = (),
    ) -> BPETokenizer:
        """Learn ``vocab_size - 256 - len(specials)`` merges from ``text``.

        ``text`` is a string or an iterable of strings (the lines of an open file);
        ``eos_token`` (``None`` for none) and ``special_tokens`` take the first ids.
        ``vocab_size`` is an upper bound: a small text may run out of pairs to merge,
        and ``tok.vocab_size`` says what was reached. Tiny Shakespeare with 512 ids
        trains in about a second.

            ["<|endoftext|>"] -> id 0; the 256 byte symbols -> 1..256; merges -> 257..511
        """
        specials = [eos_token] if eos_token is not None else []
        specials += [t for t in dict.fromkeys(special_tokens) if t not in specials]
        smallest = 256 + len(specials)
        if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < smallest:
            raise ConfigError(
                f"vocab_size for a byte-level BPE must be an integer >= {smallest} "
                f"(256 bytes + {len(specials)} special tokens), got {vocab_size!r}"
            )
        model = tokenizers.Tokenizer(tokenizers.models.BPE())
        model.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
        model.decoder = tokenizers.decoders.ByteLevel()
        trainer = tokenizers.trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=specials,
            # All 256 bytes from the start, so text unseen in training still encodes.
            initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        # Blocks of 64k characters let the library count pairs in parallel, and a stream
        # of them never holds the whole corpus; text_blocks cuts where no pre-token spans
        # the cut whenever it can, so the counts are those of the undivided text.
        blocks = text_blocks(text, 1 << 16)
        first = next(blocks, None)
        if first is None:
            raise DataError("cannot train a BPE tokenizer on empty text")
        model.train_from_iterator(itertools.chain([first], blocks), trainer=trainer)
        return cls(model, eos_token=eos_token)

    @classmethod
    def from_file(cls, path: str | os.PathLike[str], eos_token: str | None = None) -> BPETokenizer:
        """Load a Hugging Face ``tokenizer.json`` whose model is BPE.

        ``eos_token`` defaults to the ``"eos_token"`` of a ``tokenizer_config.json`` in
        the same folder, if there is one.
        """
        path = Path(path)
        model = _read_tokenizer_json(path)
        if not isinstance(model.model, tokenizers.models.BPE):
            raise DataError(
                f"{str(path)!r} holds a {type(model.model).__name__} tokenizer; "
                "BPETokenizer wraps BPE models only (HFTokenizer or load_tokenizer loads it)"
            )
        if eos_token is None:
            eos_token = _config_eos_token(path.parent / TOKENIZER_CONFIG_FILE)
        try:
            return cls(model, eos_token=eos_token)
        except DataError as e:
            raise DataError(f"{str(path)!r}: {e}") from e

    @classmethod
    def from_vocab_merges(
        cls, vocab_file: str | os.PathLike[str], merges_file: str | os.PathLike[str]
    ) -> BPETokenizer:
        """GPT-2's older pair of files: ``vocab.json`` (token -> id, tokens spelled in the
        byte alphabet, ``"Ġthe"``) and ``merges.txt`` (one merge per line, ``"Ġ t"``).

        They hold the BPE model only; the rest is GPT-2's byte-level scheme (its regex
        pre-tokenizer, no prefix space, byte-level decoding), which is what
        transformers' ``GPT2Tokenizer`` applies to them. The end-of-document token is
        the ``eos_token`` of a ``tokenizer_config.json`` beside them, else
        ``<|endoftext|>`` when the vocabulary has it; it is special, so written in text
        it encodes to its one id.
        """
        vocab_file, merges_file = Path(vocab_file), Path(merges_file)
        for file in (vocab_file, merges_file):
            if not file.is_file():
                raise DataNotFoundError(f"tokenizer file {str(file)!r} does not exist")
        try:
            model = tokenizers.models.BPE.from_file(str(vocab_file), str(merges_file))
        except Exception as e:  # the Rust side raises a bare Exception for a bad file
            raise DataError(
                f"{str(vocab_file)!r} and {str(merges_file)!r} are not a valid BPE vocabulary "
                f"and merge list: {e}"
            ) from e
        tok = tokenizers.Tokenizer(model)
        tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = tokenizers.decoders.ByteLevel()
        eos_token = _config_eos_token(vocab_file.parent / TOKENIZER_CONFIG_FILE)
        if eos_token is None and tok.token_to_id("<|endoftext|>") is not None:
            eos_token = "<|endoftext|>"
        if eos_token is not None:
            tok.add_special_tokens([tokenizers.AddedToken(eos_token, special=True)])
        try:
            return cls(tok, eos_token=eos_token)
        except DataError as e:
            raise DataError(f"{str(vocab_file)!r}: {e}") from e

    def encode(self, text: str) -> list[int]:
        _check_str(text)
        try:
            return self.tokenizer.encode(text, add_special_tokens=False).ids
        except TypeError:
            _utf8(text)  # the library says only "must be str"; name the bad character
            raise

    def decode(self, ids: Sequence[int]) -> str:
        ids = _checked_ids(ids, self.vocab_size, self.kind).tolist()
        return self.tokenizer.decode(ids, skip_special_tokens=False)

    def save(self, directory: str | os.PathLike[str]) -> None:
        directory = Path(directory)
        atomic_write_text(directory / TOKENIZER_FILE, self.tokenizer.to_str(pretty=True))
        atomic_write_json(directory / TOKENIZER_CONFIG_FILE, {"eos_token": self.eos_token})

    def __repr__(self) -> str:
        return f"BPETokenizer(vocab_size={self.vocab_size}, eos_token={self.eos_token!r})"


class HFTokenizer(Tokenizer):
    """Any other Hugging Face ``tokenizer.json`` model (BERT's WordPiece, Unigram,
    WordLevel) with the lmlab interface, plus what an encoder needs.

    ``encode(text)`` gives the text's own ids, as every lmlab tokenizer does;
    ``encode(text, add_special_tokens=True)`` applies the file's template, and
    ``encode_batch`` returns a right-padded batch with its attention mask. With
    all-MiniLM-L6-v2's WordPiece vocabulary::

        tok.encode("Hello world!")                          ->  [7592, 2088, 999]
        tok.encode("Hello world!", add_special_tokens=True) ->  [101, 7592, 2088, 999, 102]

    The special ids (``pad_id``, ``cls_id``, ``sep_id``, ``unk_id``, ``mask_id``, ``eos_id``;
    None when absent) come from ``tokenizer_config.json`` beside the file, else from BERT's
    names (``[PAD]``, ``[CLS]``, ...) when the vocabulary has them. Padding and truncation
    settings stored in the file are not applied (transformers, too, pads and truncates only
    when asked); ``save`` writes the file back with them.
    """

    kind = "hf"
    SPECIAL_ROLES: tuple[str, ...] = ("pad", "cls", "sep", "unk", "mask", "eos")
    """Roles of special tokens, as ``tokenizer_config.json`` names them (``"pad_token"``)."""
    _BERT_DEFAULTS = {
        "pad": "[PAD]",
        "cls": "[CLS]",
        "sep": "[SEP]",
        "unk": "[UNK]",
        "mask": "[MASK]",
    }

    def __init__(
        self, tokenizer: tokenizers.Tokenizer, special_tokens: dict[str, str] | None = None
    ) -> None:
        self._source = tokenizer.to_str(pretty=True)  # saved as loaded, padding settings too
        self.tokenizer = tokenizers.Tokenizer.from_str(self._source)
        self.tokenizer.no_padding()
        self.tokenizer.no_truncation()
        self.model_type = type(self.tokenizer.model).__name__
        self.vocab_size = max(self.tokenizer.get_vocab(with_added_tokens=True).values()) + 1
        special_tokens = dict(special_tokens or {})
        for role in special_tokens:
            if role not in self.SPECIAL_ROLES:
                raise DataError(
                    f"unknown special token role {role!r}{closest(role, self.SPECIAL_ROLES)}; "
                    f"valid: {', '.join(self.SPECIAL_ROLES)}"
                )
        for role, token in self._BERT_DEFAULTS.items():
            if role not in special_tokens and self.tokenizer.token_to_id(token) is not None:
                special_tokens[role] = token
        self.special_tokens = special_tokens
        ids: dict[str, int | None] = {}
        for role in self.SPECIAL_ROLES:
            token = special_tokens.get(role)
            ids[role] = None if token is None else self.tokenizer.token_to_id(token)
            if token is not None and ids[role] is None:
                raise DataError(
                    f"{role}_token {token!r} is not in the {self.model_type} vocabulary"
                )
        self.pad_id, self.cls_id, self.sep_id = ids["pad"], ids["cls"], ids["sep"]
        self.unk_id, self.mask_id, self.eos_id = ids["unk"], ids["mask"], ids["eos"]

    @classmethod
    def from_file(cls, path: str | os.PathLike[str]) -> HFTokenizer:
        """Load a Hugging Face ``tokenizer.json`` (and the special tokens named by a
        ``tokenizer_config.json`` in the same folder, if there is one)."""
        path = Path(path)
        model = _read_tokenizer_json(path)
        specials = {}
        for role in cls.SPECIAL_ROLES:
            token = _config_token(path.parent / TOKENIZER_CONFIG_FILE, f"{role}_token")
            if token is not None:
                specials[role] = token
        try:
            return cls(model, special_tokens=specials)
        except DataError as e:
            raise DataError(f"{str(path)!r}: {e}") from e

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Token ids of ``text``; with ``add_special_tokens`` wrapped in the template
        (BERT: ``[CLS] ... [SEP]``)."""
        _check_str(text)
        try:
            return self.tokenizer.encode(text, add_special_tokens=add_special_tokens).ids
        except TypeError:
            _utf8(text)  # the library says only "must be str"; name the bad character
            raise

    def encode_batch(
        self,
        texts: Sequence[str],
        pairs: Sequence[str] | None = None,
        add_special_tokens: bool = True,
        max_length: int | None = None,
    ) -> dict[str, np.ndarray]:
        """Encode ``texts`` (and second segments ``pairs``) into one right-padded batch.

        Returns int64 arrays of shape [B, T], T the longest row: ``"ids"`` (padding is
        ``pad_id``), ``"attention_mask"`` (1 on tokens, 0 on padding) and
        ``"token_type_ids"`` (the template's segment ids: 0 for the first text, 1 for the
        pair). ``max_length`` truncates each row, template tokens included.

            encode_batch(["a b", "a"]) -> ids [[CLS, a, b, SEP], [CLS, a, SEP, PAD]],
                                          attention_mask [[1, 1, 1, 1], [1, 1, 1, 0]]
        """
        texts = list(texts)
        for text in texts:
            _check_str(text)
        inputs: list[Any] = texts
        if pairs is not None:
            pairs = list(pairs)
            if len(pairs) != len(texts):
                raise DataError(f"encode_batch got {len(texts)} texts but {len(pairs)} pairs")
            for text in pairs:
                _check_str(text)
            inputs = list(zip(texts, pairs))
        if max_length is not None:
            if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 1:
                raise ConfigError(
                    f"max_length={max_length!r} is invalid: must be a positive integer"
                )
            self.tokenizer.enable_truncation(max_length)
        try:
            encodings = self.tokenizer.encode_batch(inputs, add_special_tokens=add_special_tokens)
        except TypeError:
            for text in texts + list(pairs or []):
                _utf8(text)
            raise
        finally:
            self.tokenizer.no_truncation()
        lengths = [len(e.ids) for e in encodings]
        T = max(lengths, default=0)
        if self.pad_id is None and any(n < T for n in lengths):
            raise DataError(
                f"cannot pad a batch: the {self.model_type} tokenizer has no pad token "
                "(name one as pad_token in tokenizer_config.json)"
            )
        ids = np.full((len(texts), T), self.pad_id or 0, dtype=np.int64)
        mask = np.zeros((len(texts), T), dtype=np.int64)
        types = np.zeros((len(texts), T), dtype=np.int64)
        for row, (e, n) in enumerate(zip(encodings, lengths)):
            ids[row, :n] = e.ids
            mask[row, :n] = 1
            types[row, :n] = e.type_ids
        return {"ids": ids, "attention_mask": mask, "token_type_ids": types}

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        ids = _checked_ids(ids, self.vocab_size, self.kind).tolist()
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    def save(self, directory: str | os.PathLike[str]) -> None:
        directory = Path(directory)
        atomic_write_text(directory / TOKENIZER_FILE, self._source)
        config = {f"{role}_token": token for role, token in self.special_tokens.items()}
        atomic_write_json(directory / TOKENIZER_CONFIG_FILE, config)

    def __repr__(self) -> str:
        return f"HFTokenizer({self.model_type}, vocab_size={self.vocab_size})"


class SentencePieceTokenizer(Tokenizer):
    """A SentencePiece model (``tokenizer.model``: Llama 1 and 2, Mistral, T5) with the
    lmlab interface, run by the ``sentencepiece`` library (Kudo and Richardson 2018).

    ``encode`` gives the text's own ids, with no BOS or EOS added (as every lmlab
    tokenizer does); ``decode`` drops control tokens (BOS, EOS). ``eos_id`` is the
    model's end-of-sentence id, None when it has none. ``save`` writes the model file
    back as ``tokenizer.model``, where ``find_tokenizer`` looks for it.
    """

    kind = "sentencepiece"

    def __init__(self, model_proto: bytes, source: str = SENTENCEPIECE_FILE) -> None:
        try:
            import sentencepiece  # deferred: only tokenizer.model files need it
        except ImportError as e:  # a declared dependency; missing only in a broken install
            raise DataError(
                f"{source!r} is a SentencePiece model, which needs the sentencepiece "
                "package: pip install sentencepiece"
            ) from e
        self.model_proto = bytes(model_proto)
        self.processor = sentencepiece.SentencePieceProcessor()
        try:
            self.processor.LoadFromSerializedProto(self.model_proto)
        except Exception as e:  # a RuntimeError from the C++ side
            raise DataError(f"{source!r} is not a valid SentencePiece model: {e}") from e
        self.vocab_size = self.processor.get_piece_size()
        eos = self.processor.eos_id()
        self.eos_id = eos if 0 <= eos < self.vocab_size else None

    @classmethod
    def from_file(cls, path: str | os.PathLike[str]) -> SentencePieceTokenizer:
        path = Path(path)
        if not path.is_file():
            raise DataNotFoundError(f"tokenizer file {str(path)!r} does not exist")
        return cls(path.read_bytes(), source=str(path))

    def encode(self, text: str) -> list[int]:
        _check_str(text)
        _utf8(text)  # name a lone surrogate rather than let the C++ side reject it
        return self.processor.encode(text, out_type=int)

    def decode(self, ids: Sequence[int]) -> str:
        ids = _checked_ids(ids, self.vocab_size, self.kind).tolist()
        return self.processor.decode(ids)

    def save(self, directory: str | os.PathLike[str]) -> None:
        atomic_write_bytes(Path(directory) / SENTENCEPIECE_FILE, self.model_proto)

    def __repr__(self) -> str:
        return f"SentencePieceTokenizer(vocab_size={self.vocab_size}, eos_id={self.eos_id})"


class WordTokenizer(Tokenizer):
    """Words for word-level n-gram models, one sentence per line, as KenLM reads text.

    Rules, in order:

    - ``lowercase=True`` folds case (``str.lower``) first; by default case is kept.
    - Each line is a sentence; blank lines are skipped. The line break that ends it gives
      ``</s>`` (``eos_id``); text after the last line break (a prompt) is a sentence not
      yet ended, without ``</s>``. A sentence's start, KenLM's ``<s>``, is not an id: an
      n-gram model with ``sentence_end_id = eos_id`` predicts the first word from its BOS
      context alone.
    - Within a line a word is a run of letters, digits and underscores (Unicode ``\\w``),
      with inner apostrophes kept (``I'll``, ``o'er``); every other character that is not
      whitespace is a token of its own (``,`` ``.`` ``!`` ``'``). Whitespace only separates.
    - Vocabulary: ``<unk>`` (id 0) and ``</s>`` (id 1), then the words seen at least
      ``min_count`` times in the training text, most frequent first (ties in code-point
      order), at most ``max_vocab`` ids in all; any other word encodes to ``<unk>``.

        WordTokenizer.train("I'll go.\\nGo, go!\\n").encode("go, I'll run.")
        ->  [2, 4, 7, 0, 5, 1]      # go , I'll <unk> . </s>

    ``decode`` joins words with spaces and turns ``</s>`` into a line break: the spacing
    around punctuation is not restored. ``save`` writes ``{"kind": "word", "words": [...],
    "lowercase": ...}`` as ``tokenizer.json`` (no Hugging Face pipeline expresses the
    per-line ``</s>``).
    """

    kind = "word"
    UNK_TOKEN, EOS_TOKEN = "<unk>", "</s>"
    PATTERN = re.compile(r"\w+(?:'\w+)*|[^\w\s]")

    def __init__(self, words: Sequence[str], lowercase: bool = False) -> None:
        words = list(words)
        if words[:2] != [self.UNK_TOKEN, self.EOS_TOKEN]:
            raise DataError(
                f"a word tokenizer's vocabulary starts with {self.UNK_TOKEN!r}, "
                f"{self.EOS_TOKEN!r}; got {words[:2]!r}"
            )
        for w in words[2:]:  # an entry the rules never make (from an ARPA file) is unused
            if not isinstance(w, str) or not w or any(c.isspace() for c in w):
                raise DataError(f"word tokenizer entry {w!r} is empty or holds whitespace")
        if len(set(words)) != len(words):
            repeated = sorted({w for w in words if words.count(w) > 1})
            raise DataError(f"word tokenizer vocabulary repeats {', '.join(map(repr, repeated))}")
        self.words = words
        self.lowercase = bool(lowercase)
        self.vocab_size = len(words)
        self.unk_id, self.eos_id = 0, 1
        self._ids = {w: i for i, w in enumerate(words)}

    @classmethod
    def train(
        cls,
        text: str,
        max_vocab: int | None = None,
        min_count: int = 1,
        lowercase: bool = False,
    ) -> WordTokenizer:
        """The vocabulary of ``text`` by the rules above (``max_vocab`` counts the two
        special tokens too; None keeps every word seen ``min_count`` times)."""
        _check_str(text)
        if max_vocab is not None and (
            isinstance(max_vocab, bool) or not isinstance(max_vocab, int) or max_vocab < 2
        ):
            raise ConfigError(
                f"max_vocab={max_vocab!r} is invalid: must be an integer >= 2 (<unk> and </s>)"
            )
        if isinstance(min_count, bool) or not isinstance(min_count, int) or min_count < 1:
            raise ConfigError(f"min_count={min_count!r} is invalid: must be a positive integer")
        counts = Counter(cls.PATTERN.findall(text.lower() if lowercase else text))
        if not counts:
            raise DataError("cannot train a word tokenizer on text without words")
        counts.pop(cls.UNK_TOKEN, None)
        ranked = sorted(
            (w for w, c in counts.items() if c >= min_count), key=lambda w: (-counts[w], w)
        )
        if max_vocab is not None:
            ranked = ranked[: max_vocab - 2]
        return cls([cls.UNK_TOKEN, cls.EOS_TOKEN, *ranked], lowercase=lowercase)

    def split(self, text: str) -> list[tuple[list[str], bool]]:
        """The sentences of ``text`` as (words, ended by a line break), blank lines left out."""
        _check_str(text)
        if self.lowercase:
            text = text.lower()
        out = []
        for line in text.splitlines(keepends=True):
            body = line.splitlines()[0]
            if words := self.PATTERN.findall(body):
                out.append((words, len(body) < len(line)))
        return out

    def encode(self, text: str) -> list[int]:
        ids: list[int] = []
        get = self._ids.get
        for words, ended in self.split(text):
            ids.extend([get(w, 0) for w in words])
            if ended:
                ids.append(1)
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        lines, line = [], []
        for i in _checked_ids(ids, self.vocab_size, self.kind).tolist():
            if i == self.eos_id:
                lines.append(" ".join(line) + "\n")
                line = []
            else:
                line.append(self.words[i])
        return "".join(lines) + " ".join(line)

    def save(self, directory: str | os.PathLike[str]) -> None:
        data = {"kind": self.kind, "words": self.words, "lowercase": self.lowercase}
        atomic_write_json(Path(directory) / TOKENIZER_FILE, data)


def find_tokenizer(directory: str | os.PathLike[str]) -> Tokenizer | None:
    """The tokenizer of a model folder, from the first layout it has, or None.

    ``tokenizer.json`` (lmlab's or Hugging Face's: ``load_tokenizer``), else GPT-2's
    ``vocab.json`` + ``merges.txt`` (``BPETokenizer.from_vocab_merges``), else a
    SentencePiece ``tokenizer.model``. None means the folder has no tokenizer: its model
    works on token ids only (``require_tokenizer`` says so when text is needed).
    """
    directory = Path(directory)
    if (directory / TOKENIZER_FILE).is_file():
        return load_tokenizer(directory)
    vocab, merges = directory / GPT2_VOCAB_FILE, directory / GPT2_MERGES_FILE
    if vocab.is_file() or merges.is_file():
        return BPETokenizer.from_vocab_merges(vocab, merges)  # names the one that is missing
    if (directory / SENTENCEPIECE_FILE).is_file():
        return SentencePieceTokenizer.from_file(directory / SENTENCEPIECE_FILE)
    return None


def require_tokenizer(tokenizer: Tokenizer | None, model: str, what: str) -> Tokenizer:
    """``tokenizer``, or a ``ConfigError`` saying that ``what`` (e.g. ``"generate"``) needs
    text and that ``model`` (its path or name) has no tokenizer."""
    if tokenizer is None:
        raise ConfigError(
            f"{what} works on text, but model {model!r} has no tokenizer (none of "
            f"{TOKENIZER_LAYOUTS}): it works on token ids only (lm.model(ids), "
            "lmlab.generate.generate_ids); add a tokenizer file to the folder for text"
        )
    return tokenizer


TOKENIZER_KINDS: tuple[str, ...] = ("char", "byte", "bpe", "word")
"""The ``kind`` names ``train_tokenizer`` accepts."""


def train_tokenizer(kind: str, text: str, vocab_size: int | None = None, **kw: Any) -> Tokenizer:
    """Build a tokenizer of ``kind`` (``"char"``, ``"byte"`` or ``"bpe"``) from ``text``.

    ``vocab_size`` is required for ``"bpe"`` and the most ids ``"word"`` keeps (all words
    when left out); char and byte fix their own size, so it must be left out or equal that
    size. Extra keywords go to the kind's ``train`` (``unk`` for char; ``eos_token``,
    ``special_tokens`` for bpe; ``min_count``, ``lowercase`` for word).

        train_tokenizer("char", "hello").vocab_size         ->  4
        train_tokenizer("bpe", text, vocab_size=512).kind   ->  "bpe"
    """
    if kind not in TOKENIZER_KINDS:
        raise ConfigError(
            f"unknown tokenizer kind {kind!r}{closest(str(kind), TOKENIZER_KINDS)}; "
            f"valid kinds: {', '.join(TOKENIZER_KINDS)}"
        )
    make = {
        "char": CharTokenizer.train,
        "byte": ByteTokenizer,
        "bpe": BPETokenizer.train,
        "word": WordTokenizer.train,
    }[kind]
    fixed = ("text", "vocab_size", "max_vocab")
    accepted = [p for p in inspect.signature(make).parameters if p not in fixed]
    for key in kw:
        if key not in accepted:
            raise ConfigError(
                f"{kind} tokenizer takes no option {key!r}{closest(key, accepted)}; "
                f"valid options: {', '.join(accepted) or 'none'}"
            )

    if kind == "bpe":
        if vocab_size is None:
            raise ConfigError("a bpe tokenizer needs vocab_size (e.g. 512)")
        return make(text, vocab_size, **kw)
    if kind == "word":
        return make(text, max_vocab=vocab_size, **kw)
    tok = make() if kind == "byte" else make(text, **kw)
    if vocab_size is not None and vocab_size != tok.vocab_size:
        raise ConfigError(
            f"a {kind} tokenizer on this text has vocab_size {tok.vocab_size}, not the "
            f"{vocab_size} asked for; leave vocab_size unset for {kind!r}"
        )
    return tok


def load_tokenizer(path: str | os.PathLike[str]) -> Tokenizer:
    """Load a tokenizer saved by ``Tokenizer.save``, or a Hugging Face ``tokenizer.json``.

    ``path`` is the file or the directory holding ``tokenizer.json``. Every file is in the
    Hugging Face format (a ``"model"`` key): the char and byte pipelines lmlab writes
    (``hf_char_tokenizer``, ``hf_byte_tokenizer``) load as ``CharTokenizer`` and
    ``ByteTokenizer``, other BPE models as ``BPETokenizer``, the rest as ``HFTokenizer``
    (WordPiece, ...). Files written by older lmlab, ``{"kind": "char", "chars": [...],
    "unk": false}`` or ``{"kind": "byte"}``, still load.
    """
    path = Path(path)
    file = path / TOKENIZER_FILE if path.is_dir() else path
    if not file.is_file():
        raise DataNotFoundError(f"no tokenizer file at {str(file)!r}")
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"tokenizer file {str(file)!r} is not valid JSON: {e}") from e
    if isinstance(data, dict) and "model" in data:
        plain = _plain_kind(data, file)
        if plain is not None:
            return plain
        model_type = data["model"].get("type") if isinstance(data["model"], dict) else None
        if model_type in (None, "BPE"):
            return BPETokenizer.from_file(file)
        return HFTokenizer.from_file(file)
    if not isinstance(data, dict) or "kind" not in data:
        raise DataError(
            f"tokenizer file {str(file)!r} has neither a 'kind' (lmlab format) nor a "
            "'model' (Hugging Face format) key"
        )
    kind = data["kind"]
    if kind == "char":
        chars, unk = data.get("chars"), data.get("unk", False)
        if not isinstance(chars, list) or not isinstance(unk, bool):
            raise DataError(
                f"tokenizer file {str(file)!r}: a char tokenizer needs 'chars' (a list of "
                "characters) and 'unk' (true or false)"
            )
        try:
            return CharTokenizer(chars, unk=unk)
        except DataError as e:
            raise DataError(f"tokenizer file {str(file)!r}: {e}") from e
    if kind == "byte":
        return ByteTokenizer()
    if kind == "word":
        words, lowercase = data.get("words"), data.get("lowercase", False)
        if not isinstance(words, list) or not isinstance(lowercase, bool):
            raise DataError(
                f"tokenizer file {str(file)!r}: a word tokenizer needs 'words' (a list of "
                "strings) and 'lowercase' (true or false)"
            )
        try:
            return WordTokenizer(words, lowercase=lowercase)
        except DataError as e:
            raise DataError(f"tokenizer file {str(file)!r}: {e}") from e
    valid = ["char", "byte", "word"]
    raise DataError(
        f"tokenizer file {str(file)!r} has unknown kind {kind!r}{closest(str(kind), valid)}; "
        f"valid kinds: {', '.join(valid)} (a BPE file is in the Hugging Face format)"
    )


def _plain_kind(data: dict[str, Any], file: Path) -> Tokenizer | None:
    """The char or byte tokenizer a Hugging Face ``tokenizer.json`` written by
    ``hf_char_tokenizer`` / ``hf_byte_tokenizer`` describes; None for any other file."""
    model = data["model"]
    if not isinstance(model, dict):
        return None
    char = json.loads(hf_char_tokenizer(CharTokenizer("a")).to_str())
    if (
        model.get("type") == "WordLevel"
        and data.get("pre_tokenizer") == char["pre_tokenizer"]
        and data.get("decoder") == char["decoder"]
        and isinstance(model.get("vocab"), dict)
    ):
        ordered = sorted(model["vocab"].items(), key=lambda item: item[1])
        # The library writes unk_token "<unk>" even when there is none: the vocabulary says.
        unk = CharTokenizer.UNK_TOKEN in model["vocab"]
        chars = [token for token, _ in ordered[: len(ordered) - unk]]
        if [i for _, i in ordered] != list(range(len(ordered))) or (
            unk and ordered[-1][0] != CharTokenizer.UNK_TOKEN
        ):
            raise DataError(
                f"tokenizer file {str(file)!r}: a char tokenizer's vocabulary must number its "
                f"characters 0..n-1, with {CharTokenizer.UNK_TOKEN!r} last when it has one"
            )
        try:
            return CharTokenizer(chars, unk=unk)
        except DataError as e:
            raise DataError(f"tokenizer file {str(file)!r}: {e}") from e
    byte = json.loads(hf_byte_tokenizer().to_str())
    if all(data.get(key) == byte[key] for key in ("pre_tokenizer", "decoder")) and (
        model.get("type") == "BPE"
        and model.get("vocab") == byte["model"]["vocab"]
        and not model.get("merges")
        and not data.get("added_tokens")
    ):
        return ByteTokenizer()
    return None


def _read_tokenizer_json(path: Path) -> tokenizers.Tokenizer:
    if not path.is_file():
        raise DataNotFoundError(f"tokenizer file {str(path)!r} does not exist")
    try:
        return tokenizers.Tokenizer.from_file(str(path))
    except Exception as e:  # the Rust side raises a bare Exception for a bad file
        raise DataError(f"{str(path)!r} is not a valid Hugging Face tokenizer.json: {e}") from e


def _checked_ids(ids: Sequence[int], vocab_size: int, kind: str) -> np.ndarray:
    """``ids`` as a 1-D int64 array, or ``DataError`` naming the first id out of range."""
    array = np.asarray(ids)
    if array.size == 0:
        return np.zeros(0, dtype=np.int64)
    if array.ndim != 1 or not np.issubdtype(array.dtype, np.integer):
        raise DataError(
            f"decode takes a 1-D sequence of integer ids, got shape {array.shape} of {array.dtype}"
        )
    bad = (array < 0) | (array >= vocab_size)
    if bad.any():
        at = int(np.argmax(bad))
        raise DataError(
            f"token id {array[at]} at position {at} is outside the {kind} tokenizer's "
            f"vocabulary [0, {vocab_size})"
        )
    return array.astype(np.int64)


def _check_str(text: object) -> None:
    if not isinstance(text, str):
        raise TypeError(f"encode takes a str, got {type(text).__name__}")


def _utf8(text: str) -> bytes:
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise DataError(
            f"text has a lone surrogate {text[e.start]!r} at position {e.start}, which is "
            "not a character and has no UTF-8 bytes"
        ) from e


def _config_eos_token(file: Path) -> str | None:
    return _config_token(file, "eos_token")


def _config_token(file: Path, key: str) -> str | None:
    """The special token ``key`` (``"eos_token"``, ``"pad_token"``, ...) of a
    ``tokenizer_config.json``, or None when the file or the key is absent."""
    if not file.is_file():
        return None
    try:
        token = json.loads(file.read_text(encoding="utf-8")).get(key)
    except (UnicodeDecodeError, json.JSONDecodeError, AttributeError) as e:
        raise DataError(f"{str(file)!r} is not a valid JSON object: {e}") from e
    # Hugging Face writes either "eos_token": "</s>" or {"content": "</s>", ...}.
    if isinstance(token, dict):
        token = token.get("content")
    return token if isinstance(token, str) else None
