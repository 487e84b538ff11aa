"""The OpenAI API in-process (``lmlab.serve.create_app`` through Starlette's TestClient):
the same text as the library, the completions and chat shapes, logprobs, streaming,
errors, the API key."""

import json

import pytest
import torch
from fastapi import APIRouter
from fastapi.testclient import TestClient

from lmlab.generate.chat import ChatSession
from lmlab.serve import create_app
from servers import PROMPTS


@pytest.fixture(scope="module")
def client(lm):
    with TestClient(create_app(lm, name="tiny")) as client:
        yield client


def complete(client, **body):
    reply = client.post("/v1/completions", json=body)
    assert reply.status_code == 200, reply.text
    return reply.json()


def events(client, path, body, headers=None):
    """The parsed ``data:`` events of an SSE reply, [DONE] last."""
    with client.stream("POST", path, json=body, headers=headers) as reply:
        assert reply.status_code == 200
        assert reply.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in reply.iter_lines() if line]
    assert all(line.startswith("data: ") for line in lines)
    assert lines[-1] == "data: [DONE]"
    return [json.loads(line[6:]) for line in lines[:-1]]


def test_greedy_completions_equal_the_library_and_streamed_equals_plain(client, lm):
    prompts = PROMPTS[:3]
    body = {"prompt": prompts, "max_tokens": 12, "temperature": 0}
    reply = complete(client, **body)
    assert reply["object"] == "text_completion" and reply["model"] == "tiny"
    texts = [c["text"] for c in sorted(reply["choices"], key=lambda c: c["index"])]
    assert texts == [lm.generate(p, max_new_tokens=12, temperature=0) for p in prompts]
    streamed = [""] * len(prompts)
    reasons = [None] * len(prompts)
    for event in events(client, "/v1/completions", {**body, "stream": True}):
        (choice,) = event["choices"]
        streamed[choice["index"]] += choice["text"]
        reasons[choice["index"]] = choice["finish_reason"] or reasons[choice["index"]]
    assert streamed == texts
    assert reasons == [c["finish_reason"] for c in reply["choices"]]
    n = sum(len(lm.tokenizer.encode(p)) for p in prompts)
    assert reply["usage"]["prompt_tokens"] == n


def test_token_id_prompts_and_missing_max_tokens_default_to_16(client, lm):
    """A prompt of token ids gives the same text as its string; no max_tokens means 16
    (eos biased away so that all 16 come; ignore_eos gives the same)."""
    ids = lm.tokenizer.encode("hello there")
    bias = {str(lm.tokenizer.eos_id): -100}
    by_ids = complete(client, prompt=ids, temperature=0, logit_bias=bias)
    by_text = complete(client, prompt="hello there", temperature=0, logit_bias=bias)
    assert by_ids["choices"][0]["text"] == by_text["choices"][0]["text"]
    assert by_ids["usage"]["completion_tokens"] == 16
    ignoring = complete(client, prompt="hello there", temperature=0, ignore_eos=True)
    assert ignoring["choices"][0]["text"] == by_text["choices"][0]["text"]  # eos never chosen
    assert ignoring["usage"]["completion_tokens"] == 16


def test_echo_with_max_tokens_0_scores_the_prompt(client, lm):
    """lm-eval's log-likelihood request: echo, logprobs, max_tokens 0. Each token's
    logprob is log_softmax of the model at the position before it (float32: 1e-5), the
    first is None, the top alternatives hold the argmax, the text is the prompt."""
    text = "the lazy dog jumps over"
    reply = complete(client, prompt=text, max_tokens=0, echo=True, logprobs=2, temperature=0)
    (choice,) = reply["choices"]
    lp = choice["logprobs"]
    ids = lm.tokenizer.encode(text)
    assert choice["text"] == text and "".join(lp["tokens"]) == text
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    with torch.no_grad():
        logp = lm.model(torch.tensor([ids]))[0].log_softmax(-1)  # (P, V)
    expected = logp[:-1].gather(-1, torch.tensor(ids[1:])[:, None])[:, 0].tolist()
    assert lp["token_logprobs"][1:] == pytest.approx(expected, abs=1e-5)
    for pos, top in enumerate(lp["top_logprobs"][1:]):
        assert max(top.values()) == pytest.approx(logp[pos].max().item(), abs=1e-5)
    offsets = [sum(len(t) for t in lp["tokens"][:i]) for i in range(len(ids))]
    assert lp["text_offset"] == offsets
    assert reply["usage"]["completion_tokens"] == 0


