import json
import math
import warnings

import pytest
import torch

from lmlab.data.chat import ChatTemplate
from lmlab.data.instructions import (
    IGNORE,
    PLAIN_TEMPLATE,
    EncodedExample,
    Example,
    collate,
    encode_dataset,
    encode_example,
    load_examples,
    pack,
    read_jsonl,
    response_loss,
    segment_mask,
    split_examples,
    template_for,
)
from lmlab.data.tokenizers import BPETokenizer, CharTokenizer
from lmlab.errors import ConfigError, DataError, DataNotFoundError

ALPACA = {"instruction": "Add the numbers.", "input": "2 3", "output": "5"}
CHAT = {
    "messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
    ]
}
MULTI_TURN = [
    {"role": "user", "content": "What is 2 + 3?"},
    {"role": "assistant", "content": "5"},
    {"role": "user", "content": "And 4 + 4?"},
    {"role": "assistant", "content": "It is 8."},
]


def write(path, lines):
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def labelled_text(tokenizer, encoded):
    return tokenizer.decode([i for i, label in zip(encoded.ids, encoded.labels) if label != IGNORE])


@pytest.fixture(scope="module")
def smollm2():
    """SmolLM2's tokenizer and chat template, read from its GGUF as ``lmlab.load("smollm2")``
    reads them, without loading the weights (3 s instead of 20 on a busy CPU)."""
    from lmlab.checkpoint.gguf import gguf_tokenizer, read_gguf
    from lmlab.checkpoint.pretrained import pretrained_path

    gguf = read_gguf(pretrained_path("smollm2"))
    tok = gguf_tokenizer(gguf)
    bos = tok.decode([gguf.metadata["tokenizer.ggml.bos_token_id"]])
    eos = tok.decode([tok.eos_id])
    return tok, ChatTemplate(gguf.metadata["tokenizer.chat_template"], bos, eos)


@pytest.fixture(scope="module")
def bpe():
    text = "### Instruction:\nWhat is the answer? Hello world, it is 8.\n\n### Response:\n" * 20
    return BPETokenizer.train(text, vocab_size=300)


# ----------------------------------------------------------------------------- reading


def test_load_examples_reads_alpaca_and_chat_rows(tmp_path):
    system = {**ALPACA, "input": "", "system": "You add."}
    file = write(tmp_path / "d.jsonl", [json.dumps(r) for r in (ALPACA, CHAT, system)])
    assert read_jsonl(file) == [ALPACA, CHAT, system]
    alpaca, chat, with_system = load_examples(file)
    assert list(alpaca.messages) == [
        {"role": "user", "content": "Add the numbers.\n\n2 3"},
        {"role": "assistant", "content": "5"},
    ]
    assert alpaca.source == f"{file}:1"
    assert list(chat.messages) == CHAT["messages"]
    assert [m["role"] for m in with_system.messages] == ["system", "user", "assistant"]
    assert with_system.messages[1]["content"] == "Add the numbers."  # empty input: no "\n\n"


def test_load_examples_reads_a_folder_in_name_order(tmp_path):
    write(tmp_path / "b.jsonl", [json.dumps(CHAT)])
    write(tmp_path / "a.jsonl", [json.dumps(ALPACA)])
    assert [e.source.rsplit("/", 1)[-1] for e in load_examples(tmp_path)] == [
        "a.jsonl:1",
        "b.jsonl:1",
    ]


