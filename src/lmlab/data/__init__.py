"""Data: corpora, tokenizers and memory-mapped token files.

text = load_corpus("tinyshakespeare")          # or a .txt file, or a folder of them
train, val = split_text(text, val_fraction=0.1)
tok = train_tokenizer("char", train)           # or "byte", or "bpe" with vocab_size=512
encode_to_file(train, tok, "runs/data/train.bin")
ids = read_tokens("runs/data/train.bin")       # 1-D uint16 memmap
"""

from lmlab.data.corpus import BUNDLED_CORPORA, load_corpus, split_text, text_blocks
from lmlab.data.tokenizers import (
    TOKENIZER_KINDS,
    BPETokenizer,
    ByteTokenizer,
    CharTokenizer,
    SentencePieceTokenizer,
    Tokenizer,
    WordTokenizer,
    find_tokenizer,
    load_tokenizer,
    train_tokenizer,
)
from lmlab.data.tokens import (
    TokenShards,
    encode_to_file,
    encode_to_shards,
    read_token_meta,
    read_tokens,
    sidecar_path,
    token_dtype,
    write_shards,
    write_tokens,
)

__all__ = [
    "BUNDLED_CORPORA",
    "TOKENIZER_KINDS",
    "BPETokenizer",
    "ByteTokenizer",
    "CharTokenizer",
    "SentencePieceTokenizer",
    "TokenShards",
    "Tokenizer",
    "WordTokenizer",
    "encode_to_file",
    "encode_to_shards",
    "find_tokenizer",
    "load_corpus",
    "load_tokenizer",
    "read_token_meta",
    "read_tokens",
    "sidecar_path",
    "split_text",
    "text_blocks",
    "token_dtype",
    "write_shards",
    "train_tokenizer",
    "write_tokens",
]
