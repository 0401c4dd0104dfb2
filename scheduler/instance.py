"""Instances: one engine each, behind the narrow interface the global scheduler
(`sluice.scheduler.cluster`) uses, whether the engine runs on a thread in this
process (`LocalInstance`, one per JAX device) or in a Ray actor
(`sluice.scheduler.ray_instance`).

Interface (`Instance`):

- ``submit(group)``, ``abort(request_id)``, ``set_priority(request_id, p)``;
- ``report() -> LoadReport``: the load as of the last step (never blocks);
- migration calls, each returning a `concurrent.futures.Future` and run between
  two engine steps: ``epoch``, ``export_kv``, ``suspend``, ``release``,
  ``resume`` (source side) and ``import_kv``, ``adopt``, ``cancel`` (destination
  side), with the meanings of `sluice.runtime.migration.MigrationEndpoint`;
- ``draining`` (settable): a draining instance takes no new requests;
- ``alive``, ``stop()``.

Outputs flow out through the ``on_outputs(name, outputs)`` callback; a dead
engine (an exception out of its step) is reported once through
``on_death(name, error)``, and every pending call fails with that error.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import threading
from collections.abc import Callable
from typing import Any, Protocol

from sluice.runtime.engine import EngineStats, LLMEngine
from sluice.runtime.intake import Group
from sluice.runtime.migration import Epoch, Handover, KVChunk
from sluice.runtime.outputs import RequestOutput

OutputSink = Callable[[str, list[RequestOutput]], None]
DeathSink = Callable[[str, BaseException], None]


@dataclasses.dataclass(frozen=True)
class LoadReport:
    """What the global scheduler knows about an instance."""

    name: str
    num_blocks: int
    num_free_blocks: int
    num_running: int
    num_waiting: int
    demand_blocks: int  # blocks the waiting (and just submitted) requests need to start
    num_high_priority: int  # running or waiting requests with priority < 0
    draining: bool
    alive: bool
    block_size: int
    # Requests that could migrate now, in admission order: (request id, tokens).
    candidates: tuple[tuple[str, int], ...] = ()
    stats: EngineStats | None = None  # the engine's own counters (for metrics)

    @property
    def num_requests(self) -> int:
        return self.num_running + self.num_waiting


class Instance(Protocol):
    name: str
    draining: bool

    @property
    def alive(self) -> bool: ...
    def submit(self, group: Group) -> None: ...
    def abort(self, request_id: str) -> None: ...
    def set_priority(self, request_id: str, priority: int) -> None: ...
    def report(self) -> LoadReport: ...
    def epoch(self, request_id: str) -> concurrent.futures.Future: ...
    def export_kv(self, request_id: str, first_blocks: dict[str, int],
                  epoch: Epoch) -> concurrent.futures.Future: ...
    def suspend(self, request_id: str, first_blocks: dict[str, int],
                epoch: Epoch) -> concurrent.futures.Future: ...
    def release(self, request_id: str) -> concurrent.futures.Future: ...
    def resume(self, request_id: str) -> concurrent.futures.Future: ...
    def import_kv(self, request_id: str,
                  chunks: list[KVChunk]) -> concurrent.futures.Future: ...
    def adopt(self, handover: Handover) -> concurrent.futures.Future: ...
    def cancel(self, request_id: str) -> concurrent.futures.Future: ...
    def stop(self) -> None: ...


class InstanceKilled(Exception):
    """Raised inside an instance's loop by `LocalInstance.kill` (failure injection)."""


def load_report(name: str, engine: LLMEngine, draining: bool, pending: int = 0) -> LoadReport:
    """An engine's load; ``pending`` = blocks of groups submitted but not yet enqueued."""
    bm, sched = engine.block_manager, engine.scheduler
    bs = bm.block_size
    demand = pending + _blocks_to_start(sched.waiting, bs)
    high = sum(r.priority < 0 for r in sched.waiting + sched.running)
    candidates = tuple(engine.migration.migratable())
    return LoadReport(name, bm.num_blocks, bm.num_free_blocks, sched.num_running,
                      sched.num_waiting, demand, high, draining, True, bs, candidates,
                      engine.stats())


def group_demand(group: Group, block_size: int) -> int:
    """Blocks a group needs to start (its prompts plus one generated token)."""
    return _blocks_to_start(group.requests, block_size)