@pytest.mark.parametrize(
    "lines, line, message",
    [
        ([json.dumps(ALPACA), "", json.dumps(ALPACA)], 2, "blank line"),
        ([json.dumps(ALPACA), "   "], 2, "blank line"),
        ([json.dumps(ALPACA), '{"instruction": "x",'], 2, "invalid JSON"),
        (["[1, 2]"], 1, "JSON object"),
        ([json.dumps({"instruction": "x"})], 1, "missing 'output'"),
        ([json.dumps({"output": "x"})], 1, "missing 'instruction'"),
        ([json.dumps({"prompt": "x", "completion": "y"})], 1, r"'messages' \(chat\)"),
        ([json.dumps({"instruction": "x", "output": 5})], 1, "'output' must be a string"),
    ],
)
def test_malformed_lines_name_file_line_and_what_is_expected(tmp_path, lines, line, message):
    file = write(tmp_path / "bad.jsonl", lines)
    with pytest.raises(DataError, match=message) as info:
        load_examples(file)
    assert f"bad.jsonl:{line}:" in str(info.value)


def test_missing_field_error_lists_the_expected_fields(tmp_path):
    file = write(tmp_path / "bad.jsonl", [json.dumps({"question": "x"})])
    with pytest.raises(DataError) as info:
        load_examples(file)
    text = str(info.value)
    assert "'instruction'" in text and "'output'" in text and "'messages'" in text
    assert "['question']" in text  # what the line had


@pytest.mark.parametrize(
    "messages, message",
    [
        ([{"role": "user", "content": "Hi"}], "at least a user message and an assistant"),
        ([{"role": "assistant", "content": "Hi"}, {"role": "user", "content": "Yo"}], "role"),
        (
            [
                {"role": "user", "content": "a"},
                {"role": "user", "content": "b"},
                {"role": "assistant", "content": "c"},
            ],
            "message 1 has role 'user' where 'assistant' was expected",
        ),
        (MULTI_TURN[:3], "ends with a user message"),
        (
            [{"role": "user", "content": "a"}, {"role": "system", "content": "b"}],
            "message 1 has role 'system'",
        ),
        ([{"role": "user", "content": "a"}, {"role": "bot", "content": "b"}], "valid roles"),
        ([{"role": "user", "content": 3}, {"role": "assistant", "content": "b"}], "string"),
        ("hello", "list"),
    ],
)
def test_invalid_conversations_are_named(tmp_path, messages, message):
    file = write(tmp_path / "chat.jsonl", [json.dumps(CHAT), json.dumps({"messages": messages})])
    with pytest.raises(DataError, match=message) as info:
        load_examples(file)
    assert "chat.jsonl:2:" in str(info.value)


def test_missing_paths_and_empty_inputs(tmp_path):
    with pytest.raises(DataNotFoundError, match="does not exist"):
        load_examples(tmp_path / "nope.jsonl")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataNotFoundError, match="no .jsonl files"):
        load_examples(tmp_path / "empty")
    (tmp_path / "empty.jsonl").write_text("\n\n", encoding="utf-8")
    with pytest.raises(DataError, match="empty.jsonl: the file is empty"):
        load_examples(tmp_path / "empty.jsonl")


# ----------------------------------------------------------------------------- encoding


def test_chatml_masks_exactly_the_prompt(smollm2):
    tok, template = smollm2
    example = Example(CHAT["messages"])
    encoded = encode_example(example, tok, template)
    text = template.render(CHAT["messages"], add_generation_prompt=False)
    assert list(encoded.ids) == tok.encode(text)  # one-piece tokenization, as at inference
    assert labelled_text(tok, encoded) == "Hello!<|im_end|>"
    # The labels are one contiguous run right after the generation prompt.
    prompt = template.render(CHAT["messages"][:2], add_generation_prompt=True)
    n_prompt = len(tok.encode(prompt))
    assert set(encoded.labels[:n_prompt]) == {IGNORE}
    assert encoded.labels[n_prompt:-1] == encoded.ids[n_prompt:-1]
    assert encoded.labels[-1] == IGNORE  # the "\n" after <|im_end|>
    assert tok.decode([encoded.ids[-2]]) == "<|im_end|>" and encoded.ids[-2] == tok.eos_id


