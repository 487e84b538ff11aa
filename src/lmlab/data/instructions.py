"""Instruction-tuning data: JSONL conversations -> token ids with the prompt masked out.

Supervised fine-tuning (SFT) teaches a pretrained model to answer: it is trained on
conversations rendered exactly as it will be prompted (its chat template), and the loss
counts only the tokens the model must *write*, the assistant's replies. This module takes
the data from file to batch:

1. ``load_examples(path)`` reads JSONL in the two common shapes, one object a line::

       {"instruction": "Add the numbers.", "input": "2 3", "output": "5"}       # Alpaca
       {"messages": [{"role": "user", "content": "Hi"},
                     {"role": "assistant", "content": "Hello!"}]}              # chat

   An Alpaca row becomes ``[system?] user (instruction, + "\\n\\n" + input when there is
   one) -> assistant (output)``. Every problem is a ``DataError`` naming ``file:line``.
2. ``encode_example(example, tokenizer, template, max_len)`` renders the conversation and
   tokenizes it into ``ids`` and ``labels``: ``labels`` equal ``ids`` on the assistant's
   replies (with the template's end-of-turn token, so the model learns to stop) and are
   ``IGNORE`` (-100) everywhere else. With SmolLM2's ChatML::

       <|im_start|>system\\n...<|im_end|>\\n<|im_start|>user\\nHi<|im_end|>\\n<|im_start|>assistant\\n
       ----------------------------------- masked (-100) ----------------------------------------
       Hello!<|im_end|>           \\n
       ------ labels ----------   masked

3. ``pack`` fills fixed-length sequences with several short examples; ``collate`` pads a
   batch; ``response_loss`` is the cross-entropy over the labelled tokens.

Labels are aligned with ``ids`` and shifted inside the loss, as in Hugging Face's causal
LMs (``labels=input_ids`` convention): ``logits[:, t]`` is scored against ``labels[:, t + 1]``.

Models without a chat template use ``PLAIN_TEMPLATE`` (Alpaca's "### Instruction: /
### Response:" layout) through ``template_for(tokenizer)``.

Reference: the masking rule is that of TRL's ``assistant_only_loss`` and torchtune's
``train_on_input=False``; ``tests/data/test_instructions.py`` checks it by decoding the
labelled tokens of SmolLM2's real template and comparing them with the reply text.
"""

from __future__ import annotations

import json
import os
import random
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from lmlab.data.chat import ChatTemplate, check_messages
from lmlab.errors import ConfigError, DataError, DataNotFoundError
from lmlab.models.layers import segment_mask  # noqa: F401  (re-exported beside pack)

IGNORE = -100
"""The label of a token the loss skips (PyTorch's ``cross_entropy`` ``ignore_index``)."""

ALPACA_FIELDS = ("instruction", "input", "output", "system")
"""Alpaca keys: ``instruction`` and ``output`` are required, ``input`` and ``system`` optional."""

EXPECTED_SHAPES = "expected 'instruction' and 'output' (Alpaca) or 'messages' (chat)"

PLAIN_TEMPLATE = (
    "{% for m in messages %}"
    "{% if m.role == 'system' %}{{ m.content + '\n\n' }}"
    "{% elif m.role == 'user' %}{{ '### Instruction:\n' + m.content + '\n\n' }}"
    "{% elif m.role == 'assistant' %}{{ '### Response:\n' + m.content + eos_token + '\n\n' }}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '### Response:\n' }}{% endif %}"
)
"""A chat template for models that have none (Alpaca's layout)::

    [system, user "What is 2 + 3?", assistant "5"]  ->
        You are precise.\\n\\n### Instruction:\\nWhat is 2 + 3?\\n\\n### Response:\\n5<eos>\\n\\n

``<eos>`` is the tokenizer's end-of-document token (``template_for`` fills it in); a
tokenizer without one gets no end token, and the reply's labels then end with the
"\\n\\n" that closes the turn, which a generation loop can stop on. Each turn header ends
with a newline so that the reply starts a new pre-token and tokenizes as it does alone.
"""


# ----------------------------------------------------------------------------- examples


