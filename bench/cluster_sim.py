"""Discrete-event simulator of the multi-instance cluster (issue 7, part 3).

Each simulated instance runs a simplified copy of the engine's local scheduler
(FCFS; running requests first -- a decode token each, or a prompt chunk --
preempting the last-admitted request by recompute when a block is missing;
then admission of waiting requests, one prompt chunk per step, none while a
preemption happened this step), with the KV pool, block size, batch limits and
chunk budget of the real run (`cluster.py --part serve`). A step takes

    t = a + b * batch_tokens + c * kv_tokens

with a, b, c fitted on the real run's engine steps (``step_model`` in
``results/cluster_serve.json``). The global policies are not re-implemented:
a real `sluice.scheduler.cluster.Cluster` is built over the simulated
instances (they implement ``report()``), and the simulator calls its
``_choose_instance`` for dispatch and ``_plan_migrations`` (which uses
`freeness`, `_choose_request`, `_fits`) for migration, every ``interval_s`` of
simulated time. A live migration reserves blocks on the destination, copies
for ``copy_s(blocks)`` while the request keeps decoding on the source, then
pauses it for the measured live-migration downtime, fitted from
``results/cluster_downtime.json`` when present.

Trace: shaped after the public description of BurstGPT (Wang et al., "BurstGPT:
A Real-World Workload Dataset to Optimize LLM Serving Systems", arXiv
2401.17644): Gamma-distributed inter-arrival times (bursty) and Zipf-distributed
request and response token lengths. The parameters below (CV, Zipf exponents,
ranges) are ours, scaled to the simulated instances' ``max_model_len``; no
data from the trace is used.
"""

from __future__ import annotations

import dataclasses
import heapq
import json
import sys
import time
from pathlib import Path

import numpy as np

from sluice.scheduler.cluster import Cluster, ClusterConfig
from sluice.scheduler.instance import LoadReport


@dataclasses.dataclass
class SimRequest:
    rid: str
    prompt: int
    output: int
    arrival: float
    computed: int = 0
    generated: int = 0
    blocks: int = 0
    first_token: float | None = None
    last_token: float | None = None
    finished: float | None = None
    preemptions: int = 0
    suspend_pending: bool = False
    suspended: bool = False
    migration: tuple | None = None  # (source, destination, reserved blocks) once stopping

    @property
    def num_tokens(self) -> int:
        return self.prompt + self.generated


@dataclasses.dataclass
class StepModel:
    a: float
    b: float
    c: float

    def __call__(self, tokens: int, kv: int) -> float:
        return max(1e-4, self.a + self.b * tokens + self.c * kv)


