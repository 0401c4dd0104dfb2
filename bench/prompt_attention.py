"""CPU attention over prompt pieces: the work list against the plain chunk loop (issue 21).

Run from the repository root::

    .venv/bin/python bench/prompt_attention.py [--calls 5]

`sluice.pallas_kernels.chunked` attends prompt pieces (32 query rows each, as the
engine cuts them on CPU) either with the plain loop, every piece advancing one
KV chunk per iteration to the longest piece, or with the (sequence, chunk) work
list, each piece visiting only the chunks it sees; a step takes the work list
when it needs fewer iterations. Here three programs are timed in one process,
interleaved call by call, best of ``--calls``: the chunked module as it runs,
and with the choice forced to the plain loop and to the work list (the work
list's cost per iteration shows where it does not save iterations). SmolLM2-135M's attention layout (9 query heads,
3 KV heads, head_dim 64, 30 layers scanned), float32, a 2,560-block pool with
pages spread over it, 40-page block tables; prompt batches of one 512-token
prompt, four of 128 and eight of 64 tokens (19 piece slots, as the engine's
512-token shape has). Writes bench/results/prompt_attention.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from sluice.pallas_kernels import chunked
from sluice.pallas_kernels.metadata import AttentionMetadata

OUT = Path(__file__).resolve().parent / "results" / "prompt_attention.json"
LAYERS, BLOCKS, BLOCK, Q_HEADS, KV_HEADS, HEAD_DIM = 30, 2560, 16, 9, 3, 64
PIECE, SLOTS, PAGES = 32, 19, 40
BATCHES = {"1 x 512": [512], "4 x 128": [128] * 4, "8 x 64": [64] * 8}


def prompt_metadata(lengths: list[int]) -> tuple[AttentionMetadata, int]:
    """Fresh prompts cut into pieces of PIECE rows, back to back, padded to SLOTS."""
    qsl, seq_lens, tables = [0], [], []
    for i, n in enumerate(lengths):
        table = (np.arange(PAGES) * 7 + 97 * i) % BLOCKS
        for lo in range(0, n, PIECE):
            hi = min(n, lo + PIECE)
            qsl.append(qsl[-1] + hi - lo)
            seq_lens.append(hi)
            tables.append(table)
    tokens = qsl[-1]
    while len(seq_lens) < SLOTS:
        qsl.append(tokens)
        seq_lens.append(0)
        tables.append(np.zeros(PAGES, int))
    meta = AttentionMetadata(jnp.zeros(tokens, jnp.int32), jnp.asarray(qsl, jnp.int32),
                             jnp.asarray(seq_lens, jnp.int32), jnp.asarray(np.stack(tables), jnp.int32),
                             jnp.asarray(len(lengths), jnp.int32), PIECE)
    return meta, tokens


def program(meta: AttentionMetadata, force: bool | None):
    """Attention of every layer, compiled; ``force`` True / False: the work list /
    the plain loop whatever the step needs, None: the module's own choice."""
    def attend_all(q, cache):
        def layer(acc, i):
            return acc + chunked.ragged_paged_attention(q, cache, i, meta, scale=0.125,
                                                        num_kv_heads=KV_HEADS), None
        return jax.lax.scan(layer, jnp.zeros_like(q), jnp.arange(LAYERS))[0]

    chosen = chunked._takes_work_list
    if force is not None:
        chunked._takes_work_list = lambda *a: jnp.asarray(force)
    try:  # traced now, with the choice as it is
        return jax.jit(attend_all).lower(*example(meta)).compile()
    finally:
        chunked._takes_work_list = chosen


def example(meta: AttentionMetadata):
    tokens = int(meta.query_start_loc[-1])
    q = jax.random.normal(jax.random.PRNGKey(1), (tokens, Q_HEADS, HEAD_DIM))
    cache = jax.random.normal(jax.random.PRNGKey(0), (BLOCKS, LAYERS, 2, BLOCK, KV_HEADS, HEAD_DIM))
    return q, cache


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--calls", type=int, default=5)
    args = ap.parse_args()
    rows = {}
    for name, lengths in BATCHES.items():
        meta, _ = prompt_metadata(lengths)
        q, cache = example(meta)
        fns = {"as_run": program(meta, None), "plain_loop": program(meta, False),
               "work_list": program(meta, True)}
        outs = {k: f(q, cache) for k, f in fns.items()}
        best = {k: float("inf") for k in fns}
        for _ in range(args.calls):
            for k, f in fns.items():
                t = time.perf_counter()
                jax.block_until_ready(f(q, cache))
                best[k] = min(best[k], time.perf_counter() - t)
        rows[name] = {**{f"{k}_ms": v * 1e3 for k, v in best.items()},
                      "plain_over_as_run": best["plain_loop"] / best["as_run"],
                      "max_abs_diff": float(jnp.max(jnp.abs(outs["as_run"] - outs["plain_loop"])))}
        print(f"{name}: as run {rows[name]['as_run_ms']:.1f} ms, plain loop "
              f"{rows[name]['plain_loop_ms']:.1f} ms ({rows[name]['plain_over_as_run']:.2f}x), "
              f"work list forced {rows[name]['work_list_ms']:.1f} ms, "
              f"max |diff| {rows[name]['max_abs_diff']:.1e}", flush=True)
    result = {"command": "bench/prompt_attention.py --calls " + str(args.calls), "rows": rows,
              "load_average": os.getloadavg(),
              "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                          "python": platform.python_version(), "jax": jax.__version__}}
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