@dataclass(frozen=True)
class Example:
    """One conversation: ``messages`` of ``{"role", "content"}``, ending with the assistant.

    ``source`` says where it came from (``"data.jsonl:12"``), for error messages.
    """

    messages: tuple[dict[str, str], ...]
    source: str = ""

    def __post_init__(self) -> None:
        where = self.source or "conversation"
        object.__setattr__(self, "messages", tuple(check_conversation(self.messages, where)))


def check_conversation(messages: Any, where: str = "conversation") -> list[dict[str, str]]:
    """``messages`` as a list of plain ``{"role", "content"}`` dicts, or ``DataError``.

    A trainable conversation is an optional ``system`` message, then ``user`` and
    ``assistant`` turns alternating, starting with the user and ending with the assistant:

        system? user assistant (user assistant)*

    Other keys of a message are dropped; contents must be strings.
    """
    try:
        messages = check_messages(messages)
    except DataError as e:
        raise DataError(f"{where}: {e}") from e
    roles = [m["role"] for m in messages]
    body = roles[1:] if roles[:1] == ["system"] else roles
    if len(body) < 2:
        raise DataError(
            f"{where}: a conversation needs at least a user message and an assistant reply "
            f"(optionally after a system message), got roles {roles}"
        )
    for i, role in enumerate(body):
        expected = "user" if i % 2 == 0 else "assistant"
        if role != expected:
            index = i + (len(roles) - len(body))
            raise DataError(
                f"{where}: message {index} has role {role!r} where {expected!r} was expected; "
                "roles must be: system (optional, first), then user and assistant alternating, "
                f"got {roles}"
            )
    if body[-1] != "assistant":
        raise DataError(
            f"{where}: the conversation ends with a user message; the last message must be "
            f"the assistant's reply to train on, got roles {roles}"
        )
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def read_jsonl(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The JSON objects of a JSONL file, one per line (or of a folder's ``*.jsonl`` files,
    in name order).

    Raises ``DataNotFoundError`` for a missing path or a folder without ``.jsonl`` files,
    and ``DataError`` naming ``file:line`` for an empty file, a blank line, invalid JSON or
    a line that is not an object.
    """
    return [row for _, row in read_rows(path)]


def load_examples(path: str | os.PathLike) -> list[Example]:
    """The conversations of a JSONL file (or folder of them), Alpaca or chat rows.

        {"instruction": "Reverse it.", "input": "abc", "output": "cba"}
            -> [user "Reverse it.\\n\\nabc", assistant "cba"]

    Each line's shape is detected on its own, so one file may mix both. Errors name
    ``file:line`` and what was expected.
    """
    return [example_from_row(row, where) for where, row in read_rows(path)]


def example_from_row(row: Mapping[str, Any], where: str = "") -> Example:
    """An ``Example`` from one Alpaca or chat dict (see ``load_examples``); ``where``
    (``"file:line"``) prefixes error messages and becomes the example's ``source``."""
    source, where = where, where or "row"
    if "messages" in row:
        return Example(row["messages"], source)
    if "instruction" in row or "output" in row:
        missing = [k for k in ("instruction", "output") if k not in row]
        if missing:
            raise DataError(
                f"{where}: Alpaca row is missing {' and '.join(map(repr, missing))}; "
                f"{EXPECTED_SHAPES}, with optional 'input' and 'system'"
            )
        for key in ALPACA_FIELDS:
            if key in row and not isinstance(row[key], str):
                raise DataError(
                    f"{where}: Alpaca field {key!r} must be a string, got {type(row[key]).__name__}"
                )
        user = row["instruction"]
        if row.get("input"):
            user = f"{user}\n\n{row['input']}"
        messages = [{"role": "user", "content": user}]
        if row.get("system"):
            messages.insert(0, {"role": "system", "content": row["system"]})
        messages.append({"role": "assistant", "content": row["output"]})
        return Example(messages, source)
    raise DataError(f"{where}: {EXPECTED_SHAPES}; the line has keys {sorted(row)}")


def read_rows(
    path: str | os.PathLike, what: str = "instruction data", expected: str = EXPECTED_SHAPES
) -> list[tuple[str, dict[str, Any]]]:
    """(``"file:line"``, object) for every line of a JSONL file or folder of them.

    ``what`` names the data in errors ("instruction data", "preference data", ...) and
    ``expected`` says which fields a line should hold.
    """
    path = Path(path)
    if not path.exists():
        raise DataNotFoundError(f"{what} {str(path)!r} does not exist")
    if path.is_dir():
        files = sorted(p for p in path.glob("*.jsonl") if p.is_file())
        if not files:
            raise DataNotFoundError(f"folder {str(path)!r} holds no .jsonl files")
        return [row for file in files for row in read_rows(file, what, expected)]
    data = path.read_bytes()
    if not data.strip():
        raise DataError(f"{path}: the file is empty; expected one JSON object per line")
    lines = data.split(b"\n")
    if lines[-1] == b"":  # the newline that ends the last line starts no new one
        lines.pop()
    rows = []
    for number, raw in enumerate(lines, start=1):
        where = f"{path}:{number}"
        try:
            line = raw.decode("utf-8-sig" if number == 1 else "utf-8")
        except UnicodeDecodeError as e:
            raise DataError(f"{where}: not valid UTF-8 ({e.reason} at byte {e.start})") from e
        if not line.strip():
            raise DataError(f"{where}: blank line; every line must hold one JSON object")
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{where}: invalid JSON: {e}") from e
        if not isinstance(row, dict):
            raise DataError(
                f"{where}: a line must hold a JSON object, got {type(row).__name__}; {expected}"
            )
        rows.append((where, row))
    return rows


# ----------------------------------------------------------------------------- templates


def eos_text(tokenizer: Any) -> str:
    """The text of the tokenizer's end-of-document token, or "" when it has none."""
    eos_id = getattr(tokenizer, "eos_id", None)
    return "" if eos_id is None else tokenizer.decode([eos_id])


def template_for(tokenizer: Any, chat_template: ChatTemplate | None = None) -> ChatTemplate:
    """The model's own ``chat_template`` when it has one, else ``PLAIN_TEMPLATE`` with the
    tokenizer's end-of-document token as end of turn (``template_for(lm.tokenizer,
    lm.chat_template)``)."""
    if chat_template is not None:
        return chat_template
    return ChatTemplate(PLAIN_TEMPLATE, eos_token=eos_text(tokenizer))


# ----------------------------------------------------------------------------- encoding


@dataclass(frozen=True)
class EncodedExample:
    """Token ids with their labels (``IGNORE`` where the loss does not look).

    ``segments`` numbers the examples of a packed sequence (1, 1, 1, 2, 2, ...); None for
    a single example. ``positions`` restart at 0 at each example.
    """

    ids: tuple[int, ...]
    labels: tuple[int, ...]
    segments: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "ids", tuple(int(i) for i in self.ids))
        object.__setattr__(self, "labels", tuple(int(i) for i in self.labels))
        if len(self.ids) != len(self.labels):
            raise DataError(f"{len(self.ids)} ids but {len(self.labels)} labels; need one each")
        if self.segments is not None:
            object.__setattr__(self, "segments", tuple(int(s) for s in self.segments))
            if len(self.segments) != len(self.ids):
                raise DataError(f"{len(self.ids)} ids but {len(self.segments)} segment ids")

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def n_targets(self) -> int:
        """Tokens the loss scores: labelled positions after the first (nothing predicts
        position 0)."""
        return sum(label != IGNORE for label in self.labels[1:])

    @property
    def positions(self) -> tuple[int, ...]:
        """0, 1, 2, ... within each example (restarting at each packed example)."""
        if self.segments is None:
            return tuple(range(len(self.ids)))
        out, start = [], 0
        for t, s in enumerate(self.segments):
            if t and s != self.segments[t - 1]:
                start = t
            out.append(t - start)
        return tuple(out)

    def truncated(self, max_len: int) -> EncodedExample:
        """The first ``max_len`` tokens (the reply's end is what truncation loses)."""
        segments = None if self.segments is None else self.segments[:max_len]
        return EncodedExample(self.ids[:max_len], self.labels[:max_len], segments)


