"""Property-based fuzzing (hypothesis): generated invalid requests -- wrong types, missing
fields, out-of-range values, bad token ids, unknown fields, junk bodies -- all get a 4xx
with OpenAI's error object, never a 500, and the server stays healthy (RELIABILITY.md
items 18, 21, 22). Each request is built invalid by construction: a valid base body with
one field broken."""

import json
from collections import Counter

import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lmlab.serve import create_app

VOCAB = 300  # the tiny tokenizer's (conftest); checked in the test
CONTEXT = 160
COMPLETION = {"prompt": "hello", "max_tokens": 2}
CHAT = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
FIELDS = {  # field -> values of a wrong type (strict: no "1" for 1, no true for 1)
    "temperature": "number",
    "top_p": "number",
    "top_k": "integer",
    "n": "integer",
    "max_tokens": "integer",
    "seed": "integer",
    "stream": "boolean",
    "stop": "stop",
    "stop_token_ids": "ids",
    "logit_bias": "bias",
    "repetition_penalty": "number",
    "user": "string",
    "model": "string",
}
COMPLETION_FIELDS = {**FIELDS, "prompt": "prompt", "echo": "boolean", "logprobs": "integer"}
CHAT_FIELDS = {**FIELDS, "messages": "messages", "logprobs": "boolean", "top_logprobs": "integer"}

scalars = st.one_of(
    st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), st.text(max_size=8)
)
junk = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3), max_leaves=5)


def wrong(kind: str):
    """Values that are not of ``kind`` (None is valid for most fields, so left out)."""
    not_none = junk.filter(lambda v: v is not None)
    if kind == "number":
        return not_none.filter(lambda v: isinstance(v, bool) or not isinstance(v, int | float))
    if kind == "integer":
        return not_none.filter(lambda v: isinstance(v, bool) or not isinstance(v, int))
    if kind == "boolean":
        return not_none.filter(lambda v: not isinstance(v, bool))
    if kind == "string":
        return not_none.filter(lambda v: not isinstance(v, str))
    if kind == "stop":
        return not_none.filter(
            lambda v: not (isinstance(v, str) or (isinstance(v, list) and _all(v, str)))
        )
    if kind == "ids":
        return not_none.filter(lambda v: not (isinstance(v, list) and _all(v, int)))
    if kind == "bias":
        return st.one_of(not_none, st.dictionaries(st.text(max_size=3), st.text(), min_size=1))
    if kind == "prompt":
        return junk.filter(lambda v: not _prompt_type(v))
    if kind == "messages":
        return st.one_of(
            junk.filter(lambda v: not isinstance(v, list)),
            st.just([]),
            st.lists(scalars, min_size=1, max_size=2),
            st.lists(st.fixed_dictionaries({"content": st.text(max_size=4)}), min_size=1),
            st.lists(
                st.fixed_dictionaries({"role": st.text(max_size=6), "content": st.text()}).filter(
                    lambda m: m["role"] not in ("system", "user", "assistant", "tool")
                ),
                min_size=1,
                max_size=2,
            ),
            st.lists(
                st.fixed_dictionaries(
                    {"role": st.just("user"), "content": st.one_of(st.integers(), st.booleans())}
                ),
                min_size=1,
                max_size=2,
            ),
        )
    raise AssertionError(kind)


def _all(values, kind) -> bool:
    return all(isinstance(v, kind) and not isinstance(v, bool) for v in values)


def _prompt_type(v) -> bool:
    if isinstance(v, str):
        return True
    if not isinstance(v, list) or not v:
        return False  # an empty list is a valid type, but refused anyway: excluded here
    return _all(v, str) or _all(v, int) or all(isinstance(x, list) and _all(x, int) for x in v)


