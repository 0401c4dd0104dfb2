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
  side), with the meanings of `sluice.runtime.migration.MigrationEndpoint`.
  `MigrationForwarder` implements them all over one
  ``migration_call(method, *args)``, which is all an instance provides;
- ``embed(token_ids) -> np.ndarray``: the embedding of one validated token
  sequence (`sluice.runtime.embed.mean_pooled`), computed where the instance's
  weights are, beside its engine (not between its steps); blocks. An instance
  that dies before answering raises `InstanceDied`, so the caller may ask another;
- ``draining`` (settable): a draining instance takes no new requests;
- ``alive``, ``stop()``.

`LocalInstance` runs its engine on a `sluice.runtime.engine_worker.EngineWorker`
(the same worker `AsyncEngine` uses). Outputs flow out through the
``on_outputs(name, outputs)`` callback; a dead engine (an exception out of its
step) is reported once through ``on_death(name, error)``, and every pending call
fails with that error. Its embeddings run on the calling thread, on the engine's
model unless it is given another (``embed_model``: a local cluster's instances
share the server's model, whose embedding programs the server warmed up once).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import threading
from collections.abc import Callable
from typing import Any, Protocol

import numpy as np

from sluice.runtime.embed import mean_pooled
from sluice.runtime.engine import EngineStats, LLMEngine
from sluice.runtime.engine_worker import EngineWorker
from sluice.runtime.intake import Group
from sluice.runtime.kv_manager import blocks_to_start
from sluice.runtime.loader import Model
from sluice.runtime.migration import Epoch, Handover, KVChunk
from sluice.runtime.outputs import RequestOutput

OutputSink = Callable[[str, list[RequestOutput]], None]
DeathSink = Callable[[str, BaseException], None]


class InstanceDied(RuntimeError):
    """The instance a call went to died before answering (its process is gone):
    nothing of the call is left there, so it may be made on another instance."""


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
    scheduling_policy: str | None = None  # the engine's policy (`Policy.name`)

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
    def embed(self, token_ids: list[int]) -> np.ndarray: ...
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


MIGRATION_CALLS = ("epoch", "export_kv", "suspend", "release", "resume", "import_kv",
                   "adopt", "cancel")  # `MigrationEndpoint` methods an instance forwards


class MigrationForwarder:
    """The `Instance` migration calls, each forwarded to the instance's one
    ``migration_call(method, *args) -> Future``, which runs
    ``engine.migration.<method>(*args)`` between two steps wherever the engine is."""

    def migration_call(self, method: str, *args: Any) -> concurrent.futures.Future:
        raise NotImplementedError

    def epoch(self, request_id: str) -> concurrent.futures.Future:
        return self.migration_call("epoch", request_id)

    def export_kv(self, request_id: str, first_blocks: dict[str, int],
                  epoch: Epoch) -> concurrent.futures.Future:
        return self.migration_call("export_kv", request_id, first_blocks, epoch)

    def suspend(self, request_id: str, first_blocks: dict[str, int],
                epoch: Epoch) -> concurrent.futures.Future:
        return self.migration_call("suspend", request_id, first_blocks, epoch)

    def release(self, request_id: str) -> concurrent.futures.Future:
        return self.migration_call("release", request_id)

    def resume(self, request_id: str) -> concurrent.futures.Future:
        return self.migration_call("resume", request_id)

    def import_kv(self, request_id: str, chunks: list[KVChunk]) -> concurrent.futures.Future:
        return self.migration_call("import_kv", request_id, chunks)

    def adopt(self, handover: Handover) -> concurrent.futures.Future:
        return self.migration_call("adopt", handover)

    def cancel(self, request_id: str) -> concurrent.futures.Future:
        return self.migration_call("cancel", request_id)


def load_report(name: str, engine: LLMEngine, draining: bool, pending: int = 0) -> LoadReport:
    """An engine's load; ``pending`` = blocks of groups submitted but not yet enqueued."""
    bm, sched = engine.block_manager, engine.scheduler
    bs = bm.block_size
    demand = pending + sched.demand_blocks
    high = sum(r.priority < 0 for r in sched.waiting + sched.running)
    candidates = tuple(engine.migration.migratable())
    return LoadReport(name, bm.num_blocks, bm.num_free_blocks, sched.num_running,
                      sched.num_waiting, demand, high, draining, True, bs, candidates,
                      engine.stats(), sched.policy.name)


def group_demand(group: Group, block_size: int) -> int:
    """Blocks a group needs to start (its prompts plus one generated token)."""
    return blocks_to_start(group.requests, block_size)


class LocalInstance(MigrationForwarder):
    """An engine on its own `EngineWorker` thread; calls are queued and run between steps."""

    def __init__(self, name: str, engine: LLMEngine, on_outputs: OutputSink,
                 on_death: DeathSink | None = None, embed_model: Model | None = None):
        self.name = name
        self.engine = engine
        self.embed_model = engine.model if embed_model is None else embed_model
        self.draining = False
        self._pending_blocks = 0
        self._lock = threading.Lock()
        self._on_death = on_death
        self._worker = EngineWorker(engine, name, lambda outs: on_outputs(name, outs),
                                    snapshot=lambda e: load_report(name, e, False),
                                    on_death=self._died)

    @property
    def alive(self) -> bool:
        return self._worker.alive

    # -- requests -------------------------------------------------------------

    def submit(self, group: Group) -> None:
        demand = group_demand(group, self.engine.block_manager.block_size)
        with self._lock:
            self._pending_blocks += demand

        def enqueue(engine: LLMEngine) -> None:
            with self._lock:
                self._pending_blocks -= demand
            engine.enqueue(group)
        self._worker.call(enqueue)

    def abort(self, request_id: str) -> None:
        self._worker.call(lambda e: e.abort_request(request_id))

    def set_priority(self, request_id: str, priority: int) -> None:
        self._worker.call(lambda e: e.set_priority(request_id, priority))

    def embed(self, token_ids: list[int]) -> np.ndarray:
        """The embedding of ``token_ids`` with `embed_model`, on the calling thread."""
        return mean_pooled(self.embed_model, token_ids)

    def report(self) -> LoadReport:
        r = self._worker.snapshot
        with self._lock:
            pending = self._pending_blocks
        return dataclasses.replace(r, demand_blocks=r.demand_blocks + pending,
                                   draining=self.draining, alive=self.alive)

    # -- migration ------------------------------------------------------------

    def migration_call(self, method: str, *args: Any) -> concurrent.futures.Future:
        """``engine.migration.<method>(*args)`` between two steps (`MIGRATION_CALLS`)."""
        if method not in MIGRATION_CALLS:
            raise ValueError(f"method: {method!r} is not a migration call")
        return self._worker.call(lambda e: getattr(e.migration, method)(*args))

    # -- lifecycle ------------------------------------------------------------

    def kill(self) -> None:
        """Make the engine loop fail as a crashed actor would (tests, benchmarks)."""
        self._worker.kill()

    def stop(self) -> None:
        """Stop the loop (idempotent); requests still here are dropped."""
        self._worker.stop()

    def _died(self, error: BaseException) -> None:
        if self._on_death is not None:
            self._on_death(self.name, error)
