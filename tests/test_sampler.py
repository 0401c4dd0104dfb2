"""SamplingParams validation and the device sampler against numpy references.

Every random draw uses fixed seeds, so the statistical checks are deterministic.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sluice.runtime.sampler import (ALL_ALLOWED, SamplingTensors, apply_filters, apply_penalties,
                                    mask_words, pack_token_mask, penalty_width, sample)
from sluice.runtime.sampling_params import MAX_LOGPROBS, SamplingParams

V = 300  # more than one 256-token block of the draw, more than the 128 top-k candidates

_sample = jax.jit(sample)
_filters = jax.jit(apply_filters)
_penalties = jax.jit(apply_penalties)
WIDTH = 64  # tokens of prompt and output the tests' penalty rows may hold


def run(logits: np.ndarray, rows: list[tuple], pad_rows: int = 8,
        allowed: dict[int, np.ndarray] | None = None):
    """Sample ``rows`` (build tuples) over ``logits``, padded to at least ``pad_rows``
    rows (few shapes, few compiles); ``allowed``: bool [V] masks by row (others are
    unconstrained). Returns numpy outputs for ``rows``."""
    S = max(pad_rows, len(rows))
    logits = np.vstack([logits, np.zeros((S - len(logits), logits.shape[1]), np.float32)])
    t = SamplingTensors.build(rows, S, logits.shape[1], WIDTH)
    mask = np.full((S, mask_words(logits.shape[1])), ALL_ALLOWED, np.int32)
    for row, keep in (allowed or {}).items():
        mask[row] = pack_token_mask(keep)
    out = _sample(jnp.asarray(logits, jnp.float32), t, jnp.asarray(mask))
    return jax.tree_util.tree_map(lambda a: np.asarray(a)[:len(rows)], out)


def random_logits(rows: int, seed: int, scale: float = 3.0) -> np.ndarray:
    return (scale * np.random.default_rng(seed).standard_normal((rows, V))).astype(np.float32)


# --- SamplingParams -----------------------------------------------------------------

@pytest.mark.parametrize("field,value", [
    ("temperature", -1), ("temperature", "1"), ("temperature", True), ("temperature", float("nan")),
    ("temperature", float("inf")), ("top_p", 0), ("top_p", 1.5), ("top_p", None),
    ("top_k", -2), ("top_k", 2.0), ("top_k", True), ("min_p", -0.1), ("min_p", 1.01),
    ("repetition_penalty", 0), ("repetition_penalty", -1.0), ("presence_penalty", 2.5),
    ("presence_penalty", -2.01), ("frequency_penalty", 3), ("max_tokens", 0),
    ("max_tokens", 1.0), ("n", 0), ("n", "2"), ("seed", 1.5), ("seed", False),
    ("logprobs", -1), ("logprobs", 21), ("logprobs", 1.0), ("stop", ""), ("stop", ["a", ""]),
    ("stop", [1]), ("stop", 5), ("stop_token_ids", [-1]), ("stop_token_ids", ["a"]),
    ("stop_token_ids", [True]), ("stop_token_ids", 3), ("ignore_eos", 1),
    ("include_stop_str_in_output", "no"), ("skip_special_tokens", None),
])
def test_invalid_params_name_the_field(field, value):
    with pytest.raises(ValueError, match=f"^{field}: "):
        SamplingParams(**{field: value})


def test_params_normalization():
    p = SamplingParams(temperature=1, stop="END", top_k=-1, seed=-3, logprobs=0)
    assert p.temperature == 1.0 and isinstance(p.temperature, float)
    assert p.stop == ["END"] and p.stop_token_ids == []
    assert SamplingParams(stop=("a", "b"), stop_token_ids=(2,)).stop == ["a", "b"]
    assert SamplingParams().stop == [] and not SamplingParams().is_greedy
    assert SamplingParams(temperature=0).is_greedy
    assert SamplingParams(temperature=5e-6).is_greedy
    with pytest.raises(ValueError, match=r"^temperature: must be in \[0, 3.40282e\+38\], got -1$"):
        SamplingParams(temperature=-1)


# --- SamplingTensors.build -----------------------------------------------------------

def test_build_pads_rows_and_fills_tokens_of_penalized_rows():
    rows = [(SamplingParams(top_k=-1, temperature=0.5, logprobs=0), 2**32 + 7, 3, [1, 2, 3], []),
            (SamplingParams(repetition_penalty=1.5), -1, 0, list(range(17)), [4] * 5)]
    t = SamplingTensors.build(rows, 4, V, 32)
    assert t.tokens.shape == (4, penalty_width(32))  # fixed width, whatever the token counts
    tokens = np.asarray(t.tokens)
    np.testing.assert_array_equal(tokens[1, :23], list(range(17)) + [4] * 5 + [V])
    assert (tokens[[0, 2, 3]] == V).all()  # no penalty: nothing to fill
    np.testing.assert_array_equal(np.asarray(t.prompt_lens), [3, 17, 0, 0])
    np.testing.assert_array_equal(np.asarray(t.top_k), [0, 0, 0, 0])
    np.testing.assert_array_equal(np.asarray(t.seeds), [7, 2**32 - 1, 0, 0])
    np.testing.assert_array_equal(np.asarray(t.temperature), [0.5, 1.0, 0.0, 0.0])
    np.testing.assert_array_equal(np.asarray(t.want_logprobs), [True, False, False, False])
    assert t.seeds.dtype == jnp.uint32 and t.steps.dtype == jnp.int32
    lean = SamplingTensors.build(rows[:1], 2, V, 32)
    assert lean.tokens.shape == (2, penalty_width(32))
    assert lean.tokens is SamplingTensors.build(rows[:1], 2, V, 32).tokens  # cached, no transfer
    with pytest.raises(ValueError, match="^pad_rows: "):
        SamplingTensors.build(rows, 1, V, 32)
    with pytest.raises(ValueError, match="^token_width: row 1 "):
        SamplingTensors.build(rows, 2, V, 21)


def test_penalty_width_is_a_power_of_two_bucket_shared_by_nearby_lengths():
    """Engines with different max_model_len share sampler programs within a bucket."""
    assert [penalty_width(w) for w in (1, 32, 500, 512, 513, 2048, 3000)] == [
        512, 512, 512, 512, 1024, 2048, 4096]
    assert SamplingTensors.build([], 2, V, 100).tokens.shape == (2, 512)


# --- greedy and filters ---------------------------------------------------------------

def test_greedy_is_argmax_and_all_greedy_path_agrees():
    logits = random_logits(6, seed=1)
    logits[2, [10, 20]] = logits[2].max() + 1  # a tie: the first index wins
    rows = [(SamplingParams(temperature=0), i, 0, [], []) for i in range(6)]
    expected = np.argmax(logits, -1)
    np.testing.assert_array_equal(run(logits, rows).token_ids, expected)
    # with a sampled row in the batch, the greedy rows take the same tokens
    sampled = (SamplingParams(temperature=1.0, top_k=5), 0, 0, [], [])
    np.testing.assert_array_equal(run(logits, rows + [sampled]).token_ids[:6], expected)


@pytest.mark.parametrize("params", [SamplingParams(top_k=1, temperature=2.0),
                                    SamplingParams(top_p=1e-6, temperature=2.0),
                                    SamplingParams(min_p=1.0, temperature=2.0)])
def test_degenerate_filters_equal_greedy(params):
    logits = random_logits(8, seed=2, scale=0.5)  # flat: sampling would rarely hit argmax
    out = run(logits, [(params, i, i, [], []) for i in range(8)])
    np.testing.assert_array_equal(out.token_ids, np.argmax(logits, -1))


def reference_keep(x: np.ndarray, top_k: int, top_p: float, min_p: float) -> np.ndarray:
    """vLLM-style sort-based filtering of one row of scaled logits, in float64."""
    x = x.astype(np.float64)
    keep = np.ones_like(x, bool)
    if 0 < top_k < len(x):
        keep &= x >= np.sort(x)[::-1][top_k - 1]
    p = np.where(keep, np.exp(x - x.max()), 0.0)
    if top_p < 1:
        order = np.argsort(-p, kind="stable")
        j = np.argmax(np.cumsum(p[order]) >= top_p * p.sum())
        keep &= p >= p[order[j]]
    return keep & (p >= min_p)


def test_filters_match_sort_based_reference():
    rng = np.random.default_rng(3)
    settings = [(0, 1.0, 0.0), (5, 1.0, 0.0), (128, 1.0, 0.0), (200, 1.0, 0.0), (V, 1.0, 0.0),
                (0, 0.5, 0.0), (0, 0.97, 0.0), (40, 0.9, 0.0), (250, 0.99, 0.0), (0, 1.0, 0.2),
                (0, 1.0, 0.01), (20, 0.8, 0.05), (1, 0.5, 0.5), (0, 0.999, 0.0)]
    rows, logits = [], []
    for i, (k, p, m) in enumerate(settings * 3):
        scale = (0.2, 1.0, 4.0)[i // len(settings)]  # flat rows need the full-range search
        x = scale * rng.standard_normal(V)
        x[rng.integers(V, size=4)] = x.max()  # ties at the top
        logits.append(x)
        rows.append((SamplingParams(top_k=k, top_p=p, min_p=m), i, 0, [], []))
    logits = np.asarray(logits, np.float32)
    t = SamplingTensors.build(rows, len(rows), V, WIDTH)
    kept = np.asarray(_filters(jnp.asarray(logits), t)) > -np.inf
    for row, (params, *_) in enumerate(rows):
        expected = reference_keep(logits[row], params.top_k, params.top_p, params.min_p)
        np.testing.assert_array_equal(kept[row], expected, err_msg=f"row {row}: {params}")


# --- penalties --------------------------------------------------------------------------

def reference_penalties(x: np.ndarray, p: SamplingParams, prompt: list[int],
                        output: list[int]) -> np.ndarray:
    x = x.astype(np.float64).copy()
    seen = sorted(set(prompt) | set(output))
    x[seen] = np.where(x[seen] > 0, x[seen] / p.repetition_penalty,
                       x[seen] * p.repetition_penalty)
    counts = np.bincount(output, minlength=len(x))
    return x - p.frequency_penalty * counts - p.presence_penalty * (counts > 0)


def test_penalties_match_reference_and_ignore_padding():
    rng = np.random.default_rng(4)
    logits = random_logits(5, seed=5)
    rows = []
    for i, (rep, pres, freq) in enumerate([(1.3, 0.0, 0.0), (0.7, 0.5, 0.0), (1.0, -1.0, 0.4),
                                           (2.0, 1.5, -0.5), (1.0, 0.0, 0.0)]):
        prompt = rng.integers(1, V - 1, size=3 + 9 * i).tolist()
        output = rng.integers(1, V - 1, size=2 * i).tolist() + [prompt[0]] * 2
        rows.append((SamplingParams(repetition_penalty=rep, presence_penalty=pres,
                                    frequency_penalty=freq), i, len(output), prompt, output))
    t = SamplingTensors.build(rows, 6, V, WIDTH)
    got = np.asarray(_penalties(jnp.asarray(np.vstack([logits, logits[:1]])), t))
    for i, (p, _, _, prompt, output) in enumerate(rows):
        np.testing.assert_allclose(got[i], reference_penalties(logits[i], p, prompt, output),
                                   rtol=1e-6, atol=1e-6)
    # Padding (id V) must not reach the first or last real token, which no row uses.
    np.testing.assert_array_equal(got[:5, [0, V - 1]], logits[:, [0, V - 1]])
    np.testing.assert_array_equal(got[4], logits[4])  # neutral settings: bit-identical


def test_penalties_steer_greedy_choice():
    logits = np.zeros((1, V), np.float32)
    logits[0, 7], logits[0, 9] = 2.0, 1.5
    rows = [(SamplingParams(temperature=0, repetition_penalty=2.0), 0, 1, [7], [])]
    assert run(logits, rows).token_ids[0] == 9  # 2.0 / 2 < 1.5


@pytest.mark.parametrize("penalty", [3.3e-274, 1e-30, 1e30])
def test_extreme_repetition_penalty_still_samples_valid_tokens(penalty):
    """Valid (> 0) penalties that overflow float32 once applied: sampled tokens stay
    in the vocabulary (a CI fuzz run found inf - inf making the draw garbage)."""
    logits = random_logits(4, seed=11)
    rows = [(SamplingParams(temperature=t, repetition_penalty=penalty, top_p=p), 5, 0,
             [3, 7, 200], [7]) for t, p in ((1.0, 1.0), (0.7, 0.9), (0.0, 1.0), (1.5, 0.5))]
    out = run(logits, rows)
    assert ((out.token_ids >= 0) & (out.token_ids < V)).all(), out.token_ids
    assert np.isfinite(out.logprobs).all()
    if penalty < 1:  # dividing a seen positive logit by ~0 makes it the certain choice
        seen_positive = [t for t in (3, 7, 200) if logits[0, t] > 0]
        if seen_positive:
            assert out.token_ids[0] in seen_positive


# --- seeded randomness -----------------------------------------------------------------

def test_seeded_sampling_is_reproducible_and_seed_dependent():
    logits = random_logits(1, seed=6, scale=0.5).repeat(8, 0)
    rows = [(SamplingParams(temperature=1.0), 1234, step, [], []) for step in range(8)]
    a, b = run(logits, rows).token_ids, run(logits, rows).token_ids
    np.testing.assert_array_equal(a, b)
    assert len(set(a.tolist())) > 4  # steps differ
    other = [(p, 99, step, ids, out) for p, _, step, ids, out in rows]
    assert (run(logits, other).token_ids != a).sum() > 4  # so do seeds


@pytest.mark.parametrize("target", [
    SamplingParams(temperature=0.8),
    SamplingParams(temperature=1.3, top_k=50, top_p=0.9, min_p=0.01),
    SamplingParams(temperature=1.0, top_p=0.995),  # nucleus beyond the top-k candidates
    SamplingParams(temperature=0.9, repetition_penalty=1.2, frequency_penalty=0.3),
])
def test_row_token_is_independent_of_batch_and_position(target):
    others = [SamplingParams(temperature=0), SamplingParams(top_k=3),
              SamplingParams(top_p=0.5, presence_penalty=1.0), SamplingParams(min_p=0.2),
              SamplingParams(repetition_penalty=1.5), SamplingParams(temperature=0.3),
              SamplingParams(top_k=200, frequency_penalty=-1.0)]
    prompt, output = [5, 6, 7, 5], [8, 9]
    batch_logits = random_logits(8, seed=7, scale=0.7)
    for step in range(6):
        me = (target, 42, step, prompt, output)
        alone = run(batch_logits[5:6], [me], pad_rows=1).token_ids[0]
        rows = [(p, 1000 + i, step, [i + 1] * 3, [i + 2]) for i, p in enumerate(others)]
        rows.insert(5, me)  # the batch needs penalties and filters; alone, ``target`` may not
        assert run(batch_logits, rows).token_ids[5] == alone, f"step {step}"


def chi_square(counts: np.ndarray, probs: np.ndarray) -> float:
    expected = probs * counts.sum()
    return float(((counts - expected) ** 2 / expected).sum())


def draw_counts(logits: np.ndarray, params: SamplingParams, n: int) -> np.ndarray:
    rows = [(params, 2024, step, [], []) for step in range(n)]
    tokens = run(np.repeat(logits[None], n, 0), rows).token_ids
    return np.bincount(tokens, minlength=logits.shape[0])


def test_empirical_distribution_matches_softmax():
    logits = np.array([1.0, 0.5, 0.0, -0.5, 2.0, 1.5, -3.0, 0.2], np.float32)
    counts = draw_counts(logits, SamplingParams(temperature=0.7), 8000)
    probs = np.exp(logits / 0.7) / np.exp(logits / 0.7).sum()
    assert chi_square(counts, probs) < 30  # 7 degrees of freedom: p ~ 1e-4


def test_empirical_distribution_across_blocks():
    logits = np.full(600, -np.inf, np.float32)  # three 256-token blocks, the last partial
    live = np.array([0, 5, 255, 256, 300, 511, 512, 599])
    logits[live] = [0.3, -0.2, 1.0, 0.0, 0.7, -1.0, 0.5, 0.1]
    counts = draw_counts(logits, SamplingParams(), 8000)
    assert counts[np.setdiff1d(np.arange(600), live)].sum() == 0
    probs = np.exp(logits[live]) / np.exp(logits[live]).sum()
    assert chi_square(counts[live], probs) < 30


def test_empirical_distribution_after_top_k_top_p():
    logits = np.array([2.0, 1.6, 1.2, 0.8, 0.4, 0.0, -0.4, -0.8], np.float32)
    counts = draw_counts(logits, SamplingParams(top_k=5, top_p=0.85), 8000)
    p = np.exp(logits[:5]) / np.exp(logits[:5]).sum()  # top-k renormalized
    keep = np.cumsum(p) - p < 0.85  # smallest prefix reaching 0.85
    assert keep.sum() == 4 and counts[~np.r_[keep, [False] * 3]].sum() == 0
    assert chi_square(counts[:4], p[:4] / p[:4].sum()) < 25  # 3 degrees of freedom


# --- logprobs -----------------------------------------------------------------------------

def test_logprobs_are_raw_log_softmax_with_sorted_top_ids():
    logits = random_logits(4, seed=8)
    rows = [(SamplingParams(temperature=0, logprobs=5), 0, 0, [], []),
            (SamplingParams(temperature=0.5, top_k=10, repetition_penalty=1.5), 1, 0, [3], []),
            (SamplingParams(temperature=1.5, presence_penalty=2.0), 2, 1, [], [4]),
            (SamplingParams(), 3, 0, [], [])]
    out = run(logits, rows)
    x = logits.astype(np.float64)
    log_softmax = x - x.max(-1, keepdims=True)
    log_softmax -= np.log(np.exp(log_softmax).sum(-1, keepdims=True))
    np.testing.assert_allclose(out.logprobs, log_softmax[np.arange(4), out.token_ids], atol=1e-5)
    assert out.top_ids.shape == (4, MAX_LOGPROBS)  # fixed: the engine keeps what a row asked
    np.testing.assert_array_equal(out.top_ids, np.argsort(-logits, -1)[:, :MAX_LOGPROBS])
    np.testing.assert_allclose(out.top_logprobs,
                               np.take_along_axis(log_softmax, out.top_ids, -1), atol=1e-5)
    assert (np.diff(out.top_logprobs, axis=-1) <= 0).all()
    assert out.top_ids.dtype == np.int32
    plain = [(dataclasses.replace(r[0], logprobs=None),) + r[1:] for r in rows]
    without = run(logits, plain)  # no row asks: skipped, zeros, same tokens
    np.testing.assert_array_equal(without.token_ids, out.token_ids)
    assert not without.logprobs.any() and not without.top_ids.any()


# --- token masks (structured outputs) ------------------------------------------------------

def test_pack_token_mask_bit_order():
    allowed = np.zeros((2, V), bool)
    allowed[0, [0, 31, 32, 299]] = True
    allowed[1] = True
    packed = pack_token_mask(allowed)
    assert packed.dtype == np.int32 and packed.shape == (2, mask_words(V)) == (2, 10)
    words = packed.view(np.uint32)
    assert words[0, 0] == 1 | 1 << 31 and words[0, 1] == 1 and words[0, 9] == 1 << (299 - 288)
    assert (words[0, 2:9] == 0).all()
    # token t is bit t % 32 of word t // 32; bits past V stay clear
    for t in range(V):
        assert bool(words[1, t // 32] >> (t % 32) & 1)
    assert words[1, 9] == (1 << (V - 288)) - 1


MASKED_PARAMS = [SamplingParams(temperature=0), SamplingParams(temperature=0.9),
                 SamplingParams(temperature=1.2, top_k=40, top_p=0.9, min_p=0.02),
                 SamplingParams(temperature=0, repetition_penalty=1.5, presence_penalty=1.0),
                 SamplingParams(temperature=1.0, frequency_penalty=-1.5, top_k=3),
                 SamplingParams(temperature=2.0, top_p=0.5)]


@pytest.mark.parametrize("params", MASKED_PARAMS)
def test_masked_rows_take_only_allowed_tokens_and_others_are_unchanged(params):
    """Rows 1 and 4 are masked (row 4 allows tokens outside the 128 largest
    logits and in the last, partial mask word); the other rows give bit-identical
    outputs to the same batch without masks, whatever the masked rows' settings."""
    rng = np.random.default_rng(12)
    logits = random_logits(6, seed=13)
    prompt, output = [5, 6, 7, 250], [8, 9, 9]
    allowed = {1: np.isin(np.arange(V), rng.choice(V, 5, replace=False)),
               4: np.isin(np.arange(V), np.argsort(logits[4])[:3].tolist() + [299])}
    others = [SamplingParams(temperature=0, logprobs=3), SamplingParams(top_k=5),
              SamplingParams(top_p=0.8), SamplingParams(repetition_penalty=1.3)]
    for step in range(6):
        rows = [(p, 7 + i, step, prompt, output) for i, p in enumerate(others)]
        rows.insert(1, (params, 100, step, prompt, output))
        rows.insert(4, (params, 200, step, prompt, output))
        plain = run(logits, rows)
        masked = run(logits, rows, allowed=allowed)
        for row, keep in allowed.items():
            assert keep[masked.token_ids[row]], (step, row, masked.token_ids[row])
        for row in (0, 2, 3, 5):
            for a, b in zip(jax.tree_util.tree_leaves(plain), jax.tree_util.tree_leaves(masked)):
                np.testing.assert_array_equal(a[row], b[row])


