"""`AsyncEngine`: the engine behind an asyncio interface, for web servers.

``generate(prompt, params, request_id=..., priority=, client=, conversation=)``
validates at once (raising ``ValueError``) and returns an async iterator of
streamed `RequestOutput`s; closing the iterator early (a client disconnect)
aborts the request. ``abort(request_id)`` aborts explicitly;
``set_priority(request_id, priority)`` re-ranks a live request (an admin call;
False if no live request has that id). ``stats()`` is the engine's
`EngineStats` as of the last step, snapshotted on the worker thread so readers
on the event loop never see a half-updated engine; ``model`` and
``max_model_len`` are the engine's, and ``embed(token_ids)`` computes an
embedding with its model, on the calling thread beside the engine (`AsyncEngine`
is a `sluice.runtime.frontend.FrontEnd`). All engine calls happen on one
`sluice.runtime.engine_worker.EngineWorker` thread, between steps, in the order
they were made, so the engine itself stays single-threaded and the event loop
never blocks on a model step. A step that raises fails every request then in
the engine (their streams get the error), not the server.
Validation and tokenization (``prepare``) run on a second worker thread, so a
multi-megabyte prompt never holds up the event loop (or the engine's steps).

Each request's outputs wait for their reader in an `OutputStream`: at most
``StreamLimits.max_pending`` of them are kept apart (later ones are merged into
the last: deltas concatenated, cumulative outputs superseded), so an unread
stream holds O(its output), and a reader that leaves an output unread for
longer than ``stall_timeout_s`` is cut off: the request is aborted (its KV
freed), the reader gets `StreamStalled`, and the stream is marked ``stalled``
(the server counts these in its ``sluice:num_streams_stalled`` metric).
``generate(..., delta=True)`` streams delta outputs (`sluice.runtime.outputs`).
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import dataclasses
import itertools
import logging
import time
from typing import Awaitable, Callable

import numpy as np

from sluice.runtime.embed import mean_pooled
from sluice.runtime.engine import EngineStats, LLMEngine, Prompt
from sluice.runtime.engine_worker import EngineWorker
from sluice.runtime.intake import check_priority
from sluice.runtime.loader import Model
from sluice.runtime.health import Health
from sluice.runtime.outputs import DeltaView, RequestFailed, RequestOutput, merge
from sluice.runtime.sampling_params import SamplingParams

log = logging.getLogger(__name__)


class StreamStalled(RuntimeError):
    """The stream's reader left output unread too long; the request was aborted."""


@dataclasses.dataclass
class StreamLimits:
    """Bounds on the output waiting for a stream's reader (module docstring)."""

    max_pending: int = 64  # unread outputs kept apart; later ones are merged into the last
    stall_timeout_s: float | None = 60.0  # None: never cut a reader off
    clock: Callable[[], float] = time.monotonic

    def __post_init__(self) -> None:
        if self.max_pending < 1:
            raise ValueError(f"max_pending: must be >= 1, got {self.max_pending}")
        if self.stall_timeout_s is not None and not self.stall_timeout_s > 0:
            raise ValueError(f"stall_timeout_s: must be > 0, got {self.stall_timeout_s}")


class OutputStream:
    """One request's outputs on their way to its reader: an async iterator up to
    the finished output (an exception put in it is raised to the reader).
    ``put`` is called on the event loop. Closing it early (``aclose``, a client
    disconnect) calls ``abandon()``, which aborts the request."""

    def __init__(self, abandon: Callable[[], Awaitable[None]], limits: StreamLimits,
                 delta: bool = False):
        self._abandon = abandon
        self._limits = limits
        self._delta = DeltaView() if delta else None
        self._pending: collections.deque[tuple[float, RequestOutput | BaseException]] = \
            collections.deque()
        self._ready = asyncio.Event()
        self._ended = False  # the last output (finished, or an error) has been put
        self._read_all = False  # the reader has had the last output, or closed the stream
        self.stalled = False

    def put(self, out: RequestOutput | BaseException) -> None:
        if self._ended:
            return
        now = self._limits.clock()
        timeout = self._limits.stall_timeout_s
        if timeout is not None and self._pending and now - self._pending[0][0] > timeout:
            self._stall(now, timeout)
            return
        if isinstance(out, BaseException):
            self._ended = True
        else:
            if self._delta is not None:
                out = self._delta(out)
            self._ended = out.finished
            tail = self._pending[-1] if self._pending else None
            if len(self._pending) >= self._limits.max_pending:
                self._pending[-1] = (tail[0], merge(tail[1], out))
                return
        self._pending.append((now, out))
        self._ready.set()

    def _stall(self, now: float, timeout: float) -> None:
        self.stalled = self._ended = True
        self._pending.clear()
        self._pending.append((now, StreamStalled(
            f"stream aborted: its reader left output unread for more than {timeout:g} s")))
        self._ready.set()
        log.warning("aborting a stream whose reader left output unread for over %g s", timeout)
        asyncio.ensure_future(self._abandon())

    def __aiter__(self) -> OutputStream:
        return self

    async def __anext__(self) -> RequestOutput:
        if self._read_all:
            raise StopAsyncIteration
        while not self._pending:
            self._ready.clear()
            await self._ready.wait()
        _, out = self._pending.popleft()
        if isinstance(out, BaseException):
            self._read_all = True
            raise out
        self._read_all = out.finished
        return out

    async def aclose(self) -> None:
        if not self._read_all:
            self._read_all = True
            self._pending.clear()
            if not self._ended:
                self._ended = True
                await self._abandon()


