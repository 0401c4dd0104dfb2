"""Output on its way to a reader: delta outputs carry only what each step adds
(and add up to the cumulative output exactly), an unread stream holds a bounded
number of outputs, and a reader that leaves output unread too long (an injected
clock) is cut off: the request is aborted, its KV freed, the stream ends with an
error event and ``[DONE]``, and ``sluice:num_streams_stalled`` counts it."""

from __future__ import annotations

import asyncio
import json

import pytest

from sluice.runtime import SamplingParams, greedy_generate
from sluice.runtime.async_engine import AsyncEngine, StreamLimits, StreamStalled
from sluice.runtime.engine import EngineConfig, LLMEngine
from sluice.runtime.outputs import accumulate
from sluice.runtime.server import OpenAIServer, ServerConfig


def make_engine(model) -> LLMEngine:
    return LLMEngine(model, EngineConfig(warmup=False, max_model_len=256))


class Clock:
    """Each reading is one second after the previous one: the streams read the
    clock once per output put, so "seconds" count the engine's outputs."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        self.now += 1.0
        return self.now


async def until(cond, what: str) -> None:
    for _ in range(3000):  # polls the engine's progress; only a hang runs out
        if cond():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"timed out waiting for {what}")


def test_delta_outputs_hold_only_new_tokens_and_add_up_exactly(tiny):
    engine = make_engine(tiny)
    params = SamplingParams(n=2, max_tokens=24, temperature=1.0, seed=7, logprobs=2,
                            ignore_eos=True)
    engine.add_request("whole", "same prompt", params)
    group = engine.prepare("delta", "same prompt", params)
    group.delta_outputs = True
    engine.enqueue(group)
    whole, acc, deltas = None, None, []
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.request_id == "whole":
                whole = out
            else:
                deltas.append(out)
                acc = accumulate(acc, out)
    assert all(d.delta for d in deltas)
    assert all(len(c.token_ids) <= 1 and len(m.token_times) == len(c.token_ids)
               for d in deltas for c, m in zip(d.outputs, d.metrics))  # never the history
    assert acc.finished and whole.finished
    for a, w, am, wm in zip(acc.outputs, whole.outputs, acc.metrics, whole.metrics):
        assert (a.token_ids, a.text, a.finish_reason) == (w.token_ids, w.text, w.finish_reason)
        assert [lp.token_id for lp in a.logprobs] == a.token_ids == \
            [lp.token_id for lp in w.logprobs]
        assert len(am.token_times) == len(wm.token_times) == 24
    assert acc.prompt_token_ids == whole.prompt_token_ids


def test_unread_stream_is_bounded_and_a_stalled_reader_is_cut_off(tiny):
    engine = make_engine(tiny)
    limits = StreamLimits(max_pending=4, stall_timeout_s=None, clock=Clock())
    aeng = AsyncEngine(engine, limits)
    params = SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True)

    async def main():
        # Never read until finished: at most 4 outputs held, together the whole output.
        stream = await aeng.generate({"prompt_token_ids": [5, 6, 7]}, params, delta=True)
        await until(lambda: stream._ended, "the finished output")
        assert len(stream._pending) <= 4
        acc = None
        async for out in stream:
            acc = accumulate(acc, out)
        assert acc.finished and acc.outputs[0].token_ids == greedy_generate(
            tiny, [5, 6, 7], 40, stop_at_eos=False)
        # A reader that leaves output unread longer than the limit (10 outputs'
        # "seconds") is cut off, long before the request could finish.
        limits.stall_timeout_s = 10.0
        free = engine.block_manager.num_free_blocks
        stream = await aeng.generate({"prompt_token_ids": [8, 9]},
                                     SamplingParams(max_tokens=200, temperature=0.0,
                                                    ignore_eos=True), delta=True)
        await until(lambda: stream.stalled, "the stall")
        await until(lambda: not engine.groups and engine.block_manager.num_free_blocks == free,
                    "the abort")
        with pytest.raises(StreamStalled, match="unread"):
            async for _ in stream:
                pass
        assert engine.block_manager.num_free_blocks == free
        await aeng.shutdown()

    asyncio.run(main())


def test_stalled_http_stream_ends_with_an_error_event_and_is_counted(tiny):
    """A client that stops reading a stream (its ``send`` blocks): the output
    waits, bounded, in the engine's stream; once the oldest has waited past the
    limit the request is aborted, and when the client reads again it gets an
    error event, then ``[DONE]``."""
    engine = make_engine(tiny)
    front = AsyncEngine(engine, StreamLimits(max_pending=8, stall_timeout_s=20.0,
                                             clock=Clock()))
    server = OpenAIServer(front, ServerConfig("tiny"))
    body = json.dumps({"prompt": "slow reader", "stream": True, "max_tokens": 200,
                       "ignore_eos": True, "temperature": 0}).encode()

    async def main():
        received, chunks = False, []
        gone, reading = asyncio.Event(), asyncio.Event()

        async def receive():
            nonlocal received
            if not received:
                received = True
                return {"type": "http.request", "body": body, "more_body": False}
            await gone.wait()
            return {"type": "http.disconnect"}

        async def send(message):
            if message["type"] == "http.response.body" and message["body"]:
                chunks.append(message["body"])
                if len(chunks) == 2:
                    await reading.wait()  # the client stops reading here

        scope = {"type": "http", "method": "POST", "path": "/v1/completions",
                 "raw_path": b"/v1/completions", "query_string": b"", "root_path": "",
                 "headers": [(b"content-type", b"application/json")], "scheme": "http",
                 "http_version": "1.1", "server": ("127.0.0.1", 80),
                 "client": ("127.0.0.1", 1)}
        call = asyncio.ensure_future(server.app(scope, receive, send))
        await until(lambda: len(chunks) == 2, "the client to stop reading")
        await until(lambda: not front._streams and not engine.has_unfinished_requests()
                    and not front._worker.num_pending, "the abort")
        reading.set()
        await call
        gone.set()
        events = b"".join(chunks).decode().split("\n\n")
        events = [e for e in events if e]
        assert events[-1] == "data: [DONE]"
        err = json.loads(events[-2][len("data: "):])["error"]
        assert err["code"] == "stream_stalled" and "unread" in err["message"]
        assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks
        assert server.num_waiting == 0
        metrics = server.metrics.render(front.stats()).decode()
        assert 'sluice:num_streams_stalled_total{model_name="tiny"} 1.0' in metrics
        await front.shutdown()

    asyncio.run(main())


def test_a_dead_worker_ends_every_stream_and_reports_unhealthy(tiny):
    """If the worker's loop itself dies (not a failed step, which fails only its
    requests), no request can advance again: open streams end with the error
    instead of waiting forever, and health says the engine is dead."""
    engine = make_engine(tiny)
    aeng = AsyncEngine(engine)
    params = SamplingParams(max_tokens=400, temperature=0.0, ignore_eos=True)

    def broken() -> bool:
        raise RuntimeError("the loop broke")

    async def main():
        stream = await aeng.generate({"prompt_token_ids": [5, 6, 7]}, params, delta=True)
        assert aeng.health().serving == 1
        engine.has_unfinished_requests = broken  # the loop's next turn raises
        with pytest.raises(RuntimeError, match="the loop broke"):
            async for _ in stream:
                pass
        health = aeng.health()
        assert health.serving == 0 and "worker thread died" in health.reason
        await aeng.shutdown()

    asyncio.run(main())