class SimInstance:
    """One engine: pool, FCFS local scheduler, step loop driven by the simulator."""

    def __init__(self, name: str, num_blocks: int, block_size: int, max_seqs: int,
                 budget: int):
        self.name, self.num_blocks, self.bs = name, num_blocks, block_size
        self.max_seqs, self.budget = max_seqs, budget
        self.free = num_blocks
        self.running: list[SimRequest] = []
        self.waiting: list[SimRequest] = []
        self.busy = False  # a step is in flight
        self.rows: list[tuple[SimRequest, int]] = []
        self.draining, self.alive = False, True
        self.preemptions = 0
        self.pending_adopt: list[SimRequest] = []

    def report(self) -> LoadReport:
        demand = sum(-(-(r.num_tokens + 1) // self.bs) for r in self.waiting)
        cands = tuple((r.rid, r.num_tokens) for r in self.running
                      if not (r.suspend_pending or r.suspended))
        return LoadReport(self.name, self.num_blocks, self.free, len(self.running),
                          len(self.waiting), demand, 0, self.draining, True, self.bs, cands)

    def _grow(self, req: SimRequest, tokens: int) -> bool:
        need = -(-tokens // self.bs) - req.blocks
        if need <= 0:
            return True
        if need > self.free:
            return False
        self.free -= need
        req.blocks += need
        return True

    def _preempt(self, req: SimRequest) -> None:
        self.running.remove(req)
        self.free += req.blocks
        req.blocks, req.computed = 0, 0
        req.preemptions += 1
        self.preemptions += 1
        self.waiting.insert(0, req)

    def release(self, req: SimRequest) -> None:
        self.running.remove(req)
        self.free += req.blocks
        req.blocks = 0

    def schedule(self, now: float, suspended: list[SimRequest]) -> tuple[int, int]:
        """Pick this step's rows; returns (batch tokens, KV tokens)."""
        rows, budget, prefills, preempted = [], self.budget, 0, False
        for req in [r for r in self.running if r.suspend_pending]:
            req.suspend_pending, req.suspended = False, True
            suspended.append(req)
        for req in list(self.running):
            if budget == 0:
                break
            if req not in self.running or req.suspended:
                continue
            n = min(req.num_tokens - req.computed, budget)
            prefill = n > 1 or req.computed < req.prompt
            if prefill and prefills:
                continue
            while not self._grow(req, req.computed + n):
                taken = {id(r) for r, _ in rows}
                victims = [r for r in self.running if id(r) not in taken and not r.suspended]
                victim = victims[-1]
                self._preempt(victim)
                preempted = True
                if victim is req:
                    break
            if req not in self.running:
                continue
            rows.append((req, n))
            budget -= n
            prefills += prefill
        while (not preempted and self.waiting and budget > 0 and not prefills
               and len(self.running) < self.max_seqs):
            req = self.waiting[0]
            n = min(req.num_tokens - req.computed, budget)
            if not self._grow(req, req.computed + n):
                break
            self.waiting.pop(0)
            self.running.append(req)
            rows.append((req, n))
            budget -= n
            prefills += 1
        self.rows = rows
        return sum(n for _, n in rows), sum(r.computed + n for r, n in rows)

    def finish_step(self, now: float, done: list[SimRequest]) -> None:
        for req, n in self.rows:
            if req not in self.running:
                continue
            req.computed += n
            if req.computed < req.num_tokens:
                continue
            req.generated += 1
            if req.first_token is None:
                req.first_token = now
            req.last_token = now
            if req.generated >= req.output:
                req.finished = now
                self.release(req)
                done.append(req)
        self.rows = []

    @property
    def has_work(self) -> bool:
        return any(not r.suspended for r in self.running) or bool(self.waiting)


class Simulator:
    def __init__(self, ccfg: ClusterConfig, n: int, inst: dict, step: StepModel,
                 migration: dict):
        self.instances = [SimInstance(f"s{i}", inst["pool_blocks"], inst["block_size"],
                                      inst["max_num_seqs"], inst["budget"]) for i in range(n)]
        self.by_name = {i.name: i for i in self.instances}
        # A real Cluster over the simulated instances: its dispatch and migration
        # planning run unchanged (no intake: the simulator never calls submit).
        self.cluster = Cluster(self.instances, intake=None, config=ccfg)
        self.ccfg, self.step, self.mig = ccfg, step, migration
        self.events: list = []
        self.seq = 0
        self.done: list[SimRequest] = []
        self.where: dict[str, SimInstance] = {}
        self.migrations = 0
        self.failed_migrations = 0

    def push(self, t: float, kind: str, payload=None) -> None:
        self.seq += 1
        heapq.heappush(self.events, (t, self.seq, kind, payload))

    def run(self, trace: list[SimRequest]) -> dict:
        for req in trace:
            self.push(req.arrival, "arrive", req)
        if self.ccfg.migrate:
            self.push(0.0, "tick")
        wall = time.perf_counter()
        try:
            self._loop(len(trace))
        finally:
            self.cluster._executor.shutdown()
        if len(self.done) < len(trace):
            raise RuntimeError(f"simulation stalled: {len(trace) - len(self.done)} requests "
                               "unfinished and nothing left to happen")
        leaked = {i.name: i.num_blocks - i.free for i in self.instances if i.free != i.num_blocks}
        if leaked or self.cluster._busy:
            raise RuntimeError(f"simulation ended with blocks still held: {leaked}, "
                               f"migrations open: {sorted(self.cluster._busy)}")
        return self._summary(trace, time.perf_counter() - wall)

    def _loop(self, total: int) -> None:
        while self.events and len(self.done) < total:
            now, _, kind, payload = heapq.heappop(self.events)
            getattr(self, f"_on_{kind}")(now, payload)
            if kind == "tick" and len(self.events) == 1 and not any(
                    i.busy for i in self.instances):  # only the next tick is left
                raise RuntimeError(f"simulation stalled at t={now:.1f}s with "
                                   f"{total - len(self.done)} requests unfinished")

    def _kick(self, inst: SimInstance, now: float) -> None:
        if inst.busy or not inst.has_work:
            return
        suspended: list[SimRequest] = []
        tokens, kv = inst.schedule(now, suspended)
        for req in suspended:
            self.push(now + self.mig["downtime_s"], "adopt", req)
        if not inst.rows:
            return
        inst.busy = True
        self.push(now + self.step(tokens, kv), "step", inst)

    def _on_arrive(self, now: float, req: SimRequest) -> None:
        inst = self.by_name[self.cluster._choose_instance()]
        inst.waiting.append(req)
        self.where[req.rid] = inst
        self._kick(inst, now)

    def _on_step(self, now: float, inst: SimInstance) -> None:
        inst.busy = False
        first = len(self.done)
        inst.finish_step(now, self.done)
        for req in self.done[first:]:
            if req.suspend_pending:  # finished before its source could stop it
                req.suspend_pending = False
                s, d, reserve = req.migration
                self._end_migration(now, req, s, d, reserve, ok=False)
        self._kick(inst, now)

    def _on_tick(self, now: float, _) -> None:
        reports = {i.name: i.report() for i in self.instances}
        for src, dst, rid in self.cluster._plan_migrations(reports):
            self._start_migration(now, src, dst, rid)
        self.push(now + self.ccfg.interval_s, "tick")

    def _start_migration(self, now: float, src: str, dst: str, rid: str) -> None:
        c, s, d = self.cluster, self.by_name[src], self.by_name[dst]
        if src in c._busy or dst in c._busy:
            return
        req = next(r for r in s.running if r.rid == rid)
        reserve = -(-(req.num_tokens + 1) // d.bs)
        if reserve > d.free:
            return
        d.free -= reserve
        c._busy.update((src, dst))
        c._migrating[rid] = (src, dst)
        blocks = -(-req.computed // s.bs)
        self.push(now + self.mig["copy_s"](blocks), "stop",
                  (req, s, d, reserve, req.preemptions))

    def _on_stop(self, now: float, payload) -> None:
        req, s, d, reserve, epoch = payload
        if req not in s.running or req.preemptions != epoch:
            self._end_migration(now, req, s, d, reserve, ok=False)
            return
        req.suspend_pending = True
        req.migration = (s, d, reserve)
        if not s.busy:
            self._kick(s, now)

    def _on_adopt(self, now: float, req: SimRequest) -> None:
        s, d, reserve = req.migration
        need = -(-(req.computed + 1) // d.bs)
        req.suspended = False
        if need > d.free + reserve:  # no room at the stop: it resumes on the source
            self._end_migration(now, req, s, d, reserve, ok=False)
            self._kick(s, now)
            return
        s.release(req)
        d.free += reserve - need
        req.blocks = need
        d.running.append(req)
        self.where[req.rid] = d
        self._end_migration(now, req, s, d, 0, ok=True)
        self._kick(s, now)
        self._kick(d, now)

    def _end_migration(self, now: float, req, s, d, reserve, ok: bool) -> None:
        d.free += reserve
        if reserve:
            self._kick(d, now)  # the returned blocks may admit its waiting requests
        self.cluster._busy.difference_update((s.name, d.name))
        self.cluster._migrating.pop(req.rid, None)
        self.migrations += ok
        self.failed_migrations += not ok

    def _summary(self, trace, wall: float) -> dict:
        ttft = [r.first_token - r.arrival for r in trace]
        tpot = [(r.last_token - r.first_token) / (r.generated - 1) for r in trace
                if r.generated > 1]
        return {"requests": len(trace), "ttft_p50_s": float(np.percentile(ttft, 50)),
                "ttft_p99_s": float(np.percentile(ttft, 99)),
                "tpot_mean_s": float(np.mean(tpot)), "tpot_p99_s": float(np.percentile(tpot, 99)),
                "preemptions": sum(i.preemptions for i in self.instances),
                "migrations": self.migrations, "failed_migrations": self.failed_migrations,
                "sim_end_s": max(r.finished for r in trace), "wall_s": wall}


def zipf_lengths(rng, n: int, exponent: float, lo: int, hi: int) -> np.ndarray:
    """Lengths in [lo, hi] with P(k) ~ k^-exponent (a truncated Zipf law)."""
    ks = np.arange(lo, hi + 1)
    p = ks.astype(np.float64) ** -exponent
    return rng.choice(ks, n, p=p / p.sum())


def burstgpt_like_trace(n_inst: int, per_instance: int, tokens_per_s_per_instance: float,
                        cv: float, max_len: int, seed: int) -> tuple[list[SimRequest], float]:
    """Gamma arrivals (CV ``cv``), Zipf prompt and output lengths (see the module
    docstring); the arrival rate gives each instance ``tokens_per_s_per_instance``
    of prompt + output tokens on average. Returns the trace and that rate."""
    rng = np.random.default_rng(seed)
    n = n_inst * per_instance
    prompts = zipf_lengths(rng, n, 1.1, 16, int(max_len * 0.7))
    outputs = zipf_lengths(rng, n, 1.0, 8, int(max_len * 0.8))
    outputs = np.minimum(outputs, max_len - 1 - prompts)
    rate = tokens_per_s_per_instance * n_inst / float(np.mean(prompts + outputs))
    shape = 1.0 / cv ** 2
    gaps = rng.gamma(shape, 1.0 / (rate * shape), n)
    gaps *= (n / rate) / gaps.sum()
    arrivals = np.concatenate([[0.0], np.cumsum(gaps)[:-1]])
    trace = [SimRequest(f"q{i}", int(p), int(o), float(a))
             for i, (a, p, o) in enumerate(zip(arrivals, prompts, outputs))]
    return trace, rate / n_inst


def migration_model(results: Path, suffix: str, kv_bytes_per_block: int) -> dict:
    """Copy time per block (fit on blocking copies) and live downtime (median)."""
    path = results / f"cluster_downtime{suffix}.json"
    if not path.exists():
        path = results / "cluster_downtime.json"
    rows = json.loads(path.read_text())["rows"]
    block = [r for r in rows if r["method"] == "blocking"]
    x = np.asarray([r["bytes"] / kv_bytes_per_block for r in block])
    y = np.asarray([r["downtime_s"] for r in block])
    slope, intercept = np.polyfit(x, y, 1)
    live = float(np.median([r["downtime_s"] for r in rows if r["method"] == "live"]))
    return {"source": path.name, "copy_intercept_s": float(max(0.0, intercept)),
            "copy_s_per_block": float(max(0.0, slope)), "downtime_s": live}


def main_from(args, results: Path, suffix: str) -> dict:
    path = results / f"cluster_serve{suffix}.json"
    if not path.exists():  # a tagged simulation of the untagged real run
        path = results / "cluster_serve.json"
    serve = json.loads(path.read_text())
    fit = serve["step_model"]
    step = StepModel(fit["a_s"], fit["b_s_per_token"], fit["c_s_per_kv_token"])
    w = serve["workload"]
    block_bytes = 4 * 2 * 2 * 32 * 4 * w["block_size"]  # tiny: layers, K/V, kv heads, dim, f32
    mig = migration_model(results, suffix, block_bytes)
    mig_fn = dict(mig, copy_s=lambda b: mig["copy_intercept_s"] + b * mig["copy_s_per_block"])
    inst = {"pool_blocks": w["pool_blocks"], "block_size": w["block_size"],
            "max_num_seqs": w["max_num_seqs"], "budget": 128}
    sluice_cfg = serve["runs"]["sluice"]["config"]
    configs = {
        "round-robin": ClusterConfig(dispatch="round-robin", migrate=False),
        "freest": ClusterConfig(dispatch="freest", migrate=False),
        "sluice": ClusterConfig(**sluice_cfg),
    }
    per_instance = 12 if args.quick else 30
    # Offered load: the real run's prompt + output tokens per second per instance,
    # times each --sim-load factor.
    real_tokens = (w["rate_per_s"] / w["instances"]
                   * float(np.mean(np.add(w["prompt_lens"], w["output_lens"]))))
    out = {"command": " ".join(sys.argv), "serve_source": path.name, "step_model": fit,
           "migration_model": mig, "instance": inst, "cv": args.cv,
           "requests_per_instance": per_instance,
           "real_tokens_per_s_per_instance": real_tokens, "loads": args.sim_loads,
           "trace": "BurstGPT-shaped (Gamma arrivals, Zipf lengths)", "runs": {}}
    for load in args.sim_loads:
        for n in args.sim_instances:
            key = f"load{load:g}-n{n}"
            trace_args = (n, per_instance, real_tokens * load, args.cv, w["max_model_len"],
                          args.seed)
            r = out["runs"][key] = {"instances": n, "load": load}
            for name, ccfg in configs.items():
                trace, rate = burstgpt_like_trace(*trace_args)
                res = Simulator(ccfg, n, inst, step, mig_fn).run(trace)
                r[name] = res
                r["rate_per_instance"] = rate
                print(f"[sim] load {load:g} n={n:4d} {name:12s} TTFT p50 "
                      f"{res['ttft_p50_s']:.3f}s p99 {res['ttft_p99_s']:.3f}s TPOT "
                      f"{res['tpot_mean_s'] * 1e3:.1f}ms preempt {res['preemptions']} "
                      f"migr {res['migrations']} (wall {res['wall_s']:.1f}s)")
            r["ratios"] = {"ttft_p99_rr_over_sluice": r["round-robin"]["ttft_p99_s"]
                           / r["sluice"]["ttft_p99_s"],
                           "ttft_p99_freest_over_sluice": r["freest"]["ttft_p99_s"]
                           / r["sluice"]["ttft_p99_s"],
                           "tpot_mean_sluice_over_freest": r["sluice"]["tpot_mean_s"]
                           / r["freest"]["tpot_mean_s"]}
    (results / f"cluster_sim{suffix}.json").write_text(json.dumps(out, indent=1))
    plot(out, results / f"cluster_sim{suffix}.png")
    return out


def plot(out: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    styles = dict(zip(("round-robin", "freest", "sluice"), ("C0", "C1", "C2")))
    for li, load in enumerate(out["loads"]):
        runs = [r for r in out["runs"].values() if r["load"] == load]
        sizes = [r["instances"] for r in runs]
        for name, color in styles.items():
            kw = dict(color=color, ls="-" if li == 0 else "--", marker="o",
                      label=f"{name}, load x{load:g}")
            axes[0].plot(sizes, [r[name]["ttft_p99_s"] for r in runs], **kw)
            axes[1].plot(sizes, [r[name]["tpot_mean_s"] * 1e3 for r in runs], **kw)
    for ax in axes:
        ax.set_xscale("log", base=2)
        ax.set_xlabel("instances")
    axes[0].set_yscale("log")
    axes[0].set_ylabel("P99 TTFT (s, simulated)")
    axes[1].set_ylabel("mean time per output token (ms, simulated)")
    axes[0].set_title("simulated P99 TTFT, BurstGPT-shaped trace")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
