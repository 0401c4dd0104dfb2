"""Soak: hostile and well-behaved clients at once against ``sluice serve`` on
loopback, first one engine, then ``--instances 2``, bounded in time and count.

Run from the repository root::

    .venv/bin/python bench/soak.py --duration 300 --output bench/results/soak.json

Each phase starts its own server (``--model tiny``, an API key from
``$SLUICE_API_KEY``, ``--max-waiting``, a short ``--stream-stall-timeout``,
``--header-timeout`` and ``--body-timeout``) and runs these clients for half of
``--duration`` (or until ``--max-requests`` have been sent in all):

- good streams: streamed completions (and now and then a chat) that must end
  with a finish reason and ``[DONE]``; the worst gap between two of a stream's
  events after its first is its stall;
- poison bodies: malformed JSON, integers past 64 bits, ``top_k`` past int32,
  a 300k-character stop string, too many stop strings, ``n`` too large, token
  ids outside the vocabulary, a wrong key; each must be a 4xx;
- slow readers: streams read a few bytes at a time with pauses;
- disconnects: streams dropped after two events, non-streamed requests and
  embeddings abandoned mid-way;
- over-limit bursts: 32 concurrent requests with ``n=4`` past ``--max-waiting``
  (429s expected);
- slow-loris connections that trickle half a header (the server must close them);
- huge prompts: a 3.5 MB prompt every few seconds (tokenized, then refused as
  too long), while a poller times ``GET /health`` (the worst latency is
  reported: the event loop must not freeze while such a prompt is tokenized).

A request is *served* (a complete answer), *refused* (counted by status: 4xx
for poison, 429/503 for load) or *lost*: a good request that got a 5xx, a
connection error, or a stream without its end. After each phase the server is
drained and its ``/metrics`` read: KV blocks still in use (leaked) must be 0.
Printed and written to ``--output``: per phase, requests served, refused by
status, lost (must be 0), KV blocks leaked (must be 0), the worst stall of a
good stream (goal < 2 s on the CPU machine), and the server's RSS growth from
the first request to the end.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import platform
import random
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

KEY = "soak-key"
HEADERS = {"Authorization": f"Bearer {KEY}"}
KV_GIB = 0.0625  # the pool each instance gets (so leaked blocks can be counted)
BLOCK_SIZE = 16


class Tally:
    def __init__(self) -> None:
        self.served = 0
        self.refused: collections.Counter = collections.Counter()
        self.lost: list[str] = []
        self.poison: collections.Counter = collections.Counter()  # status of poison bodies
        self.disconnects = 0
        self.loris_closed = 0
        self.loris_held = 0
        self.worst_stall = 0.0
        self.stalls: list[tuple[float, float]] = []  # (worst gap of a served stream, when)
        self.rss: list[tuple[float, int]] = []  # (seconds into the phase, server RSS)
        self.worst_health = 0.0
        self.huge = collections.Counter()  # status of huge prompts
        self.sent = 0

    def refuse_or_lose(self, status: int, what: str) -> None:
        if status in (429, 503):
            self.refused[status] += 1
        else:
            self.lost.append(f"{what}: HTTP {status}")


def start_server(extra: list[str]) -> tuple[subprocess.Popen, str]:
    env = {**os.environ, "SLUICE_API_KEY": KEY,
           "XLA_FLAGS": "--xla_force_host_platform_device_count=2",
           "SLUICE_CACHE_DIR": os.environ.get("SLUICE_CACHE_DIR", "/tmp/sluice-soak-cache")}
    cmd = [sys.executable, "-m", "sluice.runtime.cli", "serve", "--model", "tiny", "--port", "0",
           "--max-model-len", "512", "--max-waiting", "48", "--kv-cache-memory", str(KV_GIB),
           "--max-num-seqs", "16", "--max-num-batched-tokens", "256", "--full-warmup",
           "--block-size", str(BLOCK_SIZE), "--stream-stall-timeout", "5",
           "--header-timeout", "5", "--body-timeout", "5", "--log-level", "warning",
           "--access-log", "off", *extra]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                            env=env)
    lines = []
    while True:
        line = proc.stdout.readline()
        if not line:
            raise RuntimeError(f"server did not start: {lines}")
        lines.append(line)
        m = re.search(r"http://127\.0\.0\.1:\d+", line)
        if m:
            return proc, m.group(0)


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


def metrics(url: str) -> dict[str, float]:
    text = httpx.get(url + "/metrics", timeout=30).text
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            out[name.split("{")[0]] = float(value)
    return out


def prompt(rng: random.Random) -> str:
    return " ".join(rng.choice(["sluice", "gate", "water", "flow", "river", "lock"])
                    for _ in range(rng.randint(3, 40)))


async def good_stream(client: httpx.AsyncClient, rng: random.Random, t: Tally) -> None:
    chat = rng.random() < 0.25
    body = {"stream": True, "max_tokens": rng.randint(8, 64), "temperature": 0.7,
            "seed": rng.randint(0, 1000), "ignore_eos": True}
    if chat:
        path, body["messages"] = "/v1/chat/completions", [{"role": "user", "content": prompt(rng)}]
    else:
        path, body["prompt"] = "/v1/completions", prompt(rng)
    last, stall, finished, done = None, 0.0, False, False
    try:
        async with client.stream("POST", path, json=body) as r:
            if r.status_code != 200:
                t.refuse_or_lose(r.status_code, "good stream")
                return
            async for line in r.aiter_lines():
                if not line.startswith("data: "):
                    continue
                now = time.monotonic()
                if last is not None:
                    stall = max(stall, now - last)
                last = now
                if line == "data: [DONE]":
                    done = True
                    continue
                event = json.loads(line[6:])
                if "error" in event:
                    t.lost.append(f"good stream error event: {event['error']['message']}")
                    return
                finished |= any(c.get("finish_reason") for c in event["choices"])
    except httpx.HTTPError as e:
        t.lost.append(f"good stream: {type(e).__name__}: {e}")
        return
    if finished and done:
        t.served += 1
        t.worst_stall = max(t.worst_stall, stall)
        t.stalls.append((stall, time.monotonic()))
    else:
        t.lost.append(f"good stream ended without finish/[DONE] ({finished}, {done})")


POISON: list[tuple[str, bytes | dict]] = [
    ("/v1/completions", b'{"prompt": "x", "max_tokens": '),
    ("/v1/completions", b'{"prompt": "x", "max_tokens": 1e309}'),
    ("/v1/completions", {"prompt": "x", "top_k": 2147483648}),
    ("/v1/completions", {"prompt": "x", "seed": 2 ** 64}),
    ("/v1/completions", {"prompt": "x", "max_tokens": 2 ** 64}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}],
                              "max_completion_tokens": 10 ** 30}),
    ("/v1/completions", {"prompt": "x", "stop": ["s" * 300_000]}),
    ("/v1/completions", {"prompt": "x", "stop": [f"s{i}" for i in range(100)]}),
    ("/v1/completions", {"prompt": "x", "n": 100}),
    ("/v1/completions", {"prompt": [[1, 2, 10 ** 6]]}),
    ("/v1/completions", {"prompt": "x", "temperature": -1}),
    ("/v1/chat/completions", {"messages": "not a list"}),
    ("/v1/embeddings", {"input": ["a"] * 5000}),
    ("/v1/completions", {"prompt": "x" * 3000}),
]


async def poison(client: httpx.AsyncClient, rng: random.Random, t: Tally) -> None:
    path, body = rng.choice(POISON)
    kw = {"content": body} if isinstance(body, bytes) else {"json": body}
    headers = {"Authorization": "Bearer wrong"} if rng.random() < 0.1 else {}
    try:
        r = await client.post(path, headers=headers, **kw)
    except httpx.HTTPError as e:
        t.lost.append(f"poison {path}: {type(e).__name__}")
        return
    t.poison[r.status_code] += 1
    if r.status_code >= 500 and r.status_code != 503:
        t.lost.append(f"poison {path} {str(body)[:60]}: HTTP {r.status_code} {r.text[:120]}")


async def slow_reader(client: httpx.AsyncClient, rng: random.Random, t: Tally) -> None:
    body = {"prompt": prompt(rng), "stream": True, "max_tokens": 48, "ignore_eos": True,
            "logprobs": 5}
    data = b""
    try:
        async with client.stream("POST", "/v1/completions", json=body) as r:
            if r.status_code != 200:
                t.refuse_or_lose(r.status_code, "slow reader")
                return
            async for chunk in r.aiter_raw(256):
                data += chunk
                await asyncio.sleep(0.02)
    except httpx.HTTPError as e:
        t.lost.append(f"slow reader: {type(e).__name__}")
        return
    if data.endswith(b"data: [DONE]\n\n"):
        t.served += 1
    else:
        t.lost.append("slow reader stream ended without [DONE]")


async def disconnect(client: httpx.AsyncClient, rng: random.Random, t: Tally) -> None:
    kind = rng.choice(["stream", "full", "embed"])
    try:
        if kind == "stream":
            body = {"prompt": prompt(rng), "stream": True, "max_tokens": 200, "ignore_eos": True}
            async with client.stream("POST", "/v1/completions", json=body) as r:
                n = 0
                async for line in r.aiter_lines():
                    n += line.startswith("data: ")
                    if n == 2:
                        break  # leaving the block closes the connection mid-stream
        elif kind == "full":
            body = {"prompt": prompt(rng), "max_tokens": 200, "ignore_eos": True}
            await client.post("/v1/completions", json=body, timeout=0.3)
        else:
            body = {"input": [prompt(rng) for _ in range(16)]}
            await client.post("/v1/embeddings", json=body, timeout=0.2)
    except httpx.TimeoutException:
        pass
    t.disconnects += 1


async def burst(client: httpx.AsyncClient, rng: random.Random, t: Tally) -> None:
    body = {"prompt": prompt(rng), "n": 4, "max_tokens": 8, "ignore_eos": True}

    async def one() -> None:
        try:
            r = await client.post("/v1/completions", json=body)
        except httpx.HTTPError as e:
            t.lost.append(f"burst: {type(e).__name__}")
            return
        if r.status_code == 200:
            t.served += 1
        else:
            t.refuse_or_lose(r.status_code, "burst")

    await asyncio.gather(*(one() for _ in range(32)))
    t.sent += 31


async def slow_loris(url: str, t: Tally) -> None:
    host, port = url.rsplit("/", 1)[1].split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthor")
    await writer.drain()
    try:
        closed = await asyncio.wait_for(reader.read(), timeout=15) == b""
    except asyncio.TimeoutError:
        closed = False
    writer.close()
    if closed:
        t.loris_closed += 1
    else:
        t.loris_held += 1


async def huge_prompt(client: httpx.AsyncClient, t: Tally) -> None:
    try:
        r = await client.post("/v1/completions", json={"prompt": "many words " * 320_000})
    except httpx.HTTPError as e:
        t.lost.append(f"huge prompt: {type(e).__name__}")
        return
    t.huge[r.status_code] += 1
    if r.status_code >= 500 and r.status_code != 503:
        t.lost.append(f"huge prompt: HTTP {r.status_code}")


async def health(client: httpx.AsyncClient, t: Tally) -> None:
    start = time.monotonic()
    try:
        r = await client.get("/health")
    except httpx.HTTPError as e:
        t.lost.append(f"/health: {type(e).__name__}: {e}")
        return
    t.worst_health = max(t.worst_health, time.monotonic() - start)
    if r.status_code != 200:
        t.lost.append(f"/health: HTTP {r.status_code}")


async def sample_rss(pid: int, t: Tally, start: float, deadline: float) -> None:
    while time.monotonic() < deadline:
        t.rss.append((time.monotonic() - start, rss_bytes(pid)))
        await asyncio.sleep(10)


async def run_phase(url: str, pid: int, seconds: float, max_requests: int, seed: int) -> Tally:
    t = Tally()
    start = time.monotonic()
    deadline = start + seconds
    # Idle pooled connections expire before the server's 5 s keep-alive timeout closes
    # them (else a request can race the close: "server disconnected", as with any server).
    limits = httpx.Limits(max_connections=200, max_keepalive_connections=50,
                          keepalive_expiry=2.0)
    async with httpx.AsyncClient(base_url=url, headers=HEADERS, timeout=60,
                                 limits=limits) as client:
        async def worker(kind: str, i: int) -> None:
            rng = random.Random(seed * 1000 + i)
            while time.monotonic() < deadline and t.sent < max_requests:
                t.sent += 1
                if kind == "good":
                    await good_stream(client, rng, t)
                elif kind == "poison":
                    await poison(client, rng, t)
                elif kind == "slow":
                    await slow_reader(client, rng, t)
                elif kind == "drop":
                    await disconnect(client, rng, t)
                elif kind == "burst":
                    await burst(client, rng, t)
                    await asyncio.sleep(5)
                elif kind == "loris":
                    await slow_loris(url, t)
                elif kind == "huge":
                    await huge_prompt(client, t)
                    await asyncio.sleep(3)
                elif kind == "health":
                    await health(client, t)
                    await asyncio.sleep(0.2)

        kinds = ["good"] * 6 + ["poison"] * 2 + ["slow"] * 2 + ["drop"] * 2 + [
            "burst", "loris", "huge", "health"]
        await asyncio.gather(sample_rss(pid, t, start, deadline),
                             *(worker(k, i) for i, k in enumerate(kinds)))
    t.stalls = [(gap, when - start) for gap, when in t.stalls]
    return t


def num_blocks_per_instance() -> int:
    from sluice.runtime.kv_cache import num_blocks_for_budget
    from sluice.runtime.loader import load_model
    model = load_model("tiny", dtype="float32")
    return num_blocks_for_budget(model.config, int(KV_GIB * (1 << 30)), BLOCK_SIZE, model.dtype)


def drain(url: str, timeout: float = 120) -> dict[str, float]:
    deadline = time.monotonic() + timeout
    while True:
        m = metrics(url)
        idle = m["sluice:num_requests_running"] == 0 and m["sluice:num_requests_waiting"] == 0
        if (idle and m["sluice:kv_cache_usage_perc"] == 0) or time.monotonic() > deadline:
            return m
        time.sleep(0.5)


def prewarm(url: str) -> None:
    """One request of each kind first (the sampler variants the start-up warm-up
    does not compile), so stalls measure serving, and the RSS baseline is a
    serving process's."""
    chat = {"messages": [{"role": "user", "content": "warm"}]}
    for path, body in [("/v1/completions", {"prompt": "warm", "max_tokens": 4}),
                       ("/v1/completions", {"prompt": "warm", "max_tokens": 4, "seed": 1,
                                            "temperature": 0.7, "stream": True}),
                       ("/v1/completions", {"prompt": "warm", "max_tokens": 4, "logprobs": 5}),
                       ("/v1/completions", {"prompt": "warm", "max_tokens": 4, "n": 4}),
                       ("/v1/chat/completions", {**chat, "max_tokens": 4, "seed": 2,
                                                 "temperature": 0.7}),
                       ("/v1/embeddings", {"input": ["warm up " * 8] * 16})]:
        httpx.post(url + path, headers=HEADERS, json=body, timeout=600).raise_for_status()


