"""The playground's JSON routes against the library on the same model: every probability,
kept set, sample, beam and reply is recomputed here from the model's own logits (or the
library call the route stands for) and compared."""

import random
import re

import pytest
import torch
from fastapi import FastAPI
from fastapi.testclient import TestClient

from builders import tiny_chat_lm
from lmlab.generate import SamplingParams, generate, process_logits
from lmlab.generate.chat import ChatSession
from lmlab.interp import attention_maps
from lmlab.serve.playground import STATIC, mount_playground, next_token_table, token_tree

PROMPT = "hello there, how can"


@pytest.fixture(scope="module")
def lm():
    return tiny_chat_lm(sharpen=8.0)  # peaked enough that top-p keeps a few tokens


@pytest.fixture(scope="module")
def client(lm):
    app = FastAPI()
    mount_playground(app, lm)
    return TestClient(app)


def model_logits(lm, ids):
    """Next-token logits after every position: [T, V] float32, computed here."""
    with torch.no_grad():
        return lm.model(torch.tensor([ids]))[0].float()


def test_next_gives_raw_and_processed_probabilities_and_the_kept_set(lm, client):
    rng = random.Random(0)
    ids = lm.tokenizer.encode(PROMPT)
    logits = model_logits(lm, ids)[-1]
    raw = logits.softmax(-1)
    for _ in range(6):
        settings = {
            "temperature": rng.choice([0.5, 0.8, 1.0, 1.7]),
            "top_k": rng.choice([0, 2, 5, 40]),
            "top_p": rng.choice([0.2, 0.5, 0.9, 1.0]),
        }
        got = client.post("/playground/api/next", json={"prompt": PROMPT, "top_n": 30, **settings})
        assert got.status_code == 200, got.text
        data = got.json()
        assert data["prompt_ids"] == ids
        processed = process_logits(logits[None], SamplingParams(**settings))[0].softmax(-1)
        top = torch.sort(-raw, stable=True).indices[:30]
        assert data["ids"] == top.tolist()
        torch.testing.assert_close(torch.tensor(data["raw"]), raw[top], atol=1e-6, rtol=0)
        torch.testing.assert_close(
            torch.tensor(data["processed"]), processed[top], atol=1e-6, rtol=0
        )
        assert data["kept"] == (processed[top] > 0).tolist()
        assert data["kept_count"] == int((processed > 0).sum())
        assert data["kept_mass"] == pytest.approx(float(raw[processed > 0].sum()), abs=1e-6)


def test_the_kept_set_is_the_top_k_and_the_nucleus_worked_by_hand(lm, client):
    raw = model_logits(lm, lm.tokenizer.encode(PROMPT))[-1].softmax(-1)
    order = torch.sort(-raw, stable=True).indices
    for k in (1, 3, 7):
        data = client.post("/playground/api/next", json={"prompt": PROMPT, "top_k": k}).json()
        assert data["kept_count"] == k
        assert data["kept"][:10] == [i < k for i in range(10)]
    for p in (0.1, 0.4, 0.8):
        # the smallest prefix of the sorted tokens whose probability reaches p
        n = int((raw[order].cumsum(0) < p).sum()) + 1
        data = client.post("/playground/api/next", json={"prompt": PROMPT, "top_p": p}).json()
        assert data["kept_count"] == n
        assert data["kept_mass"] >= p - 1e-6


def test_temperature_zero_keeps_the_argmax_alone(lm, client):
    logits = model_logits(lm, lm.tokenizer.encode(PROMPT))[-1]
    data = client.post("/playground/api/next", json={"prompt": PROMPT, "temperature": 0}).json()
    assert data["kept_count"] == 1
    assert data["ids"][0] == int(logits.argmax())
    assert data["processed"][0] == 1.0 and data["kept"][:3] == [True, False, False]


def test_next_token_table_ranks_ties_by_lower_id():
    logits = torch.tensor([0.0, 2.0, 1.0, 2.0])
    table = next_token_table(logits, SamplingParams(top_k=1), top_n=4)
    assert table["ids"] == [1, 3, 2, 0]
    assert table["kept"] == [True, False, False, False]  # top_k's tie rule: lower id first


