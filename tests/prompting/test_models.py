"""The Completer interface: an lmlab model, an OpenAI-compatible endpoint, a replay."""

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch

from lmlab.data.tokenizers import ByteTokenizer
from lmlab.errors import DataError
from lmlab.generate.params import SamplingParams
from lmlab.generate.search import generate_text
from lmlab.lm import LM
from lmlab.models import build_model, get_preset
from lmlab.prompting.models import LMCompleter, OpenAICompleter, ReplayCompleter


def byte_lm(seed=0, context=None):
    """A tiny random byte-level GPT; ``context``: its max_seq_len (the preset's if None)."""
    torch.manual_seed(seed)
    tok = ByteTokenizer()
    spec = {
        **get_preset("gpt-char-tiny"),
        "vocab_size": tok.vocab_size,
        "n_layers": 1,
        "d_model": 32,
        "n_heads": 2,
        **({"max_seq_len": context} if context else {}),
    }
    return LM(build_model(spec).eval(), tok)


def test_lm_completer_is_greedy_decoding_in_one_batch():
    lm = byte_lm()
    model = LMCompleter(lm)
    prompts = ["Q: 2+3?\nA:", "Hello"]
    out = model.complete(prompts, max_tokens=6)
    want = generate_text(
        lm.model, lm.tokenizer, prompts, SamplingParams(max_new_tokens=6, temperature=0)
    )
    assert out == want and len(out) == 2
    sampled = model.complete(prompts, max_tokens=6, temperature=1.0, seed=3)
    assert sampled == model.complete(prompts, max_tokens=6, temperature=1.0, seed=3)
    reply = model.chat([{"role": "user", "content": "hi"}], max_tokens=4)
    assert reply == model.complete(["User: hi\nAssistant:"], max_tokens=4)[0]


class Fake(BaseHTTPRequestHandler):
    seen = []

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        Fake.seen.append((self.path, body))
        if self.path == "/v1/completions":
            reply = {
                "choices": [{"index": i, "text": p[::-1]} for i, p in enumerate(body["prompt"])][
                    ::-1
                ]
            }
        elif self.path == "/v1/chat/completions":
            reply = {
                "choices": [
                    {
                        "message": {
                            "role": "assistant",
                            "content": body["messages"][-1]["content"].upper(),
                        }
                    }
                ]
            }
        else:
            self.send_response(404)
            self.end_headers()
            self.wfile.write(b'{"error": {"message": "no such route"}}')
            return
        data = json.dumps(reply).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


@pytest.fixture
def server():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Fake)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/v1"
    httpd.shutdown()


def test_openai_completer_speaks_the_completions_and_chat_shapes(server):
    model = OpenAICompleter(server, "tiny", timeout=5)
    assert model.complete(["abc", "xyz"], max_tokens=3, stop=["\n"], seed=1) == ["cba", "zyx"]
    path, body = Fake.seen[-1]
    assert path == "/v1/completions" and body["stop"] == ["\n"] and body["seed"] == 1
    assert body["model"] == "tiny" and body["max_tokens"] == 3 and body["temperature"] == 0.0
    assert model.chat([{"role": "user", "content": "hi"}]) == "HI"
    with pytest.raises(DataError, match="HTTP 404"):
        OpenAICompleter(server.replace("/v1", "/v2"), "tiny", timeout=5).chat([])
    with pytest.raises(DataError, match="cannot reach"):
        OpenAICompleter("http://127.0.0.1:9/v1", "tiny", timeout=2).complete(["x"])


def test_replay_gives_the_recording_and_refuses_to_run_past_it():
    model = ReplayCompleter(["a", "b"])
    assert model.complete(["p"]) == ["a"] and model.chat([]) == "b"
    with pytest.raises(DataError, match="holds 2 replies"):
        model.chat([])
