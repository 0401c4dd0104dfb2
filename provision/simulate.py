"""Discrete-event simulation of a plan, and plan-then-verify with more headroom.

Interface:

- ``simulate(plan, profiles, workload, slo, duration_s=60, seed=0) -> dict``:
  SLO attainment of ``plan`` under ``workload``. Returns, per SLO term, the
  achieved statistic (mean or percentile) and whether it meets the target;
  ``met`` (all terms met); ``fraction_ok`` (requests meeting every per-request
  threshold); ``requests``; ``dropped`` (requests in buckets the plan leaves
  unserved, counted as misses); ``unverified_rate`` (req/s routed to types
  without a step-time model, e.g. imported profiles, which are not simulated).
- ``verify(profiles, workload, slo, options, ...) -> Plan``: solve, simulate, and
  while the SLO is missed re-solve with ``headroom_step`` more headroom (at most
  ``max_rounds`` solves); the returned plan carries ``attainment``.

Simulation: arrivals over ``duration_s`` with Gamma inter-arrival times of the
workload's coefficient of variation (cv = 1 is Poisson); each request draws its
bucket from the workload histogram and its lengths uniformly inside the bucket;
it goes to a type with the plan's routing weights and round-robin to one of
that type's instances. Every instance is a continuous-batching engine: FCFS
admission while the KV pool holds every admitted request's full length and
fewer than ``max_seqs`` run; each step decodes one token of every decoding
request and prefills prompt chunks FCFS in the rest of the token budget; its
duration is `Instance.step_time`. A request's first token comes at the end of
its last prefill chunk. Requests unfinished at 4 x duration + 60 s count as misses.
"""

from __future__ import annotations

import dataclasses
from collections import deque
from typing import Sequence

import numpy as np

from sluice.provision.perfmodel import Instance
from sluice.provision.planner import Options, Plan, solve
from sluice.provision.profiles import TypeProfile
from sluice.provision.workload import SLO, Workload


def arrivals(rate: float, cv: float, duration_s: float, rng: np.random.Generator) -> np.ndarray:
    n = int(rate * duration_s * 1.5) + 20
    shape = 1 / cv ** 2
    gaps = rng.gamma(shape, 1 / (shape * rate), n)
    t = np.cumsum(gaps)
    while t[-1] < duration_s:
        t = np.concatenate([t, t[-1] + np.cumsum(rng.gamma(shape, 1 / (shape * rate), n))])
    return t[t < duration_s]


def run_instance(inst: Instance, arr: np.ndarray, inp: np.ndarray, out: np.ndarray,
                 horizon: float) -> tuple[np.ndarray, np.ndarray]:
    """Simulate one instance; per request (ttft, tpot), inf where it never finished."""
    n = len(arr)
    ttft, tpot = np.full(n, np.inf), np.full(n, np.inf)
    cap_tokens = inst.kv_tokens()
    nxt, t, kv_used = 0, 0.0, 0
    waiting: deque[int] = deque()
    run = np.zeros((0, 5), dtype=np.int64)  # id, prompt left, output left, context, started
    first = np.full(n, np.nan)
    while (nxt < n or waiting or len(run)) and t < horizon:
        if not waiting and not len(run):
            t = max(t, arr[nxt])
        while nxt < n and arr[nxt] <= t:
            waiting.append(nxt)
            nxt += 1
        new = []
        while waiting and len(run) + len(new) < inst.max_seqs:
            k = waiting[0]
            need = int(inp[k] + out[k])
            if need > cap_tokens:  # never fits: a miss
                waiting.popleft()
                continue
            if kv_used + need > cap_tokens:
                break
            waiting.popleft()
            kv_used += need
            new.append((k, inp[k], out[k], 0, 0))
        if new:
            run = np.concatenate([run, np.array(new, dtype=np.int64)])
        if not len(run):
            if nxt < n:
                t = max(t, arr[nxt])
            continue
        dec = run[:, 1] == 0
        d = int(dec.sum())
        pre_left = np.where(dec, 0, run[:, 1])
        before = np.cumsum(pre_left) - pre_left
        chunk = np.clip(max(inst.token_budget - d, 0) - before, 0, pre_left)
        dt = inst.step_time(d, float(chunk.sum()), float(run[dec, 3].sum()),
                            prefill_sq=float((chunk.astype(float) ** 2).sum()))
        t += dt
        run[dec, 2] -= 1
        run[:, 3] += chunk + dec
        run[:, 1] -= chunk
        done_prefill = (~dec) & (chunk > 0) & (run[:, 1] == 0)
        ids = run[done_prefill, 0]
        first[ids] = t
        ttft[ids] = t - arr[ids]
        run[done_prefill, 2] -= 1
        run[done_prefill, 3] += 1
        fin = run[:, 2] <= 0
        for k in run[fin, 0]:
            tpot[k] = (t - first[k]) / max(out[k] - 1, 1)
            kv_used -= int(inp[k] + out[k])
        run = run[~fin]
    return ttft, tpot


