"""Autoscalers: what resizes a `Cluster` as load changes. One interface, two deciders.

Interface (`Autoscaler`), called by the cluster:

- ``observe(group, now)``: a new request was dispatched (what it asks for);
- ``add_demand(demand)``: one more input (below);
- ``tick(cluster, reports, now)``: one round (every ``ClusterConfig.interval_s``
  from the cluster's thread, or `Cluster.tick` in tests), with the live
  instances' `LoadReport`s and the cluster's clock; it may launch instances
  (``cluster.add_instance``) or drain them (``cluster.drain``: a draining
  instance takes no new work and is retired once empty).

Implementations:

- `FreenessAutoscaler`: the global scheduler's own load metric. Average
  `freeness` of the open instances below ``scale_out_below`` launches one more
  (through the cluster's launcher), above ``scale_in_above`` drains the least
  loaded one, within ``[min_instances, max_instances]``; after either, it
  decides nothing on freeness for ``cooldown_s`` (the reports must show the
  change first). Its launches, and the cluster's replacements in flight, count
  as instances (no second launch for the same load, no scale-in meanwhile).
- `ReplanAutoscaler`: the provisioner's MILP re-planner
  (`sluice.provision.replan.Replanner`) over a `sluice.scheduler.fleet.FleetActuator`
  (instances of several accelerator types, per-bucket routing); it observes every
  request's bucket, and re-plans every ``interval_s`` of the cluster's clock (the
  re-planner's hysteresis decides whether the fleet changes); while the fleet's
  launches back off, no plan that launches is applied.

Every instance launch for a cluster -- these two deciders' and the cluster's
replacement of a dead instance -- goes through `Launches`: it runs in the
background (``spawn``: a thread), so an autoscaler round or a death handler
never waits for an instance to load and compile; it counts as pending until the
instance has joined the cluster, then the instance counts (never both); after
every launch, succeeded or not, the cluster re-dispatches the requests that wait
for an instance; failures in a row back off (``backoff_s``, doubling up to
``max_backoff_s``) for deciders that retry.

Both take ``demands``: callables ``demand() -> int``, each the instances some
consumer needs now, such as the RAG layer's replica demand
(`sluice.rag.capacity.Capacity.replicas`: the replicas its latency SLOs need at
the observed arrival rates). The fleet never goes below the
largest (capped at ``max_instances``): a larger demand scales out at once (the
whole shortfall, cooldown or not) and blocks scaling in. ``sluice serve --autoscale ... --rag-index DIR`` adds the RAG
service's (`sluice.rag.http.rag_part`).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import threading
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Protocol

from sluice.runtime.intake import Group
from sluice.runtime.option_names import AUTOSCALERS
from sluice.scheduler.instance import Instance, LoadReport

if TYPE_CHECKING:
    from sluice.provision.profiles import TypeProfile
    from sluice.provision.replan import FleetDiff, Routing
    from sluice.provision.workload import Buckets
    from sluice.scheduler.cluster import Cluster, Launcher
    from sluice.scheduler.fleet import FleetActuator

log = logging.getLogger(__name__)

Demand = Callable[[], int]  # instances some consumer needs now
Spawn = Callable[[Callable[[], None]], None]  # runs a function in the background


class Autoscaler(Protocol):
    def observe(self, group: Group, now: float) -> None: ...
    def add_demand(self, demand: Demand) -> None: ...
    def tick(self, cluster: Cluster, reports: dict[str, LoadReport], now: float) -> None: ...


def demanded(demands: Sequence[Demand]) -> int:
    """The largest of the demands now (0 without any)."""
    return max((int(d()) for d in demands), default=0)


def in_thread(work: Callable[[], None]) -> None:
    """`Spawn` on a daemon thread of its own."""
    threading.Thread(target=work, name="sluice-launch", daemon=True).start()


class Launches:
    """Instance launches for a cluster, off the caller's thread.

    ``start(cluster, launcher, kind, joined)`` runs ``launcher.launch``
    through ``spawn``; the new instance joins the cluster
    (``cluster.add_instance``), and in the same step under the cluster's lock
    it stops counting as pending (`num_pending`, per ``kind``: an accelerator
    type, or None) and ``joined(instance)`` runs: whoever counts instances and
    launches under that lock (``cluster.lock``) counts each launch exactly
    once. A launch that raises, or whose instance the cluster refuses (shut
    down, or the instance died before joining: it is terminated), is a failed
    launch. However a launch ends, ``cluster.launch_finished()`` runs last, so
    requests waiting for an instance go to one or fail.
    Failures in a row back off: `back_off` (a decider calls it
    each round with its clock) turns failures since its last call into a retry
    time ``backoff_s`` later, doubling per failure in a row up to
    ``max_backoff_s``; `ready` says whether a launch may start now."""

    def __init__(self, spawn: Spawn = in_thread, backoff_s: float = 5.0,
                 max_backoff_s: float = 300.0):
        if not 0 < backoff_s <= max_backoff_s:
            raise ValueError("backoff_s, max_backoff_s: need 0 < backoff_s <= max_backoff_s")
        self.spawn, self.backoff_s, self.max_backoff_s = spawn, backoff_s, max_backoff_s
        self._cv = threading.Condition()
        self._pending: dict[str | None, int] = {}
        self.failures_in_a_row = 0
        self.num_failed = 0
        self._failed = False  # a launch failed since the last `back_off`
        self._retry_at = -math.inf

    def num_pending(self, kind: str | None = None) -> int:
        """Launches in flight: of ``kind``, or of every kind when None."""
        with self._cv:
            return self._pending.get(kind, 0) if kind is not None else sum(self._pending.values())

    def wait_idle(self, timeout: float) -> bool:
        """Wait until no launch is in flight; False if ``timeout`` s passed first."""
        with self._cv:
            return self._cv.wait_for(lambda: not any(self._pending.values()), timeout)

    def back_off(self, now: float) -> bool:
        """If a launch failed since the last call, no launch before the back-off
        from ``now``; True if one had."""
        with self._cv:
            failed, self._failed = self._failed, False
            in_a_row = self.failures_in_a_row
        if not (failed and in_a_row):
            return False
        delay = min(self.max_backoff_s, self.backoff_s * 2 ** (in_a_row - 1))
        self._retry_at = now + delay
        log.warning("%d instance launch(es) in a row failed; next try in %g s", in_a_row, delay)
        return True

    def ready(self, now: float) -> bool:
        """Whether a launch may start at ``now`` (no back-off running)."""
        self.back_off(now)
        return now >= self._retry_at

    def start(self, cluster: Cluster, launcher: Launcher, kind: str | None = None,
              joined: Callable[[Instance], None] | None = None) -> None:
        with self._cv:
            self._pending[kind] = self._pending.get(kind, 0) + 1
        self.spawn(lambda: self._run(cluster, launcher, kind, joined))

    def _run(self, cluster: Cluster, launcher: Launcher, kind: str | None,
             joined: Callable[[Instance], None] | None) -> None:
        try:
            self._launch(cluster, launcher, kind, joined)
        finally:  # whatever happened, what waited for an instance is dispatched or failed
            cluster.launch_finished()

    def _launch(self, cluster: Cluster, launcher: Launcher, kind: str | None,
                joined: Callable[[Instance], None] | None) -> None:
        try:
            inst = launcher.launch(cluster.on_outputs, cluster.on_death)
        except Exception:
            log.exception("launching an instance failed")
            self._done(kind, ok=False)
            return

        def land() -> None:  # under the cluster's lock, with the instance's join
            self._done(kind, ok=True)
            if joined is not None:
                joined(inst)
        if not cluster.add_instance(inst, then=land):
            log.warning("launched instance %s is not served (the cluster is shut down, "
                        "or it died before joining)", inst.name)
            self._done(kind, ok=False)
            launcher.terminate(inst)

    def _done(self, kind: str | None, ok: bool) -> None:
        with self._cv:
            self._pending[kind] -= 1
            if ok:
                self.failures_in_a_row = 0
            else:
                self.failures_in_a_row += 1
                self.num_failed += 1
                self._failed = True
            self._cv.notify_all()


@dataclasses.dataclass
class FreenessAutoscaler:
    scale_out_below: float = 2.0  # average freeness (blocks per running request)
    scale_in_above: float = 64.0
    min_instances: int = 1
    max_instances: int = 8
    demands: Sequence[Demand] = ()
    cooldown_s: float = 30.0  # after a scale action, no freeness decision for this long
    backoff_s: float = 5.0  # after a failed launch, none for this long; doubles per failure
    max_backoff_s: float = 300.0
    spawn: Spawn = in_thread  # how a launch runs off the cluster's thread

    def __post_init__(self) -> None:
        self.demands = list(self.demands)
        if not 1 <= self.min_instances <= self.max_instances:
            raise ValueError("min_instances, max_instances: need 1 <= min <= max")
        if not self.scale_out_below < self.scale_in_above:
            raise ValueError("scale_out_below, scale_in_above: need out < in (else it flaps)")
        if not self.cooldown_s >= 0:
            raise ValueError(f"cooldown_s: must be >= 0, got {self.cooldown_s}")
        self.launches = Launches(self.spawn, self.backoff_s, self.max_backoff_s)
        self._quiet_until = -math.inf  # no freeness decision before (cooldown)

    def observe(self, group: Group, now: float) -> None:
        pass  # it decides from the load reports alone

    def add_demand(self, demand: Demand) -> None:
        self.demands.append(demand)

    def tick(self, cluster: Cluster, reports: dict[str, LoadReport], now: float) -> None:
        from sluice.scheduler.cluster import freeness

        open_ = [r for r in reports.values() if not r.draining]
        if not open_ or cluster.launcher is None:
            return
        if self.launches.back_off(now):  # nothing changed: the back-off alone applies
            self._quiet_until = -math.inf
        size = self._size(cluster, reports, len(open_))
        floor = min(max(self.min_instances, demanded(self.demands)), self.max_instances)
        if size < floor:  # a consumer needs them now: the whole shortfall, cooldown or not
            for _ in range(floor - size if self.launches.ready(now) else 0):
                self._launch(cluster, now)
            return
        if now < self._quiet_until or size > len(open_):  # cooling down, or still launching
            return
        headroom = cluster.config.high_priority_headroom
        avg = sum(freeness(r, headroom) for r in open_) / len(open_)
        if size < self.max_instances and avg < self.scale_out_below:
            if self.launches.ready(now):
                self._launch(cluster, now)
        elif avg > self.scale_in_above and size > floor:
            cluster.drain(min(open_, key=lambda r: r.num_requests).name)
            self._quiet_until = now + self.cooldown_s

    def _size(self, cluster: Cluster, reports: dict[str, LoadReport], num_open: int) -> int:
        """Open instances, counting launches in flight (its own and the cluster's
        replacements) and instances that joined after this round's reports; read
        under the cluster's lock, where a launch joins and stops being pending in
        one step, so each counts once."""
        with cluster.lock:
            pending = self.launches.num_pending() + cluster.launches.num_pending()
            joined = sum(1 for name, inst in cluster.instances.items()
                         if name not in reports and inst.alive and not inst.draining)
        return num_open + pending + joined

    def _launch(self, cluster: Cluster, now: float) -> None:
        self._quiet_until = now + self.cooldown_s
        self.launches.start(cluster, cluster.launcher)


class ReplanAutoscaler:
    """The re-planner as an autoscaler over ``fleet`` (the cluster's `FleetActuator`).
    ``replan_kw`` go to `Replanner` (``options``, ``window_s``, ``min_saving``,
    ``patience``). ``demands`` are per type, ``{type name: [demand, ...]}``: the
    fleet keeps at least that many open instances of the type (a plan's removals
    are trimmed to it, a shortfall is launched at once). While the fleet's
    launches back off after failures, a plan or shortfall that would launch is
    not applied (the next re-plan tries again)."""

    def __init__(self, fleet: FleetActuator, profiles: Sequence[TypeProfile], buckets: Buckets,
                 interval_s: float = 10.0, demands: dict[str, Sequence[Demand]] | None = None,
                 **replan_kw):
        from sluice.provision.replan import Replanner

        if not interval_s > 0:
            raise ValueError(f"interval_s: must be > 0, got {interval_s}")
        unknown = set(demands or {}) - set(fleet.launchers)
        if unknown:
            raise ValueError(f"demands: no launcher for type(s) {sorted(unknown)}")
        self.fleet = fleet
        self.interval_s = interval_s
        self.demands = {t: list(ds) for t, ds in (demands or {}).items()}
        self.replanner = Replanner(profiles, buckets, self, **replan_kw)
        self.diffs: list[FleetDiff] = []  # every change applied, oldest first
        self._last: float | None = None
        self._floors: dict[str, int] = {}
        self._may_launch = True  # no back-off running at this round

    def observe(self, group: Group, now: float) -> None:
        req = group.requests[0]
        self.replanner.observe(now, len(req.prompt_token_ids), req.max_tokens)

    def add_demand(self, demand: Demand, type_name: str | None = None) -> None:
        """A demand for instances of ``type_name`` (default: the fleet's only type)."""
        if type_name is None:
            if len(self.fleet.launchers) != 1:
                raise ValueError("type_name: the fleet has several types; name one")
            type_name = next(iter(self.fleet.launchers))
        if type_name not in self.fleet.launchers:
            raise ValueError(f"type_name: no launcher for type {type_name!r}")
        self.demands.setdefault(type_name, []).append(demand)

    def tick(self, cluster: Cluster, reports: dict[str, LoadReport], now: float) -> None:
        from sluice.provision.replan import FleetDiff

        if self._last is not None and now - self._last < self.interval_s:
            return
        self._last = now
        self._floors = {t: demanded(ds) for t, ds in self.demands.items()}
        self._may_launch = self.fleet.launches.ready(now)
        self.replanner.replan(now)
        counts = self.counts()
        short = {t: k - counts.get(t, 0) for t, k in self._floors.items() if k > counts.get(t, 0)}
        if short:  # a consumer needs more than the plan keeps
            target = {**counts, **{t: counts.get(t, 0) + k for t, k in short.items()}}
            self.apply(FleetDiff(short, {}, target, 0.0, 0.0, "demand"))

    # -- the re-planner's `ScaleActuator`: the fleet, with the demands as floors --

    def counts(self) -> dict[str, int]:
        return self.fleet.counts()

    def apply(self, diff: FleetDiff) -> None:
        if diff.add and not self._may_launch:
            return
        counts = self.counts()
        remove = {t: min(k, counts.get(t, 0) + diff.add.get(t, 0) - self._floors.get(t, 0))
                  for t, k in diff.remove.items()}
        diff = dataclasses.replace(diff, remove={t: k for t, k in remove.items() if k > 0})
        if diff.add or diff.remove:
            self.fleet.apply(diff)
            self.diffs.append(diff)

    def route(self, routing: Routing) -> None:
        self.fleet.route(routing)


def attach(cluster: Cluster, kind: str, max_instances: int, profile_path: str | None = None,
           demands: Sequence[Demand] = (), spawn: Spawn = in_thread) -> Autoscaler:
    """Give a one-type cluster (its instances all from ``cluster.launcher``) the
    autoscaler ``kind`` (`AUTOSCALERS`), which never runs more than
    ``max_instances`` nor fewer than it started with; its launches run through
    ``spawn`` (`Launches`). ``replan`` needs
    ``profile_path``: a profile file (`sluice.provision.profiles.save_profiles`,
    ``sluice provision``) holding one type, the type of these instances."""
    if kind not in AUTOSCALERS:
        raise ValueError(f"autoscale: must be one of {AUTOSCALERS}, got {kind!r}")
    if cluster.launcher is None:
        raise ValueError("autoscale: the cluster has no launcher to start instances with")
    start = len(cluster.instances)
    if not 1 <= start <= max_instances:
        raise ValueError(f"max_instances: must be >= instances ({start}), got {max_instances}")
    if kind == "freeness":
        scaler: Autoscaler = FreenessAutoscaler(min_instances=start, max_instances=max_instances,
                                                demands=demands, spawn=spawn)
    else:
        scaler = _replan_autoscaler(cluster, max_instances, profile_path, demands, spawn)
    cluster.autoscaler = scaler
    return scaler


def _replan_autoscaler(cluster: Cluster, max_instances: int, profile_path: str | None,
                       demands: Sequence[Demand], spawn: Spawn) -> ReplanAutoscaler:
    import json

    from sluice.provision.planner import Options
    from sluice.provision.profiles import load_profiles
    from sluice.provision.workload import Buckets
    from sluice.scheduler.fleet import FleetActuator

    if profile_path is None:
        raise ValueError("autoscale_profile: --autoscale replan needs a profile file")
    with open(profile_path) as f:
        data = json.load(f)
    buckets = Buckets(tuple(data.get("input_edges", ())), tuple(data.get("output_edges", ())))
    profiles = load_profiles(profile_path, buckets)
    if len(profiles) != 1:
        raise ValueError(f"autoscale_profile: {profile_path}: a local cluster is one instance "
                         f"type; the file has {len(profiles)}")
    name = profiles[0].name
    fleet = FleetActuator(cluster, {name: cluster.launcher}, buckets, spawn=spawn)
    fleet.adopt(name, list(cluster.instances))
    floor = len(cluster.instances)
    return ReplanAutoscaler(fleet, profiles, buckets,
                            demands={name: [lambda: floor, *demands]},
                            options=Options(caps={name: max_instances}))
