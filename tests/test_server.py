"""The OpenAI-compatible server, live on loopback: the official `openai` client
against every endpoint, OpenAI error objects for bad input, the body limit,
API keys, overload, client disconnects, metrics, the access log, and a
hypothesis fuzz of the request schema.

Servers run uvicorn in a background thread on 127.0.0.1 (a free port) over the
built-in ``tiny`` model (no warm-up, ``max_model_len`` 256).
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import socket
import threading
import time

import httpx
import numpy as np
import openai
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import ThreadedServer
from sluice.runtime import AsyncEngine, greedy_generate
from sluice.runtime.embed import mean_pooled
from sluice.runtime.engine import EngineConfig, LLMEngine
from sluice.runtime.server import OpenAIServer, ServerConfig

KEY = "sk-test-key"
BODY_LIMIT = 64 * 1024
AUTH = {"Authorization": f"Bearer {KEY}"}
LONG = dict(max_tokens=200, ignore_eos=True, temperature=0.0)


class LiveServer(ThreadedServer):
    """An `OpenAIServer` over ``model`` served by uvicorn on a background thread."""

    def __init__(self, model, server_kw: dict, engine_kw: dict):
        self.engine = LLMEngine(model, EngineConfig(warmup=False, max_model_len=256, **engine_kw))
        self.server = OpenAIServer(AsyncEngine(self.engine), ServerConfig("tiny", **server_kw))
        super().__init__(self.server.app)

    def wait_idle(self, timeout: float = 20.0) -> None:
        """Until the engine holds no request and every block is free again."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            stats = self.server.engine.stats()
            if (not self.engine.groups and stats.num_free_blocks == stats.num_blocks
                    and self.server.num_waiting == 0):
                return
            time.sleep(0.02)
        raise AssertionError(f"engine not idle: groups={list(self.engine.groups)}, "
                             f"stats={self.server.engine.stats()}")


@pytest.fixture(scope="module")
def live(tiny):
    srv = LiveServer(tiny, dict(api_key=KEY, max_body_bytes=BODY_LIMIT), {})
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def http(live):
    with httpx.Client(base_url=live.url, headers=AUTH, timeout=60) as c:
        yield c


@pytest.fixture(scope="module")
def client(live):
    # generous: a request may wait for first-use compiles on a loaded machine
    return openai.OpenAI(base_url=live.url + "/v1", api_key=KEY, max_retries=0, timeout=300)


def assert_error(r: httpx.Response, status: int, param: str | None = "any") -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    if param != "any":
        assert err["param"] == param, err
    return err


# -- the openai client ------------------------------------------------------------

def test_completions_with_openai_client(client):
    r = client.completions.create(model="tiny", prompt="Hello", max_tokens=6, temperature=0,
                                  logprobs=2, extra_body={"ignore_eos": True})
    assert r.object == "text_completion" and r.id.startswith("cmpl-") and r.model == "tiny"
    assert r.created > 1_600_000_000
    (c,) = r.choices
    assert c.index == 0 and c.finish_reason == "length"
    assert len(c.logprobs.tokens) == 6 and len(c.logprobs.top_logprobs) == 6
    assert all(len(t) <= 2 for t in c.logprobs.top_logprobs)
    assert all(lp <= 0 for lp in c.logprobs.token_logprobs)
    assert "".join(c.logprobs.tokens) == c.text or "\ufffd" in "".join(c.logprobs.tokens)
    assert r.usage.prompt_tokens == 6 and r.usage.completion_tokens == 6  # <s> + 5 bytes
    assert r.usage.total_tokens == 12
    again = client.completions.create(model="tiny", prompt="Hello", max_tokens=6,
                                      temperature=0, extra_body={"ignore_eos": True})
    assert again.choices[0].text == c.text


