"""The global scheduler: many instances behind one request interface.

It sees only per-instance `LoadReport`s. Its load metric is *freeness*: free KV
blocks minus reserved headroom, over the batch size (`freeness`); blocks that
waiting requests need count as used, so a queued large request makes its
instance look full and pushes other requests out (de-fragmentation); requests
with priority < 0 reserve ``high_priority_headroom`` blocks each, so they get
room to grow; a draining instance is infinitely loaded.

Policies (`ClusterConfig`):

- dispatch: ``freest`` (default), ``least-loaded`` (fewest requests) or
  ``round-robin``;
- migration (every ``interval_s``): pair the least free instances (freeness
  below ``migrate_below``, or draining) with the freest (above
  ``migrate_above``) and live-migrate one request from each source
  (``migration_choice``: ``last`` admitted, ``shortest`` or ``longest``);
- scaling: an `Autoscaler` (`sluice.scheduler.autoscale`: the freeness-based
  one or the provisioner's re-planner) sees every dispatched request and every
  round's load reports, and launches instances (through a pluggable `Launcher`)
  or drains them (a draining instance takes no new work, its requests migrate
  away, and it is terminated once empty).

A request may carry a ``conversation`` id (multi-turn KV reuse): its turns are
dispatched to the instance where the previous turn finished, which keeps that
turn's KV in host memory (the last ``MAX_CONVERSATION_HOMES`` conversations
are remembered), unless that instance is gone, draining or not allowed.

A dead instance's requests are re-dispatched to survivors and recomputed from
the output their callers have already seen, with the same sampling seeds, so
clients get a completed response, not an error -- except a request that has now
been on ``quarantine_after`` (2) instances when they died: it is quarantined
(failed with `RequestFailed` naming the deaths), so a poison request that kills
whatever runs it takes down two instances at most, not the fleet. (Any request
on both dying instances counts, so an innocent one that shared two with the
culprit goes too; the engine's own fault isolation, which fails a culprit
without killing its instance, makes deaths rare to begin with.) With a
launcher and ``replace_dead``, a dead instance is replaced by a fresh one (at
most ``max_replacements`` per ``replacement_window_s``, so a crash loop ends),
launched in the background (`sluice.scheduler.autoscale.Launches`, ``spawn``:
the death handler never waits for an instance to load and compile); its
requests go to survivors at once, or, when none that takes work survived, wait
for a replacement to join: every launch that ends (its instance joined, or the
launch failed, or the instance died before joining) re-dispatches them, and
once no replacement is launching they fail with an error naming the deaths.
`health` says whether any instance takes requests (``GET /health``).

A ``router`` (`sluice.scheduler.fleet.FleetActuator`, driven by the
provisioner's re-planner) may restrict a request to instances of one
accelerator type; ``add_instance`` and ``drain`` resize the fleet.

Interface: ``submit(request_id, prompt, params, sink, priority, client, conversation)``
(validates at once, raising ``ValueError``; ``sink`` receives every
`RequestOutput`), ``abort(request_id)``, ``tick()`` (one round of the
migration policy and the autoscaler; a background thread calls it when started with
``start()``), ``stats()``, ``health()``, ``shutdown()`` (every request still
held, running or waiting for a replacement, ends with a `RequestFailed` naming
the shutdown). For launches (`sluice.scheduler.autoscale.Launches`):
``add_instance(instance, then)``, ``launch_finished()`` and ``lock``.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import itertools
import logging
import math
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from typing import Protocol

from sluice.runtime.intake import Group, Intake, Prompt, check_priority
from sluice.runtime.kv_cache import blocks_for
from sluice.runtime.health import Health
from sluice.runtime.option_names import DISPATCH_POLICIES
from sluice.runtime.outputs import RequestFailed, RequestOutput
from sluice.runtime.sampling_params import SamplingParams
from sluice.scheduler.autoscale import Autoscaler, Launches, Spawn, in_thread
from sluice.scheduler.instance import DeathSink, Instance, LoadReport, OutputSink
from sluice.scheduler.migration import MigrationResult, migrate

log = logging.getLogger(__name__)

Sink = Callable[[RequestOutput | Exception], None]  # an Exception ends the stream
MIGRATION_CHOICES = ("last", "shortest", "longest")
MAX_CONVERSATION_HOMES = 100_000  # conversation -> instance entries kept (LRU)
MAX_DEATHS_KEPT = 100  # dead instances' causes kept for health reports


@dataclasses.dataclass
class ClusterConfig:
    dispatch: str = "freest"
    migrate: bool = True
    migration_choice: str = "last"
    interval_s: float = 0.05
    high_priority_headroom: int = 16  # blocks reserved per high-priority request
    migrate_below: float = 4.0  # freeness (blocks per running request) of a source
    migrate_above: float = 16.0  # freeness of a destination
    max_stages: int = 64  # copy calls before the stop-and-copy (each <= CHUNK_BLOCKS blocks)
    stop_blocks: int = 2
    # a request on this many instances when they died is failed, not re-dispatched
    quarantine_after: int = 2
    replace_dead: bool = True  # with a launcher, a dead instance is replaced
    max_replacements: int = 8  # per replacement_window_s; then dead instances stay dead
    replacement_window_s: float = 600.0

    def __post_init__(self) -> None:
        if self.dispatch not in DISPATCH_POLICIES:
            raise ValueError(f"dispatch: must be one of {DISPATCH_POLICIES}, got {self.dispatch!r}")
        if self.migration_choice not in MIGRATION_CHOICES:
            raise ValueError(f"migration_choice: must be one of {MIGRATION_CHOICES}, "
                             f"got {self.migration_choice!r}")
        if self.quarantine_after < 1:
            raise ValueError(f"quarantine_after: must be >= 1, got {self.quarantine_after}")
        if self.max_replacements < 0 or not self.replacement_window_s > 0:
            raise ValueError("max_replacements, replacement_window_s: need >= 0 and > 0")


class Launcher(Protocol):
    """Starts and stops instances for scaling (local devices, Ray actors, a fleet)."""

    def launch(self, on_outputs: OutputSink, on_death: DeathSink) -> Instance: ...
    def terminate(self, instance: Instance) -> None: ...


@dataclasses.dataclass(frozen=True)
class Replacement:
    """How a dead instance is replaced: ``launcher`` starts the fresh one (None: it
    is not), counted as a launch of ``kind``; ``joined(fresh)`` runs under the
    cluster's lock as it joins."""

    launcher: Launcher | None
    kind: str | None = None
    joined: Callable[[Instance], None] = lambda fresh: None


