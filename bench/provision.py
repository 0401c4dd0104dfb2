"""Provisioner benchmark: mixed-type plans vs the best single type, solve time, TPUs.

Run from the repository root::

    .venv/bin/python bench/provision.py [--no-measure]
    .venv/bin/python bench/provision.py --melange-input IN.json[=EXPECTED.json] [...]

What it does (all profiles modelled from the built-in catalog for llama-3-8b,
on-demand prices, headroom 10%, slice factor 8, default buckets: input edges
0/128/512/2048/8192, output edges 0/64/256/1024):

1. For size distributions short / long / mixed (80% short, 20% long), TPOT SLOs
   40 and 120 ms (mean) and rates 1, 2, 4, 8, 16, 32 req/s: the cost of the
   mixed GPU plan, of the best single-GPU-type plan (each type alone, cheapest
   that serves everything), and of the mixed plan with the TPU types added.
   Saving = 1 - mixed / best single. Checks that adding TPUs never raises cost.
2. Solve time for 10 types x 480 slices, two ways: 60 buckets x slice factor 8
   (the aggregated slice counts Sluice solves), and 480 buckets x slice factor 1
   (480 distinct slices, i.e. 4800 binary assignment variables); best of 3.
3. Discrete-event simulation of the mixed GPU+TPU plans at 8 and 32 req/s on the
   mixed distribution (Poisson, 30 s): SLO attainment.
4. (unless --no-measure) A measured profile of the local CPU running Sluice's
   ``tiny`` model through `sluice.provision.profiles.engine_sweep`.
5. Writes bench/results/provision.json, provision_cost.png (cost vs rate per
   plan) and provision_mix.png (the chosen mix).

With ``--melange-input`` it does only this instead: for each Mélange solver input
(``gpu_info``, ``workload_distribution``, ...; e.g. Mélange's own profiles), at the
file's ``total_request_rate`` and at 1, 2, 4, ..., 32 req/s, the plan that
``sluice provision --melange`` gives (`sluice.provision.cli.melange_plan`) with
all of the file's types and with each type alone; saving = 1 - mixed / best
single type (and / worst single type, the other end of Mélange's published
ranges). ``=EXPECTED.json`` adds a published Mélange result for the file's own
rate (``{"TYPE": n, ..., "cost": c}``, optionally ``"single": {"TYPE": cost}``)
and reports whether Sluice's costs equal it (solver parity). Writes
bench/results/provision_melange.json.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import platform
import time
from pathlib import Path
from typing import Sequence

import numpy as np

from sluice.provision.catalog import load_catalog
from sluice.provision.cli import melange_plan, melange_result
from sluice.provision.perfmodel import model_spec
from sluice.provision.planner import Options, solve
from sluice.provision.profiles import MelangeInput, load_melange, measure_profile, modelled_profiles
from sluice.provision.simulate import simulate
from sluice.provision.workload import Buckets, Workload, parse_slo

RESULTS = Path(__file__).parent / "results"
RATES = [1, 2, 4, 8, 16, 32]
SLOS = {"tpot40ms": "tpot=0.04", "tpot120ms": "tpot=0.12"}
GPUS = ["L4", "A10G", "L40S", "A100-40GB", "A100-80GB", "H100", "H200"]
TPUS = ["TPU-v5e", "TPU-v5p", "TPU-v6e"]
MODEL = "llama-3-8b"


def distributions(b: Buckets) -> dict[str, np.ndarray]:
    short = np.zeros(b.shape)
    short[0, 0], short[0, 1], short[1, 0], short[1, 1] = 0.3, 0.2, 0.2, 0.3
    long = np.zeros(b.shape)
    long[2, 1], long[3, 1], long[3, 2], long[2, 2] = 0.3, 0.3, 0.2, 0.2
    return {"short": short, "long": long, "mixed": 0.8 * short + 0.2 * long}


def best_single(profiles, rates, options) -> tuple[str | None, float]:
    best = (None, float("inf"))
    for p in profiles:
        plan = solve([p], rates, options)
        if plan.feasible and plan.cost < best[1]:
            best = (p.name, plan.cost)
    return best


def cost_grid(catalog, buckets, options) -> list[dict]:
    rows = []
    for slo_name, slo_text in SLOS.items():
        slo = parse_slo(slo_text)
        gpu = modelled_profiles(catalog, model_spec(MODEL), buckets, slo, types=GPUS)
        tpu = modelled_profiles(catalog, model_spec(MODEL), buckets, slo, types=TPUS)
        for dist_name, dist in distributions(buckets).items():
            for rate in RATES:
                rates = rate * dist
                mixed = solve(gpu, rates, options)
                with_tpu = solve(gpu + tpu, rates, options)
                single, single_cost = best_single(gpu, rates, options)
                rows.append({
                    "slo": slo_name, "dist": dist_name, "rate": rate,
                    "mixed_cost": mixed.cost if mixed.feasible else None,
                    "mixed_counts": mixed.counts,
                    "best_single_type": single, "best_single_cost": single_cost,
                    "saving": 1 - mixed.cost / single_cost if mixed.feasible else None,
                    "with_tpu_cost": with_tpu.cost if with_tpu.feasible else None,
                    "with_tpu_counts": with_tpu.counts,
                    "tpu_never_raises_cost": (with_tpu.cost <= mixed.cost + 1e-9
                                              if mixed.feasible else with_tpu.feasible),
                    "solve_time_s": mixed.solve_time_s,
                })
    return rows


def solve_time(catalog, in_edges, out_edges, slice_factor) -> dict:
    buckets = Buckets(tuple(in_edges), tuple(out_edges))
    slo = parse_slo("tpot=0.12")
    profiles = modelled_profiles(catalog, model_spec(MODEL), buckets, slo, types=GPUS + TPUS)
    rng = np.random.default_rng(0)
    dist = rng.dirichlet(np.ones(buckets.shape[0] * buckets.shape[1])).reshape(buckets.shape)
    times = []
    for _ in range(3):
        plan = solve(profiles, 32 * dist, Options(slice_factor=slice_factor))
        times.append(plan.solve_time_s)
    n_buckets = buckets.shape[0] * buckets.shape[1]
    return {"types": len(profiles), "buckets": n_buckets, "slice_factor": slice_factor,
            "slices": n_buckets * slice_factor, "status": plan.status,
            "best_s": min(times), "times_s": times, "cost": plan.cost}


def simulations(catalog, buckets, options) -> list[dict]:
    out = []
    dist = distributions(buckets)["mixed"]
    for slo_name, slo_text in SLOS.items():
        slo = parse_slo(slo_text)
        profiles = modelled_profiles(catalog, model_spec(MODEL), buckets, slo, types=GPUS + TPUS)
        for rate in (8, 32):
            w = Workload(MODEL, rate, dist, buckets)
            plan = solve(profiles, w.rates, options)
            start = time.perf_counter()
            att = simulate(plan, profiles, w, slo, duration_s=30)
            out.append({"slo": slo_name, "rate": rate, "counts": plan.counts, "cost": plan.cost,
                        "attainment": att, "sim_wall_s": time.perf_counter() - start})
    return out


def measured() -> dict:
    from sluice.runtime.llm import LLM
    from sluice.provision.profiles import engine_sweep

    llm = LLM("tiny", max_num_seqs=16, max_num_batched_tokens=256, max_model_len=256,
              warmup=False)
    buckets = Buckets((0, 32, 128), (0, 16, 64))
    slo = parse_slo("tpot=0.05,ttft_p90=0.5")
    start = time.perf_counter()
    p = measure_profile("local-cpu-tiny", 1.0, engine_sweep(llm.engine), buckets, slo,
                        start_rate=1.0, max_steps=5, num_requests=8)
    return {"model": "tiny", "slo": str(slo), "input_edges": list(buckets.input_edges),
            "output_edges": list(buckets.output_edges), "tputs": p.tputs.tolist(),
            "source": p.source, "wall_s": time.perf_counter() - start}


def melange_point(m: MelangeInput, rate: float) -> dict:
    """At ``rate`` req/s: the mixed plan and each type alone, as ``--melange`` solves them."""
    mixed = melange_plan(m, rate=rate)
    single = {p.name: melange_plan(m, [p], rate) for p in m.profiles}
    costs = {name: plan.cost for name, plan in single.items() if plan.feasible}
    best = min(costs, key=costs.get) if costs else None
    worst = max(costs, key=costs.get) if costs else None
    ok = mixed.feasible and best is not None
    return {"rate": rate, "mixed": melange_result(mixed, m.profiles) if mixed.feasible else None,
            "single_costs": costs, "best_single_type": best, "worst_single_type": worst,
            "saving_vs_best": 1 - mixed.cost / costs[best] if ok else None,
            "saving_vs_worst": 1 - mixed.cost / costs[worst] if ok else None,
            "solve_time_s": mixed.solve_time_s}


def parity(point: dict, expected: dict) -> bool:
    """Whether ``point``'s mixed cost (and the single-type costs ``expected["single"]``
    names) equal a published Mélange result, to the cent it is printed to."""
    if point["mixed"] is None:
        return False
    pairs = [(point["mixed"]["cost"], expected["cost"])]
    pairs += [(point["single_costs"].get(name, math.inf), cost)
              for name, cost in expected.get("single", {}).items()]
    return all(abs(ours - theirs) < 0.005 for ours, theirs in pairs)


def melange_bench(spec: str, rates: Sequence[float] = RATES) -> dict:
    """``spec``: ``INPUT.json`` or ``INPUT.json=EXPECTED.json`` (see the module docstring)."""
    path, _, expected_path = spec.partition("=")
    m = load_melange(path)
    out = {"input": path, "sha256": hashlib.sha256(Path(path).read_bytes()).hexdigest(),
           "prices": {p.name: p.cost for p in m.profiles}, "slice_factor": m.slice_factor,
           "at_file_rate": melange_point(m, m.total_request_rate),
           "sweep": [melange_point(m, r) for r in rates]}
    if expected_path:
        out["expected"] = json.loads(Path(expected_path).read_text())
        out["cost_parity"] = parity(out["at_file_rate"], out["expected"])
    return out


def melange_main(specs: Sequence[str]) -> None:
    """Runs `melange_bench` on each input; prints a summary, writes provision_melange.json."""
    runs = [melange_bench(spec) for spec in specs]
    with open(RESULTS / "provision_melange.json", "w") as f:
        json.dump({"machine": platform.platform(), "runs": runs}, f, indent=1)
    for run in runs:
        at = run["at_file_rate"]
        print(f"{run['input']}: at {at['rate']:g} req/s {at['mixed']}"
              + (f", parity with expected: {run['cost_parity']}" if "expected" in run else ""))
        for x in run["sweep"]:
            print(f"  {x['rate']:>4g} req/s: " + _sweep_line(x))


def _sweep_line(x: dict) -> str:
    """One sweep point: the mixed plan's cost and its savings against single types."""
    if x["mixed"] is None:
        return "no feasible mixed plan"
    if x["saving_vs_best"] is None:
        return f"mixed ${x['mixed']['cost']:.2f}; no single type is feasible alone"
    best, worst = x["best_single_type"], x["worst_single_type"]
    return (f"mixed ${x['mixed']['cost']:.2f} vs best single {best} "
            f"${x['single_costs'][best]:.2f}: saving {x['saving_vs_best']:.1%} "
            f"(vs worst {worst}: {x['saving_vs_worst']:.1%})")