def test_masked_greedy_is_argmax_over_allowed_and_empty_mask_is_ignored():
    logits = random_logits(3, seed=14)
    allowed = {0: np.isin(np.arange(V), [3, 40, 299]), 1: np.zeros(V, bool)}
    rows = [(SamplingParams(temperature=0), i, 0, [], []) for i in range(3)]
    out = run(logits, rows, allowed=allowed)
    assert out.token_ids[0] == [3, 40, 299][int(np.argmax(logits[0, [3, 40, 299]]))]
    # a mask allowing nothing (a stuck grammar, ended by the host) must not give NaNs
    np.testing.assert_array_equal(out.token_ids[1:], np.argmax(logits[1:], -1))
    assert np.isfinite(out.logprobs).all()


def test_masked_sampling_follows_renormalized_distribution():
    logits = np.array([1.0, 0.5, 0.0, -0.5, 2.0, 1.5, -3.0, 0.2], np.float32)
    keep = np.array([1, 0, 1, 1, 0, 0, 1, 1], bool)
    n = 4000
    rows = [(SamplingParams(temperature=0.8), 77, step, [], []) for step in range(n)]
    tokens = run(np.repeat(logits[None], n, 0), rows,
                 allowed={i: keep for i in range(n)}).token_ids
    counts = np.bincount(tokens, minlength=len(logits))
    assert counts[~keep].sum() == 0
    probs = np.exp(logits[keep] / 0.8) / np.exp(logits[keep] / 0.8).sum()
    assert chi_square(counts[keep], probs) < 25  # 4 degrees of freedom


