"""SLOs, configuration profiles, the per-class planner and the runtime re-orchestrator.

- ``SLO(min_quality, latency_p95_s, max_cost)``: the targets of one query class: mean answer
  quality (token F1 on a labelled set, 0..1) at least ``min_quality``, 95th-percentile latency
  at most ``latency_p95_s`` seconds, mean cost at most ``max_cost`` dollars per query.
  ``SLO.from_dict`` parses the HTTP ``slo`` object (``ValueError`` naming the field).
- ``QueryClass(name, slo, description, seeds)``: ``seeds`` are example questions of the
  class for the intent classifier (the built-in classes' come from ``sluice.rag.intent``).
- ``Profile(config, quality, latency_p95_s, cost_usd, latency_mean_s, exact_match,
  questions, quality_method, stopped_early)``: one configuration measured offline
  (``sluice.rag.profiling``): quality is mean token F1 against the labels of
  ``quality_method`` (``"labelled"``: the corpus's own, e.g. SQuAD; ``"generated"``:
  questions generated from the passages, ``sluice.rag.synthetic``);
  ``save_profiles``/``load_profiles`` keep them as JSON (written atomically).
- ``pareto_front(profiles)``: the profiles no other profile beats or ties on all three of
  quality (higher), latency and cost (lower).
- ``Planner(profiles).choose(slo)``: the cheapest profile meeting the SLO, ties to the lower
  latency, then the higher quality; only Pareto-front profiles can win. An impossible SLO
  raises ``ValueError`` naming the violated field and the achievable range ("min_quality:
  0.95 is above the best measured quality 0.41 ..."). ``fallbacks(slo)`` lists the
  profiles that meet the quality and cost targets, fastest first: where the re-orchestrator
  may move a class when load threatens its latency. ``best_effort(slo)``: the profile closest
  to an SLO no profile meets (smallest quality shortfall, then latency, then cost overrun).
- ``ReOrchestrator(planner, classes, ...)``: at runtime each class runs its planned
  configuration. ``observe(cls, latency_s, queue_depth)`` records a finished query;
  ``config_for(cls)`` returns the configuration to use now. Pressure on a class is the larger
  of its recent observed p95 latency (last ``window`` queries) and a queueing forecast,
  (queue depth / workers + 1) x the current profile's p95 service latency (workers: the
  constructor's, or the class's current server count when `sluice.rag.capacity` scales
  it), both as a
  fraction of the class's latency bound. Above ``high`` the class steps to the next faster
  fallback at once; it steps back toward the planned (cheaper) configuration only after
  ``hold`` consecutive observations in which both the current pressure and the forecast for
  the slower configuration are below ``low``. The gap between ``high`` and ``low`` and
  the hold count are the hysteresis that keeps a class from flapping at the boundary; it
  never moves to a configuration that misses its quality or cost target. A class whose SLO
  no profile meets is not an error: it runs ``best_effort`` and ``unmet(cls)`` says why,
  so a server on slower hardware than the SLOs were written for still starts and says so.
"""

from __future__ import annotations

import json
import math
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from sluice.rag.config import PipelineConfig

SLO_FIELDS = ("min_quality", "latency_p95_s", "max_cost")


