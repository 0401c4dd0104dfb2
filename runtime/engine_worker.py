"""`EngineWorker`: one `LLMEngine` on a thread of its own, driven by a call queue.

Both front ends that run an engine off their caller's thread use it: `AsyncEngine`
(the asyncio front end of one engine) and `sluice.scheduler.instance.LocalInstance`
(one engine under the global scheduler). The engine itself stays single-threaded:
every call into it runs on the worker thread, between two steps, in the order the
calls were made.

Interface:

- ``EngineWorker(engine, name, on_outputs, snapshot=..., on_step_error=None,
  on_death=None)`` starts the thread;
- ``call(fn) -> Future``: run ``fn(engine)`` between steps; its result or exception
  goes to the future (a failing call fails its caller, not the engine);
- ``snapshot``: ``snapshot(engine)`` as of the last step (or the last idle moment),
  taken on the worker thread, so readers on other threads never see a half-updated
  engine;
- ``kill()``: make the loop fail as a crashed engine would (failure injection);
- ``alive``, ``error``, ``num_pending`` (calls not yet run), ``stop()`` (idempotent; pending calls are dropped).

After each step that produced outputs, ``on_outputs(outputs)`` is called on the
worker thread. A step that raises goes to ``on_step_error(engine, error)`` when
given (still on the worker thread, before the next step: it may abort requests),
and the worker keeps serving; without it the worker dies: ``on_death(error)`` is
called once, and every pending and later call fails with that error.
"""

from __future__ import annotations

import collections
import concurrent.futures
import threading
from collections.abc import Callable
from typing import Any, Generic, TypeVar

from sluice.runtime.engine import LLMEngine
from sluice.runtime.outputs import RequestOutput

T = TypeVar("T")


class WorkerKilled(Exception):
    """Raised inside a worker's loop by `EngineWorker.kill` (failure injection)."""


class WorkerStopped(RuntimeError):
    """A call made to (or pending in) a worker that has been stopped."""


class EngineWorker(Generic[T]):
    def __init__(self, engine: LLMEngine, name: str,
                 on_outputs: Callable[[list[RequestOutput]], None],
                 snapshot: Callable[[LLMEngine], T] = LLMEngine.stats,
                 on_step_error: Callable[[LLMEngine, Exception], None] | None = None,
                 on_death: Callable[[BaseException], None] | None = None):
        self.engine = engine
        self.name = name
        self._on_outputs = on_outputs
        self._take_snapshot = snapshot
        self._on_step_error = on_step_error
        self._on_death = on_death
        self._calls: collections.deque[tuple[Callable[[LLMEngine], Any],
                                             concurrent.futures.Future]] = collections.deque()
        self._lock = threading.Lock()  # `call` against `_die` draining the queue
        self._wake = threading.Event()
        self._stopping = False
        self.error: BaseException | None = None  # what killed the loop, if anything
        self.snapshot: T = snapshot(engine)
        self._thread = threading.Thread(target=self._loop, name=f"sluice-{name}", daemon=True)
        self._thread.start()

    @property
    def alive(self) -> bool:
        return self.error is None and not self._stopping

    @property
    def num_pending(self) -> int:
        """Calls made and not yet run."""
        return len(self._calls)

    def call(self, fn: Callable[[LLMEngine], Any]) -> concurrent.futures.Future:
        """Run ``fn(engine)`` on the worker between two steps."""
        future: concurrent.futures.Future = concurrent.futures.Future()
        with self._lock:
            if self.error is not None:
                future.set_exception(self.error)
                return future
            if self._stopping:
                future.set_exception(WorkerStopped(f"engine worker {self.name} is stopped"))
                return future
            self._calls.append((fn, future))
        self._wake.set()
        return future

    def kill(self) -> None:
        """Make the loop fail as a crashed engine would (tests, benchmarks)."""
        def die(engine: LLMEngine) -> None:
            raise WorkerKilled(f"{self.name} killed")
        self.call(die)

    def stop(self) -> None:
        """Stop the loop (idempotent) and wait for it, unless called from the
        worker thread itself (a death handler may stop it); pending calls fail
        with `WorkerStopped`."""
        with self._lock:
            self._stopping = True
            calls, self._calls = list(self._calls), collections.deque()
        self._wake.set()
        if threading.current_thread() is not self._thread:
            self._thread.join()
        for _, future in calls:
            future.set_exception(WorkerStopped(f"engine worker {self.name} is stopped"))

    def _loop(self) -> None:
        try:
            while not self._stopping:
                self._run_calls()
                if self._stopping:
                    break
                if self.engine.has_unfinished_requests():
                    self._step()
                else:
                    self.snapshot = self._take_snapshot(self.engine)
                    self._wake.wait()
                    self._wake.clear()
        except BaseException as error:  # the worker is dead; its owner re-dispatches
            self._die(error)

    def _step(self) -> None:
        try:
            outputs = self.engine.step()
        except Exception as error:
            if self._on_step_error is None:
                raise
            self._on_step_error(self.engine, error)
            outputs = []
        self.snapshot = self._take_snapshot(self.engine)
        if outputs:
            self._on_outputs(outputs)

    def _run_calls(self) -> None:
        while True:
            with self._lock:
                if not self._calls:
                    return
                fn, future = self._calls.popleft()
            try:
                result = fn(self.engine)
            except WorkerKilled:
                future.set_result(None)
                raise
            except Exception as error:  # a failed call fails its caller, not the engine
                future.set_exception(error)
            else:
                future.set_result(result)

    def _die(self, error: BaseException) -> None:
        with self._lock:
            self.error = error
            calls, self._calls = list(self._calls), collections.deque()
        for _, future in calls:
            future.set_exception(error)
        if self._on_death is not None:
            self._on_death(error)