def _blocks_to_start(requests, block_size: int) -> int:
    return sum(-(-(r.num_tokens + 1) // block_size) for r in requests)


class LocalInstance:
    """An engine on its own thread; calls are queued and run between steps."""

    def __init__(self, name: str, engine: LLMEngine, on_outputs: OutputSink,
                 on_death: DeathSink | None = None):
        self.name = name
        self.engine = engine
        self.draining = False
        self._on_outputs = on_outputs
        self._on_death = on_death
        self._calls: collections.deque[tuple[Callable[[LLMEngine], Any],
                                             concurrent.futures.Future]] = collections.deque()
        self._pending_blocks = 0
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stopping = False
        self._error: BaseException | None = None
        self._report = load_report(name, engine, False)
        self._thread = threading.Thread(target=self._loop, name=f"sluice-{name}", daemon=True)
        self._thread.start()

    @property
    def alive(self) -> bool:
        return self._error is None and not self._stopping

    # -- requests -------------------------------------------------------------

    def submit(self, group: Group) -> None:
        demand = group_demand(group, self.engine.block_manager.block_size)
        with self._lock:
            self._pending_blocks += demand

        def enqueue(engine: LLMEngine) -> None:
            with self._lock:
                self._pending_blocks -= demand
            engine.enqueue(group)
        self._call(enqueue)

    def abort(self, request_id: str) -> None:
        self._call(lambda e: e.abort_request(request_id))

    def set_priority(self, request_id: str, priority: int) -> None:
        self._call(lambda e: e.set_priority(request_id, priority))

    def report(self) -> LoadReport:
        r = self._report
        with self._lock:
            pending = self._pending_blocks
        return dataclasses.replace(r, demand_blocks=r.demand_blocks + pending,
                                   draining=self.draining, alive=self.alive)

    # -- migration ------------------------------------------------------------

    def epoch(self, request_id: str) -> concurrent.futures.Future:
        return self._call(lambda e: e.migration.epoch(request_id))

    def export_kv(self, request_id: str, first_blocks: dict[str, int],
                  epoch: Epoch) -> concurrent.futures.Future:
        return self._call(lambda e: e.migration.export_kv(request_id, first_blocks, epoch))

    def suspend(self, request_id: str, first_blocks: dict[str, int],
                epoch: Epoch) -> concurrent.futures.Future:
        return self._call(lambda e: e.migration.suspend(request_id, first_blocks, epoch))

    def release(self, request_id: str) -> concurrent.futures.Future:
        return self._call(lambda e: e.migration.release(request_id))

    def resume(self, request_id: str) -> concurrent.futures.Future:
        return self._call(lambda e: e.migration.resume(request_id))

    def import_kv(self, request_id: str, chunks: list[KVChunk]) -> concurrent.futures.Future:
        return self._call(lambda e: e.migration.import_kv(request_id, chunks))

    def adopt(self, handover: Handover) -> concurrent.futures.Future:
        return self._call(lambda e: e.migration.adopt(handover))

    def cancel(self, request_id: str) -> concurrent.futures.Future:
        return self._call(lambda e: e.migration.cancel(request_id))

    # -- lifecycle ------------------------------------------------------------

    def kill(self) -> None:
        """Make the engine loop fail as a crashed actor would (tests, benchmarks)."""
        def die(engine: LLMEngine) -> None:
            raise InstanceKilled(f"instance {self.name} killed")
        self._call(die)

    def stop(self) -> None:
        """Stop the loop (idempotent); requests still here are dropped."""
        self._stopping = True
        self._wake.set()
        if threading.current_thread() is not self._thread:  # a death handler may stop it
            self._thread.join()

    def _call(self, fn: Callable[[LLMEngine], Any]) -> concurrent.futures.Future:
        future: concurrent.futures.Future = concurrent.futures.Future()
        with self._lock:  # against `_die` draining the queue concurrently
            if self._error is not None:
                future.set_exception(self._error)
                return future
            self._calls.append((fn, future))
        self._wake.set()
        return future

    def _loop(self) -> None:
        try:
            while not self._stopping:
                self._run_calls()
                if self.engine.has_unfinished_requests():
                    outputs = self.engine.step()
                    self._report = load_report(self.name, self.engine, self.draining)
                    if outputs:
                        self._on_outputs(self.name, outputs)
                else:
                    self._report = load_report(self.name, self.engine, self.draining)
                    self._wake.wait(0.05)
                    self._wake.clear()
        except BaseException as error:  # the instance is dead; the cluster re-dispatches
            self._die(error)

    def _run_calls(self) -> None:
        while self._calls:
            fn, future = self._calls.popleft()
            try:
                result = fn(self.engine)
            except InstanceKilled:
                future.set_result(None)
                raise
            except Exception as error:  # a failed call fails its caller, not the engine
                future.set_exception(error)
            else:
                future.set_result(result)

    def _die(self, error: BaseException) -> None:
        with self._lock:
            self._error = error
            calls, self._calls = list(self._calls), collections.deque()
        for _, future in calls:
            future.set_exception(error)
        if self._on_death is not None:
            self._on_death(self.name, error)