def plots(rows: list[dict]) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 3, figsize=(14, 7), sharex=True)
    for r, slo in enumerate(SLOS):
        for c, dist in enumerate(("short", "long", "mixed")):
            ax = axes[r, c]
            sel = [x for x in rows if x["slo"] == slo and x["dist"] == dist]
            for key, label in (("best_single_cost", "best single GPU type"),
                               ("mixed_cost", "mixed GPUs"), ("with_tpu_cost", "mixed GPUs+TPUs")):
                ax.plot([x["rate"] for x in sel], [x[key] for x in sel], marker="o", label=label)
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_title(f"{dist}, {slo}")
            ax.set_xlabel("req/s")
            ax.set_ylabel("$/hour")
    axes[0, 0].legend(fontsize=8)
    fig.suptitle(f"{MODEL}: plan cost vs request rate (modelled profiles, list prices)")
    fig.tight_layout()
    fig.savefig(RESULTS / "provision_cost.png", dpi=90)
    plt.close(fig)

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for ax, slo in zip(axes, SLOS):
        sel = [x for x in rows if x["slo"] == slo and x["dist"] == "mixed"]
        types = sorted({t for x in sel for t in x["with_tpu_counts"]})
        bottom = np.zeros(len(sel))
        for t in types:
            vals = np.array([x["with_tpu_counts"].get(t, 0) for x in sel], dtype=float)
            ax.bar([str(x["rate"]) for x in sel], vals, bottom=bottom, label=t)
            bottom += vals
        ax.set_title(f"chosen mix (GPUs+TPUs), mixed sizes, {slo}")
        ax.set_xlabel("req/s")
        ax.set_ylabel("instances")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(RESULTS / "provision_mix.png", dpi=90)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--no-measure", action="store_true", help="skip the local CPU measurement")
    ap.add_argument("--melange-input", nargs="+", metavar="IN.json[=EXPECTED.json]",
                    help="only compare mixed vs single-type plans on these Mélange inputs")
    args = ap.parse_args()
    RESULTS.mkdir(parents=True, exist_ok=True)
    if args.melange_input:
        melange_main(args.melange_input)
        return
    catalog = load_catalog()
    buckets = Buckets()
    options = Options()
    rows = cost_grid(catalog, buckets, options)
    solve_times = [solve_time(catalog, np.geomspace(1, 8192, 13).round().astype(int).tolist(),
                              [0, 32, 64, 128, 256, 1024], 8),
                   solve_time(catalog, np.linspace(0, 8192, 25).round().astype(int).tolist(),
                              np.linspace(0, 1024, 21).round().astype(int).tolist(), 1)]
    sims = simulations(catalog, buckets, options)
    result = {
        "machine": {"platform": platform.platform(), "processor": platform.processor(),
                    "python": platform.python_version()},
        "model": MODEL, "catalog_as_of": json.loads((Path(__file__).parents[1] / "provision"
                                                      / "catalog.json").read_text())["as_of"],
        "cost_grid": rows, "solve_time": solve_times, "simulation": sims,
        "measured_profile": None if args.no_measure else measured(),
    }
    with open(RESULTS / "provision.json", "w") as f:
        json.dump(result, f, indent=1)
    plots(rows)
    for slo in SLOS:
        for dist in ("short", "long", "mixed"):
            sel = [x for x in rows if x["slo"] == slo and x["dist"] == dist]
            sav = [x["saving"] for x in sel if x["saving"] is not None]
            print(f"{slo:10} {dist:6} saving vs best single: "
                  + " ".join(f"{x['rate']}:{x['saving']:.0%}" for x in sel
                             if x["saving"] is not None)
                  + (f"  (range {min(sav):.0%}..{max(sav):.0%})" if sav else ""))
    print("adding TPUs never raises cost:", all(x["tpu_never_raises_cost"] for x in rows))
    for s in solve_times:
        print(f"solve {s['types']} types x {s['slices']} slices ({s['buckets']} buckets x "
              f"{s['slice_factor']}): best {s['best_s']:.3f}s, status {s['status']}")
    for s in sims:
        a = s["attainment"]
        print(f"sim {s['slo']} {s['rate']} req/s {s['counts']}: met={a['met']} "
              f"tpot {a['tpot']['value'] * 1000:.1f}ms ok={a['fraction_ok']:.1%}")
    if result["measured_profile"]:
        print("measured (local CPU, tiny):", result["measured_profile"])


if __name__ == "__main__":
    main()
