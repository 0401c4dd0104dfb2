"""``sluice provision``: the cheapest fleet that meets an SLO, or Mélange's answer form.

Interface (wired into ``sluice`` by `sluice.runtime.cli`, which imports this module
only for ``sluice provision``; the solver, the simulator and the calibration, which
import SciPy, are imported when a plan is made, so ``--help`` answers at once):

- ``configure(parser)``: the ``provision`` flags, and a ``--help`` that documents
  the workload file and lists the model presets.
- ``run(args) -> int``: exit status; 0 when a plan was found, 1 when the
  workload cannot be fully served (the plan is still printed and written).
- ``melange_plan(m, profiles=None, rate=None) -> Plan``: the plan ``--melange``
  prints, optionally for a subset of the file's types or another total rate
  (``bench/provision.py --melange-input`` uses it for its single-type baselines).
- ``melange_result(plan, profiles) -> dict``: Mélange's result form of a plan.

Two modes::

    sluice provision --workload W.json --slo tpot=0.05,ttft_p99=2 [--catalog C] [--profiles P]
                     [--calibrate]
    sluice provision --melange FILE

The first prints a table (types with their profile source, counts, $/hour,
routing, simulated SLO attainment) and writes the plan as JSON (``--output``).
The second reads Mélange's solver input and prints Mélange's result form,
``{"TYPE": count, ..., "cost": $/hour}``, solved with Mélange's settings (no
headroom, the file's ``slice_factor``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import textwrap
from typing import TYPE_CHECKING, Sequence

from sluice.provision import workload as workload_file
from sluice.provision.catalog import load_catalog
from sluice.provision.perfmodel import MODELS, ModelSpec, model_spec
from sluice.provision.workload import Buckets, Workload, load_workload, parse_slo

if TYPE_CHECKING:
    from sluice.provision.planner import Plan
    from sluice.provision.profiles import MelangeInput, TypeProfile


def configure(p: argparse.ArgumentParser) -> None:
    p.description = (
        "Plan the cost-minimal set of instances (GPU and TPU types) that serves a workload "
        "within its SLO: profiles per type and request-size bucket (modelled from the "
        "catalog, imported, or measured), an integer program (HiGHS), and a discrete-event "
        "simulation that checks the plan.")
    p.epilog = epilog()
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    mode = p.add_mutually_exclusive_group(required=True)
    mode.add_argument("--workload", help="workload JSON file (format: sluice.provision.workload)")
    mode.add_argument("--melange", help="Mélange solver input JSON; prints Mélange's result form")
    p.add_argument("--slo", help="SLO terms, e.g. tpot=0.05,ttft_p99=2 (seconds; _pNN = "
                                 "percentile, none = mean); required with --workload")
    p.add_argument("--catalog", help="JSON file overriding/extending the built-in accelerator "
                                     "catalog (prices, new types)")
    p.add_argument("--profiles", help="profile file (Sluice's or Mélange's gpu_info) whose types "
                                      "replace or add to the modelled ones")
    p.add_argument("--calibrate", action="store_true",
                   help="fit the roofline model's efficiencies to the measured profiles in "
                        "--profiles (types named as in the catalog) and re-model every type "
                        "with them (source 'calibrated')")
    p.add_argument("--types", help="comma-separated catalog types to consider (default: all)")
    p.add_argument("--spot", action="store_true", help="price with spot instead of on-demand")
    p.add_argument("--headroom", type=float, default=0.1,
                   help="over-provisioning fraction on every slice's load (default: 0.1)")
    p.add_argument("--slice-factor", type=int, default=8,
                   help="slices per bucket (default: 8)")
    p.add_argument("--cap", action="append", default=[], metavar="TYPE=N",
                   help="at most N instances of TYPE (repeatable)")
    p.add_argument("--budget", type=float, default=None,
                   help="$/hour cap; the plan then maximises the served rate")
    p.add_argument("--no-verify", action="store_true",
                   help="skip the simulation (and the re-solve with more headroom)")
    p.add_argument("--sim-duration", type=float, default=60.0,
                   help="simulated seconds of traffic (default: 60)")
    p.add_argument("--save-profiles", help="also write the profiles used to this file")
    p.add_argument("--output", default="provision_plan.json",
                   help="where to write the plan JSON (default: provision_plan.json)")


def epilog() -> str:
    """The workload file's format (from `sluice.provision.workload`, where it is
    defined) and the model presets a workload may name."""
    doc = workload_file.__doc__
    fmt = doc[doc.index("Workload file (JSON)::") + len("Workload file (JSON)::"):].rstrip()
    presets = "\n".join(f"  {m.name:<14}{m.params / 1e9:5.3g}B parameters, {m.layers} layers"
                         for m in MODELS.values())
    fields = ", ".join(f.name for f in dataclasses.fields(ModelSpec))
    head = textwrap.fill(f"model presets (the workload's \"model\"; or an object with the "
                         f"fields {fields}):", 79)
    return f"workload file (--workload, JSON):{fmt}\n\n{head}\n{presets}"


def run(args: argparse.Namespace) -> int:
    try:
        return _melange(args) if args.melange else _provision(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"sluice provision: error: {e}", file=sys.stderr)
        return 2


def melange_plan(m: MelangeInput, profiles: Sequence[TypeProfile] | None = None,
                 rate: float | None = None) -> Plan:
    """Solve a Mélange input with Mélange's settings (its slice factor, no headroom);
    ``profiles`` (default: all of the file's types) and ``rate`` (default: the
    file's ``total_request_rate``) replace the file's."""
    from sluice.provision.planner import Options, solve

    total = m.total_request_rate if rate is None else rate
    return solve(m.profiles if profiles is None else profiles, m.distribution * total,
                 Options(slice_factor=m.slice_factor, headroom=0.0))


def melange_result(plan: Plan, profiles: Sequence[TypeProfile]) -> dict:
    """``{"TYPE": count for every type in profiles, "cost": $/hour}``."""
    result: dict = {p.name: plan.counts.get(p.name, 0) for p in profiles}
    result["cost"] = plan.cost
    return result


def _melange(args: argparse.Namespace) -> int:
    from sluice.provision.profiles import load_melange

    m = load_melange(args.melange)
    plan = melange_plan(m)
    if plan.status != "optimal":
        print(json.dumps(None))
        return 1
    result = melange_result(plan, m.profiles)
    print(json.dumps(result))
    with open(args.output, "w") as f:
        json.dump(result, f, indent=2)
    return 0 if plan.feasible else 1


def _caps(items: list[str]) -> dict[str, int]:
    caps = {}
    for item in items:
        name, sep, n = item.rpartition("=")
        if not sep or not name or not n.isdigit():
            raise ValueError(f"--cap: expected TYPE=N, got {item!r}")
        caps[name] = int(n)
    return caps


def _provision(args: argparse.Namespace) -> int:
    from sluice.provision.calibrate import calibrate
    from sluice.provision.planner import Options, solve
    from sluice.provision.profiles import load_profiles, merge, modelled_profiles, save_profiles
    from sluice.provision.simulate import verify

    if not args.slo:
        raise ValueError("--slo is required with --workload")
    slo = parse_slo(args.slo)
    workload = load_workload(args.workload)
    catalog = load_catalog(args.catalog)
    types = args.types.split(",") if args.types else None
    for t in types or []:
        if t not in catalog:
            raise ValueError(f"--types: {t!r} is not in the catalog ({', '.join(catalog)})")
    given = load_profiles(args.profiles, workload.buckets) if args.profiles else []
    if args.calibrate and not any(p.source == "measured" for p in given):
        raise ValueError("--calibrate: needs --profiles with at least one measured profile")
    model = model_spec(workload.model)
    if args.calibrate:
        profiles, cal = calibrate(catalog, model, workload.buckets, slo, given, args.spot, types)
        print(cal if cal else "--calibrate: no measured profile names a catalog type; "
              "profiles stay uncalibrated")
        # modelled entries of the file (e.g. from --save-profiles) would undo the fit
        given = [p for p in given if p.source not in ("modelled", "calibrated")]
    else:
        profiles = modelled_profiles(catalog, model, workload.buckets, slo, spot=args.spot,
                                     types=types)
    profiles = merge(profiles, given)
    if args.save_profiles:
        save_profiles(args.save_profiles, workload.buckets, profiles)
    options = Options(slice_factor=args.slice_factor, headroom=args.headroom,
                      caps=_caps(args.cap), budget=args.budget)
    plan = (solve(profiles, workload.rates, options) if args.no_verify
            else verify(profiles, workload, slo, options, duration_s=args.sim_duration))
    sources = {p.name: p.source for p in profiles}
    print(table(plan, workload, sources, {p.name: p.cost for p in profiles}))
    if plan.headroom != options.headroom:
        print(f"headroom raised from {options.headroom:.0%} to {plan.headroom:.0%}: the "
              "simulation missed the SLO with less (--headroom is where the search starts)")
    out = {"workload": args.workload, "slo": str(slo), "spot": args.spot,
           "plan": plan.to_json(workload.buckets, sources)}
    with open(args.output, "w") as f:
        json.dump(out, f, indent=2)
    print(f"plan written to {args.output}")
    return 0 if plan.feasible else 1


def table(plan: Plan, workload: Workload, sources: dict[str, str],
          prices: dict[str, float]) -> str:
    b: Buckets = workload.buckets
    lines = [f"status: {plan.status}   cost: ${plan.cost:.2f}/hour   headroom: "
             f"{plan.headroom:.0%}   served: {plan.served:.3g}/{workload.rate:.3g} req/s",
             f"{'type':<14}{'source':<12}{'count':>6}{'$/h each':>10}{'$/h':>10}{'load':>8}"]
    for name, n in sorted(plan.counts.items()):
        lines.append(f"{name:<14}{sources[name]:<12}{n:>6}{prices[name]:>10.3f}"
                     f"{n * prices[name]:>10.2f}{plan.loads[name]:>8.2f}")
    lines.append("routing (fraction of each bucket's rate per type):")
    for bucket, w in sorted(plan.routing.items()):
        mix = ", ".join(f"{t} {f:.2f}" for t, f in sorted(w.items()))
        lines.append(f"  {b.label(*bucket):<28}{workload.rates[bucket]:>8.3g} req/s  {mix}")
    for bucket in plan.infeasible_buckets:
        lines.append(f"  {b.label(*bucket):<28} no type can serve this bucket within the SLO")
    a = plan.attainment
    if a:
        terms = [f"{k} {a[k]['statistic']} {a[k]['value']:.3g}s (target {a[k]['target']:g}s)"
                 for k in ("ttft", "tpot") if k in a]
        lines.append(f"simulated ({a['requests']} requests, {a['duration_s']:g}s): "
                     f"{'SLO met' if a['met'] else 'SLO MISSED'}; " + "; ".join(terms)
                     + f"; requests within every threshold {a['fraction_ok']:.1%}")
        if a["unverified_rate"]:
            lines.append(f"  {a['unverified_rate']:.3g} req/s go to types without a step-time "
                         "model (imported/measured) and were not simulated")
    return "\n".join(lines)
