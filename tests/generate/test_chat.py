import pytest
import torch
from torch import nn

from builders import CHATML
from lmlab.api import LM
from lmlab.data import BPETokenizer
from lmlab.data.chat import ChatTemplate
from lmlab.errors import ConfigError, DataError, DecodingError
from lmlab.generate import SamplingParams
from lmlab.generate.chat import ChatSession
from lmlab.models import build_model

TEXT = "\n".join(
    [
        "<|im_start|>user\nhello there<|im_end|>",
        "<|im_start|>assistant\nhello, how can I help?<|im_end|>",
        "<|im_start|>system\nyou are a helpful assistant<|im_end|>",
    ]
    * 5
)


@pytest.fixture(scope="module")
def tokenizer():
    return BPETokenizer.train(TEXT, 300, eos_token="<|im_end|>", special_tokens=["<|im_start|>"])


def tiny_lm(tokenizer, max_seq_len=256) -> LM:
    torch.manual_seed(0)
    model = build_model(
        {
            "family": "transformer",
            "vocab_size": tokenizer.vocab_size,
            "d_model": 32,
            "n_layers": 1,
            "n_heads": 2,
            "d_ff": 64,
            "max_seq_len": max_seq_len,
        }
    ).eval()
    return LM(model, tokenizer, chat_template=ChatTemplate(CHATML, eos_token="<|im_end|>"))


@pytest.fixture(scope="module")
def lm(tokenizer):
    return tiny_lm(tokenizer)


PARAMS = {"seed": 0, "max_new_tokens": 6, "temperature": 1.0}


def test_history_grows_and_streamed_pieces_join_to_the_stored_reply(lm):
    chat = ChatSession(lm, system="be brief", params=PARAMS)
    assert chat.history == [{"role": "system", "content": "be brief"}]
    pieces = list(chat.send("hello"))
    assert [m["role"] for m in chat.history] == ["system", "user", "assistant"]
    assert chat.history[1]["content"] == "hello"
    assert chat.history[2]["content"] == "".join(pieces)
    assert chat.finish_reason in ("stop", "length")
    second = chat.ask("and again")
    roles = [m["role"] for m in chat.history]
    assert roles == ["system", "user", "assistant", "user", "assistant"]
    assert chat.history[-1]["content"] == second


def test_reset_keeps_only_the_system_prompt(lm):
    chat = ChatSession(lm, system="be brief", params=PARAMS)
    chat.ask("hello")
    chat.reset()
    assert chat.history == [{"role": "system", "content": "be brief"}]
    chat = ChatSession(lm, params=PARAMS)
    chat.ask("hello")
    chat.reset()
    assert chat.history == []


def test_history_is_a_copy(lm):
    chat = ChatSession(lm, params=PARAMS)
    chat.history.append({"role": "user", "content": "sneaky"})
    assert chat.history == []


def test_reply_is_what_generate_gives_for_the_rendered_prompt(lm):
    chat = ChatSession(lm, system="be brief", params=PARAMS)
    prompt = chat.prompt("hello")
    assert prompt == (
        "<|im_start|>system\nbe brief<|im_end|>\n<|im_start|>user\nhello<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    assert chat.ask("hello") == lm.generate(prompt, **PARAMS)


def test_special_token_text_in_the_prompt_encodes_to_its_id(lm, tokenizer):
    ids = tokenizer.encode(ChatSession(lm).prompt("hello"))
    start = tokenizer.tokenizer.token_to_id("<|im_start|>")
    assert ids.count(start) == 2 and ids.count(tokenizer.eos_id) == 1


def test_seeded_conversation_replays_exactly(lm):
    def conversation():
        chat = ChatSession(lm, system="be brief", params=PARAMS)
        return [chat.ask("hello"), chat.ask("more"), chat.history]

    assert conversation() == conversation()


def test_abandoned_reply_leaves_the_history_unchanged(lm):
    chat = ChatSession(lm, params={**PARAMS, "max_new_tokens": 20, "temperature": 0})
    stream = chat.send("hello")
    next(stream)
    stream.close()  # what Ctrl-C in the middle of a reply amounts to
    assert chat.history == []


def test_beam_search_gives_the_reply_in_one_piece(lm):
    chat = ChatSession(lm, params={"num_beams": 2, "max_new_tokens": 4})
    pieces = list(chat.send("hello"))
    assert len(pieces) == 1 and chat.history[-1]["content"] == pieces[0]


def test_params_may_be_a_sampling_params(lm):
    chat = ChatSession(lm, params=SamplingParams(**PARAMS))
    assert chat.ask("hello") == ChatSession(lm, params=PARAMS).ask("hello")


class ScriptedLM(nn.Module):
    """Predicts ``successor[last token]`` (else ``end``): a reply whose tokens we know."""

    def __init__(self, vocab_size, successor, end, max_seq_len=256):
        super().__init__()
        self.config = type("Config", (), {"vocab_size": vocab_size, "max_seq_len": max_seq_len})
        table = torch.full((vocab_size,), end)
        for a, b in successor.items():
            table[a] = b
        self.register_buffer("table", table)

    def forward(self, ids, mask=None):
        return nn.functional.one_hot(self.table[ids], self.config.vocab_size).float() * 10


def test_reply_stops_at_the_templates_end_of_turn_token():
    # The tokenizer's eos is <|endoftext|>; the template closes turns with <|im_end|>.
    tok = BPETokenizer.train(TEXT, 300, special_tokens=["<|im_start|>", "<|im_end|>"])
    newline, y, o = (tok.encode(c)[0] for c in ("\n", "Y", "o"))
    im_end = tok.tokenizer.token_to_id("<|im_end|>")
    model = ScriptedLM(tok.vocab_size, {newline: y, y: o}, end=im_end)
    lm = LM(model, tok, chat_template=ChatTemplate(CHATML, eos_token="<|im_end|>"))
    chat = ChatSession(lm, params={"max_new_tokens": 10, "temperature": 0})
    assert chat.ask("hi") == "Yo"
    assert chat.finish_reason == "stop"
    assert chat.ask("again") == "Yo"
    assert chat.history[-1] == {"role": "assistant", "content": "Yo"}


def test_a_conversation_longer_than_the_context_says_so(tokenizer):
    lm = tiny_lm(tokenizer, max_seq_len=40)
    chat = ChatSession(lm, params={"max_new_tokens": 8})
    with pytest.raises(DecodingError, match="context of 40 tokens.*reset the chat"):
        chat.send("hello " * 30)
    assert chat.history == []


def test_model_without_a_chat_template_is_a_clear_error(lm):
    with pytest.raises(ConfigError, match="no chat template"):
        ChatSession(LM(lm.model, lm.tokenizer))


def test_bad_inputs_fail_at_the_call(lm):
    with pytest.raises(DecodingError, match="top_p"):
        ChatSession(lm, params={"top_p": 2.0})
    with pytest.raises(DecodingError, match="unknown sampling parameter 'temprature'"):
        ChatSession(lm, params={"temprature": 2.0})
    chat = ChatSession(lm)
    with pytest.raises(DecodingError, match="must be a string"):
        chat.send(["hello"])


def test_template_errors_surface_at_send(lm):
    strict = "{{ raise_exception('only one turn') if messages | length > 1 else '' }}ok"
    bad = LM(lm.model, lm.tokenizer, chat_template=ChatTemplate(strict))
    chat = ChatSession(bad, system="sys", params=PARAMS)
    with pytest.raises(DataError, match="only one turn"):
        chat.send("hello")