def test_step_samples_as_generate_does_or_appends_the_chosen_token(lm, client):
    ids = lm.tokenizer.encode(PROMPT)
    for seed in range(4):
        body = {"ids": ids, "temperature": 1.2, "top_p": 0.9, "seed": seed}
        data = client.post("/playground/api/step", json=body).json()
        params = SamplingParams(max_new_tokens=1, temperature=1.2, top_p=0.9, seed=seed)
        expected = generate(lm.model, [ids], params).ids[0][0]
        assert data["token"] == expected and data["ids"] == ids + [expected]
    data = client.post("/playground/api/step", json={"ids": ids, "token": 7}).json()
    assert data["ids"] == ids + [7]
    assert data["raw"] == pytest.approx(float(model_logits(lm, ids)[-1].softmax(-1)[7]), abs=1e-6)


def test_tree_merges_generates_samples_with_each_branch_probability(lm, client):
    ids = lm.tokenizer.encode(PROMPT)
    body = {"prompt": PROMPT, "samples": 6, "depth": 3, "seed": 5, "temperature": 1.3}
    data = client.post("/playground/api/tree", json=body).json()
    params = SamplingParams(max_new_tokens=3, temperature=1.3, seed=5)
    samples = generate(lm.model, [ids] * 6, params).ids
    assert data["samples"] == samples
    root = data["root"]
    assert root["count"] == 6 and sum(c["count"] for c in root["children"]) == 6
    # every sample is a path of the tree, and each node's probabilities are the model's
    for sample in samples:
        node, path = root, []
        for token in sample:
            logits = model_logits(lm, ids + path)[-1]
            path.append(token)
            node = next(c for c in node["children"] if c["id"] == token)
            assert node["count"] == sum(s[: len(path)] == path for s in samples)
            assert node["raw"] == pytest.approx(float(logits.softmax(-1)[token]), abs=1e-5)
            processed = process_logits(logits[None], params)[0].softmax(-1)[token]
            assert node["processed"] == pytest.approx(float(processed), abs=1e-5)


def test_token_tree_merges_shared_prefixes():
    root = token_tree([[5, 7], [5, 9], [4, 1]], [[0.5, 0.2], [0.5, 0.3], [0.1, 0.9]], [[1, 1]] * 3)
    assert [(c["id"], c["count"]) for c in root["children"]] == [(5, 2), (4, 1)]
    assert [(c["id"], c["raw"]) for c in root["children"][0]["children"]] == [(9, 0.3), (7, 0.2)]


def test_beams_show_the_search_that_generate_runs(lm, client):
    ids = lm.tokenizer.encode(PROMPT)
    body = {"prompt": PROMPT, "num_beams": 3, "steps": 4, "length_penalty": 0.5}
    data = client.post("/playground/api/beams", json=body).json()
    params = SamplingParams(max_new_tokens=4, num_beams=3, length_penalty=0.5)
    assert data["best"]["ids"] == generate(lm.model, [ids], params).ids[0]
    assert [s["step"] for s in data["steps"]] == list(range(1, len(data["steps"]) + 1))
    for step in data["steps"]:
        assert 1 <= len(step["beams"]) <= 3
        scores = [b["score"] for b in step["beams"]]
        assert scores == sorted(scores, reverse=True)
        for beam in step["beams"]:  # a beam's score is its sum of log p, by teacher forcing
            logp = model_logits(lm, ids + beam["ids"]).log_softmax(-1)
            n = len(beam["ids"])
            expected = sum(float(logp[len(ids) - 1 + i, t]) for i, t in enumerate(beam["ids"]))
            assert n == step["step"] and beam["score"] == pytest.approx(expected, abs=1e-4)
    assert data["steps"][-1]["closed"]


def test_chat_replies_as_a_chat_session_and_keeps_the_conversation(lm, client):
    settings = {"temperature": 0.9, "top_k": 20, "seed": 3}
    first = client.post(
        "/playground/api/chat", json={"message": "hello", "max_tokens": 6, **settings}
    )
    assert first.status_code == 200, first.text
    first = first.json()
    params = SamplingParams(max_new_tokens=6, temperature=0.9, top_k=20, seed=3)
    session = ChatSession(lm, params=params)
    assert first["reply"] == session.ask("hello")
    body = {"message": "and again", "max_tokens": 6, "session": first["session"], **settings}
    second = client.post("/playground/api/chat", json=body).json()
    assert second["session"] == first["session"]
    assert second["reply"] == session.ask("and again")
    assert second["history"] == session.history
    reset = client.post("/playground/api/chat/reset", json={"session": first["session"]}).json()
    assert reset == {"forgotten": True}
    again = client.post("/playground/api/chat", json=body).json()
    assert again["session"] != first["session"] and len(again["history"]) == 2