def test_chatml_multi_turn_labels_every_reply_and_nothing_else(smollm2):
    tok, template = smollm2
    encoded = encode_example(Example(MULTI_TURN), tok, template)
    assert labelled_text(tok, encoded) == "5<|im_end|>It is 8.<|im_end|>"
    # Two labelled runs: one per assistant turn.
    runs = sum(
        1
        for t, label in enumerate(encoded.labels)
        if label != IGNORE and (t == 0 or encoded.labels[t - 1] == IGNORE)
    )
    assert runs == 2


def test_plain_template_with_a_tiny_bpe(bpe):
    template = template_for(bpe)  # no chat template: the plain one, with <|endoftext|>
    assert template.source == PLAIN_TEMPLATE and template.eos_token == "<|endoftext|>"
    encoded = encode_example({"instruction": "What is the answer?", "output": "8"}, bpe, template)
    text = "### Instruction:\nWhat is the answer?\n\n### Response:\n8<|endoftext|>\n\n"
    assert bpe.decode(list(encoded.ids)) == text
    assert labelled_text(bpe, encoded) == "8<|endoftext|>"
    multi = encode_example(Example(MULTI_TURN), bpe, template)
    assert labelled_text(bpe, multi) == "5<|endoftext|>It is 8.<|endoftext|>"


def test_plain_template_without_eos_labels_the_turn_end():
    tok = CharTokenizer.train(PLAIN_TEMPLATE + "abcdefghijklmnopqrstuvwxyz0123456789?#:. ")
    template = template_for(tok)
    encoded = encode_example({"instruction": "2 + 3?", "output": "5"}, tok, template)
    assert labelled_text(tok, encoded) == "5\n\n"


def test_model_template_is_used_when_there_is_one(smollm2):
    tok, template = smollm2
    assert template_for(tok, template) is template