def test_batched_prompts_and_n(client):
    r = client.completions.create(model="tiny", prompt=["ab", "cde"], n=2,
                                  max_tokens=3, temperature=0.9, seed=3,
                                  extra_body={"ignore_eos": True, "top_k": 20, "min_p": 0.01})
    assert sorted(c.index for c in r.choices) == [0, 1, 2, 3]
    assert r.usage.prompt_tokens == 3 + 4 and r.usage.completion_tokens == 12
    again = client.completions.create(model="tiny", prompt=["ab", "cde"], n=2,
                                      max_tokens=3, temperature=0.9, seed=3,
                                      extra_body={"ignore_eos": True, "top_k": 20,
                                                  "min_p": 0.01})
    texts = lambda resp: [c.text for c in sorted(resp.choices, key=lambda c: c.index)]
    assert texts(again) == texts(r)  # seeded


def test_chat_stream_matches_non_stream(client):
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    kw = dict(model="tiny", messages=msgs, temperature=0, max_completion_tokens=12, n=2,
              extra_body={"ignore_eos": True})
    full = client.chat.completions.create(**kw)
    assert full.object == "chat.completion" and full.id.startswith("chatcmpl-")
    assert [c.message.role for c in full.choices] == ["assistant", "assistant"]
    assert full.usage.completion_tokens == 24
    chunks = list(client.chat.completions.create(stream=True,
                                                 stream_options={"include_usage": True}, **kw))
    assert all(ch.object == "chat.completion.chunk" and ch.id == chunks[0].id for ch in chunks)
    text, reasons, roles = {0: "", 1: ""}, {}, set()
    for ch in chunks[:-1]:
        assert ch.usage is None and len(ch.choices) == 1
        c = ch.choices[0]
        roles.add(c.delta.role)
        text[c.index] += c.delta.content or ""
        if c.finish_reason:
            reasons[c.index] = c.finish_reason
    assert "assistant" in roles
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 24
    assert chunks[-1].usage.prompt_tokens == full.usage.prompt_tokens
    assert reasons == {0: "length", 1: "length"}
    assert text == {c.index: c.message.content for c in full.choices}


def test_chat_logprobs_and_max_tokens(client):
    r = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "x"}],
                                       max_tokens=4, logprobs=True, top_logprobs=3,
                                       temperature=0, extra_body={"ignore_eos": True})
    content = r.choices[0].logprobs.content
    assert len(content) == 4 == r.usage.completion_tokens
    for entry in content:
        assert len(entry.top_logprobs) == 3
        assert entry.logprob <= max(t.logprob for t in entry.top_logprobs) + 1e-6
        assert entry.bytes == list(entry.token.encode())


def test_stop_string(client):
    base = client.completions.create(model="tiny", prompt="stop me", max_tokens=40,
                                     temperature=0, extra_body={"ignore_eos": True})
    text = base.choices[0].text
    stop = next(ch for ch in text[3:] if ch.isprintable() and ch != "\ufffd")
    r = client.completions.create(model="tiny", prompt="stop me", max_tokens=40, temperature=0,
                                  stop=[stop], extra_body={"ignore_eos": True})
    assert r.choices[0].finish_reason == "stop"
    assert r.choices[0].text == text[:text.index(stop)]