def test_attention_is_the_layers_pattern(lm, client):
    ids = lm.tokenizer.encode(PROMPT)
    maps = attention_maps(lm.model, torch.tensor(ids))  # (L, H, T, T)
    mean = client.post("/playground/api/attention", json={"ids": ids, "layer": 0}).json()
    torch.testing.assert_close(torch.tensor(mean["matrix"]), maps[0].mean(0), atol=1e-6, rtol=0)
    one = client.post("/playground/api/attention", json={"ids": ids, "layer": 0, "head": 1}).json()
    torch.testing.assert_close(torch.tensor(one["matrix"]), maps[0, 1], atol=1e-6, rtol=0)
    assert (mean["n_layers"], mean["n_heads"]) == (1, 2)


def test_info_describes_the_model(lm, client):
    info = client.get("/playground/api/info").json()
    assert info["vocab_size"] == lm.model.config.vocab_size
    assert info["context"] == 256 and info["chat"] and info["attention"]


BAD = [
    ("next", {"prompt": PROMPT, "top_p": 1.5}, 400, "top_p=1.5"),
    ("next", {"prompt": PROMPT, "top_p": 0}, 400, "top_p=0"),
    ("next", {"prompt": PROMPT, "temperature": -1}, 400, "temperature=-1"),
    ("next", {"prompt": PROMPT, "top_k": -2}, 400, "top_k=-2"),
    ("next", {"prompt": PROMPT, "ids": [1, 2]}, 400, "not both"),
    ("next", {}, 400, "not both"),
    ("next", {"prompt": ""}, 400, "empty"),
    ("next", {"ids": [1, 100000]}, 400, "token id 100000"),
    ("next", {"ids": [1] * 300}, 400, "context of 256"),
    ("next", {"prompt": PROMPT, "top_n": 0}, 422, "top_n"),
    ("next", {"prompt": PROMPT, "bogus": 1}, 422, "bogus"),
    ("next", {"prompt": 5}, 422, "prompt"),
    ("step", {"prompt": PROMPT, "token": -1}, 400, "token id -1"),
    ("step", {"prompt": PROMPT, "seed": -1}, 400, "seed=-1"),
    ("tree", {"prompt": PROMPT, "samples": 1000}, 422, "samples"),
    ("tree", {"ids": [1] * 250, "depth": 10}, 400, "context of 256"),
    ("beams", {"prompt": PROMPT, "num_beams": 1}, 422, "num_beams"),
    ("beams", {"prompt": PROMPT, "length_penalty": "long"}, 422, "length_penalty"),
    ("chat", {"prompt": PROMPT}, 422, "message"),
    ("chat", {"message": "hi", "max_tokens": 400}, 400, "context of 256"),
    ("attention", {"prompt": PROMPT, "layer": 3}, 400, "layer=3"),
    ("attention", {"prompt": PROMPT, "head": 2}, 400, "head=2"),
]


@pytest.mark.parametrize("route,body,status,named", BAD, ids=[f"{b[0]}-{b[3]}" for b in BAD])
def test_bad_requests_get_a_4xx_naming_the_problem(client, route, body, status, named):
    got = client.post(f"/playground/api/{route}", json=body)
    assert got.status_code == status, got.text
    assert named in got.text
    if status == 400:
        assert got.json()["error"]["type"] == "invalid_request_error"


def test_invalid_json_is_a_422_and_the_server_stays_healthy(client):
    got = client.post(
        "/playground/api/next", content=b"{not json", headers={"Content-Type": "application/json"}
    )
    assert got.status_code == 422
    assert client.post("/playground/api/next", json={"prompt": PROMPT}).status_code == 200


def test_the_page_is_served_and_fetches_nothing_from_elsewhere(client):
    page = client.get("/playground/")
    assert page.status_code == 200 and '<script src="app.js">' in page.text
    for name in ("app.js", "style.css"):
        assert client.get(f"/playground/{name}").status_code == 200
    for path in STATIC.iterdir():
        assert not re.search(r"(https?:)?//[a-z0-9.-]+\.[a-z]{2,}", path.read_text()), path.name
