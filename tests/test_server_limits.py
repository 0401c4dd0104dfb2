"""Hostile clients against the live server: the event loop stays free while a
prompt is tokenized, admission counts sequences, embeddings are admitted,
capped and cancelled, connection and body limits, disconnects and mid-stream
failures reported as what they are, one reading of ``Authorization``, and the
logging set-up. Timing-free: waits are on events or on the server's state,
and the few timeouts configured here only decide how long a hang would take
to show, never whether a fast machine passes.

Servers run uvicorn (with `connection_config`) on a background thread over the
built-in ``tiny`` model (no warm-up, ``max_model_len`` 256).
"""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import socket
import threading
import time

import httpx
import pytest

from conftest import ThreadedServer
from sluice.runtime import load_model
from sluice.runtime.async_engine import AsyncEngine, StreamLimits
from sluice.runtime.cli import build_parser, configure_logging
from sluice.runtime.engine import EngineConfig, LLMEngine
from sluice.runtime.server import OpenAIServer, ServerConfig, bearer_token, connection_config

KEY = "sk-limits"
AUTH = {"Authorization": f"Bearer {KEY}"}
LONG = dict(max_tokens=200, ignore_eos=True, temperature=0.0)
HANG = 30  # seconds after which a client gives up: only a hang takes this long


class LiveServer(ThreadedServer):
    def __init__(self, model, engine_kw: dict | None = None, limits: StreamLimits | None = None,
                 **server_kw):
        self.engine = LLMEngine(model, EngineConfig(warmup=False, max_model_len=256,
                                                    **(engine_kw or {})))
        self.front = AsyncEngine(self.engine, limits)
        self.server = OpenAIServer(self.front, ServerConfig("tiny", **server_kw))
        super().__init__(self.server.app,
                         lambda app: connection_config(app, self.server.config), HANG)

    def wait_for(self, cond, what: str) -> None:
        deadline = time.monotonic() + HANG
        while not cond():
            assert time.monotonic() < deadline, f"timed out waiting for {what}"
            time.sleep(0.01)

    def wait_idle(self) -> None:
        self.wait_for(lambda: not self.engine.groups and self.server.num_waiting == 0
                      and self.front.stats().num_free_blocks == self.front.stats().num_blocks,
                      "an idle engine with every block free")

    def connect(self) -> socket.socket:
        s = socket.create_connection(("127.0.0.1", self.port), timeout=HANG)
        return s


def http_request(path: str, body: bytes = b"", method: str = "POST",
                 headers: dict[str, str] | None = None, length: int | None = None) -> bytes:
    head = [f"{method} {path} HTTP/1.1", "Host: x", f"Content-Length: {len(body) if length is None else length}",
            "Content-Type: application/json"]
    head += [f"{k}: {v}" for k, v in (headers or {}).items()]
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


def read_all(s: socket.socket) -> bytes:
    out = b""
    while chunk := s.recv(65536):
        out += chunk
    return out


class SlowTokenizer:
    """The model's tokenizer, except that encoding a text starting with ``SLOW``
    (or templating a chat whose last message does) waits until the test releases
    it: a multi-megabyte prompt, without the megabytes."""

    def __init__(self, inner):
        self._inner = inner
        self.entered = threading.Event()
        self.release = threading.Event()

    def __getattr__(self, name):
        return getattr(self._inner, name)

    def encode(self, text: str, *args, **kw):
        if text.startswith("SLOW"):
            self.entered.set()
            assert self.release.wait(HANG)
        return self._inner.encode(text, *args, **kw)

    def apply_chat_template(self, messages, *args, **kw):
        text = self._inner.apply_chat_template(messages, *args, **kw)
        return "SLOW" + text if messages[-1]["content"].startswith("SLOW") else text


@pytest.fixture(scope="module")
def tiny():
    """The tiny model with a `SlowTokenizer` (one model object, so every server
    here shares the compiled steps)."""
    base = load_model("tiny", dtype="float32")
    return dataclasses.replace(base, tokenizer=SlowTokenizer(base.tokenizer))


