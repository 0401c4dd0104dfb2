"""Workloads and SLOs: what the provisioner is asked to serve.

Interface:

- ``parse_slo("tpot=0.05,ttft_p99=2") -> SLO``: terms ``tpot`` and ``ttft`` in
  seconds, each with an optional ``_pNN`` percentile suffix (no suffix: the
  mean). TPOT is a request's (finish - first token) / (output tokens - 1).
- ``Buckets(input_edges, output_edges)``: request-size buckets; bucket (i, j)
  holds requests with ``input_edges[i] < input_len <= input_edges[i+1]`` and
  likewise for outputs. ``representative`` is the bucket's midpoint (used for
  throughput), ``upper`` its upper edge (used for memory feasibility).
- ``load_workload(path) -> Workload`` reads the workload file; ``Workload.rates``
  is the req/s of each bucket (rate x distribution).
- ``histogram(buckets, requests)``: the bucket fractions of (input, output) pairs.

Workload file (JSON)::

    {"model": "llama-3-8b",            # a preset name or {ModelSpec fields}
     "rate": 8.0,                      # total requests per second
     "input_edges": [0, 128, 512, 2048, 8192],    # optional, these are the defaults
     "output_edges": [0, 64, 256, 1024],
     "distribution": [[...], ...],     # fractions, rows = input buckets, columns =
                                       # output buckets; or instead:
     "requests": [[input_len, output_len], ...],  # a sample, histogrammed
     "arrival_cv": 1.0}                # inter-arrival coefficient of variation:
                                       # 1 = Poisson, else Gamma (optional)
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path
from typing import Any, Sequence

import numpy as np

DEFAULT_INPUT_EDGES = (0, 128, 512, 2048, 8192)
DEFAULT_OUTPUT_EDGES = (0, 64, 256, 1024)


@dataclasses.dataclass(frozen=True)
class SLO:
    tpot: float | None = None
    tpot_pct: float | None = None  # None: the mean
    ttft: float | None = None
    ttft_pct: float | None = None

    def __str__(self) -> str:
        terms = []
        for name in ("tpot", "ttft"):
            value, pct = getattr(self, name), getattr(self, f"{name}_pct")
            if value is not None:
                terms.append(f"{name}{'' if pct is None else f'_p{pct:g}'}={value:g}")
        return ",".join(terms)


def parse_slo(text: str) -> SLO:
    fields: dict[str, float] = {}
    for term in filter(None, (t.strip() for t in text.split(","))):
        m = re.fullmatch(r"(tpot|ttft)(?:_p(\d+(?:\.\d+)?))?=([0-9.eE+-]+)", term)
        if m is None:
            raise ValueError(f"slo: bad term {term!r}; expected tpot|ttft[_pNN]=SECONDS")
        name, pct, value = m.group(1), m.group(2), float(m.group(3))
        if name in fields:
            raise ValueError(f"slo: {name} given twice")
        if not value > 0 or (pct is not None and not 0 < float(pct) < 100):
            raise ValueError(f"slo: {term!r}: need seconds > 0 and 0 < percentile < 100")
        fields[name] = value
        if pct is not None:
            fields[f"{name}_pct"] = float(pct)
    if not fields:
        raise ValueError("slo: give at least one of tpot, ttft")
    return SLO(**fields)


@dataclasses.dataclass(frozen=True)
class Buckets:
    input_edges: tuple[int, ...] = DEFAULT_INPUT_EDGES
    output_edges: tuple[int, ...] = DEFAULT_OUTPUT_EDGES

    def __post_init__(self) -> None:
        for name in ("input_edges", "output_edges"):
            e = getattr(self, name)
            if len(e) < 2 or e[0] < 0 or any(b <= a for a, b in zip(e, e[1:])):
                raise ValueError(f"{name}: need at least two increasing edges >= 0, got {e}")

    @property
    def shape(self) -> tuple[int, int]:
        return len(self.input_edges) - 1, len(self.output_edges) - 1

    def index(self, input_len: int, output_len: int) -> tuple[int, int] | None:
        i = int(np.searchsorted(self.input_edges, input_len, side="left")) - 1
        j = int(np.searchsorted(self.output_edges, output_len, side="left")) - 1
        ni, nj = self.shape
        return (i, j) if 0 <= i < ni and 0 <= j < nj else None

    def bounds(self, i: int, j: int) -> tuple[int, int, int, int]:
        """(input lo, input hi, output lo, output hi); lengths in (lo, hi]."""
        return (self.input_edges[i], self.input_edges[i + 1],
                self.output_edges[j], self.output_edges[j + 1])

    def representative(self, i: int, j: int) -> tuple[float, float]:
        ilo, ihi, olo, ohi = self.bounds(i, j)
        return (ilo + 1 + ihi) / 2, (olo + 1 + ohi) / 2

    def upper(self, i: int, j: int) -> tuple[int, int]:
        return self.input_edges[i + 1], self.output_edges[j + 1]

    def label(self, i: int, j: int) -> str:
        ilo, ihi, olo, ohi = self.bounds(i, j)
        return f"in({ilo},{ihi}]xout({olo},{ohi}]"


def histogram(buckets: Buckets, requests: Sequence[tuple[int, int]]) -> np.ndarray:
    """Fractions per bucket; requests outside every bucket raise ``ValueError``."""
    counts = np.zeros(buckets.shape)
    for n, (inp, out) in enumerate(requests):
        idx = buckets.index(inp, out)
        if idx is None:
            raise ValueError(f"requests[{n}]: ({inp}, {out}) lies outside every bucket")
        counts[idx] += 1
    if not counts.sum():
        raise ValueError("requests: empty")
    return counts / counts.sum()


@dataclasses.dataclass
class Workload:
    model: Any  # preset name, ModelSpec fields or a ModelSpec; resolved by perfmodel.model_spec
    rate: float
    distribution: np.ndarray
    buckets: Buckets = Buckets()
    arrival_cv: float = 1.0

    def __post_init__(self) -> None:
        self.distribution = np.asarray(self.distribution, dtype=float)
        if self.distribution.shape != self.buckets.shape:
            raise ValueError(f"distribution: shape {self.distribution.shape} != buckets "
                             f"{self.buckets.shape}")
        if (self.distribution < 0).any() or not np.isclose(self.distribution.sum(), 1, atol=1e-6):
            raise ValueError("distribution: fractions must be >= 0 and sum to 1")
        if not self.rate > 0:
            raise ValueError(f"rate: must be > 0, got {self.rate}")
        if not self.arrival_cv > 0:
            raise ValueError(f"arrival_cv: must be > 0, got {self.arrival_cv}")

    @property
    def rates(self) -> np.ndarray:
        return self.rate * self.distribution


def load_workload(path: str | Path) -> Workload:
    with open(path) as f:
        w = json.load(f)
    if not isinstance(w, dict):
        raise ValueError(f"{path}: the top level must be an object")
    for field in ("model", "rate"):
        if field not in w:
            raise ValueError(f"{path}: {field}: missing")
    buckets = Buckets(tuple(w.get("input_edges", DEFAULT_INPUT_EDGES)),
                      tuple(w.get("output_edges", DEFAULT_OUTPUT_EDGES)))
    if ("distribution" in w) == ("requests" in w):
        raise ValueError(f"{path}: give exactly one of distribution, requests")
    dist = w["distribution"] if "distribution" in w else histogram(buckets, w["requests"])
    return Workload(model=w["model"], rate=float(w["rate"]), distribution=np.asarray(dist),
                    buckets=buckets, arrival_cv=float(w.get("arrival_cv", 1.0)))