def simulate(plan: Plan, profiles: Sequence[TypeProfile], workload: Workload, slo: SLO,
             duration_s: float = 60.0, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    b = workload.buckets
    by_name = {p.name: p for p in profiles}
    t_arr = arrivals(workload.rate, workload.arrival_cv, duration_s, rng)
    n = len(t_arr)
    flat = rng.choice(workload.distribution.size, n, p=workload.distribution.ravel())
    bi, bj = np.unravel_index(flat, b.shape)
    inp = np.array([rng.integers(b.input_edges[i] + 1, b.input_edges[i + 1] + 1) for i in bi])
    out = np.array([rng.integers(b.output_edges[j] + 1, b.output_edges[j + 1] + 1) for j in bj])
    target = np.full(n, "", dtype=object)
    for k in range(n):
        w = plan.routing.get((int(bi[k]), int(bj[k])), {})
        u, acc = rng.random(), 0.0
        for name, frac in w.items():
            acc += frac
            if u < acc:
                target[k] = name
                break
    ttft, tpot = np.full(n, np.inf), np.full(n, np.inf)
    verified = np.ones(n, dtype=bool)
    horizon = 4 * duration_s + 60
    for name, count in plan.counts.items():
        mine = np.flatnonzero(target == name)
        inst = by_name[name].instance
        if inst is None:
            verified[mine] = False
            continue
        for r in range(count):
            sel = mine[r::count]
            ttft[sel], tpot[sel] = run_instance(inst, t_arr[sel], inp[sel], out[sel], horizon)
    keep = verified
    report: dict = {"requests": int(keep.sum()), "dropped": int((target[keep] == "").sum()),
                    "unverified_rate": float((~verified).sum() / duration_s),
                    "duration_s": duration_s, "arrival_cv": workload.arrival_cv}
    ok = np.ones(int(keep.sum()), dtype=bool)
    met = True
    for name, values, goal, pct in (("ttft", ttft[keep], slo.ttft, slo.ttft_pct),
                                    ("tpot", tpot[keep], slo.tpot, slo.tpot_pct)):
        if goal is None or not len(values):
            continue
        stat = float(values.mean() if pct is None else np.percentile(values, pct))
        report[name] = {"target": goal, "statistic": "mean" if pct is None else f"p{pct:g}",
                        "value": stat, "met": bool(stat <= goal)}
        met &= stat <= goal
        ok &= values <= goal
    report["met"] = bool(met) and report["requests"] > 0
    report["fraction_ok"] = float(ok.mean()) if len(ok) else 0.0
    return report


def verify(profiles: Sequence[TypeProfile], workload: Workload, slo: SLO,
           options: Options = Options(), duration_s: float = 60.0, max_rounds: int = 4,
           headroom_step: float = 0.1, seed: int = 0) -> Plan:
    for _ in range(max_rounds):
        plan = solve(profiles, workload.rates, options)
        if plan.status == "infeasible" or not plan.counts:
            return plan
        plan.attainment = simulate(plan, profiles, workload, slo, duration_s, seed)
        if plan.attainment["met"]:
            return plan
        options = dataclasses.replace(options, headroom=options.headroom + headroom_step)
    return plan
