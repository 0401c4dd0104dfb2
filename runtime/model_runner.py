"""Turns a scheduled step into padded device arrays and runs the jitted model.

A step's requests split into two row groups: decode rows (one new token that
completes the sequence) first, then prefill chunks. Each group is padded to
power-of-two buckets (sequences, tokens, longest chunk, pages per sequence), so
the set of compiled shapes is finite and known; `warmup` compiles the
decode-only and single-prefill shapes up front. The KV pool is donated into
every call, so the step never copies it.

Interface: ``execute(batch) -> (token_ids, logprobs, top_ids, top_logprobs)``
numpy arrays, one row per entry of ``batch`` (rows of unfinished prefill chunks
are garbage and ignored by the engine).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from sluice.runtime.attention import AttentionMetadata
from sluice.runtime.kv_cache import KVCacheSpec
from sluice.runtime.loader import Model
from sluice.runtime.model import compute_logits, forward_unjitted
from sluice.runtime.request import Request
from sluice.runtime.sampler import SamplingTensors, sample


def pow2_buckets(lo: int, hi: int) -> tuple[int, ...]:
    """Powers of two from ``lo`` below ``hi``, then ``hi`` itself."""
    out = []
    b = lo
    while b < hi:
        out.append(b)
        b *= 2
    return tuple(out) + (hi,)


def bucket(n: int, buckets: tuple[int, ...]) -> int:
    for b in buckets:
        if n <= b:
            return b
    raise ValueError(f"{n} exceeds the largest bucket {buckets[-1]}")


@dataclasses.dataclass
class StepRow:
    """One scheduled request in a step: its tokens and where they go."""

    request: Request
    num_new_tokens: int
    block_table: list[int]


@functools.partial(jax.jit, static_argnames=("cfg", "backend"), donate_argnames=("kv_cache",))
def _forward_logits(params, kv_cache, token_ids, positions, metas, sample_rows, *, cfg, backend):
    hidden, kv_cache = forward_unjitted(params, cfg, token_ids, positions, kv_cache, metas,
                                        backend)
    return compute_logits(params, hidden[sample_rows]), kv_cache


_sample = jax.jit(sample, static_argnames=("all_greedy", "do_penalties", "do_filters",
                                           "num_logprobs"))


class ModelRunner:
    def __init__(self, model: Model, num_blocks: int, block_size: int, max_num_seqs: int,
                 max_num_batched_tokens: int, max_model_len: int, backend: str = "reference"):
        self.model = model
        self.spec = KVCacheSpec.for_model(model.config, num_blocks, block_size, model.dtype)
        self.kv_cache = self.spec.allocate()
        self.backend = backend
        self.max_pages = -(-max_model_len // block_size)
        self.seq_buckets = pow2_buckets(1, max_num_seqs)
        self.token_buckets = pow2_buckets(16, max(16, max_num_batched_tokens))
        self.page_buckets = pow2_buckets(1, self.max_pages)

    def warmup_shapes(self) -> list[tuple[tuple[int, int, int, int], ...]]:
        """Group shapes (seqs, tokens, max query, pages) compiled at start-up: every
        decode-only bucket and every single-sequence prefill bucket."""
        decode = [((s, s, 1, p),) for s in self.seq_buckets for p in self.page_buckets]
        prefill = [((1, t, t, p),) for t in self.token_buckets for p in self.page_buckets
                   if t <= p * self.spec.block_size]
        return decode + prefill

    def warmup(self) -> None:
        """Compile the start-up shapes (padding-only inputs: the pool is untouched)."""
        for shapes in tqdm(self.warmup_shapes(), desc="compiling", unit="shape"):
            metas = tuple(_padding_group(self.spec, *s) for s in shapes)
            n_tok = sum(s[1] for s in shapes)
            n_seq = sum(s[0] for s in shapes)
            logits, self.kv_cache = _forward_logits(
                self.model.params, self.kv_cache, jnp.zeros(n_tok, jnp.int32),
                jnp.zeros(n_tok, jnp.int32), metas, jnp.zeros(n_seq, jnp.int32),
                cfg=self.model.config, backend=self.backend)
            logits.block_until_ready()

    # -- batch construction -------------------------------------------------

    def _group(self, rows: list[StepRow], tokens: list[int], positions: list[int],
               decode: bool) -> AttentionMetadata:
        """Pad one row group and append its tokens/positions; returns its metadata."""
        bs = self.spec.block_size
        n_seqs = bucket(len(rows), self.seq_buckets)
        n_tok = n_seqs if decode else bucket(sum(r.num_new_tokens for r in rows),
                                             self.token_buckets)
        max_q = 1 if decode else bucket(max(r.num_new_tokens for r in rows), self.token_buckets)
        pages = bucket(max(len(r.block_table) for r in rows), self.page_buckets)
        slots = np.full(n_tok, self.spec.num_slots, np.int32)
        qsl = np.zeros(n_seqs + 1, np.int32)
        seq_lens = np.zeros(n_seqs, np.int32)
        tables = np.zeros((n_seqs, pages), np.int32)
        start = 0
        for i, r in enumerate(rows):
            req, n = r.request, r.num_new_tokens
            first = req.num_computed_tokens
            pos = np.arange(first, first + n)
            table = np.asarray(r.block_table, np.int32)
            slots[start:start + n] = table[pos // bs] * bs + pos % bs
            tokens.extend(req.all_token_ids[first:first + n])
            positions.extend(pos.tolist())
            start += n
            qsl[i + 1] = start
            seq_lens[i] = first + n
            tables[i, :len(table)] = table
        qsl[len(rows) + 1:] = start
        pad = n_tok - start
        tokens.extend([0] * pad)
        positions.extend([0] * pad)
        return AttentionMetadata(jnp.asarray(slots), jnp.asarray(qsl), jnp.asarray(seq_lens),
                                 jnp.asarray(tables), jnp.asarray(len(rows), jnp.int32), max_q)

    def _build(self, decode: list[StepRow], prefill: list[StepRow]):
        """Device inputs for the step. Sample rows list the last query row of every
        real sequence (decode group first), then padding rows up to the sum of the
        groups' sequence buckets."""
        tokens: list[int] = []
        positions: list[int] = []
        metas, sample_rows = [], []
        num_padded_seqs = 0
        for rows, is_decode in ((decode, True), (prefill, False)):
            if not rows:
                continue
            offset = len(tokens)
            meta = self._group(rows, tokens, positions, is_decode)
            ends = np.asarray(meta.query_start_loc)[1:len(rows) + 1] - 1
            sample_rows.extend((offset + ends).tolist())
            num_padded_seqs += meta.seq_lens.shape[0]
            metas.append(meta)
        sample_rows += [0] * (num_padded_seqs - len(sample_rows))
        return (jnp.asarray(tokens, jnp.int32), jnp.asarray(positions, jnp.int32), tuple(metas),
                jnp.asarray(sample_rows, jnp.int32))

    # -- execution ----------------------------------------------------------

    def execute(self, batch: list[StepRow]) -> tuple[np.ndarray, ...]:
        """Run one step; returns per-row (token, logprob, top ids, top logprobs)."""
        decode = [r for r in batch if _is_decode(r)]
        prefill = [r for r in batch if not _is_decode(r)]
        token_ids, positions, metas, sample_rows = self._build(decode, prefill)
        logits, self.kv_cache = _forward_logits(
            self.model.params, self.kv_cache, token_ids, positions, metas, sample_rows,
            cfg=self.model.config, backend=self.backend)
        ordered = decode + prefill
        out = self._sample(logits, ordered)
        where = {id(r): i for i, r in enumerate(ordered)}
        idx = np.asarray([where[id(r)] for r in batch], np.int64)
        return tuple(a[idx] for a in out)

    def _sample(self, logits: jax.Array, rows: list[StepRow]) -> tuple[np.ndarray, ...]:
        params = [r.request.params for r in rows]
        do_penalties = any(p.repetition_penalty != 1.0 or p.presence_penalty != 0.0
                           or p.frequency_penalty != 0.0 for p in params)
        entries = [(r.request.params, r.request.seed, len(r.request.output_token_ids),
                    r.request.prompt_token_ids, r.request.output_token_ids) for r in rows]
        tensors = SamplingTensors.build(entries, logits.shape[0], self.model.config.vocab_size,
                                        do_penalties)
        out = _sample(
            logits, tensors,
            all_greedy=all(p.is_greedy for p in params),
            do_penalties=do_penalties,
            do_filters=any(p.top_k > 0 or p.top_p < 1.0 or p.min_p > 0.0 for p in params),
            num_logprobs=max((p.logprobs or 0) for p in params))
        n = len(rows)
        return tuple(np.asarray(a)[:n] for a in
                     (out.token_ids, out.logprobs, out.top_ids, out.top_logprobs))


def _is_decode(row: StepRow) -> bool:
    req = row.request
    return row.num_new_tokens == 1 and req.num_computed_tokens + 1 == req.num_tokens


def _padding_group(spec: KVCacheSpec, n_seqs: int, n_tok: int, max_q: int,
                   pages: int) -> AttentionMetadata:
    """A group of the given bucket shape that reads and writes nothing."""
    return AttentionMetadata(jnp.full(n_tok, spec.num_slots, jnp.int32),
                             jnp.zeros(n_seqs + 1, jnp.int32), jnp.zeros(n_seqs, jnp.int32),
                             jnp.zeros((n_seqs, pages), jnp.int32), jnp.asarray(0, jnp.int32),
                             max_q)
