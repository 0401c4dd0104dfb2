"""Step shapes of the model runner (issue 21): prompt chunks attend in pieces of
`QUERY_PIECE` query rows on the padded-query (pure-JAX) paths, with the same
logits as whole chunks, a step with no decode rows carries no decode group, and
with speculative decoding on, steps with and without drafted rows share shapes."""

from __future__ import annotations

import dataclasses
import re

import jax
import numpy as np
import pytest

from sluice.runtime import SamplingParams, load_model
from sluice.runtime.attention import QUERY_PIECE
from sluice.runtime.intake import Intake
from sluice.runtime.config import FULL, SLIDING
from sluice.runtime.loader import Model
from sluice.runtime.model import init_params
from sluice.runtime.model_runner import ModelRunner, StepRow, _forward_logits

BLOCK = 16


@pytest.fixture(scope="module")
def tiny():
    return load_model("tiny", dtype="float32")


def _runner(model, **kw) -> ModelRunner:
    return ModelRunner(model, 64, BLOCK, max_num_seqs=8, max_num_batched_tokens=128,
                       max_prefill_seqs=4, max_model_len=256, backend="chunked", **kw)


def _rows(model, lengths: list[int]) -> list[StepRow]:
    intake = Intake(model, 256, seed=0)
    rng = np.random.default_rng(0)
    rows, next_block = [], 0
    for i, n in enumerate(lengths):
        req = intake.prepare(f"r{i}", {"prompt_token_ids": rng.integers(1, 200, n).tolist()},
                             SamplingParams(temperature=0)).requests[0]
        blocks = -(-n // BLOCK)
        rows.append(StepRow(req, n, list(range(next_block, next_block + blocks))))
        next_block += blocks
    return rows


def test_prompt_chunks_attend_in_pieces_with_the_same_logits(tiny):
    lengths = [70, 40, 10]  # 120 tokens: the 128-token bucket
    pieced = _runner(tiny)
    (meta,) = pieced._build([], _rows(tiny, lengths))[2]  # no decode rows: no decode group
    assert meta.max_query_len == QUERY_PIECE
    assert int(meta.num_seqs) == sum(-(-n // QUERY_PIECE) for n in lengths)
    qsl, seq_lens = np.asarray(meta.query_start_loc), np.asarray(meta.seq_lens)
    assert np.diff(qsl).max() <= QUERY_PIECE and qsl[int(meta.num_seqs)] == sum(lengths)
    # every chunk's pieces end at their last token: causal masking as for the whole chunk
    assert seq_lens[:6].tolist() == [32, 64, 70, 32, 40, 10]
    # attention's query slots: sequences x max query rows, vs 4 chunks x 128 rows before
    assert meta.seq_lens.shape[0] * meta.max_query_len <= 128 + 4 * QUERY_PIECE

    whole = _runner(tiny)
    whole.query_piece = None  # as natively ragged kernels get them: chunks whole
    logits = []
    for runner in (pieced, whole):
        ids, pos, metas, sample_rows = runner._build([], _rows(tiny, lengths))
        out, runner.kv_cache = _forward_logits(
            tiny.params, runner.kv_cache, ids, pos, metas, sample_rows,
            cfg=tiny.config, backend=runner.backend)
        logits.append(np.asarray(out)[:len(lengths)])
    assert whole._build([], _rows(tiny, lengths))[2][0].max_query_len == 128
    np.testing.assert_allclose(logits[0], logits[1], rtol=1e-5, atol=1e-5)


def test_shapes_are_bounded_and_cover_steps(tiny):
    runner = _runner(tiny)
    shapes = runner.shapes()
    # decode buckets 1..8 (4); prompt steps: with or without the decode group x 4 token buckets
    assert len(shapes) == 4 + 2 * 4 == len(set(shapes))
    rows = _rows(tiny, [100, 20])
    assert runner.shape_for([], rows) in shapes
    assert runner.shape_for([], rows).decode_seqs == 0
    assert runner.shape_for(rows[1:], rows[:1]).decode_seqs == 8


def test_drafted_and_plain_steps_share_shapes(tiny):
    """With speculative decoding on, a mixed shape has room for every chunk's draft
    sample rows, so a step with a drafted row and one with a plain prompt chunk of
    as many tokens run one program: as many shapes as with it off (the issue-21
    fix: warm-up compiled each mixed shape twice)."""
    k = 3
    plain, spec = _runner(tiny), _runner(tiny, num_speculative_tokens=k)
    assert len(spec.shapes()) == len(plain.shapes()) == len(set(spec.shapes()))
    chunk = _rows(tiny, [1 + k])  # a prompt chunk of the drafted row's tokens
    drafted = _rows(tiny, [17])[0]
    drafted.request.num_computed_tokens = 16  # decode-ready: its last token, then 3 drafted
    drafted.num_new_tokens, drafted.draft, drafted.block_table = 1 + k, [1, 2, 3], [0, 1]
    decode = _rows(tiny, [5])
    decode[0].request.num_computed_tokens, decode[0].num_new_tokens = 4, 1
    shape = spec.shape_for(decode, chunk)
    assert spec.shape_for(decode, [drafted]) == shape and shape in spec.shapes()
    assert shape.sample_rows == shape.decode_seqs + spec.max_prefill_seqs * (1 + k)
    # the drafted row's positions are all sampled (its draft rows after the last rows)
    sample_rows = np.asarray(spec._build(decode, [drafted])[3])
    assert sample_rows[:2 + k].tolist() == [0, shape.decode_seqs + k, *range(
        shape.decode_seqs, shape.decode_seqs + k)]


def _copied_weights(model, runner: ModelRunner) -> list[str]:
    """Instructions of the compiled decode program that copy or transpose an array
    as large as a weight: any is a whole weight moved on every step."""
    sizes = {int(np.prod(a.shape)) for a in jax.tree_util.tree_leaves(model.params)
             if a.ndim >= 2}
    text = runner._lower_step(runner.shapes()[0], False).compile().as_text()
    found = []
    for line in text.splitlines():
        m = re.search(r"= \w+\[([\d,]*)\]\S* (copy|transpose)\(", line)
        if m and m.group(1) and int(np.prod([int(d) for d in m.group(1).split(",")])) in sizes:
            found.append(line.strip())
    return found


@pytest.mark.parametrize("kind", ["llama", "tied_sliding_period"])
def test_step_program_moves_no_weights(tiny, kind):
    # Scanning layers over a reshaped [n, period, ...] view of the stacked weights
    # made XLA copy every weight into the loop state each step, and a tied lm-head
    # computed as embed.T materialized the transposed table: a batch-1 decode step
    # of SmolLM2-135M took 143 ms instead of 40.
    model = tiny
    if kind == "tied_sliding_period":
        cfg = dataclasses.replace(tiny.config, tie_word_embeddings=True, sliding_window=8,
                                  layer_types=(SLIDING, FULL, SLIDING, FULL))
        params = init_params(cfg, seed=0)
        model = Model("tiny-tied", cfg, params, tiny.tokenizer, tiny.dtype, tiny.eos_token_ids)
    assert _copied_weights(model, _runner(model)) == []