def encode_example(
    example: Example | Mapping[str, Any],
    tokenizer: Any,
    template: ChatTemplate,
    max_len: int | None = None,
) -> EncodedExample:
    """Render ``example`` with ``template`` and tokenize it, labelling only the replies.

    Returns ``ids`` and ``labels`` of the same length (at most ``max_len``: longer
    examples keep their first ``max_len`` tokens). ``labels`` hold the ids of each
    assistant reply and of the end-of-turn token that closes it (the template's
    ``eos_token``, e.g. ``<|im_end|>``; whitespace after it is not labelled), and
    ``IGNORE`` elsewhere: system and user messages, turn headers, generation prompts.

    How the replies are found: for each assistant message ``i``, the text of
    ``render(messages[:i], add_generation_prompt=True)`` is the prompt and
    ``render(messages[:i + 1])`` ends with the reply; both must be prefixes of the whole
    rendering (``DataError`` for a template that rewrites earlier turns). The text is
    tokenized in one piece when every boundary between prompt and reply falls between
    tokens (so the ids are exactly ``tokenizer.encode(text)``), else piece by piece.

    The result may have no labels left after truncation; ``encode_dataset`` skips those.
    """
    if not isinstance(example, Example):
        example = example_from_row(example)
    messages = [dict(m) for m in example.messages]
    where = example.source or "conversation"
    try:
        text = template.render(messages, add_generation_prompt=False)
        spans = []
        for i, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            prompt = template.render(messages[:i], add_generation_prompt=True)
            turn = template.render(messages[: i + 1], add_generation_prompt=False)
            start = len(prompt)
            if not (text.startswith(turn) and turn.startswith(prompt)):
                raise DataError(
                    f"the chat template does not render this conversation turn by turn "
                    f"(the rendering of its first {i + 1} messages is not a prefix of the "
                    "whole), so the reply tokens cannot be located"
                )
            spans.append((start, start + _reply_length(turn[start:], message, template)))
    except DataError as e:
        raise DataError(f"{where}: {e}") from e
    ids, labels = _encode_spans(tokenizer, text, spans)
    encoded = EncodedExample(ids, labels)
    if max_len is not None:
        _check_positive("max_len", max_len)
        encoded = encoded.truncated(max_len)
    return encoded


