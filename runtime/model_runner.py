"""Turns a scheduled step into padded device arrays and runs the jitted model.

A step's requests split into two row groups: decode rows (one new token that
completes the sequence) first, then prompt chunks. Each step is padded to one
`StepShape` from a small, enumerable set (`ModelRunner.shapes`), so the number
of compiled programs is bounded and known; `warmup` compiles them all (a
server's: a covering set before it answers, the rest once it serves, steps padded
to a compiled cover meanwhile). The KV pool is donated into every call, so the
step never copies it.

Interface: ``execute(batch, during=None, token_masks=None) -> (token_ids,
logprobs, top_ids, top_logprobs, prompt_logprobs, draft_targets)`` numpy arrays, one row per entry of ``batch``
(rows of unfinished prefill chunks are garbage and ignored by the engine;
``prompt_logprobs`` is an object array, None but for the prompt chunks of
requests that need prompt log-probs: ``(first prompt position, [TokenLogprobs])``.
Only a step holding such a chunk computes logits at every row, in a program of
its own padded to the widest mixed shape (`scoring_shapes`: few, all warmed up,
a server's with a full decode group first),
so other steps pay nothing; ``draft_targets`` likewise: None but for drafted
rows (speculative decoding, `sluice.runtime.spec_decode`), the sampler's token
and log-probs at each of their positions (each sampled at the step index and
with the output plain decoding would have there), from programs with a sample
row per position, used only by steps with such rows);
``during`` is host work to overlap with the step on the device (asynchronous
swap-in); ``token_masks()`` returns the rows' allowed-token bitmasks
(structured outputs), computed on the host while the forward runs.

Block mover, the one device copy path of swap and live migration: runs of
consecutive pool blocks ``[(start, length), ...]`` move as whole block slabs
(`sluice.pallas_kernels.block_copy` on GPU/TPU, its reference elsewhere):
``gather(runs, rows=None) -> jax.Array`` (dispatched, not waited for),
``copy_out(runs) -> np.ndarray`` (the same, in host memory),
``copy_in(runs, blocks, rows=None)`` (host or device blocks into the runs,
dispatched; the pool is donated, so it updates in place). ``rows`` fixes the
staging shape, so one compiled copy serves every chunk (migration); without
it, staging is padded to a power of two.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import threading
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from sluice.pallas_kernels import block_copy, dispatch
from sluice.pallas_kernels.metadata import DEBUG_ENV, check_host_metadata
from sluice.runtime import compiles
from sluice.runtime.attention import AttentionMetadata, get_backend
from sluice.runtime.devices import default_device
from sluice.runtime.kv_cache import KVCacheSpec, blocks_for
from sluice.runtime.loader import Model
from sluice.runtime.model import compute_logits, forward_unjitted
from sluice.runtime.request import Request, TokenLogprobs
from sluice.runtime.sampler import (ALL_ALLOWED, Row, SamplingTensors, mask_words, sample,
                                    token_logprobs)


# Packed allowed-token masks for a step, by index into the batch given to
# `ModelRunner.execute`: int32 (or uint32) [ceil(vocab / 32)] each, token t allowed
# iff bit t % 32 of word t // 32 is set; rows not in the dict (or None) are
# unconstrained. See `sluice.runtime.sampler`.
TokenMasks = Callable[[], "dict[int, np.ndarray] | None"]


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
    """One scheduled request in a step: its tokens and where they go. With a
    ``draft`` (speculative decoding), the request's last token and then the draft
    tokens (``num_new_tokens = 1 + len(draft)``), and the step samples at each."""

    request: Request
    num_new_tokens: int
    block_table: list[int]
    draft: list[int] = dataclasses.field(default_factory=list)


@functools.partial(jax.jit, static_argnames=("cfg", "backend"), donate_argnames=("kv_cache",))
def _forward_logits(params, kv_cache, token_ids, positions, metas, sample_rows, targets=None,
                    *, cfg, backend):
    """Logits at ``sample_rows`` and the updated pool; with ``targets`` (int32, a
    next token per row: a step with prompt log-probs, a program of its own), also
    every row's log-prob of its target and top alternatives (`token_logprobs`)."""
    hidden, kv_cache = forward_unjitted(params, cfg, token_ids, positions, kv_cache, metas,
                                        backend)
    logits = compute_logits(params, hidden[sample_rows])
    if targets is None:
        return logits, kv_cache
    return logits, kv_cache, _score_rows(params, hidden, targets)