@pytest.fixture
def slow(tiny):
    tok = tiny.tokenizer
    tok.entered.clear()
    tok.release.clear()
    yield tok
    tok.release.set()


@pytest.fixture(scope="module")
def srv(tiny):
    server = LiveServer(tiny, api_key=KEY, body_timeout_s=0.5, header_timeout_s=0.5,
                        max_header_bytes=4096, max_waiting=4, max_embedding_inputs=6)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def http(srv):
    with httpx.Client(base_url=srv.url, headers=AUTH, timeout=HANG) as client:
        yield client


def in_thread(fn) -> tuple[threading.Thread, dict]:
    result: dict = {}
    t = threading.Thread(target=lambda: result.update(r=fn()), daemon=True)
    t.start()
    return t, result


# -- the event loop stays free --------------------------------------------------------

TOO_LONG = "SLOW" + "x" * 300  # more tokens than max_model_len: refused once tokenized


@pytest.mark.parametrize("path, body, status", [
    ("/v1/completions", {"prompt": TOO_LONG}, 400),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": TOO_LONG}]}, 400),
    ("/tokenize", {"prompt": TOO_LONG}, 200),
    ("/v1/embeddings", {"input": TOO_LONG}, 400),
])
def test_health_answers_while_a_prompt_is_tokenized(srv, http, slow, path, body, status):
    """(The prompts are refused after tokenizing, as too long, so no test here
    waits for a model step.)"""
    t, result = in_thread(lambda: http.post(path, json=body))
    assert slow.entered.wait(HANG)
    assert httpx.get(srv.url + "/health", timeout=HANG).status_code == 200
    slow.release.set()
    t.join(HANG)
    assert result["r"].status_code == status, result["r"].text
    srv.wait_idle()


# -- admission ------------------------------------------------------------------------

def test_max_waiting_counts_sequences(srv, http, slow):
    """At most 4 waiting sequences: an n=4 request being tokenized holds all four
    places, so an n=2 request gets 429 (it counted as one prompt), and an n=5
    request, which could never be admitted, gets 400."""
    r = http.post("/v1/completions", json={"prompt": "x", "n": 5, "max_tokens": 2})
    assert r.status_code == 400 and r.json()["error"]["param"] == "n"
    t, result = in_thread(lambda: http.post(
        "/v1/completions", json={"prompt": TOO_LONG, "n": 4, "max_tokens": 2}))
    assert slow.entered.wait(HANG)
    assert srv.server.num_waiting == 4
    r = http.post("/v1/completions", json={"prompt": "b", "n": 2, "max_tokens": 2})
    assert r.status_code == 429, r.text
    assert r.headers["retry-after"] == "1"
    slow.release.set()
    t.join(HANG)
    assert result["r"].status_code == 400  # too long: its places are given back
    srv.wait_idle()


def test_embeddings_are_capped_admitted_and_cancelled(srv, http, monkeypatch):
    calls, entered, release = [], threading.Event(), threading.Event()
    real = srv.front.embed

    def slow_embed(ids):
        calls.append(ids)
        entered.set()
        assert release.wait(HANG)
        return real(ids)

    r = http.post("/v1/embeddings", json={"input": ["a"] * 7})  # over max_embedding_inputs
    assert r.status_code == 400 and r.json()["error"]["param"] == "input"
    r = http.post("/v1/embeddings", json={"input": ["a"] * 5})  # over max_waiting
    assert r.status_code == 400 and "max_waiting" in r.json()["error"]["message"]
    monkeypatch.setattr(srv.front, "embed", slow_embed)
    try:
        s = srv.connect()
        s.sendall(http_request("/v1/embeddings", json.dumps({"input": ["a", "b", "c"]}).encode(),
                               headers=AUTH))
        assert entered.wait(HANG)
        assert srv.server.num_waiting == 3
        assert http.post("/v1/embeddings", json={"input": ["d", "e"]}).status_code == 429
        s.close()  # the client goes away during the first input
        srv.wait_for(lambda: srv.server.num_waiting == 0, "the embeddings to be released")
    finally:
        release.set()
    srv.wait_for(lambda: srv.server._embedder._work_queue.empty(), "the embedder")
    assert len(calls) == 1  # the other two inputs never ran
    monkeypatch.setattr(srv.front, "embed", real)
    assert http.post("/v1/embeddings", json={"input": ["a", "b"]}).status_code == 200


