"""Preemption benchmark (issue 6), first part: the cost of one context switch.

Swap-out + swap-in of one request's KV (default 2048 tokens of
`smollm2-135m-random`) through the engine's own copy path
(`ModelRunner.copy_out` / `copy_in`, i.e. the block gather/scatter primitive),
moved either as block groups (the sequence's contiguous runs, here one run)
or block by block (one copy per block, as per-block swap implementations do).
Both run in the same process on the same pool; each is timed over several
repeats after an untimed warm-up, and the copies are checked to restore the
exact bytes. Writes bench/results/preemption_swap.json.

    .venv/bin/python bench/preemption.py [--tokens 2048] [--repeats 5]

Not here yet (see bench/RESULTS.md): the multi-turn workload comparing Sluice's
scheduler with a baseline configuration.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import jax
import numpy as np

from sluice.runtime.loader import load_model
from sluice.runtime.model_runner import ModelRunner

RESULTS = Path(__file__).parent / "results"


def switch(runner: ModelRunner, runs: list[tuple[int, int]]) -> float:
    """Seconds for swap-out then swap-in of ``runs``, one copy per run."""
    start = time.perf_counter()
    staged = [runner.copy_out([r]) for r in runs]
    for r, blocks in zip(runs, staged):
        runner.copy_in([r], blocks)
    runner.kv_cache.block_until_ready()
    return time.perf_counter() - start


def grouped_switch(runner: ModelRunner, runs: list[tuple[int, int]]) -> float:
    """Seconds for swap-out then swap-in of all ``runs`` as one staged copy each way."""
    start = time.perf_counter()
    blocks = runner.copy_out(runs)
    runner.copy_in(runs, blocks)
    runner.kv_cache.block_until_ready()
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m-random")
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    model = load_model(args.model, progress=False)
    block_size = 16
    n = -(-args.tokens // block_size)
    runner = ModelRunner(model, 2 * n, block_size, max_num_seqs=1, max_num_batched_tokens=16,
                         max_prefill_seqs=1, max_model_len=args.tokens)
    rng = np.random.default_rng(0)
    runner.kv_cache = jax.numpy.asarray(rng.standard_normal(runner.spec.shape, np.float32)
                                        .astype(runner.spec.dtype))
    before = np.asarray(runner.kv_cache[:n])
    grouped, per_block = [(0, n)], [(b, 1) for b in range(n)]
    for runs in (grouped, per_block):  # warm-up compiles both copy shapes
        (grouped_switch if runs is grouped else switch)(runner, runs)
    times = {"grouped": [], "per_block": []}
    for _ in range(args.repeats):
        times["grouped"].append(grouped_switch(runner, grouped))
        times["per_block"].append(switch(runner, per_block))
    assert np.array_equal(np.asarray(runner.kv_cache[:n]), before), "copies changed the KV"
    best = {k: min(v) for k, v in times.items()}
    result = {
        "command": f"bench/preemption.py --tokens {args.tokens} --repeats {args.repeats}",
        "machine": {"cpu_count": jax.local_device_count("cpu"), "platform": platform.platform(),
                    "jax": jax.__version__, "backend": jax.default_backend()},
        "model": args.model, "tokens": args.tokens, "blocks": n,
        "bytes": n * runner.spec.bytes_per_block,
        "best_s": best, "all_s": times,
        "speedup_grouped_vs_per_block": best["per_block"] / best["grouped"],
        "grouped_GBps": 2 * n * runner.spec.bytes_per_block / best["grouped"] / 1e9,
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "preemption_swap.json").write_text(json.dumps(result, indent=2))
    print(json.dumps({k: result[k] for k in ("blocks", "bytes", "best_s",
                                             "speedup_grouped_vs_per_block", "grouped_GBps")},
                     indent=2))


if __name__ == "__main__":
    main()
