"""Tokenizers side by side on held-out text: how many tokens each needs, what each cannot
represent, and the from-scratch BPE trainer against the ``tokenizers`` library.

The trade-off every tokenizer makes: a bigger vocabulary means fewer tokens per word
(shorter sequences, so more text per context window and fewer steps per sentence) but a
bigger embedding table and rarer, less-trained tokens. Characters and bytes never meet an
unknown symbol; whole words need the largest vocabulary and still meet unseen words
(``<unk>``); subwords (BPE) sit between, and byte-level BPE never meets an unknown symbol.

    >>> study = compare_tokenizers("the cat sat on the mat\\n" * 50, vocab_sizes=(20, 40))
    >>> study["char"]["tokens_per_word"] > study["bpe_scratch"][-1]["tokens_per_word"]
    True
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from typing import Any

from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from tqdm.auto import tqdm

from lmlab.data.bpe import BPE, pre_tokenize
from lmlab.data.corpus import split_text
from lmlab.data.tokenizers import BPETokenizer, CharTokenizer, WordTokenizer
from lmlab.errors import ConfigError


def library_bpe(text: str, vocab_size: int):
    """The ``tokenizers`` library's BPE with the same settings as ``lmlab.data.bpe.BPE``
    (whitespace pre-tokenizer, no special tokens): the reference of the parity check."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False)
    tok.train_from_iterator(text.splitlines(), trainer)
    merges = json.loads(tok.to_str())["model"]["merges"]
    return tok, [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in merges]


def compare_tokenizers(
    text: str,
    vocab_sizes: Sequence[int] = (256, 512, 1024, 2048, 4096),
    val_fraction: float = 0.1,
    progress: bool = False,
) -> dict[str, Any]:
    """Train every tokenizer on the first part of ``text``; measure on the last
    ``val_fraction``. Returns, per tokenizer (and per vocabulary size where it has one):
    tokens per word of the held-out text (words as ``pre_tokenize`` splits them), the
    share of held-out words or characters it cannot represent, and training seconds; for
    the from-scratch BPE also whether its merges and encodings equal the library's. A
    byte-level BPE is trained only at sizes of 256 and more (it starts from the bytes)."""
    if not vocab_sizes or any(isinstance(v, bool) or int(v) != v or v < 2 for v in vocab_sizes):
        raise ConfigError(f"vocab_sizes={list(vocab_sizes)} is invalid: give integers >= 2")
    train, held_out = split_text(text, val_fraction)
    words = pre_tokenize(held_out)
    if not words:
        raise ConfigError("the held-out part of the text has no words: give a longer text")
    n_words = len(words)
    char = CharTokenizer.train(train, unk=True)
    held_ids = char.encode(held_out)
    report: dict[str, Any] = {
        "train_chars": len(train),
        "held_out_chars": len(held_out),
        "held_out_words": n_words,
        "char": {
            "vocab_size": char.vocab_size,
            "tokens_per_word": len(held_ids) / n_words,
            "unknown": sum(i == char.unk_id for i in held_ids) / len(held_ids),
        },
        "byte": {"vocab_size": 256, "tokens_per_word": len(held_out.encode()) / n_words},
        "vocab_sizes": sorted(vocab_sizes),
        "word": [],
        "bpe_bytes": [],
        "bpe_scratch": [],
    }
    for v in tqdm(sorted(vocab_sizes), desc="tokenizers", disable=not progress):
        word = WordTokenizer.train(train, max_vocab=v)
        ids = [i for line in held_out.splitlines() for i in word.encode(line)]
        ids = [i for i in ids if i != word.eos_id]  # the </s> each line ends with
        report["word"].append(
            {
                "vocab_size": word.vocab_size,
                "tokens_per_word": len(ids) / n_words,
                "unknown": sum(i == word.unk_id for i in ids) / len(ids),
            }
        )
        if v >= 256:  # a byte-level BPE starts from the 256 bytes
            start = time.perf_counter()
            byte_bpe = BPETokenizer.train(train, v, eos_token=None)
            report["bpe_bytes"].append(
                {
                    "vocab_size": byte_bpe.vocab_size,
                    "tokens_per_word": len(byte_bpe.encode(held_out)) / n_words,
                    "unknown": 0.0,
                    "train_s": time.perf_counter() - start,
                }
            )
        start = time.perf_counter()
        scratch = BPE.train(train.splitlines(), v)
        scratch_s = time.perf_counter() - start
        start = time.perf_counter()
        library, merges = library_bpe(train, v)
        library_s = time.perf_counter() - start
        ranks = scratch._ranks()
        sample = words[:2000]
        ours = [scratch.tokenize_word(w, ranks) for w in sample]
        theirs = [library.encode([w], is_pretokenized=True).tokens for w in sample]
        unseen = sum(any(c not in scratch.vocab for c in w) for w in words) / n_words
        report["bpe_scratch"].append(
            {
                "vocab_size": len(scratch.vocab),
                "tokens_per_word": sum(len(scratch.tokenize_word(w, ranks)) for w in words)
                / n_words,
                "unknown": unseen,
                "train_s": scratch_s,
                "library_train_s": library_s,
                "same_merges": scratch.merges == merges,
                "same_encodings": ours == theirs,
            }
        )
        report["first_merges"] = [
            list(m) for m in scratch.merges[:20]
        ]  # the same prefix at any size
    return report
