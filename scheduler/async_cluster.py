"""`AsyncCluster`: a `Cluster` behind the asyncio interface of `AsyncEngine`, so
the HTTP server serves many instances exactly as it serves one.

``generate(prompt, params, request_id=..., priority=..., client=..., delta=...)``
validates at once (``ValueError``) and returns an async iterator of
`RequestOutput`s (closing it early aborts the request); ``abort``,
``set_priority``, ``stats``
(the instances' engine stats summed) and ``shutdown`` as in `AsyncEngine`.
``embed(token_ids)`` runs on an instance (`Instance.embed`: the least loaded
open one; the next if it dies first), so a Ray cluster's driver, which holds
no weights, never loads them for an embedding. It implements
`sluice.runtime.frontend.FrontEnd` (``model`` and ``max_model_len`` are the
cluster intake's).

`local_cluster` builds one from a model: ``n`` instances, one per JAX device
(round-robin when there are fewer devices; on CPU,
``XLA_FLAGS=--xla_force_host_platform_device_count=N`` gives N devices).
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
from typing import AsyncIterator

import jax
import numpy as np

from sluice.runtime import compiles
from sluice.runtime.async_engine import OutputStream, StreamLimits
from sluice.runtime.engine import EngineConfig, EngineStats, LLMEngine, Prompt, make_intake
from sluice.runtime.loader import Model
from sluice.runtime.health import Health
from sluice.runtime.outputs import RequestOutput
from sluice.runtime.sampling_params import SamplingParams
from sluice.scheduler.cluster import Cluster, ClusterConfig
from sluice.scheduler.instance import (DeathSink, Instance, InstanceDied, LocalInstance,
                                       OutputSink)


class LocalLauncher:
    """Starts `LocalInstance`s on this process's devices (the cluster's scaling actuator)."""

    def __init__(self, model: Model, config: EngineConfig):
        self.model = model
        self.config = config
        self._count = itertools.count()

    def launch(self, on_outputs: OutputSink, on_death: DeathSink) -> LocalInstance:
        i = next(self._count)
        devices = jax.devices()
        config = dataclasses.replace(self.config, device=devices[i % len(devices)])
        with compiles.warming_up():  # an instance's start-up is warm-up, whenever it runs
            engine = LLMEngine(self.model, config)
        # Embeddings run on the shared model (on the default device), whose programs
        # the server warmed up once, not on the engine's copy on its own device.
        return LocalInstance(f"instance-{i}", engine, on_outputs, on_death,
                             embed_model=self.model)

    def terminate(self, instance: LocalInstance) -> None:
        instance.stop()


def local_cluster(model: Model, engine_config: EngineConfig, num_instances: int,
                  cluster_config: ClusterConfig | None = None) -> Cluster:
    """``num_instances`` engines on this process's devices under one `Cluster`."""
    if num_instances < 1:
        raise ValueError(f"instances: must be >= 1, got {num_instances}")
    launcher = LocalLauncher(model, engine_config)
    return Cluster(lambda out, death: [launcher.launch(out, death) for _ in range(num_instances)],
                   make_intake(model, engine_config), cluster_config, launcher)


class AsyncCluster:
    def __init__(self, cluster: Cluster, stream_limits: StreamLimits | None = None):
        self.cluster = cluster
        self.stream_limits = stream_limits or StreamLimits()
        self._ids = itertools.count()
        cluster.start()

    @property
    def model(self) -> Model:
        return self.cluster.intake.model

    @property
    def max_model_len(self) -> int:
        return self.cluster.intake.max_model_len

    @property
    def scheduling_policy(self) -> str | None:
        """The live instances' policy (None if none is live or they differ)."""
        names = {r.scheduling_policy for r in self.cluster.stats().instances.values()
                 if r.alive}
        return names.pop() if len(names) == 1 else None

    async def generate(self, prompt: Prompt, params: SamplingParams | None = None,
                       request_id: str | None = None, priority: int = 0,
                       client: str | None = None,
                       conversation: str | None = None,
                       delta: bool = False) -> AsyncIterator[RequestOutput]:
        request_id = request_id or f"req-{next(self._ids)}"
        loop = asyncio.get_running_loop()
        stream = OutputStream(lambda: self.abort(request_id), self.stream_limits, delta)
        # validated and tokenized off the event loop (a huge prompt must not freeze it)
        await asyncio.to_thread(self.cluster.submit, request_id, prompt, params,
                                lambda out: loop.call_soon_threadsafe(stream.put, out),
                                priority, client, conversation)
        return stream

    async def abort(self, request_id: str) -> None:
        self.cluster.abort(request_id)

    def embed(self, token_ids: list[int]) -> np.ndarray:
        """The embedding of ``token_ids``, computed by the least loaded open instance
        (or, if that one dies first, the next); blocks."""
        tried: set[str] = set()
        while True:
            instance = self._embedding_instance(tried)
            try:
                return instance.embed(token_ids)
            except InstanceDied:
                tried.add(instance.name)

    def _embedding_instance(self, exclude: set[str]) -> Instance:
        """The open (live, not draining) instance with the fewest requests, outside
        ``exclude``."""
        open_ = [i for i in list(self.cluster.instances.values())
                 if i.name not in exclude and i.alive and not i.draining]
        if not open_:
            raise RuntimeError("no live instance to compute an embedding on")
        return min(open_, key=lambda i: i.report().num_requests)

    async def set_priority(self, request_id: str, priority: int) -> bool:
        return self.cluster.set_priority(request_id, priority)

    def health(self) -> Health:
        return self.cluster.health()

    def stats(self) -> EngineStats:
        """The live instances' engine stats, summed (``kv_usage`` over all blocks)."""
        parts = [r.stats for r in self.cluster.stats().instances.values()
                 if r.alive and r.stats is not None]
        totals = {f.name: sum(getattr(s, f.name) for s in parts)
                  for f in dataclasses.fields(EngineStats)}
        blocks = totals["num_blocks"]  # 0 when no instance is alive: none in use either
        totals["kv_usage"] = 1.0 - totals["num_free_blocks"] / blocks if blocks else 0.0
        return EngineStats(**totals)

    async def shutdown(self) -> None:
        await asyncio.to_thread(self.cluster.shutdown)