def freeness(report: LoadReport, high_priority_headroom: int = 0) -> float:
    """(free blocks - waiting demand - headroom) / batch size; -inf when draining or dead."""
    if report.draining or not report.alive:
        return -math.inf
    free = (report.num_free_blocks - report.demand_blocks
            - high_priority_headroom * report.num_high_priority)
    return free / max(1, report.num_running)


@dataclasses.dataclass
class _Record:
    """What the cluster keeps per request to route output and re-dispatch it."""

    prompt: Prompt
    params: SamplingParams
    priority: int
    client: str | None
    seeds: list[int]
    sink: Sink
    arrival_time: float
    conversation: str | None = None
    owner: str = ""
    last: RequestOutput | None = None
    deaths: list[str] = dataclasses.field(default_factory=list)  # instances that died holding it


@dataclasses.dataclass
class ClusterStats:
    instances: dict[str, LoadReport]
    num_requests: int
    num_migrations: int
    num_failed_migrations: int
    num_redispatched: int
    num_deaths: int = 0
    num_replaced: int = 0
    num_quarantined: int = 0


class Cluster:
    def __init__(self, instances: list[Instance] | Callable[[OutputSink, DeathSink], list[Instance]],
                 intake: Intake, config: ClusterConfig | None = None,
                 launcher: Launcher | None = None,
                 clock: Callable[[], float] = time.monotonic,
                 autoscaler: Autoscaler | None = None, spawn: Spawn = in_thread):
        """``instances``: a factory called with this cluster's output and death
        sinks (instances report to it), or instances already wired to
        `on_outputs` / `on_death`. ``clock`` times the replacement window and
        the autoscaler's observations and rounds; ``spawn`` runs replacement
        launches (`launches`) off the death handler's thread."""
        self.config = config or ClusterConfig()
        self.intake = intake
        self.launcher = launcher
        self.autoscaler = autoscaler
        self._lock = threading.RLock()
        self._records: dict[str, _Record] = {}
        self._homes: OrderedDict[str, str] = OrderedDict()  # conversation -> instance
        self._migrating: dict[str, tuple[str, str]] = {}  # request -> (source, destination)
        # (source, destination) pairs whose KV pools differ: never planned again
        self._incompatible: set[tuple[str, str]] = set()
        self._busy: set[str] = set()  # instances in a migration
        self._rr = itertools.count()
        self._executor = concurrent.futures.ThreadPoolExecutor(4, "sluice-migrate")
        self.migrations: list[MigrationResult] = []
        self.num_redispatched = 0
        self.num_deaths = self.num_replaced = self.num_quarantined = 0
        self.deaths: OrderedDict[str, str] = OrderedDict()  # dead instance -> cause
        self._clock = clock
        self._replacements: deque[float] = deque()  # when each replacement started
        self.launches = Launches(spawn)  # replacements of dead instances in flight
        self._dead: set[str] = set()  # dead instances whose requests may still wait
        # dead instance -> its `Replacement`: the cluster's launcher by default;
        # `sluice.scheduler.fleet.FleetActuator` relaunches the dead one's type
        self.replacement_for: Callable[[str], Replacement] = lambda dead: Replacement(
            self.launcher)
        made = instances(self.on_outputs, self.on_death) if callable(instances) else instances
        self.instances: dict[str, Instance] = {i.name: i for i in made}
        # Restricts where a new group may go (the fleet actuator's per-bucket
        # routing); None or an empty answer: anywhere.
        self.router: Callable[[Group], set[str] | None] | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- requests -------------------------------------------------------------

    def submit(self, request_id: str, prompt: Prompt, params: SamplingParams | None,
               sink: Sink, priority: int = 0, client: str | None = None,
               conversation: str | None = None) -> None:
        """Validate, then dispatch to an instance; raises ``ValueError`` on bad input.
        A ``conversation``'s turns go to the instance where its last turn finished
        (which holds its KV) while that one takes work."""
        with self._lock:
            if request_id in self._records:
                raise ValueError(f"request_id: {request_id!r} is already in use")
        # Tokenized outside the lock: a huge prompt must not hold up every stream's
        # outputs (``on_outputs`` takes the lock). The intake is thread-safe.
        group = self.intake.prepare(request_id, prompt, params, priority, client,
                                    conversation=conversation)
        with self._lock:
            if request_id in self._records:
                raise ValueError(f"request_id: {request_id!r} is already in use")
            self._records[request_id] = _Record(
                prompt, group.requests[0].params, priority, client,
                [r.seed for r in group.requests], sink, group.requests[0].arrival_time,
                conversation)
            try:
                self._dispatch(request_id, group)
            except RuntimeError:  # no live instance: the request was never taken
                del self._records[request_id]
                raise
        if self.autoscaler is not None:
            self.autoscaler.observe(group, self._clock())

    def abort(self, request_id: str) -> None:
        """Abort wherever the request is (also mid-migration); unknown ids: no-op."""
        with self._lock:
            rec = self._records.pop(request_id, None)
            if rec is None:
                return
            names = {rec.owner, *self._migrating.get(request_id, ())}
        for name in names:
            inst = self.instances.get(name)
            if inst is not None and inst.alive:
                inst.abort(request_id)

    def set_priority(self, request_id: str, priority: int) -> bool:
        """Re-rank a request wherever it runs (and if it is re-dispatched or
        migrated); False if the cluster does not hold it."""
        check_priority(priority)
        with self._lock:
            rec = self._records.get(request_id)
            if rec is None:
                return False
            rec.priority = priority
            inst = self.instances.get(rec.owner)
        if inst is not None:
            inst.set_priority(request_id, priority)
        return True

    @property
    def lock(self) -> threading.RLock:
        """The cluster's lock: an instance joins under it (`add_instance`), so
        counting instances and launches in flight under it counts each once."""
        return self._lock

    def add_instance(self, instance: Instance, then: Callable[[], None] | None = None) -> bool:
        """Serve with one more instance (wired to `on_outputs` / `on_death`) and
        run ``then`` in the same step, under `lock` (a launch stops counting as
        pending there). False, adding nothing, once the cluster is shut down or
        if the instance has died already (the caller stops it): a dead instance
        never joins, so its death handler and this cannot both miss it."""
        with self._lock:
            if self._stop.is_set() or not instance.alive:
                return False
            self.instances[instance.name] = instance
            if then is not None:
                then()
            return True

    def launch_finished(self) -> None:
        """A launch for this cluster ended, however it did: the requests waiting
        for an instance go to one now, or fail if none is left to come."""
        self._redispatch()

    def _dispatch(self, request_id: str, group: Group) -> None:
        allowed = self.router(group) if self.router is not None else None
        name = self._conversation_home(group.requests[0].conversation, allowed) \
            or self._choose_instance(allowed)
        self._records[request_id].owner = name
        inst = self.instances[name]
        inst.submit(group)
        if not inst.alive:  # died in between: its death handler may have missed this one
            self._redispatch(name)

    def _conversation_home(self, conversation: str | None,
                           allowed: set[str] | None) -> str | None:
        """Where the conversation's last turn finished, if it still takes work."""
        name = self._homes.get(conversation) if conversation is not None else None
        inst = self.instances.get(name) if name is not None else None
        if inst is None or not inst.alive or inst.draining or (allowed and name not in allowed):
            return None
        self._homes.move_to_end(conversation)
        return name

    def _choose_instance(self, allowed: set[str] | None = None) -> str:
        reports = [i.report() for i in self.instances.values()]
        open_ = [r for r in reports if r.alive and not r.draining]
        if allowed and any(r.name in allowed for r in open_):
            open_ = [r for r in open_ if r.name in allowed]
        if not open_:
            raise RuntimeError("no live instance to dispatch to")
        policy = self.config.dispatch
        if policy == "round-robin":
            return open_[next(self._rr) % len(open_)].name
        if policy == "least-loaded":
            return min(open_, key=lambda r: (r.num_requests, r.demand_blocks)).name
        return max(open_, key=lambda r: freeness(r, self.config.high_priority_headroom)).name

    # -- instance callbacks ---------------------------------------------------

    def on_outputs(self, name: str, outputs: list[RequestOutput]) -> None:
        for out in outputs:
            with self._lock:
                rec = self._records.get(out.request_id)
                if rec is None:
                    continue
                rec.last = out
                if out.finished:
                    del self._records[out.request_id]
                    if rec.conversation is not None and out.error is None:
                        self._remember_home(rec.conversation, name)
            rec.sink(RequestFailed(out.error) if out.error is not None else out)

    def _remember_home(self, conversation: str, name: str) -> None:
        self._homes[conversation] = name
        self._homes.move_to_end(conversation)
        while len(self._homes) > MAX_CONVERSATION_HOMES:
            self._homes.popitem(last=False)

    def on_death(self, name: str, error: BaseException) -> None:
        """An instance died: quarantine the requests it held that have now seen
        ``quarantine_after`` deaths, start its replacement, and re-dispatch the
        rest (to survivors at once; when none survived, to the first replacement
        that joins)."""
        cause = f"{type(error).__name__}: {error}"
        log.error("instance %s died (%s); re-dispatching its requests", name, cause)
        with self._lock:
            self.num_deaths += 1
            self.deaths[name] = cause
            while len(self.deaths) > MAX_DEATHS_KEPT:
                self.deaths.popitem(last=False)
            self._quarantine(name, cause)
            self._dead.add(name)
        self._replace(name)
        self._redispatch()

    def _quarantine(self, dead: str, cause: str) -> None:
        """Count the death against every request the instance held; fail those
        that have been on ``quarantine_after`` dying instances."""
        for rid, rec in list(self._records.items()):
            if rec.owner != dead:
                continue
            rec.deaths.append(f"{dead} ({cause})")
            if len(rec.deaths) >= self.config.quarantine_after:
                log.error("quarantining request %s: %d instances died running it", rid,
                          len(rec.deaths))
                self.num_quarantined += 1
                self._fail(rid, RequestFailed(
                    f"request quarantined, not retried: {len(rec.deaths)} instances died "
                    f"while running it: {'; '.join(rec.deaths)}"))

    def _replace(self, dead: str) -> None:
        """With a launcher: stop the dead instance and start launching a fresh
        one in its place (`replacement_for`), unless ``max_replacements`` happened
        within the window or it was draining (being retired: it is only stopped)."""
        how = self.replacement_for(dead)
        if how.launcher is None or not self.config.replace_dead:
            return
        with self._lock:
            now, window = self._clock(), self.config.replacement_window_s
            while self._replacements and self._replacements[0] <= now - window:
                self._replacements.popleft()
            inst = self.instances.get(dead)
            if inst is None or inst.alive:
                return  # already replaced, or not dead
            retiring = inst.draining  # being retired: not replaced, its work goes elsewhere
            if not retiring:
                if len(self._replacements) >= self.config.max_replacements:
                    log.error("not replacing instance %s: %d replacements in the last %g s",
                              dead, len(self._replacements), window)
                    return
                self._replacements.append(now)
            del self.instances[dead]

        def joined(fresh: Instance) -> None:
            how.joined(fresh)
            self._replaced(dead, fresh)
        if not retiring:  # pending from now, before the terminate below: a scaler counting
            # instances and launches meanwhile must not see a gap and launch another
            self.launches.start(self, how.launcher, how.kind, joined=joined)
        try:
            how.launcher.terminate(inst)
        except Exception:  # it is dead; whatever is left of it must not stop the replacement
            log.exception("terminating dead instance %s failed", dead)

    def _replaced(self, dead: str, fresh: Instance) -> None:
        """``fresh`` joined in ``dead``'s place (the requests that waited for it
        go to it when its launch finishes, `launch_finished`)."""
        log.warning("instance %s replaced by %s", dead, fresh.name)
        with self._lock:
            self.num_replaced += 1

    def _redispatch(self, dead: str | None = None) -> None:
        """Recompute dead instances' requests (``dead``'s too) elsewhere, from
        what callers saw. With no live instance that takes work they wait while
        a replacement is launching, and fail when none is."""
        with self._lock:
            if dead is not None:
                self._dead.add(dead)
            if not any(i.alive and not i.draining for i in self.instances.values()):
                if self.launches.num_pending():
                    return
                for rid in [r for r, rec in self._records.items() if rec.owner in self._dead]:
                    owner = self._records[rid].owner
                    self._fail(rid, RequestFailed(
                        f"every instance has died or is draining, and no replacement is "
                        f"launching (the last to hold it, {owner}, died: "
                        f"{self.deaths.get(owner, 'unknown cause')})"))
            else:
                for rid, rec in list(self._records.items()):
                    if rec.owner in self._dead and rid not in self._migrating:
                        self._dispatch(rid, self._revive(rid, rec))
                        self.num_redispatched += 1
            self._dead = {rec.owner for rid, rec in self._records.items()
                          if rec.owner in self._dead}  # only the migrating ones still wait

    def _revive(self, rid: str, rec: _Record):
        group = self.intake.prepare(rid, rec.prompt, rec.params, rec.priority, rec.client,
                                    seeds=rec.seeds, conversation=rec.conversation)
        for req in group.requests:
            req.arrival_time = rec.arrival_time
        if rec.last is not None:
            for req, done, metrics in zip(group.requests, rec.last.outputs, rec.last.metrics):
                req.replay(done.token_ids, done.text, done.finish_reason, done.stop_reason,
                           metrics)
        return group

    def _fail(self, rid: str, error: Exception) -> None:
        rec = self._records.pop(rid)
        rec.sink(error)

    # -- the global policies --------------------------------------------------

    def start(self) -> None:
        """Run `tick` every ``interval_s`` on a background thread."""
        self._thread = threading.Thread(target=self._run, name="sluice-global", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.config.interval_s):
            try:
                self.tick()
            except Exception:  # a policy bug must not stop serving
                log.exception("global scheduling round failed")

    def tick(self) -> None:
        """One round: migrations to balance and drain, then the autoscaler's."""
        reports = {n: i.report() for n, i in list(self.instances.items()) if i.alive}
        self._retire_drained(reports)
        if self.config.migrate:
            for src, dst, rid in self._plan_migrations(reports):
                self._start_migration(src, dst, rid)
        if self.autoscaler is not None:
            self.autoscaler.tick(self, reports, self._clock())

    def _plan_migrations(self, reports: dict[str, LoadReport]) -> list[tuple[str, str, str]]:
        cfg = self.config
        with self._lock:
            idle = {n: r for n, r in reports.items() if n not in self._busy}
            moving = set(self._migrating)
        free = {n: freeness(r, cfg.high_priority_headroom) for n, r in idle.items()}
        sources = sorted((n for n in idle if (free[n] < cfg.migrate_below or idle[n].draining)
                          and idle[n].candidates), key=free.get)
        dests = sorted((n for n in idle if free[n] > cfg.migrate_above), key=free.get,
                       reverse=True)
        plan, taken = [], set()
        for src in sources:
            dst = next((d for d in dests if d != src and d not in taken
                        and (src, d) not in self._incompatible), None)
            if dst is None or free[dst] <= free[src]:
                continue
            taken.add(dst)
            candidates = [c for c in idle[src].candidates if c[0] not in moving]
            rid = _choose_request(candidates, cfg.migration_choice)
            if rid is not None and _fits(idle[dst], dict(candidates)[rid]):
                plan.append((src, dst, rid))
        return plan

    def _start_migration(self, src: str, dst: str, rid: str) -> None:
        with self._lock:
            if rid not in self._records or src in self._busy or dst in self._busy:
                return
            self._migrating[rid] = (src, dst)
            self._busy.update((src, dst))
        self._executor.submit(self._migrate, src, dst, rid)

    def _migrate(self, src: str, dst: str, rid: str) -> MigrationResult:
        try:
            source, dest = self.instances.get(src), self.instances.get(dst)
            if source is None or dest is None:  # replaced after dying
                result = MigrationResult(rid, src, dst, False, "instance gone")
            else:
                result = migrate(source, dest, rid, max_stages=self.config.max_stages,
                                 stop_blocks=self.config.stop_blocks)
        finally:
            with self._lock:
                self._migrating.pop(rid, None)
                self._busy.difference_update((src, dst))
        with self._lock:
            self.migrations.append(result)
            if result.incompatible:
                self._incompatible.add((src, dst))
            rec = self._records.get(rid)
            if result.ok and rec is not None:
                rec.owner = dst
                # a priority change sent to the source during the move may not have travelled
                dest.set_priority(rid, rec.priority)
            elif result.ok:  # aborted by its client during the migration
                dest.abort(rid)
            owner = self.instances.get(rec.owner) if rec is not None else None
            if rec is not None and (owner is None or not owner.alive):  # died meanwhile
                self._redispatch(rec.owner)
        return result

    def _retire_drained(self, reports: dict[str, LoadReport]) -> None:
        for name, r in reports.items():
            with self._lock:
                empty = (r.draining and r.num_requests == 0 and name not in self._busy
                         and not any(rec.owner == name for rec in self._records.values()))
                inst = self.instances.pop(name, None) if empty else None
                if inst is None:
                    continue
            if self.launcher is not None:
                self.launcher.terminate(inst)
            else:
                inst.stop()

    def drain(self, name: str) -> None:
        """Stop sending work to an instance; its requests migrate away, then it goes."""
        self.instances[name].draining = True

    # -- lifecycle ------------------------------------------------------------

    def stats(self) -> ClusterStats:
        with self._lock:
            ok = sum(m.ok for m in self.migrations)
            return ClusterStats({n: i.report() for n, i in self.instances.items()},
                                len(self._records), ok, len(self.migrations) - ok,
                                self.num_redispatched, self.num_deaths, self.num_replaced,
                                self.num_quarantined)

    def health(self) -> Health:
        """The instances by state (``dead``: died and not replaced); ``reason``
        says why none takes requests, when none does."""
        with self._lock:
            insts = list(self.instances.items())
            counts = dict(deaths=self.num_deaths, replaced=self.num_replaced,
                          quarantined=self.num_quarantined)
            causes = dict(self.deaths)
        serving = sum(i.alive and not i.draining for _, i in insts)
        draining = sum(i.alive and i.draining for _, i in insts)
        dead = [n for n, i in insts if not i.alive]
        reason = None
        if not serving:
            why = [f"{n} died ({causes.get(n, 'unknown cause')})" for n in dead]
            if draining:
                why.append(f"{draining} draining")
            if self.launches.num_pending():
                why.append(f"{self.launches.num_pending()} replacement(s) starting")
            reason = "no instance takes requests: " + ("; ".join(why) or "there are none")
        return Health(serving, draining, len(dead), reason=reason, **counts)

    def shutdown(self) -> None:
        """Stop the rounds, the migrations and the instances; every request still
        held (running, or waiting for a replacement) ends with a `RequestFailed`
        naming the shutdown, so no caller is left waiting."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self._executor.shutdown(wait=True)
        with self._lock:  # after this, `add_instance` refuses (a launch that was in flight)
            insts = list(self.instances.values())
            held, self._records = self._records, {}  # later outputs find no record
        for inst in insts:
            if inst.alive:
                inst.stop()
        for rid, rec in held.items():
            try:
                rec.sink(RequestFailed(f"request {rid}: the cluster shut down before it finished"))
            except Exception:  # a caller already gone must not keep the others from theirs
                log.exception("ending request %s at shutdown failed", rid)


def _choose_request(candidates: list[tuple[str, int]], choice: str) -> str | None:
    if not candidates:
        return None
    if choice == "shortest":
        return min(candidates, key=lambda c: c[1])[0]
    if choice == "longest":
        return max(candidates, key=lambda c: c[1])[0]
    return candidates[-1][0]


def _fits(dst: LoadReport, num_tokens: int) -> bool:
    """Whether the destination has room for the request and a little growth."""
    need = blocks_for(num_tokens + 1, dst.block_size) + 1
    return dst.num_free_blocks - dst.demand_blocks >= need