class AsyncEngine:
    """One engine behind the asyncio front-end interface (`sluice.runtime.frontend`),
    run on an `EngineWorker` thread."""

    def __init__(self, engine: LLMEngine, stream_limits: StreamLimits | None = None):
        self.engine = engine
        self.stream_limits = stream_limits or StreamLimits()
        self._intake = concurrent.futures.ThreadPoolExecutor(1, "sluice-intake")
        self._streams: dict[str, OutputStream] = {}
        self._loop: asyncio.AbstractEventLoop | None = None  # where outputs are delivered
        self._ids = itertools.count()
        self._worker = EngineWorker(engine, "engine", self._on_outputs,
                                    on_step_error=self._on_step_error,
                                    on_death=self._on_worker_death)

    @property
    def model(self) -> Model:
        return self.engine.model

    @property
    def max_model_len(self) -> int:
        return self.engine.max_model_len

    @property
    def scheduling_policy(self) -> str:
        return self.engine.scheduler.policy.name

    def embed(self, token_ids: list[int]) -> np.ndarray:
        return mean_pooled(self.engine.model, token_ids)

    async def generate(self, prompt: Prompt, params: SamplingParams | None = None,
                       request_id: str | None = None, priority: int = 0,
                       client: str | None = None, conversation: str | None = None,
                       delta: bool = False) -> OutputStream:
        self._loop = asyncio.get_running_loop()
        request_id = request_id or f"req-{next(self._ids)}"
        if request_id in self._streams:
            raise ValueError(f"request_id: {request_id!r} is already in use")
        stream = OutputStream(lambda: self.abort(request_id), self.stream_limits, delta)
        self._streams[request_id] = stream  # holds the id while the prompt is tokenized
        try:
            group = await self._loop.run_in_executor(
                self._intake, self.engine.prepare, request_id, prompt, params, priority, client,
                conversation)
        except BaseException:
            if self._streams.get(request_id) is stream:
                del self._streams[request_id]
            raise
        group.delta_outputs = delta
        if self._streams.get(request_id) is stream:  # not aborted meanwhile
            self._worker.call(lambda engine: engine.enqueue(group))
        return stream

    async def abort(self, request_id: str) -> None:
        """Abort a request; unknown or finished ids are a no-op."""
        if self._streams.pop(request_id, None) is not None:
            self._worker.call(lambda engine: engine.abort_request(request_id))

    async def set_priority(self, request_id: str, priority: int) -> bool:
        """Change a live request's priority from the next step; False (nothing
        changed) if no request with that id is live (a request may finish on the
        worker just before the change lands; then it changes nothing)."""
        check_priority(priority)
        if request_id not in self._streams:
            return False
        self._worker.call(lambda engine: engine.set_priority(request_id, priority))
        return True

    def stats(self) -> EngineStats:
        return self._worker.snapshot

    def health(self) -> Health:
        """Serving unless the engine is dead (`EngineDeadError`: it cannot step)."""
        dead = self.engine.dead
        if dead is None and self._worker.error is not None:
            dead = f"its worker thread died ({type(self._worker.error).__name__}: " \
                   f"{self._worker.error})"
        if dead is None:
            return Health(serving=1)
        return Health(serving=0, dead=1, deaths=1, reason=f"the engine is dead: {dead}")

    # -- on the worker thread -------------------------------------------------

    def _on_outputs(self, outputs: list[RequestOutput]) -> None:
        self._post(self._deliver, outputs)

    def _on_worker_death(self, error: BaseException) -> None:
        """The worker's loop died (not a failed step: something around it): no
        request will advance again, so every open stream ends with the error
        instead of waiting forever, and `health` reports the engine dead."""
        log.error("engine worker died", exc_info=error)
        self._post(self._fail_all, error)

    def _on_step_error(self, engine: LLMEngine, error: Exception) -> None:
        """A failed step fails its requests, not the server: abort them all before
        the next step, and fail their streams."""
        log.error("engine step failed", exc_info=error)
        for request_id in list(engine.groups):
            engine.abort_request(request_id)
        self._post(self._fail_all, error)

    def _post(self, fn: Callable[..., None], *args) -> None:
        loop = self._loop
        if loop is None:
            return
        try:
            loop.call_soon_threadsafe(fn, *args)
        except RuntimeError:  # that event loop has closed: nobody is left to read
            pass

    # -- on the event loop ----------------------------------------------------

    def _deliver(self, outputs: list[RequestOutput]) -> None:
        for out in outputs:
            stream = self._streams.get(out.request_id)
            if stream is not None:
                stream.put(RequestFailed(out.error) if out.error is not None else out)
                if out.finished:
                    del self._streams[out.request_id]

    def _fail_all(self, error: Exception, prefix: str = "engine step failed: ") -> None:
        for rid, stream in list(self._streams.items()):
            stream.put(RuntimeError(f"{prefix}{error}"))
            self._worker.call(lambda engine, rid=rid: engine.abort_request(rid))
        self._streams.clear()

    async def shutdown(self) -> None:
        self._worker.stop()
        self._intake.shutdown(wait=True, cancel_futures=True)
        self._fail_all(RuntimeError("the engine shut down"), prefix="")
