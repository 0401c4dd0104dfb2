"""Token sampling on the device, as one pure jittable function.

``sample(logits [S, V], t, token_mask)`` picks one token per row and returns a
`SamplerOutput`. ``t`` is a `SamplingTensors`: every request setting as a
per-row array, built on the host by `SamplingTensors.build` (numpy, then one
transfer). Every feature is a per-row value, never a static argument, so one
compiled program per row count serves any mix of requests and a request using a
feature for the first time compiles nothing (a warm-up covers it all). Work no
row needs is skipped at run time by ``lax.cond`` on batch-wide flags computed on
the device from those values:

- penalties run if some row has a repetition, presence or frequency penalty;
- the draw (temperature, filters, random numbers) runs if some row is not greedy,
  and top-k / top-p / min-p only if such a row uses one;
- log-probs (the chosen token's and the `MAX_LOGPROBS` most likely) are computed
  if some row asks for them (``logprobs`` not None), else returned as zeros.

``token_mask`` (int32 [S, ceil(V / 32)]) says which tokens each row may take
(structured outputs): token t is allowed iff bit t % 32 (least significant first)
of word t // 32 is set, the layout of xgrammar's and llguidance's bitmasks
(`pack_token_mask` builds one from booleans). Every step passes one, all ones
(`ALL_ALLOWED` words) for unconstrained rows, so a constrained request changes no
shape and compiles nothing; a batch without constraints skips the unpacking.
Disallowed tokens become -inf after the penalties and before everything else, for
greedy rows too.

A row whose own settings are neutral gets bit-identical logits on every path, so
its token does not depend on which branches its batch took.

Order (vLLM's): penalties -> token mask -> greedy rows take the argmax -> temperature -> top-k
-> top-p (over the top-k renormalized distribution) -> min-p -> draw. Penalties
follow HF/vLLM for repetition (positive logits of tokens seen in the prompt or the
output are divided by the penalty, negative ones multiplied) and OpenAI for
presence/frequency (subtracted per generated occurrence). Top-k keeps ties with
the k-th logit; top-p keeps the smallest set of most likely tokens whose mass
reaches p, ties at the edge included.

Each row's randomness is ``fold_in(key(seed), step)``, derived on the device, so a
seeded request gives the same tokens whatever else is in the batch and wherever
its row sits.

Why no full sort and no per-token noise: this runs every decode step, and on CPU
(V = 49152, S = 64, two cores) XLA's full sort took ~0.8 s and Gumbel noise for
every token ~70 ms. Instead the top-k and top-p cut-offs are read off the 128
largest logits (XLA's partial top-k, ~10 ms); only rows whose cut-off lies below
those bisect the order-preserving integer image of the floats, exactly, in at
most 32 compare-and-sum passes. The draw is a two-level inverse CDF (a block of
256 tokens by mass, then a token inside it) from two uniforms per row.

The log-probs are those of the raw model distribution (``log_softmax`` of the
logits before penalties, mask, temperature and filters), as vLLM v1 returns by default.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from sluice.runtime.sampling_params import GREEDY_TEMPERATURE, MAX_LOGPROBS, SamplingParams

# One row for `SamplingTensors.build`: (params, seed, step, prompt ids, output ids).
Row = tuple[SamplingParams, int, int, Sequence[int], Sequence[int]]

_BLOCK = 256  # tokens per block of the two-level draw; ~sqrt(V) balances the levels
_CANDIDATES = 128  # largest logits among which top-k / top-p cut-offs are looked for first
_GREEDY_PAD = SamplingParams(temperature=0.0)
ALL_ALLOWED = -1  # a token-mask word with all 32 bits set, as int32
_MIN_PENALTY_WIDTH = 512  # see `penalty_width`


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SamplingTensors:
    """Per-row sampling settings for S rows (device arrays).

    temperature, top_p, min_p, repetition_penalty, presence_penalty,
    frequency_penalty: f32 [S]. top_k: i32 [S], 0 = off. seeds: u32 [S].
    steps: i32 [S], tokens the request has sampled before this step.
    want_logprobs: bool [S]. tokens: i32 [S, W], the prompt then the output so
    far, padded with the vocabulary size (an id the penalties ignore) to a
    `penalty_width` W;
    prompt_lens: i32 [S], how many of them are the prompt.
    """

    temperature: jax.Array
    top_p: jax.Array
    top_k: jax.Array
    min_p: jax.Array
    repetition_penalty: jax.Array
    presence_penalty: jax.Array
    frequency_penalty: jax.Array
    seeds: jax.Array
    steps: jax.Array
    want_logprobs: jax.Array
    tokens: jax.Array
    prompt_lens: jax.Array

    @classmethod
    def build(cls, rows: Sequence[Row], pad_rows: int, vocab_size: int,
              token_width: int) -> SamplingTensors:
        """Tensors for ``rows`` followed by greedy dummies up to ``pad_rows`` rows.

        Seeds are taken modulo 2**32. ``token_width`` is the most prompt plus
        output tokens a row may have (the engine's max_model_len); ``tokens`` is
        `penalty_width` (token_width) wide whatever the rows hold, so no token
        count changes a shape. Only rows with a penalty fill it; a batch without
        any reuses one cached padding array (nothing to transfer).
        """
        if pad_rows < len(rows):
            raise ValueError(f"pad_rows: must be >= the number of rows {len(rows)}, "
                             f"got {pad_rows}")
        params = [r[0] for r in rows] + [_GREEDY_PAD] * (pad_rows - len(rows))

        def column(get: Callable[[SamplingParams], float], dtype: type) -> np.ndarray:
            return np.asarray([get(p) for p in params], dtype)

        def padded(values: list[int], dtype: type) -> np.ndarray:
            return np.asarray(values + [0] * (pad_rows - len(values)), dtype)

        penalized = [i for i, r in enumerate(rows) if has_penalties(r[0])]
        width = penalty_width(token_width)
        if penalized:
            tokens = np.full((pad_rows, width), vocab_size, np.int32)
            for i in penalized:
                prompt, output = rows[i][3], rows[i][4]
                if len(prompt) + len(output) > token_width:
                    raise ValueError(f"token_width: row {i} has {len(prompt) + len(output)} "
                                     f"prompt and output tokens, more than {token_width}")
                tokens[i, :len(prompt)] = prompt
                tokens[i, len(prompt):len(prompt) + len(output)] = output
        else:
            tokens = _padding_tokens(pad_rows, width, vocab_size)
        tensors = cls(
            temperature=column(lambda p: p.temperature, np.float32),
            top_p=column(lambda p: p.top_p, np.float32),
            # top_k >= V is off, like 0; clamping keeps any int in int32
            top_k=column(lambda p: min(max(p.top_k, 0), vocab_size), np.int32),
            min_p=column(lambda p: p.min_p, np.float32),
            repetition_penalty=column(lambda p: p.repetition_penalty, np.float32),
            presence_penalty=column(lambda p: p.presence_penalty, np.float32),
            frequency_penalty=column(lambda p: p.frequency_penalty, np.float32),
            seeds=padded([r[1] % 2**32 for r in rows], np.uint32),
            steps=padded([r[2] for r in rows], np.int32),
            want_logprobs=column(lambda p: p.logprobs is not None, np.bool_),
            tokens=tokens,
            prompt_lens=padded([len(r[3]) for r in rows], np.int32),
        )
        return jax.device_put(tensors)


def penalty_width(token_width: int) -> int:
    """Columns of `SamplingTensors.tokens` for rows of up to ``token_width`` tokens:
    the next power of two, at least `_MIN_PENALTY_WIDTH`. The sampler compiles one
    program per width, so engines whose max_model_len differ a little (512 and 300,
    say) share their programs; the padding ids cost the penalties nothing."""
    return max(_MIN_PENALTY_WIDTH, 1 << max(0, token_width - 1).bit_length())


def has_penalties(p: SamplingParams) -> bool:
    return p.repetition_penalty != 1.0 or p.presence_penalty != 0.0 or p.frequency_penalty != 0.0


@functools.lru_cache(maxsize=64)
def _padding_tokens(rows: int, width: int, vocab_size: int) -> jax.Array:
    return jax.device_put(np.full((rows, width), vocab_size, np.int32))


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SamplerOutput:
    """token_ids i32 [S]; logprobs f32 [S], of the chosen tokens under the raw
    distribution; top_ids i32 [S, N] and top_logprobs f32 [S, N], its N most
    likely tokens in descending order (N = `MAX_LOGPROBS`, or the vocabulary
    size if smaller). All three log-prob outputs are zeros when no row of the
    batch asked for log-probs."""

    token_ids: jax.Array
    logprobs: jax.Array
    top_ids: jax.Array
    top_logprobs: jax.Array


def sample(logits: jax.Array, t: SamplingTensors, token_mask: jax.Array) -> SamplerOutput:
    """One token per row of ``logits`` [S, V] (f32); ``token_mask`` is the packed
    bitmask of allowed tokens, int32 [S, mask_words(V)]; see the module docstring."""
    penalized = ((t.repetition_penalty != 1.0) | (t.presence_penalty != 0.0)
                 | (t.frequency_penalty != 0.0))
    x = jax.lax.cond(jnp.any(penalized), apply_penalties, lambda x, t: x, logits, t)
    x = apply_token_mask(x, token_mask)
    greedy_ids = _argmax(x)
    sampled = t.temperature >= GREEDY_TEMPERATURE
    token_ids = jax.lax.cond(jnp.any(sampled), _sampled_ids, lambda x, t, g: g, x, t, greedy_ids)
    return jax.lax.cond(jnp.any(t.want_logprobs), token_logprobs, _without_logprobs,
                        logits, token_ids)


def _sampled_ids(x: jax.Array, t: SamplingTensors, greedy_ids: jax.Array) -> jax.Array:
    """Tokens of a batch in which some row samples: greedy rows keep ``greedy_ids``."""
    greedy = t.temperature < GREEDY_TEMPERATURE
    x = x / jnp.where(greedy, 1.0, t.temperature)[:, None]
    filtered = ~greedy & ((t.top_k > 0) | (t.top_p < 1.0) | (t.min_p > 0.0))
    x = jax.lax.cond(jnp.any(filtered), apply_filters, lambda x, t: x, x, t)
    return jnp.where(greedy, greedy_ids, _draw(x, _row_keys(t.seeds, t.steps)))


def apply_penalties(logits: jax.Array, t: SamplingTensors) -> jax.Array:
    """Repetition penalty over prompt and output tokens, presence and frequency
    penalties over output token counts. Ids >= V (padding) are dropped."""
    S, V = logits.shape
    rows = jnp.arange(S)[:, None]
    is_output = jnp.arange(t.tokens.shape[1])[None, :] >= t.prompt_lens[:, None]
    output = jnp.where(is_output, t.tokens, V)
    counts = jnp.zeros((S, V), jnp.float32).at[rows, output].add(1.0, mode="drop")
    generated = counts > 0
    seen = jnp.zeros((S, V), bool).at[rows, t.tokens].set(True, mode="drop")
    rep = t.repetition_penalty[:, None]
    x = jnp.where(seen, jnp.where(logits > 0, logits / rep, logits * rep), logits)
    x = (x - t.frequency_penalty[:, None] * counts
         - t.presence_penalty[:, None] * generated.astype(jnp.float32))
    # An extreme penalty (e.g. 1e-30, which is > 0 and so valid) overflows to inf;
    # inf - inf would make the softmax NaN, so keep every logit finite.
    big = jnp.finfo(x.dtype).max
    return jnp.clip(x, -big, big)


def mask_words(vocab_size: int) -> int:
    """32-bit words per row of a packed token mask."""
    return -(-vocab_size // 32)


def pack_token_mask(allowed: np.ndarray) -> np.ndarray:
    """Packed int32 [..., mask_words(V)] mask of a bool [..., V] array: token t is bit
    t % 32 (least significant first) of word t // 32."""
    allowed = np.asarray(allowed, bool)
    V = allowed.shape[-1]
    padded = np.zeros(allowed.shape[:-1] + (mask_words(V) * 32,), bool)
    padded[..., :V] = allowed
    bits = np.packbits(padded.reshape(padded.shape[:-1] + (-1, 32)), axis=-1, bitorder="little")
    return bits.view(np.uint32).view(np.int32).reshape(padded.shape[:-1] + (-1,))


def apply_token_mask(x: jax.Array, mask: jax.Array) -> jax.Array:
    """``x`` [S, V] with the tokens ``mask`` (packed, see `pack_token_mask`) disallows
    set to -inf. All-ones rows are unchanged bit for bit, and a batch of only such
    rows skips the unpacking. A row that allows no token at all is left unmasked (it
    must not turn into NaNs; the host ends such a request, its grammar being stuck)."""

    def masked(x: jax.Array) -> jax.Array:
        S, V = x.shape
        shifts = jnp.arange(32, dtype=jnp.int32)
        allowed = ((mask[:, :, None] >> shifts) & 1).reshape(S, -1)[:, :V] == 1
        allowed |= ~jnp.any(allowed, -1, keepdims=True)
        return jnp.where(allowed, x, -jnp.inf)

    return jax.lax.cond(jnp.all(mask == ALL_ALLOWED), lambda x: x, masked, x)


def apply_filters(x: jax.Array, t: SamplingTensors) -> jax.Array:
    """Temperature-scaled logits with tokens outside top-k, top-p and min-p set to -inf.

    Rows that switch a filter off (top_k 0, top_p 1, min_p 0) are unchanged by it.
    """
    floor = jax.lax.cond(jnp.any(t.top_k > 0) | jnp.any(t.top_p < 1.0), _nucleus_floor,
                         lambda x, t: jnp.full(x.shape[:1], -jnp.inf), x, t)
    # min-p is relative to the most likely token, whose unnormalized prob is exp(0) = 1.
    probs = jnp.exp(x - jnp.max(x, -1, keepdims=True))
    keep = (x >= floor[:, None]) & (probs >= t.min_p[:, None])
    return jnp.where(keep, x, -jnp.inf)


def _nucleus_floor(x: jax.Array, t: SamplingTensors) -> jax.Array:
    """Per row, the smallest logit that top-k and then top-p keep.

    Each cut-off is the largest value c meeting a monotone test (top-k: at least k
    logits >= c; top-p: the mass of logits >= c reaches p). Usually it is among the
    `_CANDIDATES` largest logits and is read off them (the k-th; the first whose
    running mass reaches p); rows where it is not bisect the whole float range.
    Which way a row goes depends on that row alone, so its result does not depend
    on its batch.
    """
    V = x.shape[-1]
    # The barrier keeps XLA from folding the reads of the candidates into the sort
    # behind top_k, which would stop it using its fast partial top-k on CPU.
    cands = jax.lax.optimization_barrier(jax.lax.top_k(x, min(_CANDIDATES, V))[0])  # descending
    K = cands.shape[-1]

    k = jnp.minimum(t.top_k, V)
    on = (k > 0) & (k < V)
    kth = jnp.take_along_axis(cands, jnp.clip(k - 1, 0, K - 1)[:, None], -1)[:, 0]
    lo = jnp.where(on & (k <= K), kth, -jnp.inf)
    k_floor = _bisect(lambda c: jnp.sum(x >= c[:, None], -1) >= k, lo,
                      jnp.where(on & (k > K), cands[:, -1], lo))

    def top_k_probs(v: jax.Array) -> jax.Array:  # unnormalized, relative to the max logit
        return jnp.where(v >= k_floor[:, None], jnp.exp(v - cands[:, :1]), 0.0)

    probs = top_k_probs(x)
    target = t.top_p * jnp.sum(probs, -1)
    reached = jnp.cumsum(top_k_probs(cands), -1) >= target[:, None]
    cand = jnp.take_along_axis(cands, jnp.argmax(reached, -1)[:, None], -1)[:, 0]
    on, found = t.top_p < 1.0, jnp.any(reached, -1)
    lo = jnp.where(on & found, cand, k_floor)
    return _bisect(lambda c: jnp.sum(jnp.where(x >= c[:, None], probs, 0.0), -1) >= target,
                   lo, jnp.where(on & ~found, cands[:, -1], lo))


def _bisect(pred: Callable[[jax.Array], jax.Array], lo: jax.Array, hi: jax.Array) -> jax.Array:
    """Per row, the largest float c in [lo, hi] with ``pred(c)``, given pred(lo) holds
    and pred is monotone. Bisects the order-preserving uint32 image of the floats,
    so it is exact in at most 32 passes; rows with lo == hi cost nothing."""

    def body(bounds):
        lo, hi = bounds
        mid = hi - (hi - lo) // 2  # upper middle, so the loop always moves
        ok = pred(_from_key(mid))
        return jnp.where(ok, mid, lo), jnp.where(ok, hi, mid - 1)

    keys = jax.lax.while_loop(lambda b: jnp.any(b[0] < b[1]), body, (_to_key(lo), _to_key(hi)))
    return _from_key(keys[0])


def _to_key(v: jax.Array) -> jax.Array:
    """uint32 keys that order like the (non-NaN) float32 values."""
    bits = jax.lax.bitcast_convert_type(v, jnp.uint32)
    return jnp.where(bits >> 31 == 1, ~bits, bits | jnp.uint32(0x80000000))


def _from_key(key: jax.Array) -> jax.Array:
    bits = jnp.where(key >> 31 == 1, key & jnp.uint32(0x7FFFFFFF), ~key)
    return jax.lax.bitcast_convert_type(bits, jnp.float32)


def _argmax(x: jax.Array) -> jax.Array:
    """First index of the row maximum (two plain reductions; faster than jnp.argmax on CPU)."""
    idx = jnp.arange(x.shape[-1], dtype=jnp.int32)
    return jnp.min(jnp.where(x == jnp.max(x, -1, keepdims=True), idx, x.shape[-1]), -1)


def _row_keys(seeds: jax.Array, steps: jax.Array) -> jax.Array:
    return jax.vmap(lambda s, i: jax.random.fold_in(jax.random.key(s), i))(seeds, steps)


def _draw(x: jax.Array, keys: jax.Array) -> jax.Array:
    """A token per row from softmax(x): a block of `_BLOCK` tokens by its mass, then a
    token inside it, each by inverse CDF from its own uniform. -inf tokens are never drawn."""
    S, V = x.shape
    blocks = -(-V // _BLOCK)
    p = jnp.exp(x - jnp.max(x, -1, keepdims=True))
    p = jnp.pad(p, ((0, 0), (0, blocks * _BLOCK - V))).reshape(S, blocks, _BLOCK)
    u = jax.vmap(lambda k: jax.random.uniform(k, (2,)))(keys)
    block = _inverse_cdf(jnp.sum(p, -1), u[:, 0])
    inside = jnp.take_along_axis(p, block[:, None, None], axis=1)[:, 0]
    return block * _BLOCK + _inverse_cdf(inside, u[:, 1])


def _inverse_cdf(w: jax.Array, u: jax.Array) -> jax.Array:
    """Index i with probability w[i] / sum(w) per row, for u uniform in [0, 1).

    Only positive weights are eligible: XLA's parallel cumsum need not be exactly
    monotone, and rounding can put ``u * total`` at the total itself, in which case
    the last positive weight is taken.
    """
    n = w.shape[-1]
    idx = jnp.arange(n, dtype=jnp.int32)
    c = jnp.cumsum(w, -1)
    hit = (c > u[:, None] * c[:, -1:]) & (w > 0)
    first = jnp.min(jnp.where(hit, idx, n), -1)
    last = jnp.max(jnp.where(w > 0, idx, -1), -1)
    return jnp.where(first < n, first, last)


def token_logprobs(logits: jax.Array, token_ids: jax.Array) -> SamplerOutput:
    """``token_ids`` with their log-probs under the raw distribution of ``logits``
    and its `MAX_LOGPROBS` most likely tokens (also prompt log-probs, in the runner)."""
    lse = jax.nn.logsumexp(logits, -1)
    chosen = jnp.take_along_axis(logits, token_ids[:, None], -1)[:, 0] - lse
    top_values, top_ids = jax.lax.top_k(logits, _num_top(logits))
    return SamplerOutput(token_ids, chosen, top_ids.astype(jnp.int32),
                         top_values - lse[:, None])


def _without_logprobs(logits: jax.Array, token_ids: jax.Array) -> SamplerOutput:
    S, n = logits.shape[0], _num_top(logits)
    return SamplerOutput(token_ids, jnp.zeros(S, jnp.float32), jnp.zeros((S, n), jnp.int32),
                         jnp.zeros((S, n), jnp.float32))


def _num_top(logits: jax.Array) -> int:
    return min(MAX_LOGPROBS, logits.shape[-1])
