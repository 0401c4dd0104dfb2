"""Instances as Ray actors: the same `Instance` interface across processes and hosts.

Each actor loads the model itself and runs a `LocalInstance` (an engine on its
own thread) inside the actor process; the driver-side `RayInstance` forwards
calls to it and long-polls for outputs and load reports on a thread of its own,
so the global scheduler (`sluice.scheduler.cluster`) cannot tell it from a
local instance. Migration calls are forwarded generically (one
``migration_call(method, *args)`` on each side, `MigrationForwarder`); their
data (KV chunks, request state) crosses processes through Ray's object store; the request's detokenizer travels without its
tokenizer and is re-bound on arrival. An actor that crashes (its process dies)
surfaces as a `ray.exceptions.RayActorError` on the poll, which the instance
reports through ``on_death``: the cluster re-dispatches its requests.

An actor counts its own compiles (`sluice.runtime.compiles`: its start-up is
warm-up, and it marks itself ready once warmed up, so a later compile there is a
``serving`` one); every poll brings its totals back, and the driver adds them by
instance name (`compiles.add_remote`; names are unique in the driver process), so
the driver's ``sluice:compiles_total`` covers the actors. Embeddings run in an
actor too (``embed``: its own model; its warm-up compiles their programs, as
``sluice serve`` does for one engine), so the driver never needs the weights.

``ray_cluster(model, engine_config, n, address=None)`` starts ``n`` actors (on
an existing cluster when ``address`` is given, else a local one, through
``start_ray(address, dashboard=False)``, which logs the addresses Ray opened).
Start-up is dominated by compiling the step shapes (each actor is its own
process, so nothing compiled in one is in another's memory): the actors use
JAX's persistent compilation cache (the directory the driver chose,
`ModelSpec.compile_cache`); all actors start together, but only the first loads
the model and warms up its engine at once: the others start their processes,
wait for its ``ready``, and then load the model and the engine's programs from
that cache instead of compiling them again (the first's warm-up keeps every
core busy, so loading beside it would only compete for the cores); they
do that while the first compiles the embeddings' programs, whose cached copies
they load after it (`RayLauncher.launch_many`). The driver needs only the tokenizer and config for its
intake: it loads no weights (`load_model(..., weights=False)`); they would load
in the driver only if something read its model's parameters there, and nothing
in serving does (embeddings go to an actor).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import itertools
import logging
import os
import threading
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import ray

from sluice.runtime import compiles, embed
from sluice.runtime.compile_cache import enable_compile_cache
from sluice.runtime.engine import EngineConfig, LLMEngine, make_intake
from sluice.runtime.intake import Group
from sluice.runtime.loader import load_model
from sluice.runtime.migration import Handover, KVChunk
from sluice.runtime.outputs import RequestOutput
from sluice.scheduler.cluster import Cluster, ClusterConfig
from sluice.scheduler.instance import (DeathSink, InstanceDied, LoadReport, LocalInstance,
                                       MigrationForwarder, OutputSink)

POLL_S = 0.05
log = logging.getLogger(__name__)
# Instance names, unique in this process: the driver keeps each actor's compile
# counts by name (`compiles.add_remote`), across every cluster it starts.
_numbers = itertools.count()


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """How an actor loads the model (`load_model` arguments), where it keeps its
    compiled programs (``compile_cache``: a persistent compilation cache directory
    shared by the actors, or None for none) and on how many threads its warm-up
    compiles (``compile_threads``: its ``$SLUICE_COMPILE_THREADS``; None: the
    default, `compiles.compile_threads`); picklable."""

    model: str | Path
    dtype: str | None = None
    seed: int = 0
    compile_cache: str | None = None
    compile_threads: int | None = None


class EngineActor:
    """The actor body: a `LocalInstance` whose outputs wait here to be polled. Its
    start-up is in two parts: construction (model load, the engine's warm-up;
    ``ready`` returns after it) and `warm_embeddings` (with ``config.warmup``, the
    embeddings' warm-up), after which a compile in this process is a ``serving``
    one. ``after``: object refs (another actor's ``ready``) to wait for before
    loading the model: the load's programs (e.g. the parameters' initialisation)
    and the engine's warm-up then come from the cache they filled."""

    def __init__(self, name: str, spec: ModelSpec, config: EngineConfig,
                 after: Sequence[ray.ObjectRef] = ()):
        compiles.install()  # this process's compiles, from the model load on
        if spec.compile_cache is not None:  # before anything compiles
            enable_compile_cache(spec.compile_cache)
        if spec.compile_threads is not None:
            os.environ["SLUICE_COMPILE_THREADS"] = str(spec.compile_threads)
        ray.get(list(after))
        self.model = load_model(spec.model, dtype=spec.dtype, seed=spec.seed, progress=False)
        self._cv = threading.Condition()
        self._outputs: list[RequestOutput] = []
        self._death: str | None = None
        with compiles.warming_up():  # an instance's start-up is warm-up (`LocalLauncher`'s)
            engine = LLMEngine(self.model, config)
        self.instance = LocalInstance(name, engine, self._collect, self._died)

    def warm_embeddings(self, after: Sequence[ray.ObjectRef] = ()) -> None:
        """The rest of start-up: with ``config.warmup``, compile the embeddings'
        programs (so a first embedding here compiles nothing), once ``after``
        (another actor's `warm_embeddings`) is done, so they come from its cache;
        then mark this process ready."""
        ray.get(list(after))
        if self.instance.engine.config.warmup:
            embed.warmup(self.model, self.instance.engine.max_model_len)
        compiles.mark_ready()  # warmed up: a compile from here on stalls a request

    def _collect(self, name: str, outputs: list[RequestOutput]) -> None:
        with self._cv:
            self._outputs.extend(outputs)
            self._cv.notify_all()

    def _died(self, name: str, error: BaseException) -> None:
        with self._cv:
            self._death = f"{type(error).__name__}: {error}"
            self._cv.notify_all()

    def ready(self) -> None:
        """Returns once the actor is constructed (warmed up)."""

    def poll(self, timeout: float) -> tuple[list[RequestOutput], LoadReport, str | None,
                                            dict[tuple[str, str], int]]:
        """Outputs since the last poll (waiting up to ``timeout`` for some), the
        load report, the error that killed the engine, if any, and this process's
        compile counts (read after the outputs: they include every compile that
        those outputs waited for)."""
        with self._cv:
            self._cv.wait_for(lambda: self._outputs or self._death, timeout)
            outputs, self._outputs = self._outputs, []
            death = self._death
        return outputs, self.instance.report(), death, compiles.counts()

    def submit(self, group: Group) -> None:
        for req in group.requests:
            req.detokenizer.bind(self.model.tokenizer)
        self.instance.submit(group)

    def abort(self, request_id: str) -> None:
        self.instance.abort(request_id)

    def set_priority(self, request_id: str, priority: int) -> None:
        self.instance.set_priority(request_id, priority)

    def set_draining(self, draining: bool) -> None:
        self.instance.draining = draining

    def embed(self, token_ids: list[int]) -> np.ndarray:
        return self.instance.embed(token_ids)

    def migration_call(self, method: str, *args: Any) -> Any:
        """A migration call (`Instance`), run between steps; device arrays come
        back as numpy so they can leave the process."""
        return _to_host(self.instance.migration_call(method, *args).result())

    def crash(self) -> None:
        """Kill the actor's process (failure injection in tests)."""
        os._exit(1)

    def stop(self) -> None:
        self.instance.stop()


def _to_host(value: Any) -> Any:
    if isinstance(value, list):
        return [_to_host(v) for v in value]
    if isinstance(value, KVChunk):
        return value.to_host()
    if isinstance(value, Handover):
        return dataclasses.replace(value, tail=[c.to_host() for c in value.tail])
    return value


class RayInstance(MigrationForwarder):
    """Driver-side proxy of an `EngineActor` (the `Instance` interface)."""

    def __init__(self, name: str, actor: Any, on_outputs: OutputSink, on_death: DeathSink):
        self.name = name
        self.actor = actor
        self._draining = False
        self._on_outputs = on_outputs
        self._on_death = on_death
        self._error: BaseException | None = None
        self._stopping = False
        _, self._report, _, compiled = ray.get(actor.poll.remote(0.0))
        compiles.add_remote(name, compiled)
        self._thread = threading.Thread(target=self._poll, name=f"sluice-{name}", daemon=True)
        self._thread.start()

    @property
    def alive(self) -> bool:
        return self._error is None and not self._stopping

    @property
    def draining(self) -> bool:
        return self._draining

    @draining.setter
    def draining(self, value: bool) -> None:
        self._draining = value
        self.actor.set_draining.remote(value)

    def report(self) -> LoadReport:
        return dataclasses.replace(self._report, draining=self._draining, alive=self.alive)

    def submit(self, group: Group) -> None:
        self.actor.submit.remote(group)

    def abort(self, request_id: str) -> None:
        self.actor.abort.remote(request_id)

    def set_priority(self, request_id: str, priority: int) -> None:
        self.actor.set_priority.remote(request_id, priority)

    def embed(self, token_ids: list[int]) -> np.ndarray:
        try:
            return ray.get(self.actor.embed.remote(list(token_ids)))
        except ray.exceptions.RayActorError as error:
            raise InstanceDied(f"{self.name} died during an embedding: {error}") from error

    def migration_call(self, method: str, *args: Any) -> concurrent.futures.Future:
        return self.actor.migration_call.remote(method, *args).future()

    def kill(self) -> None:
        self.actor.crash.remote()

    def stop(self) -> None:
        self._stopping = True
        if threading.current_thread() is not self._thread:  # a death handler may stop it
            self._thread.join()
        try:
            ray.get(self.actor.stop.remote())
        except ray.exceptions.RayActorError:
            pass
        ray.kill(self.actor)

    def _poll(self) -> None:
        while not self._stopping:
            try:
                outputs, self._report, death, compiled = ray.get(self.actor.poll.remote(POLL_S))
                compiles.add_remote(self.name, compiled)  # before the outputs that waited
            except ray.exceptions.RayActorError as error:
                death, outputs = f"actor died: {error}", []
            if outputs:
                self._on_outputs(self.name, outputs)
            if death is not None:
                self._error = RuntimeError(death)
                self._on_death(self.name, self._error)
                return


class RayLauncher:
    """Starts `EngineActor`s (the cluster's scaling actuator on Ray)."""

    def __init__(self, spec: ModelSpec, config: EngineConfig, num_gpus: float = 0.0):
        self.spec = spec
        self.config = config
        self._actor_class = ray.remote(num_cpus=0, num_gpus=num_gpus,
                                       max_concurrency=8)(EngineActor)

    def launch(self, on_outputs: OutputSink, on_death: DeathSink) -> RayInstance:
        """One instance, returned once its actor has warmed up."""
        return self.launch_many(1, on_outputs, on_death)[0]

    def launch_many(self, n: int, on_outputs: OutputSink,
                    on_death: DeathSink) -> list[RayInstance]:
        """``n`` instances whose actors start together; returned once all are warm.
        With a compilation cache, the first loads the model and warms up its engine
        alone, filling it, while the others start their processes; then they load
        the model and warm up from its programs while the first compiles the
        embeddings' programs, which they load in turn once it is done (concurrent
        cold warm-ups would each compile every program, competing for the same
        cores; a model load beside the first's engine warm-up would compile its own
        programs, on cores that warm-up already keeps busy); without a cache, all
        start at once."""
        names = [f"ray-{next(_numbers)}" for _ in range(n)]
        cached = self.spec.compile_cache is not None
        first = self._actor_class.remote(names[0], self.spec, self.config)
        first_warm = first.warm_embeddings.remote()
        # refs in a list, so Ray passes them instead of waiting before the call
        others = [self._actor_class.remote(name, self.spec, self.config,
                                           [first.ready.remote()] if cached else [])
                  for name in names[1:]]
        ray.get([first_warm] + [actor.warm_embeddings.remote([first_warm] if cached else [])
                                for actor in others])
        return [RayInstance(name, actor, on_outputs, on_death)
                for name, actor in zip(names, [first] + others)]

    def terminate(self, instance: RayInstance) -> None:
        instance.stop()


def start_ray(address: str | None = None, dashboard: bool = False) -> None:
    """Join the Ray cluster at ``address``, or start a local one; nothing if Ray is up.

    A local cluster gets no dashboard unless ``dashboard`` (``--ray-dashboard``). Ray's
    processes still listen on the ports they need between them (GCS, raylet, object
    manager, one per worker); the node's addresses are logged. Call it before JAX
    starts its threads (``sluice serve --ray`` does, first thing): Ray forks its
    processes, and JAX warns that a fork after its threads exist may deadlock."""
    if ray.is_initialized():
        return
    info = ray.init(address=address, include_dashboard=dashboard, log_to_driver=False,
                    logging_level=logging.WARNING).address_info
    node = next((n for n in ray.nodes() if n.get("NodeID") == info.get("node_id")), {})
    host = node.get("NodeManagerAddress", info.get("node_ip_address"))
    web = info.get("webui_url")
    log.info("ray: %s cluster, GCS at %s; this node's raylet at %s:%s, object manager at "
             "%s:%s; dashboard %s", "started a local" if address is None else "joined the",
             info.get("gcs_address"), host, node.get("NodeManagerPort"), host,
             node.get("ObjectManagerPort"),
             f"at http://{web}" if web else "off (--ray-dashboard starts it)")


def local_compile_threads(spec: ModelSpec, num_instances: int) -> ModelSpec:
    """``spec`` for ``num_instances`` actors on this host: unless the spec or
    ``$SLUICE_COMPILE_THREADS`` says otherwise, each actor's warm-up compiles on its
    share of this process's CPUs. XLA:CPU spreads a compile over the cores itself:
    on 2 cores, a cold ``--instances 2`` start with one compile thread per actor
    took 54.9-55.8 s against 58.4-62.7 s with two (3 runs each, interleaved; the
    `bench/startup.py --ray` runs are in bench/RESULTS.md). A single engine keeps
    one per CPU: SmolLM2's warm-up took 41-44 s with two threads on 2 cores,
    44-52 s with one (`bench/warmup_breakdown.py`, 2 runs each)."""
    if spec.compile_threads is not None or "SLUICE_COMPILE_THREADS" in os.environ:
        return spec
    share = len(os.sched_getaffinity(0)) // num_instances
    return dataclasses.replace(spec, compile_threads=max(1, share))


def ray_cluster(spec: ModelSpec, config: EngineConfig, num_instances: int,
                cluster_config: ClusterConfig | None = None, address: str | None = None,
                num_gpus: float = 0.0) -> Cluster:
    """``num_instances`` engine actors under one `Cluster` (Ray started if needed);
    the driver's intake holds the model without its weights."""
    if num_instances < 1:
        raise ValueError(f"instances: must be >= 1, got {num_instances}")
    start_ray(address)
    spec = local_compile_threads(spec, num_instances) if address is None else spec
    model = load_model(spec.model, dtype=spec.dtype, seed=spec.seed, progress=False,
                       weights=False)
    intake = make_intake(model, config)  # validates the config before any actor starts
    log.info("ray: the driver holds %s's tokenizer and config, not its weights (the actors "
             "load them, and compute embeddings too)", model.name)
    launcher = RayLauncher(spec, config, num_gpus)
    return Cluster(lambda out, death: launcher.launch_many(num_instances, out, death),
                   intake, cluster_config, launcher)