def test_models_embeddings_tokenize(client, http, tiny):
    models = client.models.list()
    assert [m.id for m in models.data] == ["tiny"] and models.data[0].object == "model"
    assert client.models.retrieve("tiny").id == "tiny"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("other")
    emb = client.embeddings.create(model="tiny", input=["hello", "world"])  # base64 by default
    emb_f = client.embeddings.create(model="tiny", input="hello", encoding_format="float")
    assert [d.index for d in emb.data] == [0, 1] and emb.usage.prompt_tokens == 12
    v = np.asarray(emb.data[0].embedding)
    assert v.shape == (tiny.config.hidden_size,)
    np.testing.assert_allclose(v, emb_f.data[0].embedding, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(v, mean_pooled(tiny, tiny.tokenizer.encode("hello")),
                               rtol=1e-5, atol=1e-6)
    assert abs(np.linalg.norm(v) - 1) < 1e-5
    assert not np.allclose(v, emb.data[1].embedding)
    raw = http.post("/v1/embeddings", json={"input": [104, 105], "encoding_format": "base64"})
    decoded = np.frombuffer(base64.b64decode(raw.json()["data"][0]["embedding"]), "<f4")
    np.testing.assert_allclose(decoded, mean_pooled(tiny, [104, 105]), rtol=1e-5, atol=1e-6)

    tok = http.post("/tokenize", json={"prompt": "héllo"}).json()
    assert tok["tokens"] == tiny.tokenizer.encode("héllo") and tok["count"] == 7
    assert tok["max_model_len"] == 256
    chat_tok = http.post("/tokenize", json={"messages": [{"role": "user", "content": "a"}]})
    assert chat_tok.json()["count"] > 3
    assert http.post("/detokenize", json={"tokens": tok["tokens"]}).json() == {"prompt": "héllo"}
    assert http.get("/health").status_code == 200
    assert http.get("/version").json()["version"]


def test_metrics_after_requests(client, http):
    client.completions.create(model="tiny", prompt="m", max_tokens=3, temperature=0,
                              extra_body={"ignore_eos": True})
    text = httpx.get(http.base_url.join("/metrics")).text  # no key needed
    values = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            values[name] = float(value)
    label = '{model_name="tiny"}'
    for name in ("time_to_first_token_seconds_count", "inter_token_latency_seconds_count",
                 "time_per_output_token_seconds_count", "e2e_request_latency_seconds_count",
                 "request_queue_time_seconds_count", "prompt_tokens_total",
                 "generation_tokens_total", "prefix_cache_queries_total"):
        assert values[f"sluice:{name}{label}"] > 0, name
    for name in ("num_requests_running", "num_requests_waiting", "num_requests_swapped",
                 "kv_cache_usage_perc", "num_preemptions_total", "prefix_cache_hits_total"):
        assert f"sluice:{name}{label}" in values, name
    assert values['sluice:request_success_total{finished_reason="length",model_name="tiny"}'] > 0
    assert not any(k.endswith("_created" + label) for k in values)


def test_access_log_line(http, caplog):
    with caplog.at_level(logging.INFO, logger="sluice.access"):
        r = http.post("/v1/completions", json={"prompt": "log", "max_tokens": 2,
                                               "ignore_eos": True})
        deadline = time.monotonic() + 5
        while not any(r.json()["id"] in m.getMessage() for m in caplog.records):
            assert time.monotonic() < deadline
            time.sleep(0.02)
    line = next(json.loads(m.getMessage()) for m in caplog.records
                if r.json()["id"] in m.getMessage())
    assert line["status"] == 200 and line["path"] == "/v1/completions"
    assert line["prompt_tokens"] == 4 and line["completion_tokens"] == 2
    assert line["ttft_ms"] > 0 and line["duration_ms"] >= line["ttft_ms"]


# -- errors -------------------------------------------------------------------------

GOOD = {"prompt": "hi", "max_tokens": 2}
CHAT = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}