def test_reply_boundary_inside_a_token_is_tokenized_piecewise():
    # "ab" is one token, but the reply starts at "b": the reply is tokenized alone.
    import tokenizers

    model = tokenizers.Tokenizer(tokenizers.models.BPE())
    model.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    model.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(
        vocab_size=300,
        initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    model.train_from_iterator(["ab"] * 50, trainer=trainer)
    tok = BPETokenizer(model)
    template = ChatTemplate(
        "{% for m in messages %}{% if m.role == 'user' %}{{ m.content }}{% else %}"
        "{{ m.content }}{% endif %}{% endfor %}"
    )
    encoded = encode_example(
        Example([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]),
        tok,
        template,
    )
    assert len(tok.encode("ab")) == 1 and len(encoded.ids) == 2
    assert labelled_text(tok, encoded) == "b"


def test_template_that_rewrites_earlier_turns_is_an_error():
    # Shows only the last message: the rendering of the first turn is not a prefix.
    template = ChatTemplate("{{ messages[-1].content }}")
    with pytest.raises(DataError, match="turn by turn"):
        encode_example(
            Example(MULTI_TURN, "x.jsonl:3"), CharTokenizer("0123456789 .?+AIdnst"), template
        )


def test_truncated_reply_is_skipped_with_a_warning_and_never_gives_nan(smollm2):
    tok, template = smollm2
    long_prompt = [
        CHAT["messages"][0],
        {"role": "user", "content": "Hi " * 30},
        CHAT["messages"][2],
    ]
    examples = [Example(long_prompt, "d.jsonl:1"), Example(CHAT["messages"], "d.jsonl:2")]
    full = [encode_example(e, tok, template) for e in examples]
    max_len = len(full[1])  # the short example fits; the long one keeps only prompt
    with pytest.warns(UserWarning, match=r"skipped 1 of 2 examples.*d\.jsonl:1"):
        encoded, skipped = encode_dataset(examples, tok, template, max_len=max_len)
    assert skipped == 1 and encoded == [full[1]]
    assert encode_example(examples[0], tok, template, max_len).n_targets == 0
    batch = collate(encoded, pad_id=0)
    loss = response_loss(torch.zeros(*batch["ids"].shape, tok.vocab_size), batch["labels"])
    assert math.isfinite(loss.item())
    # An all-masked batch is an error, not a silent 0 or NaN.
    masked = torch.full((1, 4), IGNORE)
    with pytest.raises(DataError, match="no labelled response tokens"):
        response_loss(torch.zeros(1, 4, 8, requires_grad=True), masked)


def test_encode_dataset_without_skips_does_not_warn(smollm2):
    tok, template = smollm2
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        encoded, skipped = encode_dataset([Example(CHAT["messages"])], tok, template)
    assert skipped == 0 and len(encoded) == 1


def test_response_loss_hand_worked():
    """V = 2, logits all 0 (p = 1/2), labels [[-100, 1, -100]]: only position 0 is scored
    (it predicts label[1] = 1), so the loss is -ln(1/2) = ln 2."""
    logits = torch.zeros(1, 3, 2, requires_grad=True)
    loss = response_loss(logits, torch.tensor([[IGNORE, 1, IGNORE]]))
    torch.testing.assert_close(loss, torch.tensor(math.log(2)))
    loss.backward()
    assert logits.grad[0, 1:].abs().sum() == 0 and logits.grad[0, 0].abs().sum() > 0


def test_response_loss_matches_shifted_cross_entropy():
    logits = torch.randn(2, 5, 7)
    labels = torch.tensor([[IGNORE, IGNORE, 3, 4, 1], [IGNORE, 2, 6, IGNORE, IGNORE]])
    keep = labels[:, 1:] != IGNORE
    expected = torch.nn.functional.cross_entropy(logits[:, :-1][keep], labels[:, 1:][keep])
    torch.testing.assert_close(response_loss(logits, labels), expected)


# ----------------------------------------------------------------------------- batches


def test_collate_pads_right():
    a = EncodedExample([5, 6, 7], [IGNORE, 6, 7])
    b = EncodedExample([8], [IGNORE])
    batch = collate([a, b], pad_id=1)
    assert batch["ids"].tolist() == [[5, 6, 7], [8, 1, 1]]
    assert batch["labels"].tolist() == [[IGNORE, 6, 7], [IGNORE, IGNORE, IGNORE]]
    assert batch["mask"].tolist() == [[True, True, True], [True, False, False]]
    assert batch["ids"].dtype == batch["labels"].dtype == torch.int64
    assert batch["mask"].dtype == torch.bool
    assert batch["positions"].tolist() == [[0, 1, 2], [0, 0, 0]]
    with pytest.raises(DataError, match="at least one"):
        collate([])
    with pytest.raises(ConfigError, match="pad_id"):
        collate([a], pad_id=None)


def ex(n, start=0, n_prompt=1):
    ids = list(range(start, start + n))
    return EncodedExample(ids, [IGNORE] * n_prompt + ids[n_prompt:])


def test_pack_greedy_keeps_labels_inside_each_example():
    with pytest.warns(UserWarning, match="dropped 1 examples"):
        packed = pack([ex(3, 10), ex(2, 20), ex(4, 30), ex(1, 40, n_prompt=0)], seq_len=5)
    # [3 + 2] then [4] (4 + 1 would fit but the 1-token example has no target: dropped)
    assert [len(p) for p in packed] == [5, 4]
    first = packed[0]
    assert first.ids == (10, 11, 12, 20, 21)
    assert first.labels == (IGNORE, 11, 12, IGNORE, 21)  # label of 20 never scored
    assert first.segments == (1, 1, 1, 2, 2)
    assert first.positions == (0, 1, 2, 0, 1)
    batch = collate(packed)
    assert batch["segments"].tolist() == [[1, 1, 1, 2, 2], [1, 1, 1, 1, 0]]


def test_pack_first_token_label_is_masked_at_every_boundary():
    # Even an example whose first token is labelled does not leak across the boundary.
    a = EncodedExample([1, 2], [IGNORE, 2])
    b = EncodedExample([3, 4], [3, 4])
    (packed,) = pack([a, b], seq_len=8)
    assert packed.labels == (IGNORE, 2, IGNORE, 4)


def test_pack_copes_with_empty_and_over_long_examples():
    empty = EncodedExample([], [])
    long = ex(9, 100, n_prompt=2)
    long_prompt_only = ex(9, 200, n_prompt=9)
    with pytest.warns(UserWarning, match="dropped 2 examples: 1 empty, 1 with no response"):
        packed = pack([ex(2, 0), empty, long, long_prompt_only, ex(2, 50)], seq_len=4)
    assert [p.ids for p in packed] == [(0, 1), (100, 101, 102, 103), (50, 51)]
    assert all(len(p) <= 4 for p in packed)
    assert pack([], seq_len=4) == []
    with pytest.raises(ConfigError, match="seq_len"):
        pack([ex(2)], seq_len=0)


def test_segment_mask_is_block_diagonal_causal():
    mask = segment_mask(torch.tensor([[1, 1, 2, 0]]))
    assert mask.shape == (1, 1, 4, 4)
    assert mask[0, 0].int().tolist() == [
        [1, 0, 0, 0],
        [1, 1, 0, 0],
        [0, 0, 1, 0],
        [0, 0, 0, 1],
    ]


# ----------------------------------------------------------------------------- splits


def test_split_is_deterministic_disjoint_and_keeps_duplicates_together():
    rows = [{"i": i} for i in range(100)] + [{"i": 7}, {"i": 7}]
    train, val, test = split_examples(rows, val_fraction=0.1, test_fraction=0.2, seed=3)
    assert (len(val), len(test)) in {(10, 20), (12, 20), (10, 22)}
    assert len(train) + len(val) + len(test) == 102
    keys = [{json.dumps(r) for r in part} for part in (train, val, test)]
    assert not (keys[0] & keys[1]) and not (keys[0] & keys[2]) and not (keys[1] & keys[2])
    assert split_examples(rows, 0.1, 0.2, seed=3) == (train, val, test)
    assert split_examples(rows, 0.1, 0.2, seed=4) != (train, val, test)
    examples = [Example(CHAT["messages"]), Example(MULTI_TURN), Example(CHAT["messages"])]
    train, val, test = split_examples(examples, val_fraction=0.4, seed=0)
    assert sorted(map(len, (train, val))) == [1, 2] and test == []


def test_split_rejects_bad_fractions():
    with pytest.raises(ConfigError, match="val_fraction"):
        split_examples([1, 2, 3], val_fraction=1.5)
    with pytest.raises(ConfigError, match="sum"):
        split_examples([1, 2, 3], val_fraction=0.5, test_fraction=0.5)
    with pytest.raises(DataError, match="too few"):
        split_examples([1, 2], val_fraction=0.1, test_fraction=0.1)


def test_end_to_end_batch_trains_a_tiny_model(bpe, tmp_path):
    """JSONL -> examples -> encoded -> packed -> batch -> loss that a step lowers."""
    from lmlab.data.tasks import generate_tasks, write_jsonl
    from lmlab.models import build_model, get_preset

    write_jsonl(generate_tasks(["arithmetic", "reverse"], 8, seed=0), tmp_path / "t.jsonl")
    examples = load_examples(tmp_path / "t.jsonl")
    encoded, skipped = encode_dataset(examples, bpe, template_for(bpe), max_len=64)
    assert skipped == 0
    batch = collate(pack(encoded, seq_len=128), pad_id=bpe.eos_id)
    tiny = {"n_layers": 1, "d_model": 32, "n_heads": 2, "d_ff": 64}
    spec = {**get_preset("gpt-char-tiny"), "vocab_size": bpe.vocab_size, **tiny}
    model = build_model(spec)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(3):
        loss = response_loss(model(batch["ids"]), batch["labels"])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert all(math.isfinite(x) for x in losses) and losses[-1] < losses[0]
