"""Kernel benchmark: ragged paged attention and KV block copies vs the roofs.

Run from the repository root::

    .venv/bin/python bench/kernel_speed.py [--quick]

In one process, on ``jax.default_backend()``:

1. Roofs: copy bandwidth (jitted copy of a large array, bytes read + written)
   and matmul rate (square jnp matmul; bf16 on accelerators, f32 on CPU).
2. Attention sweep: decode-heavy (batch x context, one query row each) and
   prefill-heavy (a few sequences, chunk of queries each on top of a context)
   ragged batches in one pool of one layer. Paths: ``reference`` (pure JAX,
   always), ``pallas`` (Sluice's kernel for the platform; GPU/TPU only, since
   interpret mode on CPU is a correctness tool, not a kernel to time),
   ``pallas-nosplit`` (GPU decode: the same kernel without its KV split, so the
   split's gain is a ratio within one run) and
   ``builtin`` (JAX's ``pallas.ops.gpu.paged_attention`` for decode on GPU,
   ``pallas.ops.tpu.ragged_paged_attention`` on TPU; fed the same data in
   their own layouts). Bytes = KV of every sequence, queries and output each
   moved once; FLOPs = 4 * q_heads * head_dim * (query, visible key) pairs.
3. Block copies: gather and scatter of runs of 16 blocks (all layers), bytes
   read + written, for ``reference`` and (GPU/TPU) ``pallas``.
4. Writes bench/out/kernels.{json,png} (roofline: achieved FLOP/s against
   arithmetic intensity under the measured roofs) and copies them to
   bench/results/.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from sluice.pallas_kernels import block_copy, dispatch, ragged_attention, reference
from sluice.pallas_kernels.metadata import AttentionMetadata

BLOCK_SIZE = 16
OUT = Path(__file__).parent / "out"
RESULTS = Path(__file__).parent / "results"


def timeit(fn: Callable, *args, reps: int) -> float:
    """Best wall time of ``fn(*args)`` over ``reps`` runs, after one warm-up."""
    jax.block_until_ready(fn(*args))
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        jax.block_until_ready(fn(*args))
        best = min(best, time.perf_counter() - t)
    return best


def roofs(accel: bool, quick: bool, reps: int) -> dict:
    n = (1 << 28 if accel else 1 << 24) // (4 if quick else 1)
    x = jnp.ones((n,), jnp.float32)
    copy_s = timeit(jax.jit(lambda a: a + 1.0), x, reps=reps)
    dim = 8192 if accel else (512 if quick else 1024)
    dtype = jnp.bfloat16 if accel else jnp.float32
    a = jnp.ones((dim, dim), dtype)
    mm_s = timeit(jax.jit(lambda a: a @ a), a, reps=reps)
    return {"copy_bytes_per_s": 2 * 4 * n / copy_s, "matmul_flops_per_s": 2 * dim ** 3 / mm_s,
            "matmul_dtype": jnp.dtype(dtype).name}


def make_batch(rng, q_lens: list[int], kv_lens: list[int], shape: dict, dtype):
    """A ragged batch over a shuffled, fully used pool of one layer."""
    pages = [-(-kv // BLOCK_SIZE) for kv in kv_lens]
    num_blocks, width = sum(pages), max(pages)
    perm = rng.permutation(num_blocks)
    tables = np.zeros((len(kv_lens), width), np.int32)
    used = 0
    for s, n in enumerate(pages):
        tables[s, :n] = perm[used:used + n]
        used += n
    hkv, d = shape["kv_heads"], shape["head_dim"]
    cache = jax.random.normal(jax.random.PRNGKey(0),
                              (num_blocks, 1, 2, BLOCK_SIZE, hkv, d), jnp.float32).astype(dtype)
    q = jax.random.normal(jax.random.PRNGKey(1), (sum(q_lens), shape["q_heads"], d),
                          jnp.float32).astype(dtype)
    qsl = np.concatenate([[0], np.cumsum(q_lens)]).astype(np.int32)
    meta = AttentionMetadata(jnp.zeros(len(q), jnp.int32), jnp.asarray(qsl),
                             jnp.asarray(kv_lens, jnp.int32), jnp.asarray(tables),
                             jnp.asarray(len(kv_lens), jnp.int32), max(q_lens))
    return q, cache, meta


def cost(q_lens, kv_lens, shape, itemsize) -> tuple[float, float]:
    hq, hkv, d = shape["q_heads"], shape["kv_heads"], shape["head_dim"]
    pairs = sum(sum(kv - ql + i + 1 for i in range(ql)) for ql, kv in zip(q_lens, kv_lens))
    kv_bytes = sum(kv_lens) * 2 * hkv * d * itemsize
    q_bytes = 2 * sum(q_lens) * hq * d * itemsize  # queries in, output out
    return kv_bytes + q_bytes, 4.0 * hq * d * pairs


def builtin_attention(platform: str, q, cache, meta, scale: float, decode: bool):
    """JAX's own kernel for this platform as a jitted closure, or None."""
    if platform == "gpu" and decode:
        from jax.experimental.pallas.ops.gpu.paged_attention import paged_attention
        k_pages = cache[:, 0, 0].transpose(2, 0, 1, 3)  # [Hkv, pages, B, D]
        v_pages = cache[:, 0, 1].transpose(2, 0, 1, 3)
        fn = jax.jit(lambda q, k, v, bt, lens: paged_attention(q * scale, k, v, bt, lens))
        return lambda: fn(q, k_pages, v_pages, meta.block_tables, meta.seq_lens)
    if platform == "tpu":
        from jax.experimental.pallas.ops.tpu.ragged_paged_attention import ragged_paged_attention
        n, _, _, b, hkv, d = cache.shape
        kv_pages = cache[:, 0].transpose(0, 2, 3, 1, 4).reshape(n, b, 2 * hkv, d)
        fn = jax.jit(lambda q, kv, m: ragged_paged_attention(
            q, kv, m.seq_lens, m.block_tables, m.query_start_loc, m.num_seqs.reshape(1),
            sm_scale=scale))
        return lambda: fn(q, kv_pages, meta)
    return None


