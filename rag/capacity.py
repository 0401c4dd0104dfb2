"""Capacity that follows load: how many replicas of a class's pipeline to run.

The `ReOrchestrator` makes each query faster or cheaper by changing its configuration; when
the arrival rate outgrows what the class's servers absorb, only more servers keep the
latency SLO. `Capacity` estimates each class's arrival rate over a sliding window and sizes
the class's replica pool with the M/M/c queue (Erlang C): the fewest servers for which the
95th percentile of waiting time plus the configuration's p95 service time stays within
``margin`` x the class's latency bound. It scales up at once and down only after the smaller
pool has been enough for ``hold_s`` seconds, so a noisy rate estimate does not flap the pool.
Replicas are pipeline workers on Sluice instances; whoever runs them (the global
scheduler's actuator, or the benchmark's simulation) applies the number.

Interface:

- ``erlang_c(servers, offered_load) -> float``: probability an arrival waits (1 when the
  queue is unstable).
- ``wait_p95(servers, rate, service_mean_s, service_cv2=1) -> float``: 95th-percentile
  wait in seconds (inf when unstable); ``service_cv2`` = 1 is exponential service (M/M/c),
  other values scale the wait by (1 + cv^2) / 2 (Allen-Cunneen's M/G/c approximation).
- ``replicas_needed(rate, service_mean_s, service_p95_s, bound_s, margin, max_replicas,
  service_cv2)``.
- ``Capacity(bounds, window_s=20, hold_s=30, margin=0.8, max_replicas=64,
  service_cv2=1)``: ``bounds``
  maps class -> latency bound (s). ``arrival(cls, t)`` records an arrival at time ``t``;
  ``rate(cls, t)``; ``wanted(cls, t, profile) -> int`` re-decides the class's replicas now,
  given the `Profile` (service times) it currently runs; ``current(cls)`` reads the last
  decision without changing anything; ``replicas()`` is every class's last decision
  together: the instances the RAG layer asks the global scheduler's autoscaler for
  (one of its ``demands``, `sluice.scheduler.autoscale`).
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Mapping

from sluice.rag.sla import Profile

P95_TAIL = 0.05


def erlang_c(servers: int, offered_load: float) -> float:
    """Probability that an arrival waits in an M/M/c queue with ``offered_load`` = rate x
    mean service time (Erlang B recursion, then the C formula)."""
    if offered_load >= servers:
        return 1.0
    b = 1.0
    for k in range(1, servers + 1):
        b = offered_load * b / (k + offered_load * b)
    rho = offered_load / servers
    return b / (1 - rho * (1 - b))


def wait_p95(servers: int, rate: float, service_mean_s: float,
             service_cv2: float = 1.0) -> float:
    """P(wait > t) = C exp(-(c mu - lambda) t), solved for the 5% tail; for service times
    that are not exponential the wait is scaled by (1 + cv^2) / 2 (Allen-Cunneen), cv^2
    being the squared coefficient of variation of the service time."""
    if rate <= 0:
        return 0.0
    mu = 1.0 / service_mean_s
    if rate >= servers * mu:
        return math.inf
    c = erlang_c(servers, rate * service_mean_s)
    if c <= P95_TAIL:
        return 0.0
    return math.log(c / P95_TAIL) / (servers * mu - rate) * (1 + service_cv2) / 2


def replicas_needed(rate: float, service_mean_s: float, service_p95_s: float, bound_s: float,
                    margin: float = 0.8, max_replicas: int = 64,
                    service_cv2: float = 1.0) -> int:
    """Fewest servers whose p95 wait + p95 service fits in ``margin`` x ``bound_s``; when
    the service alone does not fit, the fewest that make waiting rarer than 5%."""
    if not service_mean_s > 0:
        raise ValueError(f"service_mean_s: must be > 0, got {service_mean_s}")
    slack = max(margin * bound_s - service_p95_s, 0.0)
    for c in range(1, max_replicas + 1):
        wait = wait_p95(c, rate, service_mean_s, service_cv2)
        if math.isfinite(wait) and wait <= slack:  # a stable queue, even with no bound
            return c
    return max_replicas


class Capacity:
    def __init__(self, bounds: Mapping[str, float], window_s: float = 20.0, hold_s: float = 30.0,
                 margin: float = 0.8, max_replicas: int = 64, service_cv2: float = 1.0):
        if (window_s <= 0 or hold_s < 0 or not 0 < margin <= 1 or max_replicas < 1
                or service_cv2 < 0):
            raise ValueError("capacity: need window_s > 0, hold_s >= 0, 0 < margin <= 1, "
                             "max_replicas >= 1, service_cv2 >= 0")
        self.bounds = dict(bounds)
        self.window_s, self.hold_s = window_s, hold_s
        self.margin, self.max_replicas = margin, max_replicas
        self.service_cv2 = service_cv2
        self._arrivals: dict[str, deque[float]] = {c: deque() for c in self.bounds}
        self._replicas = {c: 1 for c in self.bounds}
        self._calm_since: dict[str, float | None] = {c: None for c in self.bounds}
        self._calm_peak = {c: 1 for c in self.bounds}

    def _queue(self, cls: str) -> deque[float]:
        if cls not in self._arrivals:
            raise ValueError(f"class: unknown {cls!r} (known: {', '.join(self._arrivals)})")
        return self._arrivals[cls]

    def arrival(self, cls: str, t: float) -> None:
        self._queue(cls).append(t)
        self._trim(cls, t)

    def _trim(self, cls: str, t: float) -> None:
        q = self._queue(cls)
        while q and q[0] < t - self.window_s:
            q.popleft()

    def rate(self, cls: str, t: float) -> float:
        """Arrivals per second over the last ``window_s`` (a full window even at start-up,
        where a shorter one would turn the first few arrivals into a burst)."""
        self._trim(cls, t)
        return len(self._queue(cls)) / self.window_s

    def current(self, cls: str) -> int:
        self._queue(cls)  # validates the class
        return self._replicas[cls]

    def replicas(self) -> int:
        """The replicas of every class's pipeline together, as last decided."""
        return sum(self._replicas.values())

    def wanted(self, cls: str, t: float, profile: Profile) -> int:
        need = replicas_needed(self.rate(cls, t), profile.latency_mean_s, profile.latency_p95_s,
                               self.bounds[cls], self.margin, self.max_replicas,
                               self.service_cv2)
        if need >= self._replicas[cls]:
            self._replicas[cls], self._calm_since[cls] = need, None
            return need
        if self._calm_since[cls] is None:
            self._calm_since[cls], self._calm_peak[cls] = t, need
        self._calm_peak[cls] = max(self._calm_peak[cls], need)
        if t - self._calm_since[cls] >= self.hold_s:  # the most needed while calm suffices
            self._replicas[cls], self._calm_since[cls] = self._calm_peak[cls], None
        return self._replicas[cls]
