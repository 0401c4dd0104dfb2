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
  change first). A launch runs in the background (``spawn``: a thread), so a
  round never waits for an instance to load and compile; until it has joined
  the cluster it counts as an instance (no second launch for the same load,
  no scale-in meanwhile). A launch that fails is retried after ``backoff_s``,
  doubling per failure in a row up to ``max_backoff_s``, not every round.
- `ReplanAutoscaler`: the provisioner's MILP re-planner
  (`sluice.provision.replan.Replanner`) over a `sluice.scheduler.fleet.FleetActuator`
  (instances of several accelerator types, per-bucket routing); it observes every
  request's bucket, and re-plans every ``interval_s`` of the cluster's clock (the
  re-planner's hysteresis decides whether the fleet changes).

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
from sluice.scheduler.instance import LoadReport

if TYPE_CHECKING:
    from sluice.provision.profiles import TypeProfile
    from sluice.provision.replan import FleetDiff, Routing
    from sluice.provision.workload import Buckets
    from sluice.scheduler.cluster import Cluster
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
        if not 0 < self.backoff_s <= self.max_backoff_s:
            raise ValueError("backoff_s, max_backoff_s: need 0 < backoff_s <= max_backoff_s")
        self._lock = threading.Lock()
        self.pending = 0  # launches in flight
        self.failures_in_a_row = 0
        self.num_failed_launches = 0
        self._failed = False  # a launch failed since the last round
        self._quiet_until = -math.inf  # no freeness decision before (cooldown)
        self._retry_at = -math.inf  # no launch before (backoff)

    def observe(self, group: Group, now: float) -> None:
        pass  # it decides from the load reports alone

    def add_demand(self, demand: Demand) -> None:
        self.demands.append(demand)

    def tick(self, cluster: Cluster, reports: dict[str, LoadReport], now: float) -> None:
        from sluice.scheduler.cluster import freeness

        open_ = [r for r in reports.values() if not r.draining]
        if not open_ or cluster.launcher is None:
            return
        self._back_off_after_failures(now)
        size = self._size(cluster, reports, len(open_))
        floor = min(max(self.min_instances, demanded(self.demands)), self.max_instances)
        if size < floor:  # a consumer needs them now: the whole shortfall, cooldown or not
            for _ in range(floor - size if now >= self._retry_at else 0):
                self._launch(cluster, now)
            return
        if now < self._quiet_until or size > len(open_):  # cooling down, or still launching
            return
        headroom = cluster.config.high_priority_headroom
        avg = sum(freeness(r, headroom) for r in open_) / len(open_)
        if size < self.max_instances and avg < self.scale_out_below:
            if now >= self._retry_at:
                self._launch(cluster, now)
        elif avg > self.scale_in_above and size > floor:
            cluster.drain(min(open_, key=lambda r: r.num_requests).name)
            self._quiet_until = now + self.cooldown_s

    def _back_off_after_failures(self, now: float) -> None:
        """If a launch failed since the last round, no launch for the back-off
        (instead of the cooldown the launch started)."""
        with self._lock:
            failed, self._failed = self._failed, False
            in_a_row = self.failures_in_a_row
        if failed and in_a_row:
            delay = min(self.max_backoff_s, self.backoff_s * 2 ** (in_a_row - 1))
            self._retry_at = now + delay
            self._quiet_until = -math.inf  # nothing changed: the back-off alone applies
            log.warning("autoscaler: %d launch(es) in a row failed; next try in %g s",
                        in_a_row, delay)

    def _size(self, cluster: Cluster, reports: dict[str, LoadReport], num_open: int) -> int:
        """Open instances, counting launches in flight and instances that joined
        after this round's reports (pending is read first: a launch adds its
        instance before it stops counting as pending, so none is missed)."""
        with self._lock:
            pending = self.pending
        joined = sum(1 for name, inst in list(cluster.instances.items())
                     if name not in reports and inst.alive and not inst.draining)
        return num_open + pending + joined

    def _launch(self, cluster: Cluster, now: float) -> None:
        with self._lock:
            self.pending += 1
        self._quiet_until = now + self.cooldown_s
        self.spawn(lambda: self._run_launch(cluster))

    def _run_launch(self, cluster: Cluster) -> None:
        """One launch, off the cluster's thread: the instance joins the cluster,
        or, if the cluster shut down meanwhile, is terminated."""
        try:
            inst = cluster.launcher.launch(cluster.on_outputs, cluster.on_death)
        except Exception:
            log.exception("autoscaler: launching an instance failed")
            with self._lock:
                self.pending -= 1
                self.failures_in_a_row += 1
                self.num_failed_launches += 1
                self._failed = True
            return
        try:
            cluster.add_instance(inst)
        except RuntimeError:  # shut down
            cluster.launcher.terminate(inst)
        with self._lock:
            self.pending -= 1
            self.failures_in_a_row = 0


class ReplanAutoscaler:
    """The re-planner as an autoscaler over ``fleet`` (the cluster's `FleetActuator`).
    ``replan_kw`` go to `Replanner` (``options``, ``window_s``, ``min_saving``,
    ``patience``). ``demands`` are per type, ``{type name: [demand, ...]}``: the
    fleet keeps at least that many open instances of the type (a plan's removals
    are trimmed to it, a shortfall is launched at once)."""

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
           demands: Sequence[Demand] = ()) -> Autoscaler:
    """Give a one-type cluster (its instances all from ``cluster.launcher``) the
    autoscaler ``kind`` (`AUTOSCALERS`), which never runs more than
    ``max_instances`` nor fewer than it started with. ``replan`` needs
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
                                                demands=demands)
    else:
        scaler = _replan_autoscaler(cluster, max_instances, profile_path, demands)
    cluster.autoscaler = scaler
    return scaler


def _replan_autoscaler(cluster: Cluster, max_instances: int, profile_path: str | None,
                       demands: Sequence[Demand]) -> ReplanAutoscaler:
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
    fleet = FleetActuator(cluster, {name: cluster.launcher}, buckets)
    fleet.adopt(name, list(cluster.instances))
    floor = len(cluster.instances)
    return ReplanAutoscaler(fleet, profiles, buckets,
                            demands={name: [lambda: floor, *demands]},
                            options=Options(caps={name: max_instances}))
