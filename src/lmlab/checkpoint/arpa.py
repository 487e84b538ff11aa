"""ARPA n-gram files: lmlab's n-gram models written for KenLM, SRILM and others, and theirs read.

An ARPA file (Paul & Baker 1992; the format KenLM's ``lmplz`` and SRILM's ``ngram-count``
write) lists n-grams with a log10 probability and, below the top order, a log10 backoff
weight::

    \\data\\
    ngram 1=4
    ngram 2=2

    \\1-grams:
    -1.0    <unk>
    -99     <s>     -0.30103
    -0.5    a       -0.2
    -0.39794    </s>

    \\2-grams:
    -0.2    <s> a
    -0.1    a </s>

    \\end\\

and means, for a word w after the words h (KenLM evaluates exactly this)::

    log10 p(w | h) = P(h w)                          if "h w" is listed
                   = B(h) + log10 p(w | h[1:])       otherwise (B(h) = 0 when h is not)

so above, log10 p(a | <s>) = -0.2 and log10 p(</s> | <s>) = -0.30103 + -0.39794.

lmlab's model in this form (``write_arpa``): its BOS symbol is ``<s>``, and a token
vocabulary names the ids (``<unk>`` and ``</s>`` for a ``WordTokenizer``).

- Interpolated Kneser-Ney (plain or modified), Witten-Bell and linear interpolation are
  backoff models in disguise: a seen n-gram's interpolated probability is listed as it is,
  and every other token after the context gets gamma(ctx) * p(w | ctx[1:]), so
  B(ctx) = log10 gamma(ctx). Katz-style ``backoff`` has B(ctx) = log10 of its freed mass
  over the unseen tokens' lower mass. ``mle`` and ``add_k`` give each unseen n-gram a
  value that is not a multiple of the shorter context's, and ``stupid_backoff``'s scores
  are not probabilities: they have no ARPA form, and writing them is refused.
- lmlab pads with n-1 BOS; KenLM starts a sentence with one ``<s>``. The context
  BOS^k r (k >= 1) is written as ``<s> r``, with the probabilities of lmlab's longest
  context and B = the sum of the log10 backoffs of BOS^k r .. BOS r (they are seen
  together: every BOS^i r occurs exactly where r starts a sentence).
- An unseen token (``uniform_floor=False``) has probability 0, written as -99 (KenLM's
  "never": lmlab gives -inf there).

Reading (``read_arpa``) builds an ``NGramLM`` with ``smoothing="arpa"``: the same trie
tables, holding the file's numbers instead of counts, scored by the rule above; a context
that a listed n-gram needs but the file does not list gets B = 0, as the rule says.

Parity: ``tests/checkpoint/test_arpa.py`` loads lmlab's files with the ``kenlm`` module and
compares its sentence scores and per-word ``full_scores`` with lmlab's (1e-4 in log10:
KenLM stores float32), and checks a small file worked by hand.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from lmlab.data.tokenizers import WordTokenizer
from lmlab.errors import CheckpointError, ConfigError, DataError, DataNotFoundError
from lmlab.fileio import atomic_write_text
from lmlab.models.ngram import BACKOFF_FORMS, NGramConfig, NGramLM

BOS_WORD = "<s>"
NEVER = -99.0
"""The log10 probability ARPA files give what cannot happen (``<s>`` as a prediction)."""


def write_arpa(
    model: NGramLM, path: str | os.PathLike[str], words: Sequence[str] | None = None
) -> Path:
    """Write ``model`` as an ARPA file that KenLM, SRILM and ``read_arpa`` load.

    ``words``: the name of each id (a ``WordTokenizer``'s ``words``); None names id i
    ``"i"``. Names must be distinct, without whitespace, and not ``<s>`` (lmlab's BOS).
    """
    cfg = model.config
    V, n = cfg.vocab_size, cfg.order
    if cfg.smoothing not in BACKOFF_FORMS:
        raise ConfigError(
            f"smoothing={cfg.smoothing!r} has no ARPA (backoff) form: every unseen n-gram "
            f"gets its own value; ARPA files hold {', '.join(BACKOFF_FORMS)} models"
        )
    names = _check_words([str(i) for i in range(V)] if words is None else list(words), V)
    names = np.array([*names, BOS_WORD], dtype=object)  # id V is BOS
    sections, tables = [], _tables(model)
    for m in range(1, n + 1):
        grams, probs = _grams(model, tables, m)  # (G, m) tokens farthest first, (G,) p
        if m == 1:  # every token, seen or not, and <s>
            grams = torch.arange(V + 1)[:, None]
            probs = torch.cat([model.unigram_probabilities(), probs.new_zeros(1)])
        bows = _log10_backoffs(model, grams) if m < n else None
        log_p = torch.where(probs > 0, probs.clamp(min=1e-300).log10(), NEVER)
        # one column of strings at a time (numpy object arrays): no Python loop per line
        lines = _numbers(log_p) + "\t" + names[grams[:, 0].numpy()]
        for i in range(1, m):
            lines = lines + " " + names[grams[:, i].numpy()]
        if bows is not None:
            has = (bows != 0).numpy()
            lines[has] = lines[has] + "\t" + _numbers(bows[has])
        lines = lines.tolist()
        sections.append(lines)
    header = ["\\data\\"] + [f"ngram {m}={len(s)}" for m, s in enumerate(sections, 1)]
    body = [""]
    for m, lines in enumerate(sections, 1):
        body += [f"\\{m}-grams:", *lines, ""]
    path = Path(path)
    atomic_write_text(path, "\n".join(header + body + ["\\end\\", ""]))
    return path


def _numbers(values: torch.Tensor) -> np.ndarray:
    """``values`` as strings of 10 significant digits: an object array."""
    return np.array([f"{v:.10g}" for v in values.tolist()], dtype=object)


def words_tokenizer(words: Sequence[str]) -> WordTokenizer | None:
    """A ``WordTokenizer`` over an ARPA file's words (``<unk>``, ``</s>`` first, as lmlab
    and KenLM's lmplz write them), or None when they are in another order: the model then
    works on ids."""
    try:
        return WordTokenizer(words)
    except DataError:
        return None


def _check_words(names: list[str], V: int) -> list[str]:
    if len(names) != V:
        raise ConfigError(f"words names {len(names)} ids, but the model has vocab_size {V}")
    seen = set()
    for i, name in enumerate(names):
        if not isinstance(name, str) or not name or any(c.isspace() for c in name):
            raise ConfigError(f"word {i} ({name!r}) cannot be an ARPA word: empty or spaced")
        if name == BOS_WORD or name in seen:
            raise ConfigError(f"word {i} ({name!r}) is {BOS_WORD} (lmlab's BOS) or a repeat")
        seen.add(name)
    return names


def _tables(model: NGramLM) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Every stored m-gram of ``model`` per order: tokens [G_m, m] (farthest first, BOS =
    V) and p(w | ctx) [G_m] float64 at its own level."""
    V = model.config.vocab_size
    out = []
    for m in range(1, model.config.order + 1):
        keys = getattr(model, f"keys_{m}")
        tokens = torch.cat([model.context_tokens(m - 1)[keys // V], (keys % V)[:, None]], 1)
        out.append((tokens, model.level_probabilities(m)))
    return out


def _grams(model: NGramLM, tables, m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The ARPA m-grams of ``model``: tokens [G, m] (farthest first, at most one BOS, at
    the start) and their probabilities [G] float64."""
    V, n = model.config.vocab_size, model.config.order
    tokens, probs = tables[m - 1]
    plain = tokens[:, 0] != V  # no BOS: written as they are
    grams, values = [tokens[plain]], [probs[plain]]
    if m > 1:
        # "<s> r w" carries lmlab's longest context BOS^k r: from the top order, k = n - m + 1
        tokens, probs = tables[n - 1]
        k = n - m + 1
        pick = (tokens[:, :k] == V).all(1) & (tokens[:, k] != V)
        grams.append(tokens[pick][:, k - 1 :])
        values.append(probs[pick])
    return torch.cat(grams), torch.cat(values)


def _log10_backoffs(model: NGramLM, grams: torch.Tensor) -> torch.Tensor:
    """log10 B of each ARPA m-gram [G, m] as a context: its lmlab context's backoff
    factor, or for ``<s> r`` the product over BOS^k r .. BOS r (see the module docstring)."""
    V, n = model.config.vocab_size, model.config.order
    G, m = grams.shape
    back = torch.full((G, n - 1), V, dtype=torch.long)
    back[:, :m] = grams.flip(1)  # nearest first; BOS beyond
    rows = model.find_contexts(list(back.T), G)
    bos = grams[:, 0] == V
    log_b = torch.zeros(G, dtype=torch.float64)  # (G,)
    for j in range(m, n):
        use = rows[j] >= 0
        if j > m:
            use &= bos  # only <s> r spans the deeper BOS levels
        weights = model.backoff_weights(j)[rows[j].clamp(min=0)]
        log_b += torch.where(use, torch.log10(weights.clamp(min=1e-300)), 0.0)
    return log_b


def read_arpa(path: str | os.PathLike[str]) -> tuple[NGramLM, list[str]]:
    """An ARPA file as an ``NGramLM`` (``smoothing="arpa"``) and the word of each id.

    ``<s>`` becomes the model's BOS, ``</s>`` (if listed) its ``sentence_end_id``; the other
    unigrams are ids 0..V-1 in file order. A malformed file raises ``CheckpointError``
    naming the file and line.
    """
    path = Path(path)
    if not path.is_file():
        raise DataNotFoundError(f"ARPA file {str(path)!r} does not exist")
    sections = _parse(path)
    n = len(sections)
    unigrams = sections[0]
    words = [g[0] for g, _, _, _ in unigrams if g[0] != BOS_WORD]
    ids = {w: i for i, w in enumerate(words)}
    V = len(words)
    if V == 0:
        raise CheckpointError(f"{str(path)!r}: the 1-grams list no word besides {BOS_WORD}")
    if len(ids) != V:
        raise CheckpointError(f"{str(path)!r}: a word is listed twice among the 1-grams")
    ids[BOS_WORD] = V

    def encode(gram, line):
        out = []
        for i, w in enumerate(gram):
            if w not in ids:
                raise CheckpointError(
                    f"{str(path)}:{line}: {' '.join(gram)!r} uses {w!r}, which is not a 1-gram"
                )
            if w == BOS_WORD and (i > 0 or len(gram) == 1):
                raise CheckpointError(
                    f"{str(path)}:{line}: {BOS_WORD} can only open an n-gram of 2 or more words"
                )
            out.append(ids[w])
        return out

    tables = []  # per order: (tokens [G, m], log10 p [G], log10 backoff [G], lines)
    for m, entries in enumerate(sections, 1):
        kept = [e for e in entries if m > 1 or e[0][0] != BOS_WORD]  # <s>: the BOS
        tokens = torch.tensor([encode(g, line) for g, _, _, line in kept], dtype=torch.long)
        tables.append(
            (
                tokens.view(len(kept), m),
                torch.tensor([p for _, p, _, _ in kept], dtype=torch.float64),
                torch.tensor([b for _, _, b, _ in kept], dtype=torch.float64),
                [line for _, _, _, line in kept],
            )
        )
    bos_backoff = next((b for g, _, b, _ in unigrams if g[0] == BOS_WORD), 0.0)
    end = ids.get("</s>")
    model = NGramLM(NGramConfig(vocab_size=V, order=n, smoothing="arpa", sentence_end_id=end))
    return _install(model, tables, bos_backoff, path), words


def _install(model: NGramLM, tables, bos_backoff: float, path: Path) -> NGramLM:
    """Fill ``model``'s trie from the parsed n-grams (see ``NGramLM`` storage)."""
    V, n = model.config.vocab_size, model.config.order
    # The contexts each level needs: listed j-grams, the contexts of listed (j+1)-grams,
    # and the suffixes of longer contexts (a context is found through its suffix).
    need: list[torch.Tensor] = [torch.zeros(1, 0, dtype=torch.long)] * n
    bos = torch.tensor([[V]])
    for j in range(n - 1, 0, -1):
        parts = [tables[j - 1][0], tables[j][0][:, :-1]]
        if j == 1:
            parts.append(bos)  # "<s>" itself, never a listed 1-gram here
        if j < n - 1:
            parts.append(need[j + 1][:, 1:])
        need[j] = torch.unique(torch.cat(parts), dim=0)
    contexts, backoffs = [], []
    for j in range(1, n):
        rows = need[j]
        keys = _context_keys(model, rows)
        order = keys.argsort()
        keys = keys[order]
        contexts.append(keys)
        setattr(model, f"contexts_{j}", keys)
        bow = torch.zeros(keys.numel(), dtype=torch.float64)
        listed = tables[j - 1]
        at = torch.searchsorted(keys, _context_keys(model, listed[0]))
        bow[at] = listed[2]
        if j == 1:
            bow[torch.searchsorted(keys, torch.tensor([V]))] = bos_backoff
        backoffs.append(bow)
    grams, values = [], []
    for m in range(1, n + 1):
        tokens, log10p, _, lines = tables[m - 1]
        owner = _context_keys(model, tokens[:, :-1]) if m > 1 else torch.zeros(len(lines))
        if m > 1:
            owner = torch.searchsorted(contexts[m - 2], owner)
        keys = owner.long() * V + tokens[:, -1]
        order = keys.argsort()
        keys, log10p = keys[order], log10p[order]
        repeated = (keys[1:] == keys[:-1]).nonzero()
        if repeated.numel():
            line = lines[int(order[int(repeated[0]) + 1])]
            raise CheckpointError(f"{str(path)}:{line}: this {m}-gram is listed twice")
        grams.append(keys)
        values.append(log10p)
    return model.load_tables(contexts, grams, values, backoffs)


def _context_keys(model: NGramLM, rows: torch.Tensor) -> torch.Tensor:
    """Keys id(ctx[1:]) * (V+1) + ctx[0] of contexts [U, j] (farthest first) whose
    suffixes are already in ``model``'s tables of lengths < j."""
    V = model.config.vocab_size
    U, j = rows.shape
    suffix = model.find_contexts(list(rows[:, 1:].flip(1).T), U)[-1]  # (U,) rows at j-1
    return suffix * (V + 1) + rows[:, 0]


def _parse(path: Path) -> list[list[tuple[list[str], float, float, int]]]:
    """The n-grams of each order as (words, log10 p, log10 backoff, line number)."""

    def fail(line: int, what: str):
        raise CheckpointError(f"{str(path)}:{line}: {what}")

    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise CheckpointError(f"{str(path)!r} is not UTF-8 text (byte {e.start})") from e
    lines = text.splitlines()
    i = 0
    while i < len(lines) and lines[i].strip() != "\\data\\":
        i += 1
    if i == len(lines):
        raise CheckpointError(f"{str(path)!r} is not an ARPA file: no \\data\\ line")
    counts: list[int] = []
    i += 1
    while i < len(lines) and not lines[i].strip().startswith("\\"):
        line = lines[i].strip()
        if line:
            key, _, value = line.partition("=")
            m = len(counts) + 1
            if key.split() != ["ngram", str(m)] or not value.strip().isdigit():
                fail(i + 1, f"expected 'ngram {m}=<count>', got {line!r}")
            counts.append(int(value))
        i += 1
    if not counts:
        fail(i + 1, "the \\data\\ section gives no 'ngram 1=<count>' line")
    sections = []
    for m, count in enumerate(counts, 1):
        while i < len(lines) and not lines[i].strip():
            i += 1
        if i == len(lines) or lines[i].strip() != f"\\{m}-grams:":
            fail(min(i, len(lines)) + 1, f"expected the '\\{m}-grams:' section")
        header = i + 1
        i += 1
        entries = []
        while i < len(lines) and lines[i].strip() and not lines[i].startswith("\\"):
            fields = lines[i].split()
            if len(fields) not in (m + 1, m + 2):
                fail(i + 1, f"a {m}-gram line holds log10 p, {m} word(s) and maybe a backoff")
            try:
                p = float(fields[0])
                b = float(fields[m + 1]) if len(fields) == m + 2 else 0.0
            except ValueError:
                fail(i + 1, f"expected numbers around the words, got {lines[i].strip()!r}")
            if not (math.isfinite(p) and math.isfinite(b)) or p > 0:
                fail(i + 1, f"log10 p must be a finite number <= 0, got {fields[0]!r}")
            if len(fields) == m + 2 and m == len(counts):
                fail(i + 1, f"a {m}-gram of the top order has no backoff weight")
            entries.append((fields[1 : m + 1], p, b, i + 1))
            i += 1
        if len(entries) != count:
            fail(header, f"\\data\\ announces {count} {m}-grams, this section has {len(entries)}")
        sections.append(entries)
    while i < len(lines) and not lines[i].strip():
        i += 1
    if i == len(lines) or lines[i].strip() != "\\end\\":
        fail(min(i, len(lines)) + 1, "expected \\end\\ after the last section")
    return sections
