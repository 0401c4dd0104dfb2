"""Profiles: per instance type and request-size bucket, the highest request rate
that meets the SLO. Every profile carries its source: ``modelled``, ``imported``
or ``measured``.

Interface:

- ``TypeProfile(name, cost, tputs, source, instance=None)``: ``tputs[i, j]`` is
  req/s for bucket (i, j); 0 means the type cannot serve that bucket (memory or
  SLO) and the planner never routes it there. ``instance`` is the step-time model
  (`sluice.provision.perfmodel.Instance`) when there is one; the simulator needs it.
- ``modelled_profiles(catalog, model, buckets, slo, spot=False, types=None,
  tuning=None, source="modelled")``: one profile per catalog type from the
  roofline model, on the fewest chips (tensor parallel) that hold the model and
  serve at least one bucket within the SLO; types with no such shape are left
  out. ``tuning`` overrides the model's efficiencies (calibration).
- ``load_melange(path) -> MelangeInput``: Mélange's solver input
  (``gpu_info: {name: {cost, tputs}}``, ``workload_distribution``,
  ``total_request_rate``, ``slice_factor``); profiles come back ``imported``.
- ``save_profiles(path, buckets, profiles)`` / ``load_profiles(path, buckets)``:
  Sluice's profile file, ``{"input_edges", "output_edges", "types": {name:
  {"cost", "tputs", "source"}}}``; ``load_profiles`` also accepts a Mélange file
  (its ``gpu_info``), labelled ``imported``.
- ``merge(base, override)``: ``override`` replaces same-named types, adds others.
- ``measure_profile(name, cost, sweep, buckets, slo, ...)``: a ``measured``
  profile by raising the rate per bucket until ``sweep`` (any callable running
  requests at a rate and returning per-request (ttft, tpot)) breaks the SLO.
- ``engine_sweep(engine, seed=0)``: a sweep callable driving a Sluice
  `LLMEngine` on the local machine with open-loop Poisson arrivals.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np

from sluice.provision.catalog import Accelerator
from sluice.provision.perfmodel import Instance, ModelSpec, instances_for
from sluice.provision.workload import SLO, Buckets

# (input_len, output_len, rate, num_requests) -> [(ttft_s, tpot_s) per request]
Sweep = Callable[[int, int, float, int], list[tuple[float, float]]]


@dataclasses.dataclass
class TypeProfile:
    name: str
    cost: float  # $/hour of one instance
    tputs: np.ndarray
    source: str
    instance: Instance | None = None

    def __post_init__(self) -> None:
        self.tputs = np.asarray(self.tputs, dtype=float)
        if self.tputs.ndim != 2 or (self.tputs < 0).any() or not np.isfinite(self.tputs).all():
            raise ValueError(f"profile {self.name!r}: tputs: need a 2-D matrix of finite "
                             "rates >= 0")
        if not self.cost > 0:
            raise ValueError(f"profile {self.name!r}: cost: must be > 0, got {self.cost}")


@dataclasses.dataclass
class MelangeInput:
    profiles: list[TypeProfile]
    distribution: np.ndarray
    total_request_rate: float
    slice_factor: int


def modelled_profiles(catalog: dict[str, Accelerator], model: ModelSpec, buckets: Buckets,
                      slo: SLO, spot: bool = False, types: Sequence[str] | None = None,
                      tuning: Mapping[str, float] | None = None,
                      source: str = "modelled") -> list[TypeProfile]:
    """``tuning``: `Instance` fields (``bw_eff``, ``flop_eff``, ``overhead_s``)
    replacing the model's defaults, e.g. from `sluice.provision.calibrate`."""
    out = []
    for name in types or list(catalog):
        shapes = instances_for(catalog[name], model, **(tuning or {}))
        for inst in shapes:  # fewest chips that serve some bucket within the SLO
            tputs = np.zeros(buckets.shape)
            for i, j in np.ndindex(*buckets.shape):
                tputs[i, j] = inst.max_rate(*buckets.representative(i, j), slo,
                                            *buckets.upper(i, j))
            if tputs.any():
                out.append(TypeProfile(inst.name, inst.price(spot), tputs, source, inst))
                break
    return out


def load_melange(path: str | Path) -> MelangeInput:
    with open(path) as f:
        m = json.load(f)
    for field in ("gpu_info", "workload_distribution", "total_request_rate"):
        if field not in m:
            raise ValueError(f"{path}: {field}: missing")
    profiles = _melange_profiles(m["gpu_info"], path)
    dist = np.asarray(m["workload_distribution"], dtype=float)
    for p in profiles:
        if p.tputs.shape != dist.shape:
            raise ValueError(f"{path}: gpu_info.{p.name}.tputs: shape {p.tputs.shape} != "
                             f"workload_distribution {dist.shape}")
    sf = m.get("slice_factor", 1)
    if not isinstance(sf, int) or sf < 1:
        raise ValueError(f"{path}: slice_factor: must be a positive integer, got {sf!r}")
    return MelangeInput(profiles, dist, float(m["total_request_rate"]), sf)