def out_of_range(fields):
    """(field, value) pairs of the right type but not allowed."""
    bad_ids = st.lists(st.integers(0, VOCAB - 1), max_size=3).flatmap(
        lambda ids: st.integers().filter(lambda i: not 0 <= i < VOCAB).map(lambda b: ids + [b])
    )
    pairs = [
        st.tuples(st.just("temperature"), st.floats(max_value=-1e-6, allow_infinity=True)),
        st.tuples(st.just("temperature"), st.sampled_from([float("inf"), float("nan")])),
        st.tuples(st.just("top_p"), st.floats().filter(lambda p: not 0 < p <= 1)),
        st.tuples(st.just("top_k"), st.integers(max_value=-1)),
        st.tuples(st.just("n"), st.one_of(st.integers(max_value=0), st.integers(min_value=65))),
        st.tuples(st.just("max_tokens"), st.integers(max_value=-1)),
        st.tuples(st.just("max_tokens"), st.integers(min_value=CONTEXT)),
        st.tuples(st.just("seed"), st.one_of(st.integers(max_value=-1), st.integers(2**63))),
        st.tuples(st.just("stop_token_ids"), bad_ids),
        st.tuples(st.just("repetition_penalty"), st.floats(max_value=0)),
        st.tuples(st.just("stop"), st.lists(st.just(""), min_size=1, max_size=2)),
        st.tuples(
            st.just("logit_bias"),
            st.one_of(
                bad_ids.map(lambda ids: {str(ids[-1]): 1.0}),
                st.floats().filter(lambda b: not -100 <= b <= 100).map(lambda b: {"3": b}),
            ),
        ),
    ]
    if "prompt" in fields:
        pairs += [
            st.tuples(st.just("prompt"), bad_ids),
            st.tuples(st.just("prompt"), st.lists(bad_ids, min_size=1, max_size=2)),
            st.tuples(st.just("prompt"), st.sampled_from(["", [], [[]], ["a", ""]])),
            st.tuples(st.just("prompt"), st.just([1] * (CONTEXT + 1))),
            st.tuples(st.just("logprobs"), st.one_of(st.integers(max_value=-1), st.integers(21))),
        ]
    else:
        pairs.append(st.tuples(st.just("top_logprobs"), st.integers(min_value=21)))
    return st.one_of(pairs)


def broken(base: dict, fields: dict[str, str]):
    """A body made invalid in one way, as JSON-able data."""
    field = st.sampled_from(sorted(fields))
    return st.one_of(
        field.flatmap(lambda f: wrong(fields[f]).map(lambda v: {**base, f: v})),
        out_of_range(fields).map(lambda fv: {**base, fv[0]: fv[1]}),
        st.just({k: v for k, v in base.items() if k not in ("prompt", "messages")}),
        st.text(min_size=1, max_size=12)
        .filter(lambda k: k not in fields and k not in base)
        .map(lambda k: {**base, k: 1}),
        st.just({**base, "model": "not-this-one"}),
    )


requests = st.one_of(
    st.tuples(st.just("/v1/completions"), broken(COMPLETION, COMPLETION_FIELDS)),
    st.tuples(st.just("/v1/chat/completions"), broken(CHAT, CHAT_FIELDS)),
    st.tuples(st.sampled_from(["/v1/completions", "/v1/chat/completions"]), junk),
    st.tuples(
        st.sampled_from(["/v1/completions", "/v1/chat/completions", "/tokenize"]),
        st.binary(max_size=24).filter(lambda b: not b.strip().startswith(b"{")).map(bytes),
    ),
    st.tuples(st.just("/detokenize"), st.fixed_dictionaries({"tokens": wrong("ids")})),
)


@pytest.fixture(scope="module")
def client(lm):
    assert lm.tokenizer.vocab_size == VOCAB and lm.model.config.max_seq_len == CONTEXT
    with TestClient(create_app(lm, name="tiny"), raise_server_exceptions=False) as client:
        yield client


def fuzz(client, examples: int) -> Counter:
    statuses: Counter = Counter()

    @settings(
        max_examples=examples,
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
        derandomize=True,
    )
    @given(requests)
    def check(request):
        path, body = request
        # json.dumps writes inf and NaN as Infinity and NaN, which Python's parser reads.
        content = body if isinstance(body, bytes) else json.dumps(body)
        reply = client.post(path, content=content, headers={"content-type": "application/json"})
        statuses[reply.status_code] += 1
        assert 400 <= reply.status_code < 500, (path, body, reply.text)
        error = reply.json()["error"]
        assert set(error) == {"message", "type", "param", "code"}
        assert isinstance(error["message"], str) and error["message"]

    check()
    assert client.get("/health").json() == {"status": "ok", "active": 0}
    return statuses


def test_a_hundred_invalid_requests_get_4xx(client):
    statuses = fuzz(client, 100)
    assert sum(statuses.values()) >= 100 and statuses[500] == 0


@pytest.mark.slow
def test_1200_invalid_requests_get_4xx_never_500(client):
    statuses = fuzz(client, 1200)
    total = sum(statuses.values())
    print(f"fuzz: {total} invalid requests, statuses {dict(sorted(statuses.items()))}")
    assert total >= 1000 and statuses[500] == 0
