"""Online re-planning: keep the fleet right as traffic changes, without flapping.

Interface:

- ``ScaleActuator`` (Protocol): what the multi-instance scheduler implements.
  ``counts()`` is the fleet now (instances per type name); ``apply(diff)`` adds
  ``diff.add`` first, then drains ``diff.remove`` (migrating their requests)
  before stopping them; ``route(routing)`` installs per-bucket routing weights.
- ``Replanner(profiles, buckets, actuator, options, ...)``: ``observe(t, input_len,
  output_len)`` records a request (lengths are clipped into the bucket range);
  ``replan(now) -> FleetDiff | None`` re-estimates the bucket histogram and rate
  from the requests of the last ``window_s`` seconds, re-solves, applies the
  diff if the hysteresis rule says so, installs routing, and returns the diff.

Hysteresis: scale up at once when the current fleet cannot carry the observed
load with the plan's headroom (the planner, capped at the current counts, leaves
some rate unserved or is infeasible). Otherwise change the fleet only when the
new plan is cheaper by at least ``min_saving`` (fraction) on ``patience``
consecutive re-plans; any re-plan that is not cheaper resets that count. The
current fleet keeps serving, with routing re-solved for it, in between.
"""

from __future__ import annotations

import dataclasses
import threading
from collections import deque
from typing import Protocol, Sequence

import numpy as np

from sluice.provision.planner import Options, Plan, solve
from sluice.provision.profiles import TypeProfile
from sluice.provision.workload import Buckets

Routing = dict[tuple[int, int], dict[str, float]]


@dataclasses.dataclass(frozen=True)
class FleetDiff:
    add: dict[str, int]
    remove: dict[str, int]
    target: dict[str, int]
    cost_before: float
    cost_after: float
    reason: str  # "scale_up" | "cheaper"


class ScaleActuator(Protocol):
    def counts(self) -> dict[str, int]: ...

    def apply(self, diff: FleetDiff) -> None: ...

    def route(self, routing: Routing) -> None: ...


class Replanner:
    def __init__(self, profiles: Sequence[TypeProfile], buckets: Buckets, actuator: ScaleActuator,
                 options: Options = Options(), window_s: float = 300.0,
                 min_saving: float = 0.1, patience: int = 3):
        self.profiles = list(profiles)
        self.buckets = buckets
        self.actuator = actuator
        self.options = options
        self.window_s = window_s
        self.min_saving = min_saving
        self.patience = patience
        self._seen: deque[tuple[float, tuple[int, int]]] = deque()
        # arrivals are observed on the serving threads while a re-plan reads them
        self._seen_lock = threading.Lock()
        self._cheaper_streak = 0
        self._max_in = buckets.input_edges[-1]
        self._max_out = buckets.output_edges[-1]

    def observe(self, t: float, input_len: int, output_len: int) -> None:
        idx = self.buckets.index(min(max(input_len, 1), self._max_in),
                                 min(max(output_len, 1), self._max_out))
        with self._seen_lock:
            self._seen.append((t, idx))

    def rates(self, now: float) -> np.ndarray:
        with self._seen_lock:
            while self._seen and self._seen[0][0] <= now - self.window_s:
                self._seen.popleft()
            seen = [idx for _, idx in self._seen]
        counts = np.zeros(self.buckets.shape)
        for idx in seen:
            counts[idx] += 1
        return counts / self.window_s

    def replan(self, now: float) -> FleetDiff | None:
        rates = self.rates(now)
        current = self.actuator.counts()
        names = {p.name for p in self.profiles}
        caps = {n: current.get(n, 0) for n in names}
        on_current = solve(self.profiles, rates, dataclasses.replace(self.options, caps=caps))
        target = solve(self.profiles, rates, self.options)
        cost_now = sum(p.cost * current.get(p.name, 0) for p in self.profiles)
        adequate = on_current.status == "optimal" and not on_current.unserved
        diff = None
        if not adequate and target.status == "optimal":
            diff = self._diff(current, target, cost_now, "scale_up")
        elif adequate and target.cost <= cost_now * (1 - self.min_saving):
            self._cheaper_streak += 1
            if self._cheaper_streak >= self.patience:
                diff = self._diff(current, target, cost_now, "cheaper")
        else:
            self._cheaper_streak = 0
        plan: Plan = on_current if diff is None else target
        if diff is not None:
            self._cheaper_streak = 0
            self.actuator.apply(diff)
        self.actuator.route(plan.routing)
        return diff

    def _diff(self, current: dict[str, int], target: Plan, cost_now: float,
              reason: str) -> FleetDiff | None:
        names = {p.name for p in self.profiles}
        add = {n: target.counts.get(n, 0) - current.get(n, 0) for n in names}
        add = {n: k for n, k in add.items() if k > 0}
        remove = {n: current.get(n, 0) - target.counts.get(n, 0) for n in names}
        remove = {n: k for n, k in remove.items() if k > 0}
        if not add and not remove:
            return None
        return FleetDiff(add, remove, dict(target.counts), cost_now, target.cost, reason)
