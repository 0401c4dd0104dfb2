"""Per-step time of the engine at two commits, same machine, same run (issue 20's
"no per-step regression" check of the restructured engine core).

Each commit is exported with ``git archive`` into a temporary directory and run
in its own child process with only that tree on the import path (``sluice.*``
resolves to it, not to the working tree). A child builds an `LLMEngine`
(``--model``, float32, no warm-up), submits ``--batch`` requests of
``--prompt`` random tokens (greedy, ignore_eos), runs them through their
prefills and then times ``--steps`` pure-decode ``engine.step()`` calls (every
row one token; the first ``--skip`` decode steps, which compile, are dropped).
The children alternate (base, head, base, head, ... ``--rounds`` times), so a
change in the machine's load hits both alike; the load average is recorded
before each child. Reported: each child's median step time, each commit's
best-of-rounds median, and head / base.

    .venv/bin/python bench/step_regression.py --base 5631034 --head HEAD \
        [--model tiny] [--batch 32] [--rounds 2]

Writes bench/results/step_regression-<model>[-<tag>].json (``--tag`` keeps an earlier
comparison of the same model).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
PACKAGES = ("runtime", "pallas_kernels", "scheduler", "provision", "rag")

CHILD = r"""
import json, statistics, sys, time
import numpy as np
import sluice.runtime
from sluice.runtime.engine import EngineConfig, LLMEngine
from sluice.runtime.loader import load_model
from sluice.runtime.sampling_params import SamplingParams

a = json.loads(sys.argv[1])
model = load_model(a["model"], dtype="float32")
engine = LLMEngine(model, EngineConfig(max_num_seqs=a["batch"], max_num_batched_tokens=512,
                                       max_model_len=a["prompt"] + a["steps"] + a["skip"] + 8,
                                       warmup=False, seed=0))
rng = np.random.default_rng(0)
params = SamplingParams(max_tokens=a["steps"] + a["skip"] + 4, temperature=0.0, ignore_eos=True)
for i in range(a["batch"]):
    engine.add_request(f"r{i}", {"prompt_token_ids": rng.integers(0, 250, a["prompt"]).tolist()},
                       params)
sched = engine.scheduler
while len(sched.running) < a["batch"] or any(
        r.num_computed_tokens < r.num_tokens - 1 for r in sched.running):
    engine.step()  # prefills (and their first tokens)
times = []
for _ in range(a["skip"] + a["steps"]):
    t0 = time.perf_counter()
    engine.step()
    times.append(time.perf_counter() - t0)
times = times[a["skip"]:]
print(json.dumps({"median_s": statistics.median(times), "min_s": min(times),
                  "steps": len(times), "package": sluice.runtime.__file__}))
"""


def export(commit: str, into: Path) -> Path:
    """The commit's tree under ``into`` and an import root whose ``sluice.*`` is it."""
    tree, path = into / "tree", into / "path" / "sluice"
    tree.mkdir(parents=True)
    path.mkdir(parents=True)
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", commit], check=True,
                             capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(tree)], input=archive, check=True)
    for pkg in PACKAGES:
        (path / pkg).symlink_to(tree / pkg)
    return path.parent


def run_child(import_root: Path, args: argparse.Namespace) -> dict:
    load = os.getloadavg()[0]
    env = dict(os.environ, PYTHONPATH=str(import_root))
    spec = json.dumps({k: getattr(args, k) for k in ("model", "batch", "prompt", "steps", "skip")})
    out = subprocess.run([sys.executable, "-c", CHILD, spec], env=env, check=True,
                         capture_output=True, text=True, cwd=tempfile.gettempdir())
    result = json.loads(out.stdout.strip().splitlines()[-1])
    if not result["package"].startswith(str(import_root)):
        raise RuntimeError(f"the child imported {result['package']}, not {import_root}")
    return {**result, "load_avg_1m_before": load}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", default="5631034")
    ap.add_argument("--head", default="HEAD")
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--prompt", type=int, default=64)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--skip", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--tag", default="", help="suffix of the result file's name")
    args = ap.parse_args(argv)
    commits = {name: subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", c],
                                    check=True, capture_output=True, text=True).stdout.strip()
               for name, c in (("base", args.base), ("head", args.head))}
    runs: dict[str, list[dict]] = {"base": [], "head": []}
    with tempfile.TemporaryDirectory() as tmp:
        roots = {name: export(c, Path(tmp) / name) for name, c in commits.items()}
        for i in range(args.rounds):
            for name in ("base", "head"):
                runs[name].append(run_child(roots[name], args))
                print(f"round {i + 1} {name} ({commits[name]}): "
                      f"{runs[name][-1]['median_s'] * 1e3:.1f} ms/step, load "
                      f"{runs[name][-1]['load_avg_1m_before']:.1f}", flush=True)
    best = {name: min(r["median_s"] for r in rs) for name, rs in runs.items()}
    result = {"command": "bench/step_regression.py " + " ".join(argv or sys.argv[1:]),
              "commits": commits, "cpu_cores": os.cpu_count(),
              "config": {k: getattr(args, k) for k in ("model", "batch", "prompt", "steps",
                                                       "skip", "rounds")},
              "runs": runs, "best_median_s": best, "head_over_base": best["head"] / best["base"]}
    RESULTS.mkdir(exist_ok=True)
    name = f"step_regression-{args.model}" + (f"-{args.tag}" if args.tag else "")
    (RESULTS / f"{name}.json").write_text(json.dumps(result, indent=2))
    print(json.dumps({"best_median_ms": {k: v * 1e3 for k, v in best.items()},
                      "head_over_base": result["head_over_base"]}, indent=2))


if __name__ == "__main__":
    main()