@pytest.mark.parametrize("path,body,status,param", [
    ("/v1/completions", b"{not json", 400, None),
    ("/v1/completions", b"[1, 2]", 400, None),
    ("/v1/completions", {"max_tokens": 2}, 400, "prompt"),
    ("/v1/completions", {**GOOD, "max_tokens": "2"}, 400, "max_tokens"),
    ("/v1/completions", {**GOOD, "stream": 1}, 400, "stream"),
    ("/v1/completions", {**GOOD, "prompt": 5}, 400, "prompt"),
    ("/v1/completions", {**GOOD, "prompt": [1, 99999]}, 400, "prompt"),
    ("/v1/completions", {**GOOD, "prompt": ""}, 400, "prompt"),
    ("/v1/completions", {**GOOD, "prompt": "x" * 300}, 400, "prompt"),
    ("/v1/completions", {**GOOD, "model": "gpt-4"}, 404, "model"),
    ("/v1/completions", {**GOOD, "temperature": -1}, 400, "temperature"),
    ("/v1/completions", {**GOOD, "top_p": 0}, 400, "top_p"),
    ("/v1/completions", {**GOOD, "n": 0}, 400, "n"),
    ("/v1/completions", {**GOOD, "logprobs": 99}, 400, "logprobs"),
    ("/v1/completions", {**GOOD, "stop": [""]}, 400, "stop"),
    ("/v1/completions", {**GOOD, "stream_options": {"include_usage": True}}, 400,
     "stream_options"),
    ("/v1/completions", {**GOOD, "user": "key:0123"}, 400, "user"),
    ("/v1/chat/completions", {**CHAT, "messages": []}, 400, "messages"),
    ("/v1/chat/completions", {**CHAT, "messages": [{"role": "bot", "content": "x"}]}, 400,
     "messages[0].role"),
    ("/v1/chat/completions", {**CHAT, "messages": [{"role": "user", "content": "x" * 300}]},
     400, "messages"),
    ("/v1/chat/completions", {**CHAT, "top_logprobs": 2}, 400, "top_logprobs"),
    ("/v1/chat/completions", {**CHAT, "max_completion_tokens": 0}, 400,
     "max_completion_tokens"),
    ("/v1/chat/completions", {**CHAT, "model": "nope"}, 404, "model"),
    ("/v1/chat/completions", {**CHAT, "tools": [{"type": "function"}]}, 400,
     "tools[0].function"),
    ("/v1/embeddings", {"input": []}, 400, "input"),
    ("/v1/embeddings", {"input": "x" * 300}, 400, "input"),
    ("/detokenize", {"tokens": [-1]}, 400, "tokens"),
    ("/tokenize", {}, 400, "prompt"),
    ("/admin/priority", {"request_id": "cmpl-nope", "priority": 1}, 404, "request_id"),
    ("/admin/priority", {"priority": 1}, 400, "request_id"),
    ("/admin/priority", {"request_id": "cmpl-x", "priority": "high"}, 400, "priority"),
    ("/admin/priority", {"request_id": "cmpl-x", "priority": True}, 400, "priority"),
])
def test_bad_requests_get_openai_errors(live, http, path, body, status, param):
    kw = {"content": body} if isinstance(body, bytes) else {"json": body}
    assert_error(http.post(path, **kw), status, param)
    live.wait_idle()
    assert http.post("/v1/completions", json=GOOD).status_code == 200  # still serving


def test_admin_priority_reranks_a_queued_stream(tiny):
    """One sequence slot, the priority policy: a stream queued behind a long one
    finishes first once ``/admin/priority`` raises it (by the id in its
    ``X-Request-Id`` header, before its first token); a finished one is a 404;
    nothing leaks."""
    srv = LiveServer(tiny, dict(api_key=KEY), dict(scheduling_policy="priority", max_num_seqs=1))
    body = {"stream": True, **LONG, "max_tokens": 240, "priority": 5}
    done: dict[str, float] = {}  # stream -> when its [DONE] arrived

    ids: set[str] = set()  # the chunks' ids

    def read_to_end(name: str, lines) -> None:
        events = [line for line in lines if line.startswith("data: ")]
        if events[-1] == "data: [DONE]":
            done[name] = time.monotonic()
        ids.update(json.loads(e[6:])["id"] for e in events[:-1])

    try:
        with httpx.Client(base_url=srv.url, headers=AUTH, timeout=60) as http:
            srv.wait_idle()
            free = srv.server.engine.stats().num_free_blocks
            with http.stream("POST", "/v1/completions", json={**body, "prompt": "first"}) as a:
                a_lines = a.iter_lines()
                assert next(a_lines).startswith("data: ")  # running, in the only slot
                reader = threading.Thread(target=read_to_end, args=("a", a_lines))
                reader.start()
                with http.stream("POST", "/v1/completions",
                                 json={**body, "prompt": "second"}) as b:
                    rid = b.headers["x-request-id"]
                    assert rid.startswith("cmpl-")
                    r = http.post("/admin/priority", json={"request_id": rid, "priority": 0})
                    assert r.status_code == 200, r.text
                    assert r.json() == {"request_id": rid, "priority": 0,
                                        "engine_requests": [rid]}
                    read_to_end("b", b.iter_lines())
                    assert rid in ids
                reader.join(60)
            assert len(ids) == 2
            assert done["b"] < done["a"]  # without the call, b would wait for all of a
            assert srv.engine.scheduler.num_preemptions >= 1
            assert_error(http.post("/admin/priority", json={"request_id": rid, "priority": 1}),
                         404, "request_id")
            srv.wait_idle()
            assert srv.server.engine.stats().num_free_blocks == free
    finally:
        srv.stop()


