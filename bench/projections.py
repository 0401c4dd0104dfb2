"""Fused projections, weight layouts and XLA:CPU flags for the decode step (issue 21).

Run from the repository root::

    .venv/bin/python bench/projections.py [--rounds 3] [--flags all|NAME,...]
    .venv/bin/python bench/projections.py --chain-rows 1,8,32 --calls 20  # chain only

Each child holds about 4 GB; on a 23 GB machine run at most 3 flag sets at once.

On ``smollm2-135m-random`` (float32) at 1, 8 and 32 decode rows and a 128-token
prefill chunk. Everything a variant is compared against runs in the same process,
the variants interleaved call by call, each time the best of several calls after
a warm-up (the best, not the median: on a shared, loaded machine the minimum is
the run least disturbed by other work):

1. the model's matmul chain alone (30 layers scanned, the 7 projections each,
   plus the lm-head), in four variants: separate projections stored ``[in, out]``
   (the runtime's layout), QKV and gate/up fused into one matmul each, and both
   again with weights stored ``[out, in]`` (the checkpoint's own layout);
2. the whole jitted decode step (`model_runner._forward_logits`, chunked CPU
   attention at a context of 192, KV pool donated), as the runtime runs it.

XLA:CPU flags have to be set before the backend starts, so each flag set runs in
its own child process (the ``--child`` mode), all children of a round at once so
that they share whatever else loads the machine; a flag set's speed-up is its
time over the no-flag child's time in the same round (median over ``--rounds``). Writes bench/results/projections.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

OUT = Path(__file__).resolve().parent / "results" / "projections.json"
ROWS = (1, 8, 32, 128)  # 128: one prefill chunk of 128 tokens
CONTEXT, BLOCK = 192, 16
FLAG_SETS = {
    "none": "",
    "no_multi_thread_eigen": "--xla_cpu_multi_thread_eigen=false",
    "fast_math": "--xla_cpu_enable_fast_math=true",
    "xnnpack": "--xla_cpu_use_xnnpack=true",
    "xnn_fusion_dot": "--xla_cpu_experimental_xnn_fusion_type=dot",
    "ynn_fusion_dot": "--xla_cpu_experimental_ynn_fusion_type=dot",
    "onednn_fusion_dot": "--xla_cpu_experimental_onednn_fusion_type=dot",
    "legacy_runtime": "--xla_cpu_use_thunk_runtime=false",
}


def best_ms(fns: dict, calls: int) -> dict[str, float]:
    """Best-of-``calls`` ms of each function, the functions interleaved call by call."""
    import jax
    for fn in fns.values():
        jax.block_until_ready(fn())
    best = {name: float("inf") for name in fns}
    for _ in range(calls):
        for name, fn in fns.items():
            t = time.perf_counter()
            jax.block_until_ready(fn())
            best[name] = min(best[name], (time.perf_counter() - t) * 1e3)
    return best


def chain_variants(cfg, rows: int):
    """The matmul chain in four weight arrangements, as jitted closures over random weights."""
    import jax
    import jax.numpy as jnp

    L, H, I = cfg.num_layers, cfg.hidden_size, cfg.intermediate_size
    q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    keys = iter(jax.random.split(jax.random.PRNGKey(1), 10))
    rnd = lambda *s: 0.02 * jax.random.normal(next(keys), s, jnp.float32)  # noqa: E731
    w = {"wq": rnd(L, H, q), "wk": rnd(L, H, kv), "wv": rnd(L, H, kv), "wo": rnd(L, q, H),
         "w_gate": rnd(L, H, I), "w_up": rnd(L, H, I), "w_down": rnd(L, I, H)}
    head = rnd(H, cfg.vocab_size)
    x = rnd(rows, H)
    fused = {"wqkv": jnp.concatenate([w["wq"], w["wk"], w["wv"]], -1), "wo": w["wo"],
             "w_gate_up": jnp.concatenate([w["w_gate"], w["w_up"]], -1), "w_down": w["w_down"]}
    t = lambda d: {k: jnp.swapaxes(v, 1, 2) for k, v in d.items()}  # noqa: E731
    mm_in_out = lambda a, b: a @ b  # noqa: E731
    mm_out_in = lambda a, b: jax.lax.dot_general(a, b, (((1,), (1,)), ((), ())))  # noqa: E731

    def mix(y, qq, k, v, lp, mm):
        # every projection's output feeds the next layer, so none is dead code
        a = qq + jnp.concatenate([k, v] * (q // (2 * kv)) + [k] * (q // kv % 2), -1)
        return y + mm(a, lp["wo"])

    def separate(mm):
        def layer(y, lp):
            y = mix(y, mm(y, lp["wq"]), mm(y, lp["wk"]), mm(y, lp["wv"]), lp, mm)
            return y + mm(jax.nn.silu(mm(y, lp["w_gate"])) * mm(y, lp["w_up"]), lp["w_down"]), None
        return layer

    def fused_layer(mm):
        def layer(y, lp):
            qkv = mm(y, lp["wqkv"])
            y = mix(y, qkv[:, :q], qkv[:, q:q + kv], qkv[:, q + kv:], lp, mm)
            gu = mm(y, lp["w_gate_up"])
            return y + mm(jax.nn.silu(gu[:, :I]) * gu[:, I:], lp["w_down"]), None
        return layer

    def program(layer, weights, mm, head):
        f = jax.jit(lambda x, ws, h: mm(jax.lax.scan(layer, x, ws)[0], h))
        return lambda: f(x, weights, head)

    return {"separate_in_out": program(separate(mm_in_out), w, mm_in_out, head),
            "fused_in_out": program(fused_layer(mm_in_out), fused, mm_in_out, head),
            "separate_out_in": program(separate(mm_out_in), t(w), mm_out_in, head.T),
            "fused_out_in": program(fused_layer(mm_out_in), t(fused), mm_out_in, head.T)}


def step_program(model, rows: int):
    """The runtime's jitted decode step (or one 128-token prefill chunk) on ``model``."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from sluice.pallas_kernels.metadata import AttentionMetadata
    from sluice.runtime.kv_cache import KVCacheSpec
    from sluice.runtime.model_runner import _forward_logits

    spec = KVCacheSpec.for_model(model.config, 512, BLOCK)
    state = {"cache": spec.allocate()}
    pages = 256 // BLOCK
    if rows == 128:  # a prefill chunk: one sequence, positions 0..127
        tables = np.arange(pages)[None]
        meta = AttentionMetadata(jnp.arange(rows, dtype=jnp.int32),
                                 jnp.asarray([0, rows], jnp.int32),
                                 jnp.asarray([rows], jnp.int32), jnp.asarray(tables, jnp.int32),
                                 jnp.asarray(1, jnp.int32), rows)
        ids, pos, sample_rows = (jnp.zeros(rows, jnp.int32), jnp.arange(rows, dtype=jnp.int32),
                                 jnp.asarray([rows - 1], jnp.int32))
    else:
        tables = (np.arange(rows * pages).reshape(rows, pages) * 7) % spec.num_blocks
        slots = tables[:, (CONTEXT - 1) // BLOCK] * BLOCK + (CONTEXT - 1) % BLOCK
        meta = AttentionMetadata(jnp.asarray(slots, jnp.int32),
                                 jnp.arange(rows + 1, dtype=jnp.int32),
                                 jnp.full(rows, CONTEXT, jnp.int32), jnp.asarray(tables, jnp.int32),
                                 jnp.asarray(rows, jnp.int32), 1)
        ids, pos, sample_rows = (jnp.zeros(rows, jnp.int32),
                                 jnp.full(rows, CONTEXT - 1, jnp.int32),
                                 jnp.arange(rows, dtype=jnp.int32))

    def call():
        logits, state["cache"] = _forward_logits(model.params, state["cache"], ids, pos, (meta,),
                                                 sample_rows, cfg=model.config, backend="chunked")
        return logits
    return call


def child(calls: int, chains: bool) -> dict:
    """Measure under the XLA_FLAGS this process was started with: the step, and the
    four chain variants (``chains``) or only the runtime's own."""
    import jax

    from sluice.runtime.loader import load_model

    model = load_model("smollm2-135m-random", progress=False)
    out = {"xla_flags": os.environ.get("XLA_FLAGS", ""), "jax": jax.__version__, "rows": {}}
    for rows in ROWS:
        variants = chain_variants(model.config, rows)
        fns = {f"chain_{k}": v for k, v in variants.items()
               if chains or k == "separate_in_out"}
        fns["step"] = step_program(model, rows)
        out["rows"][str(rows)] = best_ms(fns, calls if rows < 128 else max(3, calls // 2))
    return out


def run_children(flag_sets: dict[str, str], calls: int, chains: bool) -> dict[str, dict]:
    """One child per flag set, all at once, so that they share whatever else loads the
    machine; only the no-flag child times the four chain variants when ``chains``."""
    procs = {name: subprocess.Popen(
        [sys.executable, __file__, "--child", "--calls", str(calls)]
        + (["--chains"] if chains and name == "none" else []),
        env=dict(os.environ, XLA_FLAGS=flags), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True) for name, flags in flag_sets.items()}
    out = {}
    for name, p in procs.items():
        stdout, stderr = p.communicate()
        out[name] = (json.loads(stdout.strip().splitlines()[-1]) if p.returncode == 0 else
                     {"xla_flags": flag_sets[name], "returncode": p.returncode,
                      "error": (stderr or stdout).strip().splitlines()[-3:]})
    return out


def summarize(rounds: list[dict[str, dict]]) -> dict:
    """Per flag set, row count and program: best ms over rounds and the median over
    rounds of (time / the no-flag child's time in the same round)."""
    import numpy as np

    summary = {}
    for name in rounds[0]:
        runs = [r[name] for r in rounds if "rows" in r[name]]
        if not runs:
            summary[name] = {k: rounds[0][name].get(k) for k in ("returncode", "error")}
            continue
        summary[name] = {}
        for rows, progs in runs[0]["rows"].items():
            summary[name][rows] = {}
            for prog in progs:
                ms = [r["rows"][rows][prog] for r in runs]
                base = [r["none"]["rows"][rows][prog] for r in rounds if "rows" in r[name]]
                within = [r["rows"][rows][prog] / r["rows"][rows]["chain_separate_in_out"]
                          for r in runs] if prog.startswith("chain") else None
                summary[name][rows][prog] = {
                    "best_ms": min(ms),
                    "vs_no_flags": float(np.median([m / b for m, b in zip(ms, base)])),
                    **({"vs_separate_in_out": float(np.median(within))} if within else {})}
    return summary


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--calls", type=int, default=12, help="timed calls per program (half at 128 rows)")
    ap.add_argument("--flags", default="all", help="'all', or comma-separated names of "
                                                   f"{', '.join(FLAG_SETS)}")
    ap.add_argument("--no-chains", action="store_true",
                    help="skip the fused / [out, in] chain variants (flags only)")
    ap.add_argument("--chain-rows", default=None,
                    help="only the four chain variants, in this process, at these comma-"
                         "separated row counts (no model, no children: the cheap check)")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--chains", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.chain_rows:
        from sluice.runtime.config import BUILTIN_CONFIGS
        cfg = BUILTIN_CONFIGS["smollm2-135m-random"]
        for rows in map(int, args.chain_rows.split(",")):
            print(rows, json.dumps(best_ms(chain_variants(cfg, rows), args.calls)), flush=True)
        return
    if args.child:
        print(json.dumps(child(args.calls, args.chains)))
        return
    names = list(FLAG_SETS) if args.flags == "all" else ["none"] + [
        n for n in args.flags.split(",") if n != "none"]
    rounds = []
    for i in range(args.rounds):
        rounds.append(run_children({n: FLAG_SETS[n] for n in names}, args.calls,
                                   not args.no_chains))
        print(f"round {i + 1}/{args.rounds} done", file=sys.stderr, flush=True)
    import jax
    result = {"command": "bench/projections.py " + " ".join(sys.argv[1:]),
              "model": "smollm2-135m-random", "dtype": "float32", "context": CONTEXT,
              "flag_sets": {n: FLAG_SETS[n] for n in names}, "summary": summarize(rounds),
              "rounds": rounds, "load_average": os.getloadavg(),
              "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                          "python": platform.python_version(), "jax": jax.__version__}}
    print(json.dumps(result["summary"], indent=1))
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