def attention_sweep(platform: str, quick: bool, reps: int) -> list[dict]:
    accel = platform in ("gpu", "tpu")
    shape = (dict(q_heads=32, kv_heads=8, head_dim=128) if accel
             else dict(q_heads=8, kv_heads=2, head_dim=64))
    dtype = jnp.bfloat16 if accel else jnp.float32
    if accel:
        decode = [(b, c) for b in (1, 8, 32, 128) for c in (512, 2048, 8192, 32768)
                  if b * c <= 1 << 20]
        prefill = [(s, chunk, ctx) for s in (1, 4) for chunk in (512, 2048) for ctx in (0, 4096)]
    else:
        decode = [(b, c) for b in (1, 8) for c in (256, 1024)] + ([] if quick else [(32, 1024)])
        prefill = [(1, 128, 0), (2, 128, 256)] + ([] if quick else [(4, 256, 512)])
    cases = ([("decode", [1] * b, [c] * b) for b, c in decode]
             + [("prefill", [chunk] * s, [chunk + ctx] * s) for s, chunk, ctx in prefill])
    rng = np.random.default_rng(0)
    scale = shape["head_dim"] ** -0.5
    rows = []
    for kind, q_lens, kv_lens in cases:
        q, cache, meta = make_batch(rng, q_lens, kv_lens, shape, dtype)
        nbytes, flops = cost(q_lens, kv_lens, shape, jnp.dtype(dtype).itemsize)
        paths = {"reference": jax.jit(lambda q, c, m: reference.ragged_paged_attention(
            q, c, 0, m, scale=scale))}
        if accel:
            paths["pallas"] = jax.jit(lambda q, c, m: dispatch.ragged_paged_attention(
                q, c, 0, m, scale=scale))
        if platform == "gpu" and kind == "decode":  # the KV split's gain, same run
            paths["pallas-nosplit"] = jax.jit(
                lambda q, c, m: ragged_attention.ragged_paged_attention_gpu(
                    q, c, 0, m, scale=scale, splits=1))
        runs = {name: (lambda f=f: f(q, cache, meta)) for name, f in paths.items()}
        try:
            builtin = builtin_attention(platform, q, cache, meta, scale, kind == "decode")
        except Exception as e:  # an unsupported shape or API drift: record, keep going
            builtin = None
            print(f"builtin {kind} {len(q_lens)}x{kv_lens[0]}: {type(e).__name__}: {e}")
        if builtin is not None:
            runs["builtin"] = builtin
        for name, run in runs.items():
            try:
                seconds = timeit(run, reps=reps)
            except Exception as e:
                print(f"{name} {kind} {len(q_lens)}x{kv_lens[0]}: {type(e).__name__}: {e}")
                continue
            rows.append(dict(kind=kind, path=name, batch=len(q_lens), query_len=q_lens[0],
                             context=kv_lens[0], seconds=seconds, bytes=nbytes, flops=flops,
                             bytes_per_s=nbytes / seconds, flops_per_s=flops / seconds))
            print(f"{kind:8s} {name:14s} batch {len(q_lens):4d} q {q_lens[0]:5d} "
                  f"kv {kv_lens[0]:6d}: {seconds * 1e3:9.3f} ms {nbytes / seconds / 1e9:8.2f} GB/s "
                  f"{flops / seconds / 1e12:8.3f} TFLOP/s")
    return rows


