"""`AsyncEngine`: the engine behind an asyncio interface, for web servers.

``generate(prompt, params, request_id=..., priority=, client=, conversation=)``
validates at once (raising ``ValueError``) and returns an async iterator of
streamed `RequestOutput`s; closing the iterator early (a client disconnect)
aborts the request. ``abort(request_id)`` aborts explicitly;
``set_priority(request_id, priority)`` re-ranks a live request (an admin call;
False if no live request has that id). ``stats()`` is the engine's
`EngineStats` as of the last step, snapshotted on the worker thread so readers
on the event loop never see a half-updated engine. All engine calls happen on
one worker thread, between steps, in the order they were made, so the engine
itself stays single-threaded and the event loop never blocks on a model step.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import itertools
import logging
from typing import AsyncIterator, Awaitable, Callable

from sluice.runtime.engine import EngineStats, LLMEngine, Prompt
from sluice.runtime.intake import check_priority
from sluice.runtime.outputs import RequestOutput
from sluice.runtime.sampling_params import SamplingParams

log = logging.getLogger(__name__)


async def stream_outputs(queue: asyncio.Queue,
                         abandon: Callable[[], Awaitable[None]]) -> AsyncIterator[RequestOutput]:
    """Yield a request's outputs from ``queue`` up to the finished one (an
    exception put in the queue is raised); a consumer that stops early (a client
    disconnect) triggers ``abandon()``, which aborts the request."""
    finished = False
    try:
        while not finished:
            out = await queue.get()
            if isinstance(out, BaseException):
                raise out
            finished = out.finished
            yield out
    finally:
        if not finished:
            await abandon()


class AsyncEngine:
    def __init__(self, engine: LLMEngine):
        self.engine = engine
        self._executor = concurrent.futures.ThreadPoolExecutor(1, "sluice-engine")
        self._streams: dict[str, asyncio.Queue] = {}
        # Engine calls in the order they were made (add, abort, re-rank): filled on the
        # event loop, drained on the worker between steps (deques are thread-safe).
        self._calls: collections.deque[Callable[[LLMEngine], None]] = collections.deque()
        self._wakeup: asyncio.Event | None = None
        self._loop_task: asyncio.Task | None = None
        self._ids = itertools.count()
        self._stats = engine.stats()

    async def generate(self, prompt: Prompt, params: SamplingParams | None = None,
                       request_id: str | None = None, priority: int = 0,
                       client: str | None = None,
                       conversation: str | None = None) -> AsyncIterator[RequestOutput]:
        request_id = request_id or f"req-{next(self._ids)}"
        if request_id in self._streams:
            raise ValueError(f"request_id: {request_id!r} is already in use")
        group = self.engine.prepare(request_id, prompt, params, priority, client, conversation)
        queue: asyncio.Queue = asyncio.Queue()
        self._streams[request_id] = queue
        self._calls.append(lambda engine: engine.enqueue(group))
        self._ensure_loop()
        return stream_outputs(queue, lambda: self.abort(request_id))

    async def abort(self, request_id: str) -> None:
        """Abort a request; unknown or finished ids are a no-op."""
        if self._streams.pop(request_id, None) is not None:
            self._calls.append(lambda engine: engine.abort_request(request_id))
            self._ensure_loop()

    async def set_priority(self, request_id: str, priority: int) -> bool:
        """Change a live request's priority from the next step; False (nothing
        changed) if no request with that id is live (a request may finish on the
        worker just before the change lands; then it changes nothing)."""
        check_priority(priority)
        if request_id not in self._streams:
            return False
        self._calls.append(lambda engine: engine.set_priority(request_id, priority))
        self._ensure_loop()
        return True

    def _ensure_loop(self) -> None:
        if self._loop_task is None or self._loop_task.done():
            self._wakeup = asyncio.Event()
            self._loop_task = asyncio.get_running_loop().create_task(self._run())
        self._wakeup.set()

    def _apply_pending(self) -> None:
        while self._calls:
            self._calls.popleft()(self.engine)

    def stats(self) -> EngineStats:
        return self._stats

    def _step(self) -> list[RequestOutput]:
        self._apply_pending()
        outputs = self.engine.step() if self.engine.has_unfinished_requests() else []
        self._stats = self.engine.stats()
        return outputs

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not (self._calls or self.engine.has_unfinished_requests()):
                self._wakeup.clear()
                await self._wakeup.wait()
            try:
                outputs = await loop.run_in_executor(self._executor, self._step)
            except Exception as e:  # a failed step fails its requests, not the server
                log.exception("engine step failed")
                self._fail_all(e)
                continue
            for out in outputs:
                queue = self._streams.get(out.request_id)
                if queue is not None:
                    queue.put_nowait(out)
                    if out.finished:
                        del self._streams[out.request_id]

    def _fail_all(self, error: Exception) -> None:
        for rid, queue in list(self._streams.items()):
            queue.put_nowait(RuntimeError(f"engine step failed: {error}"))
            self._calls.append(lambda engine, rid=rid: engine.abort_request(rid))
        self._streams.clear()

    async def shutdown(self) -> None:
        if self._loop_task is not None:
            self._loop_task.cancel()
        self._executor.shutdown(wait=True, cancel_futures=True)