# -- connections ----------------------------------------------------------------------

def test_slow_headers_are_cut_off(srv):
    s = srv.connect()
    s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n")  # and nothing more
    assert read_all(s) == b""  # closed by the server, no request was ever made
    # After a response too: a keep-alive connection trickling its next header.
    s = srv.connect()
    s.sendall(http_request("/health", method="GET"))
    assert s.recv(65536).startswith(b"HTTP/1.1 200")
    s.sendall(b"GET /he")
    assert read_all(s) == b""


def test_slow_body_gets_408(srv):
    s = srv.connect()
    s.sendall(http_request("/v1/completions", b'{"prompt": ', headers=AUTH, length=100))
    reply = read_all(s)
    assert reply.startswith(b"HTTP/1.1 408"), reply
    assert b'"request_timeout"' in reply


def test_a_request_head_past_the_size_cap_gets_400(srv):
    s = srv.connect()
    s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nX-Pad: " + b"p" * 6000)  # no end yet
    assert s.recv(65536).startswith(b"HTTP/1.1 400")


def test_concurrency_limit_answers_503(tiny):
    """uvicorn counts the connection asking: with a limit of 3, two held
    keep-alive connections leave room for none more."""
    server = LiveServer(tiny, limit_concurrency=3)
    try:
        held = [server.connect() for _ in range(2)]
        for s in held:  # both accepted and kept alive
            s.sendall(http_request("/health", method="GET"))
            assert s.recv(65536).startswith(b"HTTP/1.1 200")
        s = server.connect()
        s.sendall(http_request("/health", method="GET"))
        assert s.recv(65536).startswith(b"HTTP/1.1 503")
    finally:
        server.stop()


# -- errors reported as what they are -------------------------------------------------

def no_tracebacks(caplog) -> None:
    bad = [r for r in caplog.records if r.exc_info or r.levelno >= logging.ERROR]
    assert not bad, [r.getMessage() for r in bad]


def access_statuses(caplog) -> list[int]:
    return [json.loads(r.getMessage())["status"] for r in caplog.records
            if r.name == "sluice.access"]


def test_disconnect_during_upload_is_a_499_without_traceback(srv, caplog):
    with caplog.at_level(logging.INFO):
        s = srv.connect()
        s.sendall(http_request("/v1/completions", b'{"prompt": "abc", ', headers=AUTH,
                               length=1000))
        s.shutdown(socket.SHUT_WR)  # gone before the body is complete
        read_all(s)
        s.close()
        srv.wait_for(lambda: access_statuses(caplog), "the access line")
    assert access_statuses(caplog) == [499]
    no_tracebacks(caplog)


def test_disconnect_before_a_full_response_is_a_499_without_traceback(srv, caplog):
    with caplog.at_level(logging.INFO):
        s = srv.connect()
        s.sendall(http_request("/v1/completions", json.dumps({"prompt": "abc", **LONG}
                                                             ).encode(), headers=AUTH))
        srv.wait_for(lambda: srv.engine.groups, "the request to run")
        s.close()
        srv.wait_for(lambda: access_statuses(caplog), "the access line")
        srv.wait_idle()
    assert access_statuses(caplog) == [499]
    no_tracebacks(caplog)


