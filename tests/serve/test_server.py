"""A real ``lmlab serve`` process on a free loopback port: the official openai client,
streams, a client that goes away, 32 concurrent streams, the API key from the
environment, and SIGTERM draining the requests in flight (RELIABILITY.md items 23-25)."""

import asyncio
import json
import threading

import httpx
import openai
import pytest

from lmlab.generate.chat import ChatSession
from servers import PROMPTS, Server

pytestmark = pytest.mark.slow  # real server processes (a few seconds each to start)


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=60)


def test_binds_loopback_by_default(server):
    assert server.url.startswith("http://127.0.0.1:")


def test_openai_client_completions_plain_streamed_echo_logprobs(client, lm):
    prompt = "the quick"
    plain = client.completions.create(model="tiny", prompt=prompt, max_tokens=10, temperature=0)
    assert plain.choices[0].text == lm.generate(prompt, max_new_tokens=10, temperature=0)
    stream = client.completions.create(
        model="tiny", prompt=prompt, max_tokens=10, temperature=0, stream=True
    )
    pieces = [chunk.choices[0].text for chunk in stream if chunk.choices]
    assert "".join(pieces) == plain.choices[0].text
    scored = client.completions.create(
        model="tiny", prompt=prompt, max_tokens=1, temperature=0, echo=True, logprobs=1
    )
    lp = scored.choices[0].logprobs
    n = len(lm.tokenizer.encode(prompt))
    assert scored.choices[0].text.startswith(prompt) and len(lp.tokens) == n + 1
    assert lp.token_logprobs[0] is None and all(x < 0 for x in lp.token_logprobs[1:])
    assert lp.token_logprobs[-1] == pytest.approx(max(lp.top_logprobs[-1].values()))


def test_openai_client_chat_plain_streamed_logprobs(client, lm):
    messages = [{"role": "user", "content": "hello"}]
    plain = client.chat.completions.create(
        model="tiny",
        messages=messages,
        max_tokens=8,
        temperature=0,
        logprobs=True,
        top_logprobs=2,
    )
    session = ChatSession(lm, params={"max_new_tokens": 8, "temperature": 0})
    assert plain.choices[0].message.content == session.ask("hello")
    assert plain.choices[0].message.role == "assistant"
    content = plain.choices[0].logprobs.content
    assert len(content) == plain.usage.completion_tokens
    assert all(len(c.top_logprobs) == 2 for c in content)
    stream = client.chat.completions.create(
        model="tiny", messages=messages, max_tokens=8, temperature=0, stream=True
    )
    text = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
    assert text == plain.choices[0].message.content


def test_openai_client_sees_errors_as_bad_requests(client):
    with pytest.raises(openai.BadRequestError, match="top_p"):
        client.completions.create(model="tiny", prompt="x", top_p=2.0)
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="gpt-4", prompt="x")


def test_a_client_that_disconnects_mid_stream_frees_its_slot(server, lm):
    body = {"prompt": "the", "max_tokens": 150, "stream": True, "temperature": 0}
    body["logit_bias"] = {str(lm.tokenizer.eos_id): -100}  # no early end
    with httpx.Client(timeout=30) as http:
        with http.stream("POST", f"{server.url}/v1/completions", json=body) as reply:
            lines = reply.iter_lines()
            assert next(lines).startswith("data: ")
            assert server.health()["active"] == 1  # still generating as the client leaves
    # the connection is closed: the engine drops the job at its next step
    for _ in range(300):
        if server.health()["active"] == 0:
            break
        threading.Event().wait(0.1)
    assert server.health()["active"] == 0


def test_32_concurrent_streams_all_complete_with_their_own_outputs(server, lm):
    """Load: 32 streams at once (8 prompts x 4 lengths, greedy); each stream's text is the
    library's greedy text for its own prompt and length."""
    cases = [(p, 6 + 5 * k) for k in range(4) for p in PROMPTS]

    async def one(http, prompt, max_tokens):
        body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True}
        text, done = "", False
        async with http.stream("POST", f"{server.url}/v1/completions", json=body) as reply:
            assert reply.status_code == 200
            async for line in reply.aiter_lines():
                if line == "data: [DONE]":
                    done = True
                elif line.startswith("data: "):
                    text += json.loads(line[6:])["choices"][0]["text"]
        return text, done

    async def all_streams():
        limits = httpx.Limits(max_connections=64)
        async with httpx.AsyncClient(timeout=300, limits=limits) as http:
            return await asyncio.gather(*(one(http, p, m) for p, m in cases))

    results = asyncio.run(all_streams())
    assert all(done for _, done in results)
    for k in range(4):  # the library's greedy text, a batch per length (= each alone)
        max_tokens = 6 + 5 * k
        expected = lm.generate(PROMPTS, max_new_tokens=max_tokens, temperature=0)
        got = [text for (_, m), (text, _) in zip(cases, results) if m == max_tokens]
        assert got == expected
    assert server.health()["active"] == 0


@pytest.fixture(scope="module")
def keyed(checkpoint):
    """A server whose API key comes from the environment, one row at a time."""
    server = Server(
        ["--ckpt", str(checkpoint), "--dtype", "float32", "--name", "tiny", "--max_batch", "1"],
        env={"LMLAB_API_KEY": "sesame"},
    )
    yield server
    server.stop()


def test_api_key_from_the_environment(keyed):
    body = {"prompt": "x", "max_tokens": 2}
    url = f"{keyed.url}/v1/completions"
    assert httpx.post(url, json=body, timeout=30).status_code == 401
    wrong = {"Authorization": "Bearer open"}
    assert httpx.post(url, json=body, headers=wrong, timeout=30).status_code == 401
    assert httpx.get(f"{keyed.url}/v1/models", timeout=30).status_code == 401
    good = {"Authorization": "Bearer sesame"}
    assert httpx.post(url, json=body, headers=good, timeout=30).status_code == 200
    assert keyed.health()["status"] == "ok"  # public


def test_sigterm_drains_requests_in_flight(keyed, lm):
    """SIGTERM while a stream runs and a second request waits for the one row: both
    complete in full, then the process exits 0."""
    headers = {"Authorization": "Bearer sesame"}
    url = f"{keyed.url}/v1/completions"
    bias = {str(lm.tokenizer.eos_id): -100}  # no early end: every token is generated
    body = {"prompt": "the", "max_tokens": 60, "temperature": 0, "logit_bias": bias}
    streamed = {**body, "stream": True, "logprobs": 0}  # logprobs: one event per token
    waiting = {}

    def second():
        reply = httpx.post(url, json={**body, "prompt": "fox"}, headers=headers, timeout=120)
        waiting["reply"] = reply

    with httpx.Client(timeout=120) as http:
        with http.stream("POST", url, json=streamed, headers=headers) as reply:
            lines = reply.iter_lines()
            first = next(lines)
            thread = threading.Thread(target=second)
            thread.start()
            for _ in range(100):  # the second request is queued behind the stream
                if keyed.health()["active"] == 2:
                    break
                threading.Event().wait(0.05)
            keyed.proc.terminate()
            rest = [line for line in [first, *lines] if line]
    thread.join(120)
    events = [json.loads(line[6:]) for line in rest if line.startswith("data: {")]
    assert rest[-1] == "data: [DONE]" and events[-1]["choices"][0]["finish_reason"] == "length"
    assert sum(e["choices"][0]["finish_reason"] is None for e in events) == 60  # tokens
    assert waiting["reply"].status_code == 200
    assert waiting["reply"].json()["usage"]["completion_tokens"] == 60
    assert keyed.proc.wait(60) == 0
    assert "server stopped" in keyed.proc.stderr.read()
