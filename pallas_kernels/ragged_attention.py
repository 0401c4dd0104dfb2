"""Ragged paged attention in Pallas: one call for a mixed decode/prefill batch.

Interface (same as `reference.ragged_paged_attention`, plus ``interpret``)::

    ragged_paged_attention_{gpu,tpu}(q, cache, layer, meta, *, scale,
                                     sliding_window=None, soft_cap=None,
                                     interpret=False) -> [T, q_heads, head_dim]

Work split. The flattened query rows are cut into fixed tiles of ``BQ`` rows,
regardless of sequence boundaries, and the grid is ``(tiles, kv_heads)`` on
GPU, ``(tiles,)`` on TPU (one program takes every KV head of its tile). A
tile may span several sequences (many decode rows, or the end of one prefill
chunk and the start of the next); the program loops over exactly the
sequences that own rows of its tile (ranges computed by a tiny XLA pre-pass)
and, for each, over only the KV pages its rows can see (causal upper bound,
sliding-window lower bound). Each query row accumulates only from its own
sequence, so every row gets one online-softmax (float32) state no matter how
the tile is shared, and padding rows end with zero weight and return zeros.
This keeps the grid static for every batch shape, needs no per-sequence
padding of queries, and reads each sequence's KV once per tile.

Long decodes on GPU (a decode-only batch whose tiles x KV heads leave SMs
idle) add a third grid axis, flash-decoding's KV split: each program takes
one of ``splits`` equal parts of every sequence's visible pages and writes its
part's output (normalised over the part) and log-sum-exp in float32; XLA then
merges the parts by their log-sum-exps (`kv_splits`, `_combine_splits`).
A GPU page whose keys and values overflow the target's shared memory
(head_dim 256 at block size 128) is attended to in parts, each one KV step of
the online softmax (`gpu_page_parts`). Both are sized for the GPU the kernel
is compiled for (`dispatch` passes it).

The query heads are grouped by the model's KV-head count, which the pool's may
exceed (padding heads, `pool_layout`); only the pool's first heads are read.

The ``G`` query heads sharing a KV head are processed together: the wrapper
lays queries out as ``[kv_heads, rows * G', head_dim]`` (``G'`` = G rounded up
to a power of two, extra heads zero) so a tile is one 2-D ``[BQ * G', D]``
operand per KV head (``[Hkv, BQ * G', D]`` with batched matmuls on TPU) and
the kernel needs no in-kernel reshapes.

Guards: the page loop never passes the block-table width and page indices
are clamped into the pool, the layer into the pool's layers and the sequence
range into the table's rows, so bad metadata reads wrong data but never
outside the tables or the pool.

Masking rules that make stray data harmless: scores are selected with
``where`` (never added to a bias), and value rows past ``seq_lens`` are zeroed
before the probability matmul, so NaN in unused slots cannot leak.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Callable

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas import triton as pltriton

from sluice.pallas_kernels import chunked
from sluice.pallas_kernels.metadata import AttentionMetadata
from sluice.pallas_kernels.platform import next_power_of_2, tpu_interpret_params
from sluice.pallas_kernels.pool_layout import pads_queries

# Target query rows (BQ * G') per tile: small for decode-only groups (the
# matmuls are tiny and memory-bound), larger for prefill chunks.
DECODE_TILE_ROWS = 16
PREFILL_TILE_ROWS = 64
# On TPU each prefill tile re-reads the KV its rows see, so its arithmetic
# intensity is about its rows per KV head in FLOP/byte (modelled: 64 is far
# below the v5e/v6e ridge of ~240/~560); but decode rows sharing a mixed
# batch's tile are multiplied against all of its rows, so larger tiles waste
# compute there. 128 halves prefill KV traffic at a 2x cost on such decodes.
TPU_PREFILL_TILE_ROWS = 128
# KV positions one TPU loop step attends to (pages per step = this / block
# size): a score tile narrower than 128 lanes would leave most of the vector
# unit and MXU idle.
TPU_STEP_TOKENS = 128
# TPU scoped-memory budgets. VMEM: v5e and v6e have 128 MiB per core and the
# default scoped limit (16/32 MiB) is too small for pages of many KV heads at
# block size 128 (e.g. 32 KV heads in float32). SMEM: 1 MiB per core holds the
# scalar-prefetched tables; the compiler keeps a little of it for itself.
VMEM_LIMIT = 64 << 20
SMEM_BUDGET = 1000 << 10


@dataclasses.dataclass(frozen=True)
class _Static:
    """Compile-time parameters of one kernel instance."""

    tile_tokens: int        # BQ: query tokens per tile
    group: int              # G': query heads per KV head, padded to a power of two
    block_size: int
    pages: int              # block-table width
    num_blocks: int         # pool size (page indices are clamped into it)
    scale: float
    sliding_window: int | None
    soft_cap: float | None
    pages_per_step: int = 1  # pages one step of the KV loop attends to together
    page_parts: int = 1      # steps one page is cut into (GPU: shared memory)

    @property
    def rows(self) -> int:
        return self.tile_tokens * self.group

    @property
    def step_tokens(self) -> int:
        return self.block_size * self.pages_per_step // self.page_parts


@dataclasses.dataclass(frozen=True)
class _Tiles:
    """Per-call inputs shared by both variants."""

    q: jax.Array            # [Hkv, Tpad * G', D]
    layer: jax.Array        # [1]
    query_start_loc: jax.Array
    seq_lens: jax.Array
    block_tables: jax.Array  # [S * P], flattened (1-D scalar table)
    seq_lo: jax.Array       # [tiles] first sequence owning rows of the tile
    seq_hi: jax.Array       # [tiles] one past the last one (live sequences only)


def _plan(q: jax.Array, cache: jax.Array, layer, meta: AttentionMetadata, scale: float,
          sliding_window: int | None, soft_cap: float | None, num_kv_heads: int, *,
          prefill_rows: int = PREFILL_TILE_ROWS, pages_per_step: int = 1
          ) -> tuple[_Static, _Tiles]:
    """Tiles of ``q``'s rows grouped by the model's ``num_kv_heads`` (the
    pool's first heads; see `pool_layout`)."""
    num_tokens, num_q_heads, head_dim = q.shape
    num_seqs = meta.seq_lens.shape[0]
    group = num_q_heads // num_kv_heads
    gp = next_power_of_2(group)
    target = DECODE_TILE_ROWS if meta.max_query_len == 1 else prefill_rows
    # A power of two, at least 8 rows (TPU sublanes), no larger than needed.
    bq = min(max(1, target // gp, 8 // math.gcd(gp, 8)),
             max(next_power_of_2(num_tokens), 8 // math.gcd(gp, 8)))
    tiles = -(-num_tokens // bq)
    static = _Static(bq, gp, cache.shape[3], meta.block_tables.shape[1], cache.shape[0],
                     float(scale), sliding_window, None if soft_cap is None else float(soft_cap),
                     pages_per_step)

    qg = q.reshape(num_tokens, num_kv_heads, group, head_dim)
    qg = jnp.pad(qg, ((0, tiles * bq - num_tokens), (0, 0), (0, gp - group), (0, 0)))
    qg = qg.transpose(1, 0, 2, 3).reshape(num_kv_heads, tiles * bq * gp, head_dim)

    qsl = meta.query_start_loc.astype(jnp.int32)
    starts = jnp.arange(tiles, dtype=jnp.int32) * bq
    seq_lo = jnp.searchsorted(qsl[1:], starts, side="right").astype(jnp.int32)
    seq_hi = jnp.searchsorted(qsl[:-1], starts + bq, side="left").astype(jnp.int32)
    # Guards: whatever the metadata says, a program visits only rows of the
    # tables (num_seqs <= S) and only layers of the pool.
    seq_hi = jnp.clip(seq_hi, 0, jnp.clip(meta.num_seqs.astype(jnp.int32), 0, num_seqs))
    layer = jnp.clip(jnp.asarray(layer, jnp.int32), 0, cache.shape[1] - 1)
    inputs = _Tiles(qg, layer.reshape(1), qsl,
                    meta.seq_lens.astype(jnp.int32),
                    meta.block_tables.astype(jnp.int32).reshape(-1), seq_lo, seq_hi)
    return static, inputs


def _unplan(out: jax.Array, q: jax.Array) -> jax.Array:
    num_tokens, num_q_heads, head_dim = q.shape
    num_kv_heads = out.shape[0]
    group = num_q_heads // num_kv_heads
    out = out.reshape(num_kv_heads, -1, next_power_of_2(group), head_dim)
    return out[:, :num_tokens, :group].transpose(1, 0, 2, 3).reshape(q.shape)


class _Pages:
    """How `_attend_tile` gets a sequence's pages: ``begin`` before its first
    page, ``get`` for each KV step in order (returning keys and values). This
    plain version loads each step when asked, through ``load_page(page, kv,
    part)``: part ``part`` of ``parts`` equal parts of a page (the whole page
    when ``parts`` is 1); the TPU variant substitutes a double-buffered one."""

    def __init__(self, load_page: Callable, parts: int = 1):
        self.load_page, self.parts = load_page, parts

    def begin(self, page_of: Callable, first, end) -> None:
        del page_of, first, end

    def get(self, page_of: Callable, p, end) -> tuple[jax.Array, jax.Array]:
        """Keys and values of KV step ``p``; ``page_of(i)`` is the pool block
        of the sequence's ``i``-th page."""
        del end
        page, part = page_of(p // self.parts), p % self.parts
        return self.load_page(page, 0, part), self.load_page(page, 1, part)


def _attend_tile(st: _Static, tile, q: jax.Array, qsl_ref, seq_lens_ref, tables_ref,
                 seq_lo, seq_hi, load_page: Callable | _Pages, *,
                 state_refs: tuple | None = None, split=None
                 ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Online-softmax attention of one tile's rows ``q``; returns the float32
    state (row max, row sum, unnormalised accumulator), see `_normalized`.

    ``q`` is ``[M, D]`` (one KV head) or ``[Hkv, M, D]`` (every KV head of the
    tile at once, as batched matmuls). ``load_page(page, kv, part)`` returns
    keys (kv=0) or values (kv=1) of one KV step, part ``part`` of a page cut
    into ``st.page_parts``, as ``[step_tokens, D]`` or ``[Hkv, step_tokens,
    D]`` to match; a `_Pages` may be passed instead, which may return
    ``st.pages_per_step`` consecutive pages per step.
    The online-softmax state (row max, row sum, accumulator) is carried by the
    loops, or kept in ``state_refs`` (three float32 VMEM refs shaped like
    ``q[..., :1]``, ``q[..., :1]`` and ``q``) when given, which keeps large
    tiles out of the loop-carried registers.

    ``split`` = (index, count) restricts each sequence to the ``index``-th of
    ``count`` equal parts of the KV pages its rows see (flash-decoding's KV
    split; the parts' states are merged by `_combine_splits`).

    Guards: the page loop stops at the block-table width and page indices are
    clamped into the pool, so no metadata can make it read outside either.
    """
    pages_of = (load_page if isinstance(load_page, _Pages)
                else _Pages(load_page, st.page_parts))
    rows, head_dim = q.shape[-2:]
    batch = q.ndim - 2  # leading head axis or none
    bs = st.step_tokens  # KV positions per loop step
    first_row = tile * st.tile_tokens
    # Token row of each of the M tile rows, as a column [M, 1].
    row = first_row + jax.lax.broadcasted_iota(jnp.int32, (rows, 1), 0) // st.group
    kv_col = jax.lax.broadcasted_iota(jnp.int32, (1, bs), 1)
    kv_row = jax.lax.broadcasted_iota(jnp.int32, (bs, 1), 0)
    precision = jax.lax.Precision.HIGHEST if q.dtype == jnp.float32 else None
    heads = tuple(range(batch))

    def matmul(a, b, contract_b: int):
        dims = (((batch + 1,), (batch + contract_b,)), (heads, heads))
        return jax.lax.dot_general(a, b, dims, precision=precision,
                                   preferred_element_type=jnp.float32)

    def seq_body(s, carry):
        q_start, q_end, seq_len = qsl_ref[s], qsl_ref[s + 1], seq_lens_ref[s]
        ctx = seq_len - (q_end - q_start)  # position of the sequence's first query row
        r_lo = jnp.maximum(q_start, first_row)
        r_hi = jnp.minimum(q_end, first_row + st.tile_tokens)
        kv_hi = jnp.where(r_hi > r_lo, ctx + r_hi - q_start, 0)  # causal bound
        kv_hi = jnp.clip(kv_hi, 0, st.pages * st.block_size)  # never past the table row
        kv_lo = jnp.int32(0)
        if st.sliding_window is not None:
            kv_lo = jnp.clip(ctx + r_lo - q_start - st.sliding_window + 1, 0, kv_hi)
        in_seq = (row >= q_start) & (row < q_end)
        q_pos = ctx + row - q_start  # [M, 1]
        p_lo, p_hi = kv_lo // bs, (kv_hi + bs - 1) // bs
        if split is not None:
            index, count = split
            per = (p_hi - p_lo + count - 1) // count
            p_lo, p_hi = (jnp.minimum(p_lo + index * per, p_hi),
                          jnp.minimum(p_lo + (index + 1) * per, p_hi))

        def page_of(i):
            i = jnp.minimum(i, st.pages - 1)  # a step's last pages may lie past the row
            return jnp.clip(tables_ref[s * st.pages + i], 0, st.num_blocks - 1)

        def update(p, m, l, acc):
            k, v = pages_of.get(page_of, p, p_hi)
            kv_pos = p * bs + kv_col  # [1, B]
            mask = in_seq & (kv_pos <= q_pos)
            if st.sliding_window is not None:
                mask &= kv_pos > q_pos - st.sliding_window
            scores = matmul(q, k, 1) * st.scale
            if st.soft_cap is not None:
                scores = st.soft_cap * jnp.tanh(scores / st.soft_cap)
            scores = jnp.where(mask, scores, -jnp.inf)
            m_new = jnp.maximum(m, jnp.max(scores, axis=-1, keepdims=True))
            shift = jnp.where(m_new == -jnp.inf, 0.0, m_new)
            alpha = jnp.exp(m - shift)
            probs = jnp.where(mask, jnp.exp(scores - shift), 0.0)
            v = jnp.where(p * bs + kv_row < seq_len, v, jnp.zeros_like(v))
            pv = matmul(probs.astype(v.dtype), v, 0)
            return m_new, alpha * l + jnp.sum(probs, axis=-1, keepdims=True), alpha * acc + pv

        def page_body(p, carry):
            if state_refs is None:
                return update(p, *carry)
            new = update(p, *(ref[...] for ref in state_refs))
            for ref, value in zip(state_refs, new):
                ref[...] = value
            return carry

        pages_of.begin(page_of, p_lo, p_hi)
        return jax.lax.fori_loop(p_lo, p_hi, page_body, carry)

    stat = q.shape[:-1] + (1,)
    init = (jnp.full(stat, -jnp.inf, jnp.float32), jnp.zeros(stat, jnp.float32),
            jnp.zeros(q.shape, jnp.float32))
    if state_refs is not None:
        for ref, value in zip(state_refs, init):
            ref[...] = value
        jax.lax.fori_loop(seq_lo, seq_hi, seq_body, jnp.int32(0))
        return tuple(ref[...] for ref in state_refs)
    return jax.lax.fori_loop(seq_lo, seq_hi, seq_body, init)


def _normalized(state: tuple[jax.Array, jax.Array, jax.Array]) -> jax.Array:
    """Attention output of an online-softmax state (zero for rows that saw nothing)."""
    _, l, acc = state
    return acc / jnp.where(l > 0, l, 1.0)


# -- GPU (Pallas Triton) --------------------------------------------------------


def _gpu_kernel(st: _Static, splits: int, layer_ref, qsl_ref, seq_lens_ref, tables_ref,
                seq_lo_ref, seq_hi_ref, q_ref, cache_ref, o_ref, *lse_ref):
    tile, head = pl.program_id(0), pl.program_id(1)
    layer = layer_ref[0]
    step = st.step_tokens

    def load_page(page, kv, part):
        tokens = slice(None) if st.page_parts == 1 else pl.ds(part * step, step)
        return cache_ref[page, layer, kv, tokens, head, :]

    state = _attend_tile(st, tile, q_ref[...], qsl_ref, seq_lens_ref, tables_ref,
                         seq_lo_ref[tile], seq_hi_ref[tile], load_page,
                         split=(pl.program_id(2), splits) if splits > 1 else None)
    o_ref[...] = _normalized(state).astype(o_ref.dtype)
    if splits > 1:
        m, l, _ = state
        lse_ref[0][...] = jnp.where(l > 0, m + jnp.log(jnp.where(l > 0, l, 1.0)), -jnp.inf)


def triton_shapes(head_dim: int, block_size: int) -> bool:
    """Whether the Triton kernel compiles for these sizes (else `chunked` runs)."""
    return head_dim & (head_dim - 1) == 0 and block_size & (block_size - 1) == 0 \
        and block_size >= 16


def _gpu_warps(st: _Static) -> int:
    """Warps per Triton program: 8 once a KV step's score tile reaches 64 x 128
    (ptxas: a prefill tile at block size 128 with 4 warps needs 255 registers
    and spills; with 8, 254 and no spills, compiled for sm_90a), else 4."""
    return 8 if st.rows * st.step_tokens >= 64 * 128 else 4


# KV split for long decodes (flash-decoding): a decode-only batch with fewer
# programs (tiles x KV heads) than `GPU_WAVES` waves of the GPU's SMs leaves
# SMs idle while each program walks its sequences' whole context, so every
# sequence's pages are cut into `kv_splits` parts, one program each, merged by
# their log-sum-exp. The SM count is the target device's (`gpu_sm_count`;
# an H100/H200's 132 where the device does not say); a part walks at least
# `GPU_MIN_SPLIT_TOKENS` KV positions so the partial outputs (float32, one
# [rows, head_dim] per part) stay small next to the KV read.
GPU_WAVES = 2
HOPPER_SMS = 132
GPU_MIN_SPLIT_TOKENS = 512


def _default_device() -> jax.Device:
    device = jax.config.jax_default_device
    return device if isinstance(device, jax.Device) else jax.devices()[0]


def gpu_sm_count(device: jax.Device | None = None) -> int:
    """SMs of ``device``, the GPU a kernel is sized for (None: the default
    device): PJRT's ``core_count`` of a GPU, else `HOPPER_SMS` (interpret
    mode on CPU; an export without devices)."""
    device = device if device is not None else _default_device()
    if device.platform not in ("gpu", "cuda", "rocm"):
        return HOPPER_SMS
    count = getattr(device, "core_count", None)
    return int(count) if isinstance(count, int) and count > 0 else HOPPER_SMS


# Shared memory one Triton program may use (CUDA's opt-in limit per block) by
# compute capability; `HOPPER_SMEM` (an H100's / H200's) where the device does
# not say (interpret mode on CPU, an export without devices), the smallest one
# listed for a GPU not listed.
GPU_SHARED_MEMORY = {(8, 0): 166_912, (8, 6): 101_376, (8, 7): 166_912, (8, 9): 101_376,
                     (9, 0): 232_448, (10, 0): 232_448, (12, 0): 101_376}
HOPPER_SMEM = GPU_SHARED_MEMORY[(9, 0)]
GPU_STAGES = 2  # Triton software-pipelining stages of the KV loop
GPU_SMEM_SCRATCH = 256  # bytes ptxas asked for beyond the tiles (float32)
GPU_MIN_STEP_TOKENS = 16  # Triton dots need at least 16 rows


def gpu_shared_memory(device: jax.Device | None = None) -> int:
    """Shared memory (bytes) a Triton program may use on ``device``, the GPU a
    kernel is sized for (None: the default device)."""
    device = device if device is not None else _default_device()
    if device.platform not in ("gpu", "cuda", "rocm"):
        return HOPPER_SMEM
    capability = getattr(device, "compute_capability", None)
    if capability is None:
        return HOPPER_SMEM
    major, minor = (int(x) for x in str(capability).split(".")[:2])
    return GPU_SHARED_MEMORY.get((major, minor), min(GPU_SHARED_MEMORY.values()))


def gpu_smem_bytes(rows: int, step_tokens: int, head_dim: int, dtype) -> int:
    """Shared memory the Triton attention program asks for with a tile of
    ``rows`` query rows and KV steps of ``step_tokens``: ``GPU_STAGES`` buffers
    of a step's keys and one of its values, the float32 query tile and score
    tile, and a little scratch. Fitted to the requests of the compiler for
    sm_90a (head_dim 256, 64 rows: 491,776 bytes at 128 float32 tokens, 278,784
    at 64, 294,912 at 128 bfloat16 tokens; exact, within the scratch)."""
    kv = step_tokens * head_dim * jnp.dtype(dtype).itemsize
    return (GPU_STAGES + 1) * kv + rows * (head_dim + step_tokens) * 4 + GPU_SMEM_SCRATCH


def gpu_page_parts(rows: int, block_size: int, head_dim: int, dtype, smem: int) -> int:
    """Parts each page is cut into so a KV step's tiles fit ``smem`` bytes of
    shared memory (1: whole pages); steps never go below `GPU_MIN_STEP_TOKENS`."""
    parts = 1
    while (block_size // parts > GPU_MIN_STEP_TOKENS
           and gpu_smem_bytes(rows, block_size // parts, head_dim, dtype) > smem):
        parts *= 2
    return parts


def kv_splits(programs: int, max_kv_tokens: int, max_query_len: int,
              sm_count: int = HOPPER_SMS) -> int:
    """How many KV parts the GPU kernel cuts each sequence into (1: no split)
    on a GPU with ``sm_count`` SMs."""
    if max_query_len != 1:  # prefill tiles already fill the grid and are compute-bound
        return 1
    target = GPU_WAVES * sm_count
    return max(1, min(-(-target // programs), max_kv_tokens // GPU_MIN_SPLIT_TOKENS))


def _combine_splits(parts: jax.Array, lse: jax.Array, dtype) -> jax.Array:
    """Merge per-part outputs ``parts`` [N, Hkv, R, D] (each normalised over its
    own part) by their log-sum-exps ``lse`` [N, Hkv, R, 1]; rows no part saw
    (lse -inf everywhere) are zero."""
    top = jnp.max(lse, axis=0)
    weights = jnp.exp(lse - jnp.where(jnp.isfinite(top), top, 0.0))  # exp(-inf) = 0
    total = jnp.sum(weights, axis=0)
    out = jnp.sum(weights * parts, axis=0) / jnp.where(total > 0, total, 1.0)
    return out.astype(dtype)


@pads_queries
def ragged_paged_attention_gpu(q: jax.Array, cache: jax.Array, layer, meta: AttentionMetadata,
                               *, scale: float, sliding_window: int | None = None,
                               soft_cap: float | None = None, num_kv_heads: int,
                               splits: int | None = None, device: jax.Device | None = None,
                               interpret: bool = False) -> jax.Array:
    """Pallas-Triton variant. Triton blocks and dots need power-of-two sizes:
    compiled with a ``head_dim`` or ``block_size`` that is not a power of two
    (or a block size under 16), it is the pure-JAX `chunked` path instead, the
    same results without a kernel (Phi-3's head_dim 96, for instance).

    The grid is ``(tiles, kv_heads, splits)``; ``splits`` (None: `kv_splits`
    for the target device's SM count) > 1 is the KV split, whose parts are
    merged in XLA (`_combine_splits`). ``device`` is the GPU the kernel is
    sized for (SMs, shared memory; None: the default device); a page whose
    keys and values do not fit its shared memory is attended to in parts
    (`gpu_page_parts`)."""
    head_dim, block_size = q.shape[2], cache.shape[3]
    if not interpret and not triton_shapes(head_dim, block_size):
        return chunked.ragged_paged_attention(q, cache, layer, meta, scale=scale,
                                              sliding_window=sliding_window, soft_cap=soft_cap,
                                              num_kv_heads=num_kv_heads)
    device = device if device is not None else _default_device()
    st, t = _plan(q, cache, layer, meta, scale, sliding_window, soft_cap, num_kv_heads)
    st = dataclasses.replace(st, page_parts=gpu_page_parts(
        st.rows, block_size, head_dim, cache.dtype, gpu_shared_memory(device)))
    total_rows = t.q.shape[1]
    tiles = total_rows // st.rows
    if splits is None:
        splits = kv_splits(tiles * num_kv_heads, st.pages * block_size, meta.max_query_len,
                           gpu_sm_count(device))
    whole = pl.no_block_spec
    tile_spec = pl.BlockSpec((None, st.rows, head_dim), lambda i, h, s: (h, i, 0))
    out_shape = [jax.ShapeDtypeStruct(t.q.shape, q.dtype)]
    out_specs = [tile_spec]
    if splits > 1:  # per-part outputs (float32) and their log-sum-exps
        out_shape = [jax.ShapeDtypeStruct((splits,) + t.q.shape, jnp.float32),
                     jax.ShapeDtypeStruct((splits, num_kv_heads, total_rows, 1), jnp.float32)]
        out_specs = [pl.BlockSpec((None, None, st.rows, head_dim), lambda i, h, s: (s, h, i, 0)),
                     pl.BlockSpec((None, None, st.rows, 1), lambda i, h, s: (s, h, i, 0))]
    outs = pl.pallas_call(
        functools.partial(_gpu_kernel, st, splits),
        out_shape=out_shape,
        grid=(tiles, num_kv_heads, splits),
        in_specs=[whole] * 6 + [tile_spec, whole],
        out_specs=out_specs,
        compiler_params=pltriton.CompilerParams(num_warps=_gpu_warps(st), num_stages=2),
        interpret=interpret,
        name="sluice_ragged_paged_attention",
    )(t.layer, t.query_start_loc, t.seq_lens, t.block_tables, t.seq_lo, t.seq_hi, t.q, cache)
    out = outs[0] if splits == 1 else _combine_splits(*outs, q.dtype)
    return _unplan(out, q)


# -- TPU (Mosaic) ---------------------------------------------------------------


class _TpuPages(_Pages):
    """Double-buffered page DMAs: KV step ``p`` (``pages_per_step`` consecutive
    pages of the sequence) lands in slot ``p % 2`` and the next step's pages
    are in flight while ``p`` is computed on.

    A page moves as one DMA per keys/values covering every KV head,
    ``cache[page, layer, kv]`` = ``[block_size, Hkv, D]``: only leading
    (untiled) dimensions are indexed dynamically, which Mosaic requires of
    packed dtypes (a per-head slice is an offset along the tiled, sublane-packed
    ``Hkv`` axis and does not compile in bfloat16). The heads are separated in
    VMEM by one transpose to ``[Hkv, pages_per_step * block_size, D]``.
    """

    def __init__(self, cache_hbm, layer, kv_buf, sems, heads: int):
        self.cache_hbm, self.layer, self.kv_buf, self.sems = cache_hbm, layer, kv_buf, sems
        self.pages_per_step = kv_buf.shape[2]
        self.heads = heads  # the model's KV heads: the pool's first ones

    def _copy(self, page, kv: int, slot, j: int):
        return pltpu.make_async_copy(self.cache_hbm.at[page, self.layer, kv],
                                     self.kv_buf.at[slot, kv, j], self.sems.at[slot, kv])

    def _start(self, page_of: Callable, p, slot) -> None:
        for j in range(self.pages_per_step):
            page = page_of(p * self.pages_per_step + j)
            for kv in (0, 1):
                self._copy(page, kv, slot, j).start()

    def begin(self, page_of: Callable, first, end) -> None:
        pl.when(first < end)(lambda: self._start(page_of, first, first % 2))

    def get(self, page_of: Callable, p, end) -> tuple[jax.Array, jax.Array]:
        nxt = p + 1
        pl.when(nxt < end)(lambda: self._start(page_of, nxt, nxt % 2))
        slot = p % 2
        for j in range(self.pages_per_step):
            for kv in (0, 1):
                self._copy(0, kv, slot, j).wait()  # a wait needs only the destination's shape
        _, _, n, bs, heads, dim = self.kv_buf.shape
        return tuple(jnp.swapaxes(self.kv_buf[slot, kv].reshape(n * bs, heads, dim), 0, 1)
                     [:self.heads] for kv in (0, 1))


def _tpu_kernel(st: _Static, layer_ref, qsl_ref, seq_lens_ref, tables_ref, seq_lo_ref,
                seq_hi_ref, q_ref, cache_hbm, o_ref, kv_buf, sems, m_ref, l_ref, acc_ref):
    tile = pl.program_id(0)
    pages = _TpuPages(cache_hbm, layer_ref[0], kv_buf, sems, q_ref.shape[0])
    out = _attend_tile(st, tile, q_ref[...], qsl_ref, seq_lens_ref, tables_ref,
                       seq_lo_ref[tile], seq_hi_ref[tile], pages,
                       state_refs=(m_ref, l_ref, acc_ref))
    o_ref[...] = _normalized(out).astype(o_ref.dtype)


@pads_queries
def ragged_paged_attention_tpu(q: jax.Array, cache: jax.Array, layer, meta: AttentionMetadata,
                               *, scale: float, sliding_window: int | None = None,
                               soft_cap: float | None = None, num_kv_heads: int,
                               interpret: bool = False) -> jax.Array:
    """Mosaic-TPU variant: scalar tables in SMEM (scalar prefetch), the KV pool
    left in HBM and pages DMA'd into a double buffer in VMEM (`_TpuPages`).

    One program per tile handles every KV head: its queries are one
    ``[Hkv, BQ * G', D]`` block and each page is fetched once for all heads, so
    the matmuls are batched over heads. The grid is ``(tiles,)``.

    Compiled, it supports any head_dim, block_size and KV-head count (checked
    on v5e and v6e, bfloat16 and float32) but the scalar tables must fit SMEM:
    ``4 * (S * P + 2 * S + 2 * tiles)`` bytes at most `SMEM_BUDGET` (about
    250k block-table entries, e.g. 64 sequences of 64k tokens at block size
    16); past that it raises ValueError naming ``block_tables``.
    """
    st, t = _plan(q, cache, layer, meta, scale, sliding_window, soft_cap, num_kv_heads,
                  prefill_rows=TPU_PREFILL_TILE_ROWS,
                  pages_per_step=max(1, min(TPU_STEP_TOKENS // cache.shape[3],
                                            meta.block_tables.shape[1])))
    total_rows, head_dim = t.q.shape[1:]
    tiles = total_rows // st.rows
    scalars = [t.layer, t.query_start_loc, t.seq_lens, t.block_tables, t.seq_lo, t.seq_hi]
    smem = sum(4 * x.size for x in scalars)
    if not interpret and smem > SMEM_BUDGET:
        raise ValueError(
            f"block_tables: {meta.block_tables.shape[0]} x {meta.block_tables.shape[1]} pages "
            f"(with the other tables {smem} bytes) exceed the TPU kernel's SMEM budget of "
            f"{SMEM_BUDGET} bytes; use fewer sequences per step, a shorter max_model_len or a "
            f"larger block_size")
    tile_spec = pl.BlockSpec((num_kv_heads, st.rows, head_dim), lambda i, *_: (0, i, 0))
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=6,
        grid=(tiles,),
        in_specs=[tile_spec, pl.BlockSpec(memory_space=pl.ANY)],
        out_specs=tile_spec,
        scratch_shapes=[pltpu.VMEM((2, 2, st.pages_per_step, st.block_size, cache.shape[4],
                                    head_dim), cache.dtype),
                        pltpu.SemaphoreType.DMA((2, 2)),
                        pltpu.VMEM((num_kv_heads, st.rows, 1), jnp.float32),
                        pltpu.VMEM((num_kv_heads, st.rows, 1), jnp.float32),
                        pltpu.VMEM((num_kv_heads, st.rows, head_dim), jnp.float32)],
    )
    out = pl.pallas_call(
        functools.partial(_tpu_kernel, st),
        out_shape=jax.ShapeDtypeStruct(t.q.shape, q.dtype),
        grid_spec=grid_spec,
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel",),
                                             vmem_limit_bytes=VMEM_LIMIT),
        interpret=tpu_interpret_params() if interpret else False,
        name="sluice_ragged_paged_attention",
    )(*scalars, t.q, cache)
    return _unplan(out, q)