# Rows scored at a time in a prompt-scoring step: its full-vocabulary logits exist
# for this many rows at once, not for the step's every row (a 152k vocabulary at
# 8,192 rows would be 5 GB of float32 logits).
SCORE_CHUNK_ROWS = 256


def _score_rows(params, hidden: jax.Array, targets: jax.Array) -> tuple[jax.Array, ...]:
    """Every row's (log-prob of its target, top ids, top log-probs), computed
    `SCORE_CHUNK_ROWS` rows at a time (`token_logprobs` per chunk)."""
    rows = hidden.shape[0]
    chunk = min(rows, SCORE_CHUNK_ROWS)
    pad = -rows % chunk
    h = jnp.pad(hidden, ((0, pad), (0, 0))).reshape(-1, chunk, hidden.shape[-1])
    t = jnp.pad(targets, (0, pad)).reshape(-1, chunk)

    def score(part):
        out = token_logprobs(compute_logits(params, part[0]), part[1])
        return out.logprobs, out.top_ids, out.top_logprobs

    return tuple(a.reshape(-1, *a.shape[2:])[:rows] for a in jax.lax.map(score, (h, t)))


_gather_blocks = jax.jit(dispatch.gather_blocks, static_argnums=2)
# The pool is donated so a swap-in writes its blocks in place, not into a copy.
_scatter_blocks = jax.jit(dispatch.scatter_blocks, donate_argnums=0)

# One program per row count, whatever sampling features the rows use.
_sample = jax.jit(sample)


@dataclasses.dataclass(frozen=True)
class StepShape:
    """A step's padded shape; one compiled program each.

    ``decode_seqs`` decode rows (one query each; 0: no decode group), then, in
    steps with prompt chunks, a prompt group of ``prefill_tokens`` rows holding
    the chunks back to back. Attention sees the prompt group as
    ``prefill_seqs`` sequences of at most ``query_rows`` queries: pieces of the
    chunks on backends that pad queries per sequence (see
    `sluice.runtime.attention.QUERY_PIECE`), whole chunks on ragged kernels.
    ``sample_rows``: logits rows (one per decode row and per possible chunk;
    with speculative decoding on, also ``num_speculative_tokens`` per possible
    chunk in every program with a prompt group: every position of a drafted row
    is verified, and steps with and without drafted rows share one program, so
    a step without them samples ``max_prefill_seqs * num_speculative_tokens``
    padding rows rather than warm-up compiling each such shape twice).
    ``pages``: block-table width of both groups.
    """

    decode_seqs: int
    prefill_seqs: int
    prefill_tokens: int
    query_rows: int
    sample_rows: int
    pages: int

    def groups(self) -> list[tuple[int, int, int]]:
        """(sequences, rows, max query rows) of each row group present."""
        out = [(self.decode_seqs, self.decode_seqs, 1)] if self.decode_seqs else []
        if self.prefill_tokens:
            out.append((self.prefill_seqs, self.prefill_tokens, self.query_rows))
        return out