def test_stop_strings_past_the_limits_are_400(http):
    r = http.post("/v1/completions", json={"prompt": "x", "stop": ["s" * 300_000]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "stop"


def test_mid_stream_engine_error_sends_an_error_event_then_done(srv, http):
    real, steps = srv.engine.step, []

    def failing_step():
        steps.append(1)
        if len(steps) == 4:
            raise RuntimeError("injected step failure")
        return real()

    srv.engine.step = failing_step
    try:
        with http.stream("POST", "/v1/completions",
                         json={"prompt": "x", "stream": True, **LONG}) as r:
            events = [line for line in r.iter_lines() if line.startswith("data: ")]
        assert events[-1] == "data: [DONE]"
        err = json.loads(events[-2][6:])["error"]
        assert err["type"] == "server_error" and "injected step failure" in err["message"]
        assert all("choices" in json.loads(e[6:]) for e in events[:-2])
        steps.clear()
        r = http.post("/v1/completions", json={"prompt": "x", **LONG})
        assert r.status_code == 500 and "injected step failure" in r.json()["error"]["message"]
    finally:
        srv.engine.step = real
    srv.wait_idle()


def test_authorization_is_read_once_the_same_way(srv):
    """The first Authorization header decides (it used to be the last for the key
    check and the first for the client name); the scheme is case-insensitive."""
    def get(*values: str) -> int:
        s = srv.connect()
        s.sendall(("GET /v1/models HTTP/1.1\r\nHost: x\r\n" + "".join(
            f"Authorization: {v}\r\n" for v in values) + "Connection: close\r\n\r\n").encode())
        return int(read_all(s).split(b" ", 2)[1])

    assert get("Bearer wrong", f"Bearer {KEY}") == 401
    assert get(f"Bearer {KEY}", "Bearer wrong") == 200
    assert get(f"bearer {KEY}") == 200 and get(f"BEARER  {KEY}") == 200
    assert get(f"Basic {KEY}") == 401 and get("Bearer") == 401
    assert bearer_token([(b"authorization", b"Bearer a"), (b"authorization", b"Bearer b")]) \
        == b"a"


def test_api_key_from_the_environment(monkeypatch):
    monkeypatch.setenv("SLUICE_API_KEY", "from-env")
    assert build_parser().parse_args(["serve"]).api_key == "from-env"


# -- logging --------------------------------------------------------------------------

def test_logging_reaches_sluice_loggers_despite_an_earlier_basic_config(srv):
    """Something (orbax, absl) configured the root logger first, so basicConfig
    is a no-op: Sluice's own handler still gets INFO lines, access lines among
    them, in the chosen format and level."""
    logging.basicConfig()  # as orbax/absl do at import
    buf = io.StringIO()
    loggers = [logging.getLogger(n) for n in ("sluice", "uvicorn", "sluice.access")]
    saved = [(lg.level, lg.propagate, list(lg.handlers)) for lg in loggers]
    try:
        configure_logging("info", "json", buf)
        assert httpx.get(srv.url + "/health").status_code == 200
        srv.wait_for(lambda: '"path": "/health"' in buf.getvalue(), "the access line")
        line = next(x for x in buf.getvalue().splitlines() if '"path": "/health"' in x)
        fields = json.loads(line.split("sluice.access: ", 1)[1])
        assert fields["status"] == 200 and fields["duration_ms"] >= 0
        configure_logging("warning", "json", buf)
        logging.getLogger("sluice.runtime.server").info("not shown")
        configure_logging("info", "off", buf)
        httpx.get(srv.url + "/health")
        logging.getLogger("sluice.x").info("shown")
        srv.wait_for(lambda: "shown" in buf.getvalue(), "the info line")
        assert "not shown" not in buf.getvalue()
        assert buf.getvalue().count('"path": "/health"') == 1
    finally:
        for lg, (level, propagate, handlers) in zip(loggers, saved):
            lg.setLevel(level)
            lg.propagate = propagate
            lg.handlers[:] = handlers


def test_text_access_log(tiny, caplog):
    server = LiveServer(tiny, access_log_format="text")
    try:
        with caplog.at_level(logging.INFO, logger="sluice.access"):
            r = httpx.post(server.url + "/v1/completions", timeout=HANG,
                           json={"prompt": "x", "max_tokens": 3, "ignore_eos": True})
            assert r.status_code == 200
            server.wait_for(lambda: any(x.name == "sluice.access" for x in caplog.records),
                            "the access line")
        (line,) = [x.getMessage() for x in caplog.records if x.name == "sluice.access"]
        fields = dict(kv.split("=", 1) for kv in line.split())
        assert fields["status"] == "200" and fields["completion_tokens"] == "3"
        assert fields["request_id"] == r.json()["id"] and fields["path"] == "/v1/completions"
    finally:
        server.stop()