def _melange_profiles(gpu_info: dict, path: str | Path) -> list[TypeProfile]:
    if not isinstance(gpu_info, dict):
        raise ValueError(f"{path}: gpu_info: must be an object of name -> {{cost, tputs}}")
    out = []
    for name, g in gpu_info.items():
        if not isinstance(g, dict) or "cost" not in g or "tputs" not in g:
            raise ValueError(f"{path}: gpu_info.{name}: needs cost and tputs")
        out.append(TypeProfile(name, float(g["cost"]), g["tputs"], "imported"))
    return out


def save_profiles(path: str | Path, buckets: Buckets, profiles: Sequence[TypeProfile]) -> None:
    data = {"input_edges": list(buckets.input_edges), "output_edges": list(buckets.output_edges),
            "types": {p.name: {"cost": p.cost, "tputs": p.tputs.tolist(), "source": p.source}
                      for p in profiles}}
    with open(path, "w") as f:
        json.dump(data, f, indent=1)


def load_profiles(path: str | Path, buckets: Buckets) -> list[TypeProfile]:
    with open(path) as f:
        data = json.load(f)
    if "gpu_info" in data:
        profiles = _melange_profiles(data["gpu_info"], path)
    else:
        edges = (tuple(data.get("input_edges", ())), tuple(data.get("output_edges", ())))
        if edges != (buckets.input_edges, buckets.output_edges):
            raise ValueError(f"{path}: input_edges/output_edges {edges} differ from the "
                             f"workload's {(buckets.input_edges, buckets.output_edges)}")
        profiles = [TypeProfile(name, float(t["cost"]), t["tputs"], t.get("source", "imported"))
                    for name, t in data.get("types", {}).items()]
    for p in profiles:
        if p.tputs.shape != buckets.shape:
            raise ValueError(f"{path}: {p.name}: tputs shape {p.tputs.shape} != buckets "
                             f"{buckets.shape}")
    return profiles


def merge(base: Sequence[TypeProfile], override: Sequence[TypeProfile]) -> list[TypeProfile]:
    names = {p.name for p in override}
    return [p for p in base if p.name not in names] + list(override)


def slo_met(samples: Sequence[tuple[float, float]], slo: SLO) -> bool:
    """Whether per-request (ttft, tpot) samples meet every SLO term."""
    if not samples:
        return False
    arr = np.asarray(samples, dtype=float)
    for col, (target, pct) in enumerate(((slo.ttft, slo.ttft_pct), (slo.tpot, slo.tpot_pct))):
        if target is None:
            continue
        v = arr[:, col]
        stat = v.mean() if pct is None else np.percentile(v, pct)
        if stat > target:
            return False
    return True


def measure_profile(name: str, cost: float, sweep: Sweep, buckets: Buckets, slo: SLO,
                    start_rate: float = 0.5, factor: float = 2.0, max_steps: int = 6,
                    num_requests: int = 16, warmup: bool = True) -> TypeProfile:
    """Per bucket (at its representative size), multiply the rate by ``factor`` from
    ``start_rate`` until the SLO breaks; the last passing rate is the bucket's tput.
    ``warmup``: first one untimed run per bucket (a JIT engine compiles its shapes)."""
    tputs = np.zeros(buckets.shape)
    for i, j in np.ndindex(*buckets.shape):
        inp, out = (max(1, round(x)) for x in buckets.representative(i, j))
        if warmup:
            sweep(inp, out, start_rate, num_requests)
        rate = start_rate
        for _ in range(max_steps):
            if not slo_met(sweep(inp, out, rate, num_requests), slo):
                break
            tputs[i, j] = rate
            rate *= factor
    return TypeProfile(name, cost, tputs, "measured")


def engine_sweep(engine, seed: int = 0) -> Sweep:
    """Open-loop Poisson arrivals into ``engine`` (a `sluice.runtime.engine.LLMEngine`);
    random prompts, ``ignore_eos`` so every request generates exactly its output length."""
    from sluice.runtime.sampling_params import SamplingParams

    rng = np.random.default_rng(seed)
    vocab = engine.model.config.vocab_size
    counter = iter(range(1 << 62))

    def sweep(input_len: int, output_len: int, rate: float, n: int) -> list[tuple[float, float]]:
        params = SamplingParams(temperature=0.0, max_tokens=output_len, ignore_eos=True)
        t0 = time.monotonic()
        arrivals = t0 + np.cumsum(rng.exponential(1 / rate, n))
        prompts = [rng.integers(0, vocab, input_len).tolist() for _ in range(n)]
        ids, next_i, samples = {}, 0, []
        while len(samples) < n:
            now = time.monotonic()
            while next_i < n and arrivals[next_i] <= now:
                rid = f"sweep-{next(counter)}"
                ids[rid] = arrivals[next_i]
                engine.add_request(rid, {"prompt_token_ids": prompts[next_i]}, params)
                next_i += 1
            if not engine.has_unfinished_requests():
                time.sleep(max(0.0, arrivals[next_i] - now))
                continue
            for o in engine.step():
                if o.finished:
                    m = o.metrics[0]
                    tokens = len(o.outputs[0].token_ids)
                    tpot = (m.finished_time - m.first_token_time) / max(tokens - 1, 1)
                    samples.append((float(m.first_token_time - ids.pop(o.request_id)), tpot))
        return samples

    return sweep