def copy_sweep(platform: str, quick: bool, reps: int) -> list[dict]:
    accel = platform in ("gpu", "tpu")
    layers, hkv, d = (32, 8, 128) if accel else (4, 2, 64)
    num_blocks, run = (4096, 16) if accel else (256, 16)
    dtype = jnp.bfloat16 if accel else jnp.float32
    cache = jnp.ones((num_blocks, layers, 2, BLOCK_SIZE, hkv, d), dtype)
    rows = []
    for n_runs in ((4,) if quick else (1, 4, 16)):
        groups_list = [(i * 2 * run, run) for i in range(n_runs)]  # runs with gaps
        groups = block_copy.groups_array(groups_list, n_runs)
        staged = n_runs * run
        staging = jnp.ones((staged,) + cache.shape[1:], dtype)
        nbytes = 2 * staging.size * staging.dtype.itemsize
        ids = jnp.asarray(block_copy.expand_groups(groups_list))
        paths = {"reference": (jax.jit(lambda c: reference.gather_blocks(c, ids)),
                               jax.jit(lambda c, g, s: reference.scatter_blocks(c, ids, s)))}
        if accel:
            paths["pallas"] = (jax.jit(lambda c: dispatch.gather_blocks(c, groups, staged)),
                               jax.jit(dispatch.scatter_blocks))
        for name, (gather, scatter) in paths.items():
            for op, run_op in (("gather", lambda: gather(cache)),
                               ("scatter", lambda: scatter(cache, groups, staging))):
                seconds = timeit(run_op, reps=reps)
                rows.append(dict(op=op, path=name, runs=n_runs, blocks=staged, seconds=seconds,
                                 bytes=nbytes, bytes_per_s=nbytes / seconds))
                print(f"{op:7s} {name:9s} {n_runs:3d} runs of {run}: {seconds * 1e3:8.3f} ms "
                      f"{nbytes / seconds / 1e9:8.2f} GB/s")
    return rows


def plot(result: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    bw, peak = result["roofs"]["copy_bytes_per_s"], result["roofs"]["matmul_flops_per_s"]
    fig, ax = plt.subplots(figsize=(7, 5))
    ai = np.logspace(-1, 4, 200)
    ax.loglog(ai, np.minimum(ai * bw, peak), "k-", label="measured copy BW / matmul roofs")
    markers = {"decode": "o", "prefill": "s"}
    for path_name, color in (("reference", "tab:blue"), ("pallas", "tab:red"),
                             ("builtin", "tab:green")):
        for kind, marker in markers.items():
            pts = [(r["flops"] / r["bytes"], r["flops_per_s"]) for r in result["attention"]
                   if r["path"] == path_name and r["kind"] == kind]
            if pts:
                x, y = zip(*pts)
                ax.scatter(x, y, c=color, marker=marker, label=f"{path_name} {kind}")
    ax.set_xlabel("arithmetic intensity (FLOP / byte)")
    ax.set_ylabel("achieved FLOP/s")
    ax.set_title(f"ragged paged attention on {result['device']} (JAX {result['jax']})")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sweep, few repetitions")
    args = parser.parse_args()
    platform = jax.default_backend()
    reps = 3 if args.quick else 10
    result = {"platform": platform, "device": jax.devices()[0].device_kind,
              "jax": jax.__version__, "quick": args.quick,
              "roofs": roofs(platform in ("gpu", "tpu"), args.quick, reps)}
    print(json.dumps(result["roofs"]))
    result["attention"] = attention_sweep(platform, args.quick, reps)
    result["block_copy"] = copy_sweep(platform, args.quick, reps)
    OUT.mkdir(exist_ok=True)
    RESULTS.mkdir(exist_ok=True)
    (OUT / "kernels.json").write_text(json.dumps(result, indent=2))
    plot(result, OUT / "kernels.png")
    for name in ("kernels.json", "kernels.png"):
        shutil.copy(OUT / name, RESULTS / name)
    print(f"wrote {OUT / 'kernels.json'} and {OUT / 'kernels.png'}")


if __name__ == "__main__":
    main()
