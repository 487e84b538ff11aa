"""What a model's input embeddings learned: nearest neighbours, analogies, a 2-D map.

Every lmlab model starts by looking up one vector per token. Tokens used alike end up with
vectors that point alike, which the cosine similarity measures (Mikolov et al. 2013
found vector arithmetic in them: king - man + woman lands near queen). This module reads
that table from any model with an embedding layer (a character GPT, SmolLM2, MiniLM):

- ``EmbeddingSpace.of(model, tokenizer)``: the table [V, D] and the text of each token;
- ``space.vector(word)``: a word's vector: its one token if the tokenizer has it as a whole
  word (with or without the leading space BPE vocabularies put on words), else the mean of
  its pieces (stated in ``space.pieces(word)``);
- ``space.nearest(word, k)``: the k tokens of highest cosine similarity, the word itself
  and its spelling variants (case, leading space or ``##``) left out;
- ``space.analogy(a, b, c)``: "a is to b as c is to ?", by 3CosAdd: the tokens nearest to
  b - a + c, the three inputs left out (Mikolov et al. 2013; Levy & Goldberg 2014 on why
  leaving them out matters);
- ``project_2d(vectors)``: the first two principal components, for a figure.

Only word-like tokens are candidates for neighbours and answers (letters, at least two of
them), so punctuation and byte pieces do not crowd the lists; a character-level model's
tokens are single characters, and for those every printable character is a candidate.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from lmlab.errors import ConfigError


def embedding_table(model: nn.Module) -> torch.Tensor:
    """The input embedding matrix [V, D] of ``model`` (float32, on the CPU)."""
    table = getattr(model, "tok_emb", None)
    if not isinstance(table, nn.Embedding):
        table = next((m for m in model.modules() if isinstance(m, nn.Embedding)), None)
    if table is None:
        raise ConfigError(
            f"the {type(model).__name__} model has no embedding layer to read: it needs a "
            "token embedding table (the transformer, recurrent and MLP families have one; the "
            "n-gram has none)"
        )
    return table.weight.detach().float().cpu()


def _plain(token: str) -> str:
    """A token's spelling without its word markers: leading space (BPE's Ġ is decoded to a
    space), WordPiece's ##, and case."""
    return token.strip().removeprefix("##").lower()


@dataclass
class EmbeddingSpace:
    vectors: torch.Tensor
    """[V, D] the embedding table."""
    tokens: list[str]
    """The text of each token id."""
    candidates: torch.Tensor
    """[V] bool: tokens that may appear as neighbours or answers."""
    tokenizer: object

    @classmethod
    def of(cls, model: nn.Module, tokenizer) -> EmbeddingSpace:
        if tokenizer is None:
            raise ConfigError("embeddings need the model's tokenizer to read words")
        vectors = embedding_table(model)
        n = min(vectors.shape[0], tokenizer.vocab_size)
        tokens = [_token_text(tokenizer, i) for i in range(n)]
        single_chars = max(len(t) for t in tokens) <= 1  # a character-level vocabulary
        if single_chars:
            keep = [t.isprintable() and not t.isspace() and t != "" for t in tokens]
        else:
            keep = [
                sum(c.isalpha() for c in _plain(t)) >= 2 and _plain(t).isalpha() for t in tokens
            ]
        return cls(vectors[:n], tokens, torch.tensor(keep), tokenizer)

    def pieces(self, word: str) -> list[int]:
        """The token ids that make ``word``: a whole-word token where one exists."""
        if not isinstance(word, str) or not word.strip():
            raise ConfigError(f"word {word!r} is invalid: give a non-empty string")
        options = [self.tokenizer.encode(" " + word), self.tokenizer.encode(word)]
        options = [ids for ids in options if ids and all(i < len(self.tokens) for i in ids)]
        if not options:
            raise ConfigError(f"word {word!r} has no tokens in this model's vocabulary")
        return min(options, key=len)

    def vector(self, word: str | torch.Tensor) -> torch.Tensor:
        if isinstance(word, torch.Tensor):
            return word.float()
        return self.vectors[self.pieces(word)].mean(0)

    def _exclude(self, words: Sequence[str]) -> torch.Tensor:
        plain = {_plain(w) for w in words if isinstance(w, str)}
        mask = self.candidates.clone()
        for i, t in enumerate(self.tokens):
            if mask[i] and _plain(t) in plain:
                mask[i] = False
        return mask

    def _ranked(self, query: torch.Tensor, mask: torch.Tensor, k: int) -> list[tuple[str, float]]:
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ConfigError(f"k={k!r} is invalid: must be a positive integer")
        sims = torch.nn.functional.cosine_similarity(self.vectors, query[None], dim=-1)
        sims = sims.masked_fill(~mask, float("-inf"))
        out, seen = [], set()
        for i in sims.argsort(descending=True).tolist():
            if sims[i] == float("-inf") or len(out) == k:
                break
            key = _plain(self.tokens[i])
            if key in seen:  # " King" and "king" are one answer
                continue
            seen.add(key)
            out.append((self.tokens[i].strip() or self.tokens[i], sims[i].item()))
        return out

    def nearest(self, word: str | torch.Tensor, k: int = 10) -> list[tuple[str, float]]:
        """The ``k`` nearest tokens by cosine similarity, as (text, similarity)."""
        return self._ranked(self.vector(word), self._exclude([word]), k)

    def analogy(self, a: str, b: str, c: str, k: int = 5) -> list[tuple[str, float]]:
        """a is to b as c is to ?: the tokens nearest b - a + c (3CosAdd), inputs left out."""
        query = self.vector(b) - self.vector(a) + self.vector(c)
        return self._ranked(query, self._exclude([a, b, c]), k)


def _token_text(tokenizer, i: int) -> str:
    try:
        return tokenizer.decode([i])
    except Exception:  # a special or byte-piece id some tokenizers refuse alone
        return ""


def project_2d(vectors: torch.Tensor) -> torch.Tensor:
    """[N, D] -> [N, 2]: the coordinates along the first two principal components."""
    if vectors.dim() != 2 or vectors.shape[0] < 2:
        raise ConfigError(
            f"project_2d needs at least two vectors as an [N, D] matrix, got shape {tuple(vectors.shape)}"
        )
    centred = vectors.double() - vectors.double().mean(0)
    _, _, v = torch.linalg.svd(centred, full_matrices=False)
    # fix each component's sign (the largest loading positive) so the figure is stable
    v = v[:2] * torch.sign(v[:2].gather(1, v[:2].abs().argmax(1, keepdim=True)))
    return (centred @ v.T).float()