def _reply_length(turn_text: str, message: dict[str, str], template: ChatTemplate) -> int:
    """How many characters of ``turn_text`` (what the template writes for one assistant
    message after its generation prompt) the model must learn to write: through the
    end-of-turn token when the template has one after the reply, else all of it."""
    content_at = turn_text.find(message["content"]) if message["content"] else 0
    after = content_at + len(message["content"]) if content_at >= 0 else 0
    eos = template.eos_token
    end = turn_text.find(eos, after) if eos else -1
    return end + len(eos) if end >= 0 else len(turn_text)


def _encode_spans(
    tokenizer: Any, text: str, spans: list[tuple[int, int]]
) -> tuple[list[int], list[int]]:
    """Token ids of ``text`` and labels that copy the ids inside the character ``spans``.

    text "Q: hi A: yo.", spans [(9, 12)]  ->  labels IGNORE over "Q: hi A: ", ids of "yo."
    """
    cuts = sorted({b for span in spans for b in span if 0 < b < len(text)})
    ids = tokenizer.encode(text)
    token_cuts = []
    for b in cuts:
        head = tokenizer.encode(text[:b])
        if ids[: len(head)] != head:
            break  # a token straddles the boundary
        token_cuts.append(len(head))
    if len(token_cuts) == len(cuts):
        pieces = [ids[a:b] for a, b in zip([0, *token_cuts], [*token_cuts, len(ids)])]
    else:  # tokenize each piece alone, so the reply's tokens are its own
        pieces = [tokenizer.encode(text[a:b]) for a, b in zip([0, *cuts], [*cuts, len(text)])]
    labelled = {start for start, end in spans if end > start}
    out_ids, out_labels = [], []
    for start, piece in zip([0, *cuts], pieces):
        out_ids += piece
        out_labels += piece if start in labelled else [IGNORE] * len(piece)
    return out_ids, out_labels


def encode_dataset(
    examples: Sequence[Example | Mapping[str, Any]],
    tokenizer: Any,
    template: ChatTemplate,
    max_len: int | None = None,
) -> tuple[list[EncodedExample], int]:
    """``encode_example`` on every example -> (encoded, number skipped).

    An example with no labelled token left (its reply truncated away by ``max_len``, or
    empty with no end token) would add nothing to the loss, or a 0/0 NaN in a batch of
    its own: it is skipped, and one ``UserWarning`` says how many and which
    (RELIABILITY.md item 12).
    """
    out, skipped = [], []
    for index, example in enumerate(examples):
        encoded = encode_example(example, tokenizer, template, max_len)
        if encoded.n_targets == 0:
            skipped.append(getattr(example, "source", "") or f"example {index}")
        else:
            out.append(encoded)
    if skipped:
        shown = ", ".join(skipped[:5]) + (", ..." if len(skipped) > 5 else "")
        warnings.warn(
            f"skipped {len(skipped)} of {len(examples)} examples with no response tokens "
            f"left to train on (max_len={max_len}): {shown}",
            stacklevel=2,
        )
    return out, len(skipped)