def test_echo_with_new_tokens_and_logprobs(client, lm):
    """echo + generation: text is prompt + continuation; logprobs cover both, and the
    generated tokens' logprobs equal the model's at the greedy choice (its argmax)."""
    reply = complete(client, prompt="fox", max_tokens=4, echo=True, logprobs=1, temperature=0)
    (choice,) = reply["choices"]
    alone = lm.generate("fox", max_new_tokens=4, temperature=0)
    assert choice["text"] == "fox" + alone
    lp = choice["logprobs"]
    n_prompt = len(lm.tokenizer.encode("fox"))
    for logprob, top in zip(lp["token_logprobs"][n_prompt:], lp["top_logprobs"][n_prompt:]):
        assert logprob == pytest.approx(max(top.values()))  # greedy: the most likely token


def test_seeded_sampling_is_reproducible_per_request(client):
    body = {"prompt": "the", "max_tokens": 10, "temperature": 1.0}
    first = [complete(client, **body, seed=s)["choices"][0]["text"] for s in range(4)]
    again = [complete(client, **body, seed=s)["choices"][0]["text"] for s in range(4)]
    assert first == again
    assert len(set(first)) > 1  # different seeds, different text


def test_n_choices_are_seeded_in_turn(client):
    """n=3 with seed s: choice k equals a single request with seed s + k."""
    body = {"prompt": "the", "max_tokens": 8, "temperature": 1.0}
    reply = complete(client, **body, n=3, seed=5)
    texts = [c["text"] for c in sorted(reply["choices"], key=lambda c: c["index"])]
    assert texts == [complete(client, **body, seed=5 + k)["choices"][0]["text"] for k in range(3)]


def test_chat_uses_the_template_and_equals_a_chat_session(client, lm):
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello"}]
    body = {"messages": messages, "max_tokens": 10, "temperature": 0}
    reply = client.post("/v1/chat/completions", json=body).json()
    assert reply["object"] == "chat.completion"
    (choice,) = reply["choices"]
    session = ChatSession(lm, system="be brief", params={"max_new_tokens": 10, "temperature": 0})
    assert choice["message"] == {"role": "assistant", "content": session.ask("hello")}
    assert choice["finish_reason"] == session.finish_reason
    chunks = events(client, "/v1/chat/completions", {**body, "stream": True})
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    streamed = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    assert streamed == choice["message"]["content"]
    assert chunks[-1]["choices"][0]["finish_reason"] == choice["finish_reason"]


def test_chat_logprobs_shape_and_values(client, lm):
    body = {
        "messages": [{"role": "user", "content": [{"type": "text", "text": "hello"}]}],
        "max_tokens": 5,
        "temperature": 0,
        "logprobs": True,
        "top_logprobs": 3,
        "logit_bias": {str(lm.tokenizer.eos_id): -100},
    }
    reply = client.post("/v1/chat/completions", json=body).json()
    content = reply["choices"][0]["logprobs"]["content"]
    assert len(content) == reply["usage"]["completion_tokens"] == 5
    for entry in content:
        assert entry["bytes"] == list(entry["token"].encode())
        tops = [t["logprob"] for t in entry["top_logprobs"]]
        assert len(tops) == 3 and tops == sorted(tops, reverse=True)
        assert entry["logprob"] <= tops[0] + 1e-6


def test_models_tokenize_detokenize_and_tokenizer_info(client, lm):
    models = client.get("/v1/models").json()
    assert [m["id"] for m in models["data"]] == ["tiny"]
    reply = client.post("/tokenize", json={"prompt": "hello there"}).json()
    assert reply["tokens"] == lm.tokenizer.encode("hello there") and reply["max_model_len"] == 160
    text = client.post("/detokenize", json={"tokens": reply["tokens"]}).json()["prompt"]
    assert text == "hello there"
    chat = client.post("/tokenize", json={"messages": [{"role": "user", "content": "hi"}]})
    assert lm.tokenizer.decode(chat.json()["tokens"]).endswith("<|im_start|>assistant\n")
    info = client.get("/tokenizer_info").json()
    assert info["eos_token"] == "<|im_end|>" and "im_start" in info["chat_template"]
    assert client.get("/health").json()["status"] == "ok"


