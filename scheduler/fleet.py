"""The provisioner's scale actuator over a `Cluster`: a fleet of instances of
several accelerator types, resized by `sluice.provision.replan.Replanner`.

``FleetActuator(cluster, launchers, buckets)`` implements the `ScaleActuator`
protocol: ``counts()`` is the open (not draining) instances per type;
``apply(diff)`` starts launching ``diff.add`` in the background
(`sluice.scheduler.autoscale.Launches`: the caller does not wait for instances
to load and compile; a launch in flight counts in ``counts()`` for its type
until its instance has joined, then the instance does: never both) and drains ``diff.remove`` (the least loaded
open instances of each type: they take no new requests, their running ones
live-migrate away, and the cluster stops them once empty); ``route``
installs per-bucket routing weights, after which each new request goes to an
instance of a type drawn with its bucket's weights (the cluster's dispatch
policy picks among that type's instances). A dead instance is replaced by one
of its own type, launched by that type's launcher (the cluster's
``replacement_for``), and counts as that type while it launches.
`sluice.scheduler.autoscale.ReplanAutoscaler` drives it: it feeds the
re-planner every dispatched request and re-plans on the cluster's rounds.
"""

from __future__ import annotations

import numpy as np

from sluice.provision.replan import FleetDiff, Routing
from sluice.provision.workload import Buckets
from sluice.runtime.intake import Group
from sluice.scheduler.autoscale import Launches, Spawn, in_thread
from sluice.scheduler.cluster import Cluster, Launcher, Replacement
from sluice.scheduler.instance import Instance


class FleetActuator:
    def __init__(self, cluster: Cluster, launchers: dict[str, Launcher], buckets: Buckets,
                 seed: int = 0, spawn: Spawn = in_thread):
        self.cluster = cluster
        self.launchers = launchers
        self.buckets = buckets
        self.launches = Launches(spawn)
        self.type_of: dict[str, str] = {}  # instance name -> accelerator type
        self.routing: Routing = {}
        self._rng = np.random.default_rng(seed)
        cluster.router = self.eligible
        cluster.replacement_for = self._replacement_for

    def adopt(self, type_name: str, names: list[str]) -> None:
        """Declare the type of instances the cluster started with."""
        self.type_of.update({n: type_name for n in names})

    def counts(self) -> dict[str, int]:
        """Open instances per type, launches in flight included; read under the
        cluster's lock, where a launch's instance joins, is typed and stops
        counting as pending in one step, so each launch counts exactly once."""
        with self.cluster.lock:
            counts = {t: self.launches.num_pending(t) + self.cluster.launches.num_pending(t)
                      for t in self.launchers}
            for name, inst in self.cluster.instances.items():
                if inst.alive and not inst.draining and name in self.type_of:
                    counts[self.type_of[name]] += 1
        return counts

    def apply(self, diff: FleetDiff) -> None:
        for type_name, n in diff.add.items():
            for _ in range(n):
                self.launches.start(self.cluster, self.launchers[type_name], type_name,
                                    joined=lambda inst, t=type_name: self._typed(inst, t))
        for type_name, n in diff.remove.items():
            open_ = [i.report() for name, i in self.cluster.instances.items()
                     if self.type_of.get(name) == type_name and i.alive and not i.draining]
            for report in sorted(open_, key=lambda r: r.num_requests)[:n]:
                self.cluster.drain(report.name)

    def _typed(self, inst: Instance, type_name: str) -> None:
        self.type_of[inst.name] = type_name

    def _replacement_for(self, dead: str) -> Replacement:
        """A dead instance's replacement: its type's launcher, typed as it joins
        (an instance of no known type goes to the cluster's own launcher)."""
        type_name = self.type_of.get(dead)
        if type_name is None:
            return Replacement(self.cluster.launcher)

        def joined(fresh: Instance) -> None:
            self.type_of.pop(dead, None)
            self._typed(fresh, type_name)
        return Replacement(self.launchers[type_name], type_name, joined)

    def route(self, routing: Routing) -> None:
        self.routing = routing

    def eligible(self, group: Group) -> set[str] | None:
        """Instances a new request may go to under the routing (None: any)."""
        req = group.requests[0]
        cell = self.buckets.index(len(req.prompt_token_ids), req.max_tokens)
        weights = self.routing.get(cell) if cell is not None else None
        if not weights:
            return None
        types, w = zip(*[(t, x) for t, x in weights.items() if x > 0])
        chosen = types[self._rng.choice(len(types), p=np.asarray(w) / sum(w))]
        names = {n for n, t in self.type_of.items()
                 if t == chosen and n in self.cluster.instances}  # not dead or retired ones
        return names or None