# ----------------------------------------------------------------------------- batches


def pack(examples: Sequence[EncodedExample], seq_len: int) -> list[EncodedExample]:
    """Greedily pack short examples into sequences of at most ``seq_len`` tokens.

    Examples are taken in order and appended to the current sequence while they fit; the
    next one that does not fit starts a new sequence. The packed ``segments`` number the
    examples (1, 1, 2, 2, 2, ...) and ``positions`` restart at each; ``collate`` returns
    both and ``segment_mask`` turns them into a block-diagonal causal mask.

        lengths [3, 2, 4, 1], seq_len 5  ->  [3 + 2], [4 + 1]

    Labels never cross an example: the first token of each packed example is unlabelled,
    so no position is scored on the next example's first token. Attention does cross
    (with a plain causal mask a later example sees the earlier ones in its sequence), as
    in Hugging Face's ``ConstantLengthDataset`` and nanoGPT-style pretraining; a model
    that takes ``segment_mask`` or the positions avoids it.

    Empty examples are dropped. An example longer than ``seq_len`` is truncated to its
    first ``seq_len`` tokens and fills a sequence alone. An example without labels (or
    left without by truncation) is dropped. One ``UserWarning`` counts the dropped ones.
    """
    _check_positive("seq_len", seq_len)
    packed: list[EncodedExample] = []
    ids: list[int] = []
    labels: list[int] = []
    segments: list[int] = []
    n_empty = n_unlabelled = 0

    def flush():
        if ids:
            packed.append(EncodedExample(ids, labels, segments))

    for example in examples:
        if len(example) == 0:
            n_empty += 1
            continue
        if len(example) > seq_len:
            example = example.truncated(seq_len)
        if example.n_targets == 0:
            n_unlabelled += 1
            continue
        if len(ids) + len(example) > seq_len:
            flush()
            ids, labels, segments = [], [], []
        segment = segments[-1] + 1 if segments else 1
        ids = ids + list(example.ids)
        labels = labels + [IGNORE] + list(example.labels[1:])
        segments = segments + [segment] * len(example)
    flush()
    if n_empty or n_unlabelled:
        warnings.warn(
            f"pack dropped {n_empty + n_unlabelled} examples: {n_empty} empty, "
            f"{n_unlabelled} with no response tokens (left after truncation to "
            f"seq_len={seq_len})",
            stacklevel=2,
        )
    return packed


def collate(examples: Sequence[EncodedExample], pad_id: int = 0) -> dict[str, torch.Tensor]:
    """Right-pad a batch to its longest example.

    Returns ``ids`` [B, T] int64 (``pad_id`` on padding), ``labels`` [B, T] int64
    (``IGNORE`` on padding), ``mask`` [B, T] bool (True on real tokens), ``segments``
    [B, T] int64 (packed example number from 1; 0 on padding) and ``positions`` [B, T]
    int64 (restarting at each packed example; 0 on padding).

        lengths [3, 1] -> ids [[a, b, c], [d, pad, pad]], mask [[T, T, T], [T, F, F]]
    """
    if not examples:
        raise DataError("collate needs at least one example")
    if isinstance(pad_id, bool) or not isinstance(pad_id, int) or pad_id < 0:
        raise ConfigError(f"pad_id={pad_id!r} is invalid: must be a token id (an int >= 0)")
    B, T = len(examples), max(len(e) for e in examples)
    ids = torch.full((B, T), pad_id, dtype=torch.int64)
    labels = torch.full((B, T), IGNORE, dtype=torch.int64)
    segments = torch.zeros((B, T), dtype=torch.int64)
    positions = torch.zeros((B, T), dtype=torch.int64)
    for row, e in enumerate(examples):
        n = len(e)
        ids[row, :n] = torch.tensor(e.ids, dtype=torch.int64)
        labels[row, :n] = torch.tensor(e.labels, dtype=torch.int64)
        segments[row, :n] = torch.tensor(e.segments or [1] * n, dtype=torch.int64)
        positions[row, :n] = torch.tensor(e.positions, dtype=torch.int64)
    return {
        "ids": ids,
        "labels": labels,
        "mask": segments > 0,
        "segments": segments,
        "positions": positions,
    }


