"""`sluice serve` as a process: the ready line's curl command works as pasted,
and SIGTERM shuts down gracefully (no new connections, in-flight streams finish
or are aborted at the deadline, exit status 0)."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import threading
import time

import httpx
import pytest


def start_server(*extra: str) -> tuple[subprocess.Popen, str, str]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "sluice.runtime.cli", "serve", "--model", "tiny", "--no-warmup",
         "--max-model-len", "512", "--port", "0", *extra],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    deadline = time.monotonic() + 90
    lines = []
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        lines.append(line)
        if line.startswith("curl "):
            url = re.search(r"http://127\.0\.0\.1:\d+", lines[-2]).group(0)
            return proc, url, line.strip()
    proc.kill()
    raise AssertionError(f"server did not become ready: {lines}")


def stream_in_thread(url: str, max_tokens: int, result: dict) -> threading.Thread:
    def run() -> None:
        body = {"prompt": "shutdown", "max_tokens": max_tokens, "ignore_eos": True,
                "temperature": 0, "stream": True}
        lines = []
        try:
            with httpx.stream("POST", url + "/v1/completions", json=body, timeout=60) as r:
                for line in r.iter_lines():
                    if line:
                        lines.append(line)
                        result["started"] = True
        except httpx.HTTPError as e:
            result["error"] = e
        result["lines"] = lines

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def wait_for(cond, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline
        time.sleep(0.02)


@pytest.mark.slow
def test_ready_curl_line_and_sigterm_finishes_in_flight():
    proc, url, curl = start_server("--shutdown-timeout", "20")
    try:
        out = subprocess.run(curl, shell=True, capture_output=True, text=True, timeout=60)
        assert json.loads(out.stdout)["choices"][0]["finish_reason"] in ("stop", "length")
        result: dict = {}
        t = stream_in_thread(url, 40, result)
        wait_for(lambda: result.get("started"), 30)
        proc.send_signal(signal.SIGTERM)
        wait_for(lambda: not _connects(url), 10)  # stopped admitting
        assert proc.wait(timeout=30) == 0
        t.join(10)
        lines = result["lines"]
        assert lines[-1] == "data: [DONE]"
        assert json.loads(lines[-2][6:])["choices"][0]["finish_reason"] == "length"
        assert len(lines) == 40 + 1  # one chunk per token, then [DONE]
    finally:
        proc.kill()


@pytest.mark.slow
def test_sigterm_aborts_past_the_deadline_and_exits_0():
    proc, url, _ = start_server("--shutdown-timeout", "1")
    try:
        result: dict = {}
        t = stream_in_thread(url, 500, result)
        wait_for(lambda: result.get("started"), 30)
        start = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
        assert time.monotonic() - start < 15
        t.join(10)
        assert "data: [DONE]" not in result["lines"]  # cut off, not completed
    finally:
        proc.kill()


def _connects(url: str) -> bool:
    try:
        httpx.get(url + "/health", timeout=2)
        return True
    except httpx.HTTPError:
        return False