def _number(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
        raise ValueError(f"slo.{name}: must be a number, got {value!r}")
    return float(value)


@dataclass(frozen=True)
class SLO:
    min_quality: float = 0.0
    latency_p95_s: float = math.inf
    max_cost: float = math.inf

    def __post_init__(self) -> None:
        for name in SLO_FIELDS:
            _number(name, getattr(self, name))
        if not 0.0 <= self.min_quality <= 1.0:
            raise ValueError(f"slo.min_quality: must be in [0, 1], got {self.min_quality}")
        if self.latency_p95_s <= 0:
            raise ValueError(f"slo.latency_p95_s: must be positive, got {self.latency_p95_s}")
        if self.max_cost < 0:
            raise ValueError(f"slo.max_cost: must be non-negative, got {self.max_cost}")

    @classmethod
    def from_dict(cls, d: Any, base: SLO | None = None) -> SLO:
        """An SLO from a JSON object; fields it lacks come from ``base``."""
        if not isinstance(d, dict):
            raise ValueError("slo: must be an object with min_quality, latency_p95_s, max_cost")
        unknown = set(d) - set(SLO_FIELDS)
        if unknown:
            raise ValueError(f"slo: unknown fields {sorted(unknown)} "
                             f"(expected {', '.join(SLO_FIELDS)})")
        values = {name: getattr(base or cls(), name) for name in SLO_FIELDS}
        values.update({name: _number(name, v) for name, v in d.items()})
        return cls(**values)

    def to_dict(self) -> dict[str, float | None]:
        return {name: (None if math.isinf(getattr(self, name)) else getattr(self, name))
                for name in SLO_FIELDS}


@dataclass(frozen=True)
class QueryClass:
    name: str
    slo: SLO
    description: str = ""
    seeds: tuple[str, ...] = ()  # example questions for the intent classifier


@dataclass(frozen=True)
class Profile:
    config: PipelineConfig
    quality: float
    latency_p95_s: float
    cost_usd: float
    latency_mean_s: float
    exact_match: float | None = None  # on the same questions as ``quality`` (mean token F1)
    questions: int = 0                # questions measured
    quality_method: str = "labelled"  # "labelled" or "generated" (sluice.rag.synthetic)
    stopped_early: bool = False       # measurement cut short: clearly dominated

    def meets(self, slo: SLO) -> bool:
        return (self.quality >= slo.min_quality and self.latency_p95_s <= slo.latency_p95_s
                and self.cost_usd <= slo.max_cost)

    def to_dict(self) -> dict[str, Any]:
        return {"config": self.config.to_dict(), "name": self.config.name,
                "quality": self.quality, "f1": self.quality, "exact_match": self.exact_match,
                "quality_method": self.quality_method, "questions": self.questions,
                "stopped_early": self.stopped_early, "latency_p95_s": self.latency_p95_s,
                "cost_usd": self.cost_usd, "latency_mean_s": self.latency_mean_s}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Profile:
        em = d.get("exact_match")
        return cls(PipelineConfig.from_dict(d["config"]), float(d["quality"]),
                   float(d["latency_p95_s"]), float(d["cost_usd"]), float(d["latency_mean_s"]),
                   None if em is None else float(em), int(d.get("questions", 0)),
                   str(d.get("quality_method", "labelled")), bool(d.get("stopped_early", False)))


def save_profiles(path: str | Path, profiles: Sequence[Profile]) -> None:
    """Write atomically (a temporary file renamed over ``path``), so a build interrupted
    while writing leaves the previous file whole."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps([p.to_dict() for p in profiles], indent=1))
    tmp.replace(path)


def load_profiles(path: str | Path) -> list[Profile]:
    try:
        rows = json.loads(Path(path).read_text())
        return [Profile.from_dict(r) for r in rows]
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as e:
        raise ValueError(f"{path}: cannot read the profiles ({e})") from e


def _dominates(a: Profile, b: Profile) -> bool:
    return (a.quality >= b.quality and a.latency_p95_s <= b.latency_p95_s
            and a.cost_usd <= b.cost_usd
            and (a.quality, -a.latency_p95_s, -a.cost_usd) != (b.quality, -b.latency_p95_s,
                                                                -b.cost_usd))


def pareto_front(profiles: Sequence[Profile]) -> list[Profile]:
    return [p for p in profiles if not any(_dominates(o, p) for o in profiles)]


class Planner:
    def __init__(self, profiles: Sequence[Profile]):
        if not profiles:
            raise ValueError("profiles: none measured; build them with sluice rag build-index")
        self.profiles = list(profiles)
        self.front = pareto_front(self.profiles)

    def choose(self, slo: SLO) -> Profile:
        feasible = [p for p in self.front if p.meets(slo)]
        if not feasible:
            raise ValueError(self._infeasible(slo))
        return min(feasible, key=lambda p: (p.cost_usd, p.latency_p95_s, -p.quality))

    def plan(self, classes: Mapping[str, QueryClass]) -> dict[str, Profile]:
        out = {}
        for name, cls in classes.items():
            try:
                out[name] = self.choose(cls.slo)
            except ValueError as e:
                raise ValueError(f"class {name!r}: {e}") from None
        return out

    def best_effort(self, slo: SLO) -> Profile:
        """The profile closest to an SLO none meets: the smallest quality shortfall, then
        the smallest latency overrun, then the smallest cost overrun."""
        return min(self.profiles, key=lambda p: (
            max(0.0, slo.min_quality - p.quality),
            max(0.0, p.latency_p95_s / slo.latency_p95_s - 1.0),
            max(0.0, p.cost_usd - slo.max_cost), p.latency_p95_s))

    def fallbacks(self, slo: SLO) -> list[Profile]:
        ok = [p for p in self.profiles
              if p.quality >= slo.min_quality and p.cost_usd <= slo.max_cost]
        return sorted(ok, key=lambda p: (p.latency_p95_s, p.cost_usd))

    def _infeasible(self, slo: SLO) -> str:
        ps = self.profiles
        best_q = max(p.quality for p in ps)
        if slo.min_quality > best_q:
            return (f"slo.min_quality: {slo.min_quality:g} is above the best measured quality "
                    f"{best_q:.3f}; achievable: min_quality <= {best_q:.3f}")
        fast = min(p.latency_p95_s for p in ps if p.quality >= slo.min_quality)
        if slo.latency_p95_s < fast:
            return (f"slo.latency_p95_s: {slo.latency_p95_s:g}s is below the fastest p95 "
                    f"{fast:.4g}s of configurations with quality >= {slo.min_quality:g}; "
                    f"achievable: latency_p95_s >= {fast:.4g}")
        ok = [p for p in ps if p.quality >= slo.min_quality
              and p.latency_p95_s <= slo.latency_p95_s]
        cheap = min(p.cost_usd for p in ok)
        return (f"slo.max_cost: {slo.max_cost:g} is below the cheapest {cheap:.4g} $/query of "
                f"configurations with quality >= {slo.min_quality:g} and p95 <= "
                f"{slo.latency_p95_s:g}s; achievable: max_cost >= {cheap:.4g}")


@dataclass
class _ClassState:
    ladder: list[Profile]          # index 0: the planned (cheapest) configuration
    level: int = 0                 # current position; higher = faster
    calm: int = 0                  # consecutive observations below the low mark
    latencies: deque = field(default_factory=deque)
    unmet: str | None = None       # why no configuration meets the SLO (served best-effort)


class ReOrchestrator:
    def __init__(self, planner: Planner, classes: Mapping[str, QueryClass], workers: int = 1,
                 high: float = 0.8, low: float = 0.5, hold: int = 20, window: int = 50):
        if not 0 < low < high:
            raise ValueError(f"low/high: need 0 < low < high, got {low}, {high}")
        self.classes, self.workers = dict(classes), workers
        self.high, self.low, self.hold, self.window = high, low, hold, window
        self.states: dict[str, _ClassState] = {}
        for name, cls in self.classes.items():
            try:
                planned, unmet = planner.plan({name: cls})[name], None
            except ValueError as e:
                planned, unmet = planner.best_effort(cls.slo), str(e)
            faster = [p for p in planner.fallbacks(cls.slo)
                      if p.latency_p95_s < planned.latency_p95_s]
            self.states[name] = _ClassState([planned] + faster, unmet=unmet)

    def unmet(self, cls: str) -> str | None:
        """Why no measured configuration meets ``cls``'s SLO, or None when one does."""
        return self._state(cls).unmet

    def _state(self, cls: str) -> _ClassState:
        if cls not in self.states:
            raise ValueError(f"class: unknown {cls!r} (known: {', '.join(self.states)})")
        return self.states[cls]

    def profile_for(self, cls: str) -> Profile:
        state = self._state(cls)
        return state.ladder[state.level]

    def config_for(self, cls: str) -> PipelineConfig:
        return self.profile_for(cls).config

    def pressure(self, cls: str, queue_depth: int, level: int | None = None,
                 workers: int | None = None) -> float:
        """Forecast or observed p95 latency as a fraction of the class's latency bound, for
        the configuration at ``level`` of the class's ladder (default: the current one) on
        ``workers`` servers (default: the constructor's)."""
        state = self._state(cls)
        level = state.level if level is None else level
        bound = self.classes[cls].slo.latency_p95_s
        workers = workers or self.workers
        forecast = (queue_depth / workers + 1) * state.ladder[level].latency_p95_s
        observed = (float(np.percentile(state.latencies, 95))
                    if state.latencies and level == state.level else 0.0)
        return max(forecast, observed) / bound

    def observe(self, cls: str, latency_s: float, queue_depth: int,
                workers: int | None = None) -> None:
        state = self._state(cls)
        state.latencies.append(latency_s)
        while len(state.latencies) > self.window:
            state.latencies.popleft()
        self.update(cls, queue_depth, workers)

    def update(self, cls: str, queue_depth: int, workers: int | None = None) -> None:
        """Re-decide ``cls``'s level from the current pressure (also called on arrivals);
        ``workers``: the servers the class has now, when capacity follows load."""
        state = self._state(cls)
        pressure = self.pressure(cls, queue_depth, workers=workers)
        if pressure > self.high and state.level + 1 < len(state.ladder):
            state.level += 1
            state.calm = 0
            state.latencies.clear()  # judge the new configuration on its own latencies
        elif (state.level > 0 and pressure < self.low
              and self.pressure(cls, queue_depth, state.level - 1, workers) < self.low):
            state.calm += 1
            if state.calm >= self.hold:
                state.level -= 1
                state.calm = 0
                state.latencies.clear()
        else:
            state.calm = 0