def test_fair_clients_are_users_else_api_keys(tiny):
    """Under the fair policy a request's client is its ``user``, else its API key
    (by a digest: the key itself is not kept)."""
    srv = LiveServer(tiny, dict(api_key=KEY), dict(scheduling_policy="fair"))
    try:
        with httpx.Client(base_url=srv.url, headers=AUTH, timeout=60) as http:
            for extra in ({"user": "alice"}, {}):
                body = {"prompt": "hi", "max_tokens": 3, "ignore_eos": True, **extra}
                assert http.post("/v1/completions", json=body).status_code == 200
        digest = hashlib.sha256(KEY.encode()).hexdigest()[:16]
        assert set(srv.engine.scheduler.policy.counters) == {"alice", f"key:{digest}"}
    finally:
        srv.stop()


def test_unknown_route_and_method(http):
    assert_error(http.get("/v1/nothing"), 404)
    assert_error(http.get("/v1/completions"), 405)


def test_openai_client_raises_typed_errors(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="tiny", prompt="x", temperature=-2)
    assert e.value.body["param"] == "temperature"
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "x"}])


def test_body_limit(http):
    big = {"prompt": "x" * (BODY_LIMIT + 1), "max_tokens": 1}
    assert_error(http.post("/v1/completions", json=big), 413)

    def chunks():  # no Content-Length: the limit holds while reading
        for _ in range(5):
            yield b"x" * (BODY_LIMIT // 4)
    assert_error(http.post("/v1/completions", content=chunks()), 413)
    assert http.post("/v1/completions", json=GOOD).status_code == 200


def test_api_key(live):
    url = live.url + "/v1/completions"
    assert_error(httpx.post(url, json=GOOD), 401)
    assert_error(httpx.post(url, json=GOOD, headers={"Authorization": "Bearer sk-wrong"}), 401)
    assert_error(httpx.post(url, json=GOOD, headers={"Authorization": KEY}), 401)
    assert_error(httpx.post(live.url + "/tokenize", json={"prompt": "a"}), 401)
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=live.url + "/v1", api_key="bad", max_retries=0).models.list()
    assert httpx.get(live.url + "/health").status_code == 200
    assert httpx.post(url, json=GOOD, headers=AUTH).status_code == 200


# -- disconnects --------------------------------------------------------------------

def test_stream_disconnect_aborts_and_frees_blocks(live, http):
    live.wait_idle()
    baseline = live.server.engine.stats().num_free_blocks
    with http.stream("POST", "/v1/completions",
                     json={"prompt": "a long one", "stream": True, **LONG}) as r:
        lines = r.iter_lines()
        got = [next(lines) for _ in range(6)]  # data, blank, data, ... : a few tokens in
        assert got[0].startswith("data: ")
        assert live.server.engine.stats().num_free_blocks < baseline
    live.wait_idle(timeout=10)
    assert live.server.engine.stats().num_free_blocks == baseline


