"""Modelled roofline of each kernel on a target, from its compiled module.

Run from the repository root in an accelerator environment (no accelerator
needed; see compile_tests/targets.py)::

    .venv-gpu/bin/python bench/compile_roofline.py --target h200
    .venv-tpu/bin/python bench/compile_roofline.py --target v6e

For Llama-3-8B's attention layout (32 query heads, 8 KV heads, head_dim 128,
bfloat16, block size 16 unless noted) it compiles each kernel through
`sluice.pallas_kernels.dispatch` for the target and records:

- what the compiler says: XLA's ``cost_analysis()`` of the module (it cannot
  see inside a Pallas custom call: its bytes are the call's operands, whole
  pool included, and its flops only the XLA ops around it), and on GPU the
  Triton kernel's launch (grid, threads, dynamic shared memory, from XLA's
  thunk sequence) and ptxas's registers and spills for sm_90a;
- a model of the kernel's own work, from its tiling (`ragged_attention._plan`):
  bytes = every KV page each program reads (a prefill tile re-reads its
  sequence's causal prefix), plus queries and output; flops = the matmuls
  the kernel executes (padded heads and masked positions included);
  modelled time = max(bytes / HBM bandwidth, flops / bf16 peak).

Nothing is timed: the "measured" column of bench/RESULTS.md stays empty until
bench/gpu_device_check.sh runs on the hardware. Writes
bench/results/compile_roofline_<target>.json and prints the Markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from compile_tests import offline  # noqa: E402

offline.apply()
DUMP = tempfile.mkdtemp(prefix="sluice-xla-dump-")
if "--target" in sys.argv and sys.argv[sys.argv.index("--target") + 1].startswith("h"):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + f" --xla_dump_to={DUMP}").strip()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from compile_tests.check import compile_for, kernel_calls, sds  # noqa: E402
from compile_tests.targets import TARGETS  # noqa: E402
from sluice.pallas_kernels import dispatch, ragged_attention  # noqa: E402
from sluice.pallas_kernels.metadata import AttentionMetadata  # noqa: E402

# Peaks the model uses: HBM bandwidth and dense bf16 matmul rate.
PEAKS = {
    # tests/data/gpu-targets/h200.txtpb memory_bandwidth; NVIDIA's H200 SXM dense bf16.
    "h200": dict(hbm_bytes_per_s=4.8e12, bf16_flops_per_s=989e12),
    "h100": dict(hbm_bytes_per_s=3.35e12, bf16_flops_per_s=989e12),
    # JAX's own TPU table (jax._src.pallas.mosaic.tpu_info) for v6e / v5e.
    "v6e": dict(hbm_bytes_per_s=1.64e12, bf16_flops_per_s=9.20e14),
    "v5e": dict(hbm_bytes_per_s=8.20e11, bf16_flops_per_s=1.97e14),
}
Q_HEADS, KV_HEADS, HEAD_DIM, LAYERS = 32, 8, 128, 32
DTYPE, ITEM = jnp.bfloat16, 2
# name: (query rows per sequence, KV length per sequence, sequences, window, soft cap, block)
ATTENTION = {
    "attention decode 64 x 4k": (1, 4096, 64, None, None, 16),
    "attention decode 1 x 32k": (1, 32768, 1, None, None, 16),
    "attention prefill 8 x 2048": (2048, 2048, 8, None, None, 16),
    "attention prefill 8 x 2048, block 128": (2048, 2048, 8, None, None, 128),
    "attention mixed, window 1024, cap 50": (None, None, None, 1024, 50.0, 16),
}
MIXED = [(1, 3000)] * 30 + [(512, 1800), (300, 300)]  # (query rows, KV length)


def _seqs(name: str) -> list[tuple[int, int]]:
    q_len, kv_len, n, *_ = ATTENTION[name]
    return MIXED if q_len is None else [(q_len, kv_len)] * n


def _tiling(seqs, block: int, platform: str):
    """The platform kernel's static plan for this batch (tile rows, padded
    group, KV positions per loop step)."""
    tokens = sum(q for q, _ in seqs)
    pages = max(-(-kv // block) for _, kv in seqs)
    q = jax.ShapeDtypeStruct((tokens, Q_HEADS, HEAD_DIM), DTYPE)
    cache = jax.ShapeDtypeStruct((len(seqs) * pages + 1, 1, 2, block, KV_HEADS, HEAD_DIM), DTYPE)
    i32 = jnp.int32
    meta = AttentionMetadata(jax.ShapeDtypeStruct((tokens,), i32),
                             jax.ShapeDtypeStruct((len(seqs) + 1,), i32),
                             jax.ShapeDtypeStruct((len(seqs),), i32),
                             jax.ShapeDtypeStruct((len(seqs), pages), i32),
                             jax.ShapeDtypeStruct((), i32), max(q for q, _ in seqs))
    plan = {}

    if platform == "tpu":  # as ragged_paged_attention_tpu plans it
        kw = dict(prefill_rows=ragged_attention.TPU_PREFILL_TILE_ROWS,
                  pages_per_step=max(1, min(ragged_attention.TPU_STEP_TOKENS // block, pages)))
    else:
        kw = {}

    def capture(q, c, m):
        plan["static"], tiles = ragged_attention._plan(q, c, 0, m, 1.0, None, None, KV_HEADS, **kw)
        return tiles.q

    jax.eval_shape(capture, q, cache, meta)
    return plan["static"]


def attention_model(name: str, platform: str) -> dict:
    """Bytes and flops the platform's attention kernel moves and executes for
    this batch: pages are read in the kernel's loop steps (`_Static.step_tokens`
    KV positions: one page on GPU, 128 positions on TPU), and a GPU KV split
    (`kv_splits`) adds its float32 partial outputs, written and read back."""
    seqs = _seqs(name)
    window, block = ATTENTION[name][3], ATTENTION[name][5]
    st = _tiling(seqs, block, platform)
    bq, rows, step = st.tile_tokens, st.rows, st.step_tokens
    page_bytes = 2 * block * KV_HEADS * HEAD_DIM * ITEM  # keys and values, all KV heads
    pages_read, starts = 0, np.cumsum([0] + [q for q, _ in seqs])
    tokens = int(starts[-1])
    for t in range(-(-tokens // bq)):
        lo, hi = t * bq, (t + 1) * bq
        for s, (q_len, kv_len) in enumerate(seqs):
            r_lo, r_hi = max(starts[s], lo), min(starts[s + 1], hi)
            if r_hi <= r_lo:
                continue
            ctx = kv_len - q_len
            kv_hi = ctx + r_hi - starts[s]
            kv_lo = 0 if window is None else max(0, ctx + r_lo - starts[s] - window + 1)
            pages_read += (-(-kv_hi // step) - kv_lo // step) * st.pages_per_step
    io = 2 * tokens * Q_HEADS * HEAD_DIM * ITEM
    tiles = -(-tokens // bq)
    splits = 1 if platform != "gpu" else ragged_attention.kv_splits(
        tiles * KV_HEADS, st.pages * block, _max_query_len(seqs))
    if splits > 1:  # each part's [rows, D] output and log-sum-exp, float32, written and read
        io += 2 * splits * KV_HEADS * tiles * rows * (HEAD_DIM + 1) * 4
    # Per page a program executes [rows, D] x [D, B] and [rows, B] x [B, D] for each KV head.
    flops = pages_read * KV_HEADS * 2 * (2 * rows * block * HEAD_DIM)
    return dict(bytes=int(pages_read * page_bytes + io), flops=int(flops), tile_tokens=bq,
                kv_splits=splits,
                kv_reads_per_token=round(float(pages_read * block / sum(kv for _, kv in seqs)), 2))


def _max_query_len(seqs) -> int:
    return max(q for q, _ in seqs)


def compile_attention(target, name: str):
    seqs = _seqs(name)
    window, cap, block = ATTENTION[name][3:]
    tokens, pages = sum(q for q, _ in seqs), max(-(-kv // block) for _, kv in seqs)
    i32 = jnp.int32
    meta = AttentionMetadata(sds(target, (tokens,), i32), sds(target, (len(seqs) + 1,), i32),
                             sds(target, (len(seqs),), i32),
                             sds(target, (len(seqs), pages), i32), sds(target, (), i32),
                             max_query_len=max(q for q, _ in seqs))
    cache = sds(target, (len(seqs) * pages + 1, 2, 2, block, KV_HEADS, HEAD_DIM), DTYPE)
    q = sds(target, (tokens, Q_HEADS, HEAD_DIM), DTYPE)
    fn = lambda q, c, l, m: dispatch.ragged_paged_attention(  # noqa: E731
        q, c, l, m, scale=HEAD_DIM ** -0.5, sliding_window=window, soft_cap=cap)
    return compile_for(target, fn, (q, cache, sds(target, (), i32), meta))


def compile_write(target, tokens: int):
    cache = sds(target, (4096, 2, 2, 16, KV_HEADS, HEAD_DIM), DTYPE)
    new = sds(target, (tokens, KV_HEADS, HEAD_DIM), DTYPE)
    fn = lambda c, l, k, v, s: dispatch.write_kv(c, l, k, v, s)  # noqa: E731
    out = compile_for(target, fn, (cache, sds(target, (), jnp.int32), new, new,
                                   sds(target, (tokens,), jnp.int32)), donate=(0,))
    return out, dict(bytes=2 * 2 * tokens * KV_HEADS * HEAD_DIM * ITEM, flops=0)


def compile_copy(target, scatter: bool):
    cache = sds(target, (256, LAYERS, 2, 16, KV_HEADS, HEAD_DIM), DTYPE)
    groups = sds(target, (8, 2), jnp.int32)
    if scatter:
        staging = sds(target, (32,) + cache.shape[1:], DTYPE)
        out = compile_for(target, dispatch.scatter_blocks, (cache, groups, staging), donate=(0,))
    else:
        out = compile_for(target, lambda c, g: dispatch.gather_blocks(c, g, 32), (cache, groups))
    slab = int(np.prod(cache.shape[1:])) * ITEM
    return out, dict(bytes=2 * 32 * slab, flops=0)


def gpu_kernel_facts(seen: set[str]) -> dict:
    """Launch and ptxas facts of the sluice_* Triton kernels of the newest dumped module."""
    dump = Path(DUMP)
    thunks = sorted(set(dump.glob("*thunk_sequence.txt")) - seen, key=os.path.getmtime)
    if not thunks:
        return {}
    seen.update(thunks)
    module = thunks[-1].name.split(".")[0]
    facts = {}
    for m in re.finditer(r"(sluice_\w+) grid: \[([\d, ]+)\] threads: \[([\d, ]+)\]\s+"
                         r"shared_memory: (\d+) bytes", thunks[-1].read_text()):
        facts[m.group(1)] = dict(grid=m.group(2), threads=int(m.group(3).split(",")[0]),
                                 shared_memory_bytes=int(m.group(4)))
    ptxas = Path(sys.prefix).glob("lib/python*/site-packages/nvidia/cuda_nvcc/bin/ptxas")
    ptxas = next(iter(ptxas))
    for ptx in dump.glob(f"{module}.*.ptx"):
        text = ptx.read_text()
        if ".entry sluice_" not in text:
            continue
        info = subprocess.run([str(ptxas), "-arch=sm_90a", "-v", "-o", os.devnull, str(ptx)],
                              capture_output=True, text=True).stderr
        for m in re.finditer(r"Compiling entry function '(sluice_\w+)'.*?(\d+) bytes spill "
                             r"stores, (\d+) bytes spill loads.*?Used (\d+) registers", info,
                             re.S):
            facts.setdefault(m.group(1), {}).update(
                registers=int(m.group(4)), spill_store_bytes=int(m.group(2)),
                spill_load_bytes=int(m.group(3)))
    return facts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--target", required=True, choices=sorted(PEAKS))
    args = parser.parse_args()
    target, peak = TARGETS[args.target], PEAKS[args.target]
    seen: set = set()
    rows = []
    cases = [(n, lambda n=n: (compile_attention(target, n), attention_model(n, target.platform)))
             for n in ATTENTION]
    cases += [("write_kv 64 tokens", lambda: compile_write(target, 64)),
              ("write_kv 2048 tokens", lambda: compile_write(target, 2048)),
              ("gather_blocks 32 blocks x 32 layers", lambda: compile_copy(target, False)),
              ("scatter_blocks 32 blocks x 32 layers", lambda: compile_copy(target, True))]
    for name, run in cases:
        (compiled, hlo, seconds), model = run()
        cost = compiled.cost_analysis()
        cost = (cost[0] if isinstance(cost, (list, tuple)) else cost) or {}
        t_mem = model["bytes"] / peak["hbm_bytes_per_s"]
        t_flop = model["flops"] / peak["bf16_flops_per_s"]
        row = dict(case=name, kernel_calls=kernel_calls(hlo, target),
                   compile_seconds=round(seconds, 2),
                   xla_cost_bytes=float(cost.get("bytes accessed", 0)),
                   xla_cost_flops=float(cost.get("flops", 0)), **model,
                   modelled_us=round(1e6 * max(t_mem, t_flop), 1),
                   bound="memory" if t_mem >= t_flop else "compute",
                   arithmetic_intensity=round(model["flops"] / model["bytes"], 1))
        if target.platform == "gpu":
            row["kernels"] = gpu_kernel_facts(seen)
        rows.append(row)
        print(json.dumps(row), flush=True)
    out = ROOT / "bench" / "results" / f"compile_roofline_{args.target}.json"
    out.write_text(json.dumps(dict(target=args.target, jax=jax.__version__, peaks=peak,
                                   layout=dict(q_heads=Q_HEADS, kv_heads=KV_HEADS,
                                               head_dim=HEAD_DIM, dtype="bfloat16"),
                                   rows=rows), indent=1))
    print(f"\nwrote {out}\n")
    print("| kernel / case | modelled bytes | modelled flops | bound | modelled time | "
          "measured |" + (" programs | regs / spills / smem |" if target.platform == "gpu" else ""))
    print("|---|---|---|---|---|---|" + ("---|---|" if target.platform == "gpu" else ""))
    for r in rows:
        extra = ""
        if target.platform == "gpu":
            k = next(iter(r.get("kernels", {}).values()), {})
            programs = int(np.prod([int(g) for g in k["grid"].split(",")])) if k else 0
            extra = (f" {programs:,} | {k.get('registers', '-')} / {k.get('spill_store_bytes', '-')}"
                     f" B / {k.get('shared_memory_bytes', 0) // 1024} KiB |" if k
                     else " | (no kernel) |")
        print(f"| {r['case']} | {r['bytes'] / 1e6:,.1f} MB | {r['flops'] / 1e9:,.1f} GFLOP | "
              f"{r['bound']} | {r['modelled_us']:,.1f} us | |{extra}")


if __name__ == "__main__":
    main()