class ModelRunner:
    def __init__(self, model: Model, num_blocks: int, block_size: int, max_num_seqs: int,
                 max_num_batched_tokens: int, max_prefill_seqs: int, max_model_len: int,
                 backend: str = "reference", device: jax.Device | None = None,
                 num_speculative_tokens: int = 0):
        compiles.install()  # count compiles from the pool's allocation on
        self.model = model
        self.device = device
        self.spec = KVCacheSpec.for_model(model.config, num_blocks, block_size, model.dtype, device)
        # committed to its device even when none was named: a real model's parameters
        # are committed, and a jit output is whenever an input is, so an uncommitted
        # pool would turn committed after the first step and every step program
        # warmed up against it would compile again while serving
        self.kv_cache = self.spec.allocate(device if device is not None else default_device())
        self.backend = backend
        self.max_num_seqs = max_num_seqs
        self.max_prefill_seqs = max_prefill_seqs
        self.num_speculative_tokens = num_speculative_tokens
        max_pages = blocks_for(max_model_len, block_size)
        self.seq_buckets = pow2_buckets(1, max_num_seqs)
        self.token_buckets = pow2_buckets(16, max(16, max_num_batched_tokens))
        # A step with prompt chunks but no decode rows leaves the decode group out
        # where a full one would add over a quarter of the smallest prompt group's
        # rows; otherwise one decode group of max_num_seqs serves every mixed step.
        self.mixed_decode_buckets = ((0, max_num_seqs) if 4 * max_num_seqs > self.token_buckets[0]
                                     else (max_num_seqs,))
        platform = device.platform if device is not None else jax.default_backend()
        self.query_piece = get_backend(backend).query_piece(platform)
        if get_backend(backend).cost_grows_with_table_width:
            # At most four widths: padding to the next one at most doubles attention reads.
            self.page_buckets = pow2_buckets(max(1, max_pages // 8), max_pages)
        else:
            self.page_buckets = (max_pages,)
        self.max_model_len = max_model_len
        self._mask_words = mask_words(model.config.vocab_size)
        # (shape, scoring) whose programs a deferred warm-up has yet to compile
        self._deferred: set[tuple[StepShape, bool]] = set()
        self.refined = threading.Event()  # set while no program is deferred (`warmup`)
        self.refined.set()
        self._all_allowed: dict[int, jax.Array] = {}  # sample rows -> all-ones token mask

    def shapes(self) -> list[StepShape]:
        """Every shape a step can take (all compiled by `warmup`)."""
        decode = [StepShape(s, 0, 0, 0, s, p) for s in self.seq_buckets for p in self.page_buckets]
        mixed = [self._mixed_shape(d, t, p) for d in self.mixed_decode_buckets
                 for t in self.token_buckets for p in self.page_buckets]
        return decode + mixed

    def shape_for(self, decode: list[StepRow], prefill: list[StepRow]) -> StepShape:
        """The step's shape: its buckets', or while that program is still deferred
        (`warmup`), the smallest compiled one that holds the step."""
        pages = bucket(max(len(r.block_table) for r in decode + prefill), self.page_buckets)
        if not prefill:
            n = bucket(len(decode), self.seq_buckets)
            return self._compiled(StepShape(n, 0, 0, 0, n, pages), False)
        return self._compiled(self._mixed_shape(bucket(len(decode), self.mixed_decode_buckets),
                                                bucket(sum(r.num_new_tokens for r in prefill),
                                                       self.token_buckets), pages), False)

    def _compiled(self, shape: StepShape, scoring: bool) -> StepShape:
        """``shape``, or while its program is deferred, the smallest shape of the
        same kind (decode-only or mixed, scoring or not) whose program is compiled
        and is at least as large in every dimension: padding holds the step."""
        if not self._deferred or (shape, scoring) not in self._deferred:
            return shape  # every step once the deferred programs are in
        fields = dataclasses.astuple(shape)
        covers = [s for s in (self.scoring_shapes() if scoring else self.shapes())
                  if (s, scoring) not in self._deferred
                  and bool(s.prefill_tokens) == bool(shape.prefill_tokens)
                  and all(a >= b for a, b in zip(dataclasses.astuple(s), fields))]
        return min(covers, key=lambda s: (s.decode_seqs + s.prefill_tokens, s.pages))

    def _mixed_shape(self, decode_seqs: int, tokens: int, pages: int) -> StepShape:
        """The shape of a step with prompt chunks of up to ``tokens`` rows in all,
        any of which may be a drafted row sampling at every position (`StepShape`).
        Chunks are cut into pieces of ``q`` query rows: up to max_prefill_seqs
        chunks of ``tokens`` rows in all make at most
        ``(tokens + chunks * (q - 1)) // q`` pieces (each chunk's last one may be short)."""
        q = min(tokens, self.query_piece or tokens)
        seqs = min(tokens, (tokens + self.max_prefill_seqs * (q - 1)) // q)
        chunk_rows = 1 + self.num_speculative_tokens
        return StepShape(decode_seqs, seqs, tokens, q,
                         decode_seqs + self.max_prefill_seqs * chunk_rows, pages)

    def warmup(self, defer: bool = False) -> None:
        """Compile every step shape (padding-only inputs: the pool is untouched), the
        scoring variant of the `scoring_shapes` (prompt log-probs), and
        the sampler for its row count (one program serves every sampling feature),
        plus the fixed-size block copy of live migration. Whether later compiles
        are ``serving`` ones is the server's decision (`sluice.runtime.compiles`:
        it marks the process ready once every instance has warmed up), not this
        runner's: another instance may still be starting.

        With ``defer``, only a covering set compiles now (`_first_shapes`: every
        other decode bucket from the largest down, the mixed shapes with a full
        decode group, their scoring shapes); the rest compile on a thread of their
        own once the process is ready (`compiles.after_ready`), each taken into
        use as it is compiled (`refined` is set when all are). Until then a step
        runs padded to a compiled shape that holds it (`shape_for`): a server
        answers sooner (on 2 cores, a Ray instance's 29 programs took ~40 s), its
        first steps slower, never compiling."""
        steps = [(shape, False) for shape in self.shapes()]
        steps += [(shape, True) for shape in self.scoring_shapes()]
        first = self._first_shapes() if defer else set(steps)
        with compiles.warming_up():
            self.copy_in([], self.gather([], COPY_CHUNK_BLOCKS), COPY_CHUNK_BLOCKS)  # copies nothing
            self._compile([step for step in steps if step in first], set())
        later = [step for step in steps if step not in first]
        if not later:
            return
        self._deferred.update(later)
        self.refined.clear()
        done_rows = {shape.sample_rows for shape, _ in first}
        compiles.after_ready(lambda: self._refine(later, done_rows))

    def _first_shapes(self) -> set[tuple[StepShape, bool]]:
        """The steps a deferred warm-up compiles first: each other step has a
        compiled cover among them (`_compiled`)."""
        decode = set(self.seq_buckets[::-1][::2])
        full = self.mixed_decode_buckets[-1]
        plain = [s for s in self.shapes()
                 if (s.decode_seqs == full if s.prefill_tokens else s.decode_seqs in decode)]
        return ({(s, False) for s in plain}
                | {(s, True) for s in self.scoring_shapes() if s.decode_seqs == full})

    def _refine(self, steps: list[tuple[StepShape, bool]], done_rows: set[int]) -> None:
        """Compile the deferred ``steps`` one by one (with the sampler for a row
        count not compiled yet), each taken into use as soon as it is."""
        for step in steps:
            self._compile([step], done_rows, background=True)
            done_rows.add(step[0].sample_rows)
            self._deferred.discard(step)
        self.refined.set()

    def _compile(self, steps: list[tuple[StepShape, bool]], done_rows: set[int],
                 background: bool = False) -> None:
        """Compile the step programs of ``steps`` (shape, scoring) and the sampler
        for each row count among them not in ``done_rows``: on the compile pool
        (`compiles.compile_ahead`), or ``background``, one after another on this
        (daemon) thread, which nothing waits for at exit. Compiled, not run: a
        padding step's forward costs what a real one does (most of a warm start).
        Their inputs are made on the host: `jnp.zeros` would compile a program per
        shape (42 for tiny)."""
        programs = [functools.partial(self._lower_step, shape, scoring)
                    for shape, scoring in steps]
        programs += [functools.partial(self._lower_sample, rows)
                     for rows in sorted({shape.sample_rows for shape, _ in steps} - done_rows)]
        if background:
            for lower in programs:
                lower().compile()
        else:
            compiles.compile_ahead(programs, "compiling step programs")

    def _lower_sample(self, rows: int) -> jax.stages.Lowered:
        """The sampler's program for ``rows`` rows, lowered with inputs placed as a
        step's: logits committed to the pool's device like `_forward_logits`'s (a
        jit output follows its inputs, and the sampler's programs differ for
        committed and uncommitted arguments), made on the host, so nothing compiles
        for them."""
        embed = self.model.params["embed"]
        hidden = jax.ShapeDtypeStruct((rows, embed.shape[1]), embed.dtype)
        logits = jax.eval_shape(compute_logits, self.model.params, hidden)
        logits = jax.device_put(np.zeros(logits.shape, logits.dtype), self.kv_cache.sharding)
        tensors = SamplingTensors.build([], rows, self.model.config.vocab_size,
                                        self.max_model_len)
        return _sample.lower(logits, tensors, self._token_mask(rows, None))

    def _lower_step(self, shape: "StepShape", scoring: bool) -> jax.stages.Lowered:
        """The step program of ``shape`` (with prompt scoring or not), lowered with
        padding-only inputs of exactly the types and placement `execute` passes."""
        metas = tuple(_padding_group(self.spec, n, t, q, shape.pages)
                      for n, t, q in shape.groups())
        n_tok = sum(t for _, t, _ in shape.groups())
        targets = ((jax.device_put(np.zeros(n_tok, np.int32), self.device),) if scoring
                   else ())
        ids, positions, sample_rows = jax.device_put(
            (np.zeros(n_tok, np.int32), np.zeros(n_tok, np.int32),
             np.zeros(shape.sample_rows, np.int32)))
        return _forward_logits.lower(
            self.model.params, self.kv_cache, ids, positions, metas, sample_rows,
            *targets, cfg=self.model.config, backend=self.backend)

    # -- batch construction -------------------------------------------------

    def _group(self, rows: list[StepRow], dims: tuple[int, int, int], pages: int,
               tokens: list[int], positions: list[int]) -> tuple[tuple[np.ndarray, ...], list[int]]:
        """Pad one row group to ``dims`` (sequences, rows, max query rows), each
        row's chunk one sequence of the metadata per piece of max-query rows, and
        append its tokens/positions; returns its metadata arrays (host; in
        `AttentionMetadata` order) and the group row of each row's last token."""
        bs = self.spec.block_size
        n_seqs, n_tok, max_q = dims
        slots = np.full(n_tok, self.spec.num_slots, np.int32)
        qsl = np.zeros(n_seqs + 1, np.int32)
        seq_lens = np.zeros(n_seqs, np.int32)
        tables = np.zeros((n_seqs, pages), np.int32)
        ends: list[int] = []
        start = seq = 0
        for r in rows:
            req, n = r.request, r.num_new_tokens
            first = req.num_computed_tokens
            table = np.asarray(r.block_table, np.int32)
            pos = np.arange(first, first + n)
            slots[start:start + n] = table[pos // bs] * bs + pos % bs
            tokens.extend(req.all_token_ids[first:first + n - len(r.draft)])
            tokens.extend(r.draft)
            positions.extend(range(first, first + n))
            for lo in range(0, n, max_q):  # the chunk's pieces, a sequence each
                hi = min(n, lo + max_q)
                qsl[seq + 1] = start + hi
                seq_lens[seq] = first + hi
                tables[seq, :len(table)] = table
                seq += 1
            start += n
            ends.append(start - 1)
        qsl[seq + 1:] = start
        if os.environ.get(DEBUG_ENV) == "1":  # debug mode: name bad metadata on the host
            check_host_metadata(slots, qsl, seq_lens, tables, seq,
                                num_blocks=self.spec.num_blocks, block_size=bs)
        tokens.extend([0] * (n_tok - start))
        positions.extend([0] * (n_tok - start))
        return (slots, qsl, seq_lens, tables, np.int32(seq)), ends

    def _build(self, decode: list[StepRow], prefill: list[StepRow],
               shape: StepShape | None = None):
        """Device inputs for the step (padded to ``shape``, default `shape_for`'s).
        Sample rows list the last query row of every real sequence (decode group
        first), then every other row of each drafted row (`_draft_targets`), then
        padding rows."""
        shape = shape or self.shape_for(decode, prefill)
        tokens: list[int] = []
        positions: list[int] = []
        groups, sample_rows = [], []
        present = [rows for rows, n in ((decode, shape.decode_seqs),
                                        (prefill, shape.prefill_tokens)) if n]
        for rows, dims in zip(present, shape.groups()):
            offset = len(tokens)
            arrays, ends = self._group(rows, dims, shape.pages, tokens, positions)
            sample_rows.extend(offset + e for e in ends)
            groups.append(arrays)
            if rows is prefill:
                sample_rows.extend(offset + e - r.num_new_tokens + 1 + j
                                   for r, e in zip(rows, ends) for j in range(len(r.draft)))
        sample_rows.extend([0] * (shape.sample_rows - len(sample_rows)))
        # one device_put for the whole step (each call costs host time); not
        # jnp.asarray, which compiles a copy per new shape
        ids, pos, sample_rows, groups = jax.device_put(
            (np.asarray(tokens, np.int32), np.asarray(positions, np.int32),
             np.asarray(sample_rows, np.int32), groups))
        metas = tuple(AttentionMetadata(*g, max_q) for g, (_, _, max_q) in
                      zip(groups, shape.groups()))
        return ids, pos, metas, sample_rows

    # -- execution ----------------------------------------------------------

    def execute(self, batch: list[StepRow],
                during: Callable[[jax.Array], None] | None = None,
                token_masks: TokenMasks | None = None) -> tuple[np.ndarray, ...]:
        """Run one step; returns per-row (token, logprob, top ids, top logprobs,
        prompt logprobs, draft targets) (module docstring).
        ``during(tokens)`` runs on this thread once the step is dispatched and
        before its results are fetched (``tokens``: the step's device output), so
        host work there (a swap-in) overlaps the step on the device.
        ``token_masks()`` runs once the forward is dispatched and before sampling,
        so grammar masks are computed while the device runs the forward; it maps
        indices into ``batch`` to packed masks (see `TokenMasks`)."""
        decode, prefill, is_decode = [], [], []
        for r in batch:
            is_decode.append(r.request.is_decode(r.num_new_tokens))
            (decode if is_decode[-1] else prefill).append(r)
        # where[i]: batch row i's row in decode + prefill (the sample-row order)
        is_decode = np.asarray(is_decode, bool)
        where = np.cumsum(is_decode, dtype=np.int64) - 1
        where[~is_decode] = len(decode) + np.arange(len(prefill))
        scoring = self._scoring_shape(decode, prefill)
        token_ids, positions, metas, sample_rows = self._build(decode, prefill, scoring)
        targets, spans = self._prompt_targets(decode, prefill, scoring)
        logits, self.kv_cache, *every = _forward_logits(
            self.model.params, self.kv_cache, token_ids, positions, metas, sample_rows,
            # no argument when None: warm-up compiled the plain program without it (an
            # explicit None is another jit cache key, a compile per shape while serving)
            *(() if targets is None else (jax.device_put(targets, self.device),)),
            cfg=self.model.config, backend=self.backend)
        masks = token_masks() if token_masks is not None else None
        out = self._sample(logits, decode + prefill,
                           {int(where[i]): m for i, m in masks.items()} if masks else None)
        if during is not None:
            during(out[0])
        prompt = _prompt_logprobs(len(batch), spans, targets, every[0] if every else None)
        verified = _draft_targets(out, decode, prefill)
        return tuple(np.asarray(a)[where] for a in out + (prompt, verified))

    def scoring_shapes(self) -> list[StepShape]:
        """The shapes of steps that score prompts (a prompt chunk needs prompt
        log-probs): the widest mixed shape per decode bucket, so few programs of
        the scoring variant exist and `warmup` compiles them all; such steps pad
        to them (a scoring workload's steps are full anyway)."""
        return [self._widest_mixed(d) for d in self.mixed_decode_buckets]

    def _widest_mixed(self, decode_seqs: int) -> StepShape:
        return self._mixed_shape(decode_seqs, self.token_buckets[-1], self.page_buckets[-1])

    def _scoring_shape(self, decode: list[StepRow], prefill: list[StepRow]
                       ) -> StepShape | None:
        """The step's scoring shape (`scoring_shapes`), or None if no chunk scores."""
        if not any(r.request.needs_prompt_logprobs for r in prefill):
            return None
        return self._compiled(self._widest_mixed(bucket(len(decode), self.mixed_decode_buckets)),
                              True)

    def _prompt_targets(self, decode: list[StepRow], prefill: list[StepRow],
                        shape: StepShape | None
                        ) -> tuple[np.ndarray | None, list[tuple[int, int, int, int]]]:
        """For the prompt chunks of requests that need prompt log-probs, in a step
        of scoring ``shape`` (None: no chunk scores, the step runs the plain
        program): each query row's next prompt token (int32 over the step's rows)
        and spans ``(index into decode + prefill, first row, first prompt position
        scored, rows)``. Row ``j`` of a chunk holds position ``p`` and scores the
        prompt token at ``p + 1``."""
        if shape is None:
            return None, []
        targets = np.zeros(sum(rows for _, rows, _ in shape.groups()), np.int32)
        spans, row = [], shape.decode_seqs  # the prompt group follows the decode rows
        for i, r in enumerate(prefill):
            req, first = r.request, r.request.num_computed_tokens
            count = min(first + r.num_new_tokens, len(req.prompt_token_ids) - 1) - first
            if req.needs_prompt_logprobs and count > 0:
                targets[row:row + count] = req.prompt_token_ids[first + 1:first + 1 + count]
                spans.append((len(decode) + i, row, first + 1, count))
            row += r.num_new_tokens
        return targets, spans


    # -- block mover (swap and migration) --------------------------------------

    def copy_out(self, groups: list[tuple[int, int]]) -> np.ndarray:
        """The blocks of ``groups`` (runs of consecutive blocks), staged to host memory."""
        return np.asarray(self.gather(groups))

    def gather(self, groups: list[tuple[int, int]], rows: int | None = None) -> jax.Array:
        """The blocks of ``groups`` as one array on this runner's device (for a
        device-to-device copy, e.g. live migration). ``rows`` fixes the staging
        shape (rows past the blocks are unspecified), so one compiled copy
        serves every chunk of up to ``rows`` blocks; default: exactly the blocks."""
        n = sum(length for _, length in groups)
        if rows is not None:
            return _gather_blocks(self.kv_cache, block_copy.groups_array(groups, rows), rows)
        arr = block_copy.groups_array(groups, _staging_rows(len(groups)))
        return _gather_blocks(self.kv_cache, arr, _staging_rows(n))[:n]

    def copy_in(self, groups: list[tuple[int, int]], blocks: np.ndarray | jax.Array,
                rows: int | None = None) -> None:
        """Write ``blocks`` (host or any device; rows past the runs' total are
        ignored) into the runs ``groups`` of the pool; ``rows`` as in `gather`."""
        n = blocks.shape[0]
        size = rows if rows is not None else _staging_rows(n)
        staging = jax.device_put(blocks, self.device) if self.device is not None else blocks
        if size != n:
            staging = jnp.pad(jnp.asarray(staging), [(0, size - n)] + [(0, 0)] * (blocks.ndim - 1))
        max_groups = rows if rows is not None else _staging_rows(len(groups))
        arr = block_copy.groups_array(groups, max_groups)
        self.kv_cache = _scatter_blocks(self.kv_cache, arr, jnp.asarray(staging))

    def _token_mask(self, num_rows: int, masks: dict[int, np.ndarray] | None) -> jax.Array:
        """The packed mask of a step's ``num_rows`` sample rows: all ones but for the
        rows in ``masks`` (sample row -> mask). Without masks, a device array kept
        per row count, so unconstrained steps transfer nothing."""
        if not masks:
            if num_rows not in self._all_allowed:
                self._all_allowed[num_rows] = jax.device_put(
                    np.full((num_rows, self._mask_words), ALL_ALLOWED, np.int32), self.device)
            return self._all_allowed[num_rows]
        out = np.full((num_rows, self._mask_words), ALL_ALLOWED, np.int32)
        for row, m in masks.items():
            m = np.asarray(m)
            if m.dtype not in (np.int32, np.uint32) or m.shape != (self._mask_words,):
                raise ValueError(f"token_masks: each mask must be int32 or uint32 "
                                 f"[{self._mask_words}], got {m.dtype} {list(m.shape)}")
            out[row] = m.view(np.int32)
        return jax.device_put(out, self.device)

    def _sample(self, logits: jax.Array, rows: list[StepRow],
                masks: dict[int, np.ndarray] | None = None) -> tuple[jax.Array, ...]:
        """Dispatch sampling; device arrays with a row per padded logits row.
        ``masks``: packed allowed-token masks by index into ``rows``."""
        # a drafted row's last row samples after its whole draft; then a row per
        # draft position (`_build`'s order), each at its own step with the draft
        # tokens before it as output (penalties), as plain decoding would sample it
        entries = [_sampling_row(r, len(r.draft)) for r in rows]
        entries += [_sampling_row(r, j) for r in rows for j in range(len(r.draft))]
        tensors = SamplingTensors.build(entries, logits.shape[0], self.model.config.vocab_size,
                                        self.max_model_len)
        out = _sample(logits, tensors, self._token_mask(logits.shape[0], masks))
        return out.token_ids, out.logprobs, out.top_ids, out.top_logprobs


def _sampling_row(row: StepRow, drafted: int) -> Row:
    """The sampler's row for the position of ``row`` after ``drafted`` of its draft
    tokens: the step index and output plain decoding has there once they are
    accepted (so a seeded request draws the same random numbers as without drafts)."""
    req = row.request
    output = req.output_token_ids + row.draft[:drafted] if drafted else req.output_token_ids
    return (req.params, req.seed, len(req.output_token_ids) + drafted, req.prompt_token_ids,
            output)


def _prompt_logprobs(num_rows: int, spans: list[tuple[int, int, int, int]],
                     targets: np.ndarray | None, every: tuple[jax.Array, ...] | None
                     ) -> np.ndarray:
    """Per row of the step (object array): None, or ``(first position, [TokenLogprobs])``
    with all `MAX_LOGPROBS` alternatives (the scheduler keeps the request's number)."""
    out = np.full(num_rows, None, object)
    if every is None:
        return out
    lps, top_ids, top_lps = (np.asarray(a) for a in every)
    for index, row, start, count in spans:
        out[index] = (start, [TokenLogprobs(int(targets[j]), float(lps[j]), dict(zip(
            top_ids[j].tolist(), top_lps[j].tolist()))) for j in range(row, row + count)])
    return out


def _draft_targets(sampled: tuple[jax.Array, ...], decode: list[StepRow],
                   prefill: list[StepRow]) -> np.ndarray:
    """Per row of decode + prefill (object array): None, or for a drafted row the
    sampler's output at each of its positions (its draft rows, then its last row),
    as (token ids, log-probs, top ids, top log-probs) arrays with a row per
    position, from the step's ``sampled`` outputs in `_build`'s sample-row order."""
    out = np.full(len(decode) + len(prefill), None, object)
    if not any(r.draft for r in prefill):
        return out
    arrays = [np.asarray(a) for a in sampled]
    extra = len(decode) + len(prefill)  # the draft rows follow one row per sequence
    for i, r in enumerate(prefill):
        if r.draft:
            rows = list(range(extra, extra + len(r.draft))) + [len(decode) + i]
            out[len(decode) + i] = tuple(a[rows] for a in arrays)
            extra += len(r.draft)
    return out


def _padding_group(spec: KVCacheSpec, n_seqs: int, n_tok: int, max_q: int,
                   pages: int) -> AttentionMetadata:
    """A group of the given bucket shape that reads and writes nothing (its arrays
    made on the host, as a step's are: no program compiles for them)."""
    arrays = jax.device_put((np.full(n_tok, spec.num_slots, np.int32),
                             np.zeros(n_seqs + 1, np.int32), np.zeros(n_seqs, np.int32),
                             np.zeros((n_seqs, pages), np.int32), np.int32(0)))
    return AttentionMetadata(*arrays, max_q)


# Rows of the fixed staging buffer chunked copies (live migration) use: one
# compiled gather and scatter per device serve any number of blocks.
COPY_CHUNK_BLOCKS = 32


def _staging_rows(n: int) -> int:
    """Staging buffers are padded to powers of two to bound compiled copies."""
    return 1 << max(0, (n - 1).bit_length())