def split_examples(
    examples: Sequence[Any],
    val_fraction: float = 0.1,
    test_fraction: float = 0.0,
    seed: int = 0,
) -> tuple[list[Any], list[Any], list[Any]]:
    """Shuffle with ``seed`` and cut into (train, val, test), the same way every time.

    Identical examples (same messages, or equal rows) are kept together in one split, so a
    held-out example never also appears in training. Split sizes are rounded from the
    fractions, counted in distinct examples; a non-zero fraction gets at least one.

        100 distinct examples, val 0.1, test 0.1 -> 80, 10, 10
    """
    for name, value in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
        if not isinstance(value, int | float) or not 0 <= value < 1:
            raise ConfigError(f"{name}={value!r} is invalid: must be in [0, 1)")
    if val_fraction + test_fraction >= 1:
        raise ConfigError(
            f"val_fraction + test_fraction = {val_fraction + test_fraction} leaves no "
            "training data; their sum must be below 1"
        )
    groups: dict[str, list[Any]] = {}
    for example in examples:
        groups.setdefault(_key(example), []).append(example)
    keys = list(groups)
    random.Random(seed).shuffle(keys)
    n = len(keys)
    n_test = max(1, round(n * test_fraction)) if test_fraction else 0
    n_val = max(1, round(n * val_fraction)) if val_fraction else 0
    if n - n_test - n_val < 1:
        raise DataError(
            f"{n} distinct examples are too few for val_fraction={val_fraction} and "
            f"test_fraction={test_fraction}: no training example would be left"
        )
    test_keys, val_keys, train_keys = (
        keys[:n_test],
        keys[n_test : n_test + n_val],
        keys[n_test + n_val :],
    )
    return tuple([e for k in part for e in groups[k]] for part in (train_keys, val_keys, test_keys))


def _key(example: Any) -> str:
    """A canonical string for an example, equal for equal examples."""
    if isinstance(example, Example):
        example = list(example.messages)
    elif isinstance(example, EncodedExample):
        example = [example.ids, example.labels]
    return json.dumps(example, sort_keys=True, ensure_ascii=False, default=str)


# ----------------------------------------------------------------------------- loss


def response_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over the labelled tokens: a scalar, in float32.

    ``logits`` [B, T, V] come from ``model(ids)``; ``labels`` [B, T] int64 are aligned
    with ``ids`` (``IGNORE`` where not scored), and the loss shifts them: position ``t``
    predicts ``labels[:, t + 1]``, as in Hugging Face's causal LMs. The mean is over all
    labelled tokens of the batch (a long reply weighs more than a short one).

    Worked example: V = 2, logits all 0 (p = 1/2 everywhere), labels [[-100, 1, -100]]:
    only ``logits[0, 0]`` is scored (against label 1), so the loss is ln 2 = 0.693.

    A batch with no labelled token raises ``DataError`` rather than returning 0 or NaN
    (RELIABILITY.md item 12); ``encode_dataset`` and ``pack`` never produce one.
    """
    if logits.ndim != 3 or labels.shape != logits.shape[:2]:
        raise DataError(
            f"response_loss takes logits [B, T, V] and labels [B, T], got "
            f"{tuple(logits.shape)} and {tuple(labels.shape)}"
        )
    logits, targets = logits[:, :-1], labels[:, 1:]  # (B, T-1, V), (B, T-1)
    n = (targets != IGNORE).sum()
    if n.item() == 0:
        raise DataError(
            "the batch has no labelled response tokens: every label is masked "
            "(encode_dataset skips such examples; was the batch built from them?)"
        )
    total = F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]).float(),
        targets.reshape(-1),
        ignore_index=IGNORE,
        reduction="sum",
    )
    return total / n


def _check_positive(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{name}={value!r} is invalid: must be a positive integer")