def phase(name: str, extra: list[str], instances: int, seconds: float, max_requests: int,
          seed: int, blocks: int) -> dict:
    proc, url = start_server(extra)
    try:
        prewarm(url)
        rss0 = rss_bytes(proc.pid)
        start = time.monotonic()
        t = asyncio.run(run_phase(url, proc.pid, seconds, max_requests, seed))
        wall = time.monotonic() - start
        m = drain(url)
        rss1 = rss_bytes(proc.pid)
    finally:
        proc.terminate()
        proc.wait(60)
    leaked = round(m["sluice:kv_cache_usage_perc"] * blocks * instances)
    return {"phase": name, "seconds": round(wall, 1), "requests_sent": t.sent,
            "served": t.served, "refused": dict(sorted(t.refused.items())),
            "poison_statuses": dict(sorted(t.poison.items())), "disconnects": t.disconnects,
            "slow_loris_closed": t.loris_closed, "slow_loris_held": t.loris_held,
            "lost": len(t.lost), "lost_examples": t.lost[:10],
            "kv_blocks_leaked": leaked, "worst_good_stall_s": round(t.worst_stall, 3),
            "worst_good_stall_at_s": round(max(t.stalls, default=(0, 0))[1], 1),
            "good_streams_stalled_over_2s": sum(gap > 2 for gap, _ in t.stalls),
            "good_stream_stall_p99_s": round(sorted(g for g, _ in t.stalls)[
                int(0.99 * (len(t.stalls) - 1))], 3) if t.stalls else 0.0,
            "huge_prompt_statuses": dict(sorted(t.huge.items())),
            "worst_health_latency_s": round(t.worst_health, 3),
            "streams_stalled_metric": m.get("sluice:num_streams_stalled_total", 0.0),
            "rss_start_mib": round(rss0 / 2 ** 20, 1), "rss_end_mib": round(rss1 / 2 ** 20, 1),
            "rss_growth_mib": round((rss1 - rss0) / 2 ** 20, 1),
            "rss_mib_every_10s": [round(r / 2 ** 20) for _, r in t.rss]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--duration", type=float, default=300.0, help="seconds in all (default 300)")
    p.add_argument("--max-requests", type=int, default=50_000, help="requests in all")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", default=None, help="write the results as JSON here")
    args = p.parse_args(argv)
    blocks = num_blocks_per_instance()
    phases = []
    for i, (name, extra, n) in enumerate([("one engine", [], 1),
                                          ("--instances 2", ["--instances", "2"], 2)]):
        res = phase(name, extra, n, args.duration / 2, args.max_requests // 2, args.seed + i,
                    blocks)
        phases.append(res)
        print(json.dumps(res, indent=2), flush=True)
    import jax
    result = {"command": " ".join([sys.executable, *sys.argv]),
              "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                          "python": platform.python_version(), "jax": jax.__version__},
              "phases": phases,
              "ok": all(r["lost"] == 0 and r["kv_blocks_leaked"] == 0 for r in phases)}
    if args.output:
        Path(args.output).write_text(json.dumps(result, indent=2) + "\n")
    print("OK" if result["ok"] else "FAILED: requests lost or KV blocks leaked")
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