def test_runner_applies_token_masks_by_batch_index():
    """`ModelRunner.execute(token_masks=...)`: the hook runs once per step, its masks
    are keyed by position in the batch (not the runner's decode-first order), the
    masked rows take only allowed tokens and the others match a step without it."""
    from sluice.runtime import load_model
    from sluice.runtime.intake import Intake
    from sluice.runtime.model_runner import ModelRunner, StepRow

    model = load_model("tiny", dtype="float32")
    runner = ModelRunner(model, 16, 16, max_num_seqs=2, max_num_batched_tokens=16,
                         max_prefill_seqs=2, max_model_len=64)
    intake = Intake(model, 64, seed=0)
    params = [SamplingParams(temperature=0), SamplingParams(temperature=1.0, seed=3)]
    reqs = [intake.prepare(f"r{i}", {"prompt_token_ids": [1 + i, 2, 3]}, p).requests[0]
            for i, p in enumerate(params)]
    batch = [StepRow(r, 3, [i]) for i, r in enumerate(reqs)]
    vocab = model.config.vocab_size
    allowed = np.isin(np.arange(vocab), [11, 200, vocab - 1])
    calls = []

    def masks():
        calls.append(1)
        return {1: pack_token_mask(allowed)}

    plain = runner.execute(batch)
    for _ in range(3):
        masked = runner.execute(batch, token_masks=masks)
        assert allowed[masked[0][1]]
        for a, b in zip(plain, masked):
            np.testing.assert_array_equal(a[0], b[0])
    assert len(calls) == 3
    both = runner.execute(batch, token_masks=lambda: {0: pack_token_mask(allowed),
                                                       1: pack_token_mask(allowed)})
    assert allowed[both[0]].all()  # the greedy row too
    with pytest.raises(ValueError, match="^token_masks: "):
        runner.execute(batch, token_masks=lambda: {0: np.zeros(3, np.int32)})