BAD = [
    ({"prompt": "x", "temperature": -0.5}, "temperature"),
    ({"prompt": "x", "top_p": 0}, "top_p"),
    ({"prompt": "x", "top_p": 1.5}, "top_p"),
    ({"prompt": "x", "top_k": -1}, "top_k"),
    ({"prompt": "x", "n": 0}, "n"),
    ({"prompt": "x", "max_tokens": -1}, "max_tokens"),
    ({"prompt": "x", "max_tokens": 1000}, "max_tokens"),
    ({"prompt": [5, 300]}, "prompt"),
    ({"prompt": [[1], [-2]]}, "prompt"),
    ({"prompt": ""}, "prompt"),
    ({"prompt": []}, "prompt"),
    ({"prompt": "x " * 200}, "prompt"),
    ({"prompt": "x", "stop_token_ids": [300]}, "stop_token_ids"),
    ({"prompt": "x", "logit_bias": {"300": 1}}, "logit_bias"),
    ({"prompt": "x", "logit_bias": {"a": 1}}, "logit_bias"),
    ({"prompt": "x", "logit_bias": {"3": 101}}, "logit_bias"),
    ({"prompt": "x", "stop": [""]}, "stop"),
    ({"prompt": "x", "seed": -1}, "seed"),
    ({"prompt": "x", "logprobs": 21}, "logprobs"),
    ({"prompt": "x", "temperature": "hot"}, "temperature"),
    ({"prompt": "x", "max_tokens": 2.5}, "max_tokens"),
    ({"prompt": "x", "echo": 1}, "echo"),
    ({"prompt": "x", "frequency_penalty": 0.5}, "frequency_penalty"),
    ({"prompt": "x", "tempurature": 0}, "tempurature"),
    ({"max_tokens": 3}, "prompt"),
    ({"prompt": "x", "model": "gpt-4"}, "model"),
]


@pytest.mark.parametrize(("body", "param"), BAD, ids=[str(b) for b, _ in BAD])
def test_bad_completion_requests_get_400_with_an_openai_error(client, body, param):
    reply = client.post("/v1/completions", json=body)
    assert reply.status_code == (404 if param == "model" else 400)
    error = reply.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error" and error["param"] == param
    assert error["message"]


def test_bad_chat_requests_and_junk_bodies_get_4xx(client):
    cases = [
        {"messages": []},
        {"messages": [{"role": "wizard", "content": "hi"}]},
        {"messages": [{"content": "hi"}]},
        {"messages": "hi"},
        {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
        {"messages": [{"role": "user", "content": "hi"}], "top_logprobs": 2},
        {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 0},
    ]
    for body in cases:
        reply = client.post("/v1/chat/completions", json=body)
        assert reply.status_code == 400, body
        assert reply.json()["error"]["type"] == "invalid_request_error"
    for junk in [b"{", b"", b"[1, 2]", b"null", b'{"prompt": NaN}', "\u00ff".encode("latin-1")]:
        reply = client.post(
            "/v1/completions", content=junk, headers={"content-type": "application/json"}
        )
        assert reply.status_code == 400, junk
        assert "error" in reply.json()
    assert client.get("/v1/nothing").status_code == 404
    assert client.get("/v1/completions").status_code == 405
    assert client.get("/health").json()["active"] == 0  # still healthy, nothing left running


def test_api_key_guards_everything_but_health_and_extra_routers_get_the_state(lm):
    router = APIRouter()

    @router.get("/extra/name")
    async def name():
        return {"name": "extra"}

    def make(state):
        assert state.lm is lm and state.tokenizer is lm.tokenizer and state.engine.active == 0
        extra = APIRouter()

        @extra.get("/extra/model")
        async def model():
            return {"model": state.model_name}

        return extra

    app = create_app(lm, name="tiny", api_key="sesame", routers=[router, make])
    with TestClient(app) as client:
        body = {"prompt": "x", "max_tokens": 2}
        for headers in ({}, {"Authorization": "Bearer nope"}, {"Authorization": "sesame"}):
            for method, path in [
                ("POST", "/v1/completions"),
                ("GET", "/v1/models"),
                ("GET", "/extra/name"),
                ("POST", "/tokenize"),
            ]:
                reply = client.request(method, path, json=body, headers=headers)
                assert reply.status_code == 401, (path, headers)
                assert reply.json()["error"]["code"] == "invalid_api_key"
        assert client.get("/health").status_code == 200
        good = {"Authorization": "Bearer sesame"}
        assert client.post("/v1/completions", json=body, headers=good).status_code == 200
        assert client.get("/extra/name", headers=good).json() == {"name": "extra"}
        assert client.get("/extra/model", headers=good).json() == {"model": "tiny"}