def test_non_stream_disconnect_aborts(live):
    live.wait_idle()
    aborted = aborted_count(live)
    body = json.dumps({"prompt": "bye", **LONG, "max_tokens": 250}).encode()
    port = int(live.url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: "
                  b"application/json\r\nAuthorization: Bearer " + KEY.encode() +
                  b"\r\nContent-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
        deadline = time.monotonic() + 10
        while not live.engine.groups:  # admitted and running
            assert time.monotonic() < deadline
            time.sleep(0.01)
    live.wait_idle(timeout=10)
    assert aborted_count(live) == aborted + 1


def aborted_count(live: LiveServer) -> float:
    return live.server.metrics.registry.get_sample_value(
        "sluice:request_success_total", {"model_name": "tiny", "finished_reason": "abort"}) or 0


# -- overload -----------------------------------------------------------------------

def test_overload_429_and_nothing_admitted_is_dropped(tiny):
    srv = LiveServer(tiny, dict(max_waiting=1), dict(max_num_seqs=1))
    try:
        with httpx.Client(base_url=srv.url, timeout=60) as c:
            body = {"prompt": "busy", "stream": True, **LONG, "max_tokens": 60}
            with c.stream("POST", "/v1/completions", json=body) as first:
                lines = first.iter_lines()
                assert next(lines).startswith("data: ")  # running
                with c.stream("POST", "/v1/completions", json=body) as second:
                    deadline = time.monotonic() + 10
                    while srv.server.num_waiting < 1:
                        assert time.monotonic() < deadline
                        time.sleep(0.01)
                    third = c.post("/v1/completions", json=GOOD)
                    assert_error(third, 429)
                    assert int(third.headers["Retry-After"]) >= 1
                    rest = [ln for ln in second.iter_lines() if ln]
                first_rest = [ln for ln in lines if ln]
            for stream in (first_rest, rest):
                assert stream[-1] == "data: [DONE]"
                assert json.loads(stream[-2][6:])["choices"][0]["finish_reason"] == "length"
            assert c.post("/v1/completions", json=GOOD).status_code == 200
        srv.wait_idle()
    finally:
        srv.stop()


# -- fuzz ---------------------------------------------------------------------------

JSON = st.recursive(st.none() | st.booleans() | st.integers(-10**6, 10**6)
                    | st.floats(allow_nan=False) | st.text(max_size=8),
                    lambda inner: st.lists(inner, max_size=3)
                    | st.dictionaries(st.text(max_size=6), inner, max_size=3), max_leaves=6)
SMALL = st.integers(-2, 3)
FIELDS = {
    "model": st.sampled_from(["tiny", "other", ""]) | JSON,
    "max_tokens": SMALL | JSON, "max_completion_tokens": SMALL | JSON, "n": SMALL | JSON,
    "temperature": st.floats(-1, 3) | JSON, "top_p": st.floats(-0.5, 1.5) | JSON,
    "top_k": st.integers(-3, 50) | JSON, "min_p": st.floats(-0.5, 1.5) | JSON,
    "seed": st.integers(-2**40, 2**40) | JSON, "stop": st.lists(st.text(max_size=3), max_size=2)
    | JSON, "stream": st.booleans() | JSON, "logprobs": SMALL | st.booleans() | JSON,
    "top_logprobs": SMALL | JSON, "ignore_eos": st.booleans() | JSON,
    "priority": st.integers(-5, 5) | JSON,
    "stream_options": st.fixed_dictionaries({"include_usage": st.booleans()}) | JSON,
    "presence_penalty": st.floats(-3, 3) | JSON, "repetition_penalty": st.floats(-1, 3) | JSON,
    "stop_token_ids": st.lists(st.integers(-2, 300), max_size=2) | JSON,
}
PROMPT = st.text(max_size=20) | st.lists(st.integers(-2, 300), max_size=5) | JSON
MESSAGES = st.lists(st.fixed_dictionaries(
    {"role": st.sampled_from(["user", "system", "assistant", "robot"]),
     "content": st.text(max_size=10) | JSON}), max_size=2) | JSON


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_fuzz_request_schema_never_500(live, http, data):
    chat = data.draw(st.booleans())
    body = data.draw(st.fixed_dictionaries(
        {"messages": MESSAGES} if chat else {"prompt": PROMPT},
        optional={k: v for k, v in FIELDS.items()}))
    unbounded = chat and not {"max_tokens", "max_completion_tokens"} & body.keys()
    if unbounded or data.draw(st.booleans()):  # keep requests cheap enough to run
        body["max_tokens"] = data.draw(st.integers(1, 3))
        body.pop("max_completion_tokens", None)
    raw = json.dumps(body).encode() if data.draw(st.integers(0, 9)) else data.draw(st.binary())
    r = http.post("/v1/chat/completions" if chat else "/v1/completions", content=raw)
    assert r.status_code in (200, 400, 404), r.text
    if r.status_code != 200:
        assert_error(r, r.status_code)
    elif body.get("stream") is True:
        assert r.text.rstrip().endswith("data: [DONE]")
    else:
        assert r.json()["choices"]


def test_conversation_id_reuses_the_previous_turns_kv(tiny):
    """A second turn under the same conversation_id (and user) copies the first turn's
    KV in from host memory; another user's identical id does not; the output is the
    one-at-a-time reference either way; bad uses are 400s naming the field."""
    srv = LiveServer(tiny, {}, dict(swap_space=64 * 32 * 1024))
    try:
        with httpx.Client(base_url=srv.url, timeout=60) as http:
            def turn(prompt, user, max_tokens=12):
                r = http.post("/v1/completions", json={
                    "model": "tiny", "prompt": prompt, "max_tokens": max_tokens,
                    "temperature": 0.0, "ignore_eos": True, "conversation_id": "chat-1",
                    "user": user})
                assert r.status_code == 200, r.text
                return r.json()

            first = list(range(1, 50))
            turn(first, "alice")
            srv.wait_idle()
            srv.engine.swapper.wait()
            out1 = greedy_generate(tiny, first, 12, stop_at_eos=False)
            second = first + out1 + [5, 6, 7]
            srv.engine.block_manager.reset_prefix_cache()  # only host memory has turn 1 now
            turn(second, "mallory")  # same id, other user: nothing to reuse
            assert srv.engine.scheduler.num_reused_blocks == 0
            srv.engine.block_manager.reset_prefix_cache()
            body = turn(second, "alice")
            assert srv.engine.scheduler.num_reused_blocks == (49 + 12 - 1) // 16
            want = tiny.tokenizer.decode(greedy_generate(tiny, second, 12, stop_at_eos=False))
            assert body["choices"][0]["text"] == want
            for extra, param in ((dict(n=2), "conversation_id"),
                                 (dict(prompt=[[1, 2], [3, 4]]), "conversation_id"),
                                 (dict(conversation_id=""), "conversation_id")):
                r = http.post("/v1/completions", json={
                    "model": "tiny", "prompt": [1, 2, 3], "max_tokens": 2,
                    "conversation_id": "c", **extra})
                assert_error(r, 400, param)
            srv.wait_idle()
    finally:
        srv.stop()


def test_server_parts_mount_routes_and_shutdown_hooks(tiny):
    """Optional parts (RAG's routes) are mounted through ``parts``, so the server imports
    none of them: their routes go through the server's wrapper (an APIError is an OpenAI
    error object) and its size-limited body reader (413), and their shutdown hooks run
    before the engine stops."""
    from starlette.responses import JSONResponse
    from starlette.routing import Route
    from starlette.testclient import TestClient

    from sluice.runtime.openai_protocol import APIError
    closed = []

    def part(ctx):
        async def echo(request):
            body = await ctx.read_body(request)
            if not body:
                raise APIError(400, "body: must not be empty", param="body")
            return JSONResponse({"model": ctx.model_name, "bytes": len(body)})

        async def close():
            closed.append(ctx.engine.health().ok)  # the engine still runs

        ctx.on_shutdown.append(close)
        return [Route("/v1/echo", ctx.wrap(echo), methods=["POST"])]

    engine = AsyncEngine(LLMEngine(tiny, EngineConfig(warmup=False, max_model_len=256)))
    server = OpenAIServer(engine, ServerConfig("tiny", max_body_bytes=64), [part])
    with TestClient(server.app) as c:
        assert c.post("/v1/echo", content=b"abc").json() == {"model": "tiny", "bytes": 3}
        assert_error(c.post("/v1/echo", content=b""), 400, "body")
        assert_error(c.post("/v1/echo", content=b"x" * 65), 413)
        assert closed == []
    assert closed == [True]


def test_admin_priority_under_a_policy_that_ignores_it_says_so(live, http):
    """Under fcfs (``live``'s engine, as its front end says; or fair) a re-rank
    changes no order: the response says so in ``warning``, naming the policy that
    would honour it."""
    assert live.server.engine.scheduling_policy == "fcfs"
    body = {"stream": True, **LONG, "max_tokens": 120, "prompt": "first"}
    with http.stream("POST", "/v1/completions", json=body) as a:
        rid = a.headers["x-request-id"]
        r = http.post("/admin/priority", json={"request_id": rid, "priority": 0})
        assert r.status_code == 200, r.text
        warning = r.json()["warning"]
        assert "'fcfs' ignores priorities" in warning and "--scheduling-policy priority" in warning
        assert [line for line in a.iter_lines() if line][-1] == "data: [DONE]"
    live.wait_idle()
