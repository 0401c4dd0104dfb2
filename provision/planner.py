"""The cost-minimal allocation as an integer program (``scipy.optimize.milp``, HiGHS).

Interface:

- ``solve(profiles, rates, options) -> Plan``: ``rates[i, j]`` is the req/s of
  bucket (i, j); ``profiles`` are `TypeProfile`s over the same buckets.
- ``Options``: ``slice_factor`` (slices per bucket), ``headroom`` (default 0.1:
  every slice's load is inflated by 10%), ``caps`` (most instances per type name),
  ``budget`` ($/hour; then the served rate is maximised, ties broken by cost).
- ``Plan``: ``counts`` per type, ``cost`` $/hour, ``routing[(i, j)] = {type:
  fraction of the bucket's rate}`` (for the load balancer), ``loads`` (summed
  load per type, in instances), ``served`` / ``unserved`` req/s, the buckets
  no type can serve, the solver status and time. ``to_json()`` for output.

The program (Mélange's formulation, with identical slices aggregated): each
bucket's rate r_b is cut into S equal slices; n[b, t] in {0..S} is how many of
them type t serves (only for types with tput[b, t] > 0: a bucket a type cannot
hold or serve within the SLO is never assigned to it). y[t] >= 0 integer is the
instance count of type t. Constraints: sum_t n[b, t] = S (<= S in budget mode);
sum_b n[b, t] (r_b / S)(1 + headroom) / tput[b, t] <= y[t]; y[t] <= cap[t];
budget mode adds sum_t cost[t] y[t] <= budget. Objective: min sum_t cost[t] y[t]
(budget mode: max served rate, then min cost at that rate). Giving all S slices
of a bucket their own binary variable, as Mélange does, describes the same
feasible set with S! symmetric copies of each solution; counting them is exact.
Buckets with rate > 0 that no type can serve are reported, left unserved.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Sequence

import numpy as np
from scipy.optimize import Bounds, LinearConstraint, milp
from scipy.sparse import coo_array

from sluice.provision.profiles import TypeProfile


@dataclasses.dataclass(frozen=True)
class Options:
    slice_factor: int = 8
    headroom: float = 0.1
    caps: dict[str, int] = dataclasses.field(default_factory=dict)
    budget: float | None = None
    time_limit_s: float = 60.0


@dataclasses.dataclass
class Plan:
    status: str  # "optimal" | "infeasible" | "time_limit"
    counts: dict[str, int]
    cost: float
    routing: dict[tuple[int, int], dict[str, float]]
    loads: dict[str, float]
    served: float
    unserved: dict[tuple[int, int], float]
    infeasible_buckets: list[tuple[int, int]]
    headroom: float
    solve_time_s: float
    attainment: dict | None = None  # filled by `sluice.provision.simulate.verify`

    @property
    def feasible(self) -> bool:
        return self.status == "optimal" and not self.unserved

    def to_json(self, buckets=None, sources: dict[str, str] | None = None) -> dict:
        label = (lambda b: buckets.label(*b)) if buckets is not None else (lambda b: f"{b[0]},{b[1]}")
        return {
            "status": self.status, "feasible": self.feasible,
            "cost_usd_per_hour": self.cost,
            "counts": self.counts,
            "sources": {t: sources[t] for t in self.counts} if sources else None,
            "loads": self.loads,
            "routing": {label(b): w for b, w in self.routing.items()},
            "served_rate": self.served,
            "unserved_rate": {label(b): r for b, r in self.unserved.items()},
            "infeasible_buckets": [label(b) for b in self.infeasible_buckets],
            "headroom": self.headroom,
            "solve_time_s": self.solve_time_s,
            "attainment": self.attainment,
        }


def solve(profiles: Sequence[TypeProfile], rates: np.ndarray, options: Options = Options()) -> Plan:
    rates = np.asarray(rates, dtype=float)
    S, h = options.slice_factor, options.headroom
    if S < 1 or h < 0:
        raise ValueError("slice_factor must be >= 1 and headroom >= 0")
    for name in options.caps:
        if name not in {p.name for p in profiles}:
            raise ValueError(f"caps: unknown type {name!r}")
    T = len(profiles)
    buckets = [b for b in np.ndindex(*rates.shape) if rates[b] > 0]
    pairs = [(b, t) for b in buckets for t in range(T) if profiles[t].tputs[b] > 0]
    infeasible = [b for b in buckets if all(p.tputs[b] <= 0 for p in profiles)]
    served_buckets = [b for b in buckets if b not in infeasible]
    P = len(pairs)
    nvar = P + T
    cost = np.array([p.cost for p in profiles])
    slice_rate = np.array([rates[b] / S for b, _ in pairs])

    bucket_row = {b: r for r, b in enumerate(served_buckets)}
    nb = len(served_buckets)
    ri = [bucket_row[b] for b, _ in pairs] + [nb + t for _, t in pairs] + list(range(nb, nb + T))
    ci = list(range(P)) + list(range(P)) + list(range(P, P + T))
    vals = ([1.0] * P + [slice_rate[k] * (1 + h) / profiles[t].tputs[b]
                         for k, (b, t) in enumerate(pairs)] + [-1.0] * T)
    lo = [0 if options.budget is not None else S] * nb + [-np.inf] * T
    hi = [S] * nb + [0] * T
    if options.budget is not None:  # sum cost * count <= budget
        ri += [nb + T] * T
        ci += list(range(P, P + T))
        vals += list(cost)
        lo.append(-np.inf)
        hi.append(options.budget)
    A = coo_array((vals, (ri, ci)), shape=(len(lo), nvar)).tocsr()
    ub = np.concatenate([np.full(P, S), [options.caps.get(p.name, np.inf) for p in profiles]])
    bounds = Bounds(np.zeros(nvar), ub)
    constraints = [LinearConstraint(A, lo, hi)] if lo else []
    integrality = np.ones(nvar)
    cost_obj = np.concatenate([np.zeros(P), cost])
    milp_opts = {"time_limit": options.time_limit_s}

    start = time.perf_counter()
    if options.budget is not None and P:
        served_obj = np.concatenate([-slice_rate, np.zeros(T)])
        first = milp(served_obj, integrality=integrality, bounds=bounds, constraints=constraints,
                     options=milp_opts)
        if first.x is not None:
            best = -first.fun
            constraints.append(LinearConstraint(-served_obj, best - 1e-7 * max(best, 1), np.inf))
    res = milp(cost_obj, integrality=integrality, bounds=bounds, constraints=constraints,
               options=milp_opts)
    elapsed = time.perf_counter() - start

    if res.x is None:
        return Plan("infeasible", {}, 0.0, {}, {}, 0.0,
                    {b: float(rates[b]) for b in buckets}, infeasible, h, elapsed)
    x = np.round(res.x).astype(int)
    counts = {p.name: int(x[P + t]) for t, p in enumerate(profiles) if x[P + t] > 0}
    routing: dict[tuple[int, int], dict[str, float]] = {}
    loads = {p.name: 0.0 for p in profiles}
    for k, (b, t) in enumerate(pairs):
        if x[k]:
            routing.setdefault(b, {})[profiles[t].name] = float(x[k] / S)
            loads[profiles[t].name] += float(x[k] * slice_rate[k]) * (1 + h) / profiles[t].tputs[b]
    unserved = {b: float(rates[b]) * (1 - sum(routing.get(b, {}).values())) for b in buckets}
    unserved = {b: r for b, r in unserved.items() if r > 1e-9}
    status = "optimal" if res.status == 0 else "time_limit"
    return Plan(status, counts, float(sum(cost[t] * x[P + t] for t in range(T))), routing,
                {n: v for n, v in loads.items() if n in counts},
                float(rates.sum() - sum(unserved.values())), unserved, infeasible, h, elapsed)
